"""FSDP2 (fully_shard) + PMA on 2 gloo ranks: parity with one process, sharded state, DCP resume, errors.

One torchrun launch (tests/workers/fsdp_ddp_checks.py) runs every check and writes JSON; the tests
below assert on it. tests/test_ddp.py does the same for DDP with the same worker.
"""
from __future__ import annotations

import json
import os
from collections import defaultdict

import pytest

from pma_dist.comm import model
from tests.launching import run_ranks

WORLD = 2
PERIOD, STEPS = 3, 12  # as in the worker: four periods
PMA_CASES = ("adamw_pma_reference", "adamw_pma_paper_clipped", "lion_pma", "adamw_pma_fused")
GA_CASES = ("adamw_ga", "lion_ga")
PLAIN_CASES = ("adamw", "lion")  # no accumulation: an optimizer step on every micro-batch
# fp32: the sharded run sums the same per-sample gradients in another order (reduce-scatter vs one
# matmul); with eps = 1e-3 that stays at a few ulps (measured <= 5e-8 absolute). Lion is exact.
PARITY_ABS_TOL = 5e-7
# The worker's deep linear net: Linear(8,6) -> Linear(6,5) -> Linear(5,7) -> Linear(7,4), fp32, one
# fully_shard unit per layer. Its comm runs take COMM_STEPS micro-steps, PMA with gradient clipping.
LAYERS = ((8, 6), (6, 5), (5, 7), (7, 4))
COMM_STEPS = 2 * PERIOD
FP32 = 4


def launch_checks(backend: str, tmp_path_factory) -> list:
    out = tmp_path_factory.mktemp(f"{backend}_checks")
    run_ranks("fsdp_ddp_checks.py", ["--backend", backend, "--out", out], nproc=WORLD, timeout=240)
    results = [json.loads((out / f"results_rank{rank}.json").read_text()) for rank in range(WORLD)]
    for rank, result in enumerate(results):
        assert "crash" not in result, f"rank {rank} crashed:\n{result['crash']}"
        assert result["world_size"] == WORLD
    return results


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return launch_checks("fsdp", tmp_path_factory)


# ---------------------------------------------------------------- assertions shared with test_ddp.py
def assert_pma_parity(results):
    for rank, result in enumerate(results):
        for case in PMA_CASES:
            r = result["parity"][case]
            assert r["optimizer_steps"] == STEPS, (rank, case, r)  # PMA steps on every micro-batch
            assert r["group_step"] == STEPS, (rank, case, r)
            assert r["moved"] > 1e-2, f"{case}: the weights barely moved, parity would prove nothing: {r}"
            assert r["max_abs_diff"] <= PARITY_ABS_TOL, f"rank {rank} {case} drifted from one process: {r}"
        lion = result["parity"]["lion_pma"]
        assert lion["max_abs_diff"] <= PARITY_ABS_TOL
        clipped = result["parity"]["adamw_pma_paper_clipped"]
        assert clipped["largest_grad_norm"] > clipped["clip"] > 0, f"clipping never engaged: {clipped}"


def assert_ga_parity(results):
    for rank, result in enumerate(results):
        for case in GA_CASES:
            r = result["parity"][case]
            assert r["optimizer_steps"] == STEPS // PERIOD, (rank, case, r)  # one step per K micro-batches
            assert r["moved"] > 1e-2, (case, r)
            assert r["max_abs_diff"] <= PARITY_ABS_TOL, f"rank {rank} {case} drifted from one process: {r}"


def assert_plain_parity(results):
    for rank, result in enumerate(results):
        for case in PLAIN_CASES:
            r = result["parity"][case]
            assert r["optimizer_steps"] == STEPS, (rank, case, r)
            assert r["moved"] > 1e-2, (case, r)
            assert r["max_abs_diff"] <= PARITY_ABS_TOL, f"rank {rank} {case} drifted from one process: {r}"


def assert_resume(results):
    for rank, result in enumerate(results):
        r = result["resume"]
        assert r["save_at"] % PERIOD != 0, "the checkpoint must be taken mid-period"
        assert r["different_before_load"], "the fresh model already had the saved weights: load proves nothing"
        assert r["loaded"] == dict(micro_steps=r["save_at"], group_step=r["save_at"],
                                   tensor_steps=[float(r["save_at"])], scheduler_epoch=r["save_at"],
                                   lr_matches=True), (rank, r)
        assert r["steps_after_load"] >= PERIOD + 1  # crosses a large step
        assert r["bit_identical"], f"rank {rank}: resumed run differs by up to {r['max_abs_diff']}"


def assert_errors(results):
    for result in results:
        e = result["errors"]
        assert e["load_other_period"].startswith("ValueError:")
        assert "period=3" in e["load_other_period"] and "period=4" in e["load_other_period"]
        assert e["load_missing"].startswith("FileNotFoundError:") and "no_such_checkpoint" in e["load_missing"]
        assert e["save_mid_accumulation"].startswith("RuntimeError:")
        assert "micro-step 1 of a 3-micro-step accumulation" in e["save_mid_accumulation"]
        assert e["mid_accumulation_dir_exists"] is False


def ledger_totals(path) -> dict:
    """op -> [count, bytes] over the whole run, and the (micro_step, kind, op) set, from one ledger file."""
    data = json.loads(open(path).read())
    totals = defaultdict(lambda: [0, 0])
    for record in data["records"]:
        totals[record["op"]][0] += record["count"]
        totals[record["op"]][1] += record["bytes"]
    return data, {op: tuple(v) for op, v in totals.items()}


def assert_comm(results, expected: dict, backend_label: str):
    """Measured bytes == the analytical model per micro-step, and == hand-computed totals for the run."""
    report_file = os.path.join(os.path.dirname(results[0]["comm"]["pma"]["ledger_file"]), "report.json")
    report = json.loads(open(report_file).read())
    assert report["run"]["backend"] == backend_label
    assert report["model"]["available"] and report["model"]["agree"], report["model"]
    for rank, result in enumerate(results):
        for case, want in expected.items():
            r = result["comm"][case]
            if "max_abs_diff" in r:  # runs that have a single-process reference
                assert r["max_abs_diff"] <= PARITY_ABS_TOL, f"counting changed the training result: {r}"
            data, totals = ledger_totals(r["ledger_file"])
            assert data["meta"]["micro_steps"] == COMM_STEPS
            assert model.compare(data) == [], f"rank {rank} {case}: measured != model"
            assert totals == want, f"rank {rank} {case}: measured {totals}, expected {want}"


# ---------------------------------------------------------------- FSDP2 tests
@pytest.mark.slow
def test_fsdp_pma_equals_single_process(results):
    assert_pma_parity(results)


@pytest.mark.slow
def test_fsdp_ga_baselines_equal_single_process(results):
    assert_ga_parity(results)


@pytest.mark.slow
def test_fsdp_no_accumulation_baselines_equal_single_process(results):
    assert_plain_parity(results)


@pytest.mark.slow
def test_fsdp_optimizer_state_is_the_local_shard(results):
    for rank, result in enumerate(results):
        report = result["shards"]
        assert len(report) == 8  # 4 Linear layers x (weight, bias)
        for entry in report:
            assert entry["param_is_dtensor"], entry
            assert entry["local_numel"] < entry["full_numel"], (rank, entry)
            for key, moment in entry["moments"].items():
                assert moment["is_dtensor"] and moment["same_placements"], (rank, entry["name"], key)
                assert moment["local_shape"] == entry["local_shape"], (rank, entry["name"], key)
            assert entry["step"] == STEPS
    # the two ranks' shards tile each parameter exactly (dim-0 sharding, ceil-sized first shard)
    for entry0, entry1 in zip(results[0]["shards"], results[1]["shards"]):
        assert entry0["name"] == entry1["name"]
        assert entry0["local_numel"] + entry1["local_numel"] == entry0["full_numel"], (entry0, entry1)
        rows = entry0["moments"]["exp_avg"]["global_shape"][0]
        assert entry0["local_shape"][0] == -(-rows // WORLD)
        assert entry1["local_shape"][0] == rows - entry0["local_shape"][0]


@pytest.mark.slow
def test_fsdp_dcp_resume_mid_period_is_bit_identical(results):
    assert_resume(results)


@pytest.mark.slow
def test_fsdp_checkpoint_errors(results):
    assert_errors(results)


def fsdp_unit_bytes(world: int) -> list:
    """FSDP2 pads dim 0 (out_features) of each weight and bias to a multiple of the world size."""
    return [-(-out // world) * world * (inp + 1) * FP32 for inp, out in LAYERS]


@pytest.mark.slow
def test_fsdp_measured_bytes_equal_the_model(results):
    units = fsdp_unit_bytes(WORLD)
    assert units == [216, 168, 192, 128]  # 5 and 7 rows pad to 6 and 8
    syncs_ga = COMM_STEPS // PERIOD
    # every micro-step all-gathers each unit in forward and again in backward (the root holds no params)
    gathers = (2 * len(units) * COMM_STEPS, 2 * sum(units) * COMM_STEPS)
    assert_comm(results, {
        "pma": {"all_gather": gathers,
                "reduce_scatter": (len(units) * COMM_STEPS, sum(units) * COMM_STEPS),
                "all_reduce": (COMM_STEPS, FP32 * COMM_STEPS)},  # the clipping norm
        "ga": {"all_gather": gathers,
               "reduce_scatter": (len(units) * syncs_ga, sum(units) * syncs_ga)},
    }, "fsdp2")
    # every method of the table: PMA and the no-accumulation baselines reduce-scatter on every micro-step,
    # the GA baselines once per K; unclipped, so no norm all-reduce
    every_step = {"all_gather": gathers, "reduce_scatter": (len(units) * COMM_STEPS, sum(units) * COMM_STEPS)}
    assert_comm(results, {
        "lion_pma": every_step, "adamw": every_step, "lion": every_step,
        "lion_ga": {"all_gather": gathers, "reduce_scatter": (len(units) * syncs_ga, sum(units) * syncs_ga)},
    }, "fsdp2")


@pytest.mark.slow
def test_fsdp_mixed_precision_without_reshard_bytes_equal_the_model(results):
    # bf16 all-gathers (half the fp32 bytes) only in forward, fp32 reduce-scatters on every micro-step
    units = fsdp_unit_bytes(WORLD)
    assert_comm(results, {"pma_bf16_no_reshard": {
        "all_gather": (len(units) * COMM_STEPS, sum(units) // 2 * COMM_STEPS),
        "reduce_scatter": (len(units) * COMM_STEPS, sum(units) * COMM_STEPS)}}, "fsdp2")
