"""AdaPM on FSDP2 (``fully_shard``), 2 ranks, float64 GPT-2-style model: parity with the single-process
AdaPM on the same global batch (AdaPM, AdaPM-mini, with PMA, plain gradient descent, full-rank fit),
per-rank optimizer-state bytes, AdaPM's ledger-counted collectives against the model, DCP resume
mid-period bit-identical, 2 -> 1 and 1 -> 2 ranks. One 2-rank launch for the module (tests/workers/adapm_fsdp.py)."""
from __future__ import annotations

import json

import pytest

from tests.launching import run_ranks

pytestmark = pytest.mark.slow

WORLD = 2
PARITY_CASES = ["adapm", "adapm_mini", "adapm_pma", "adapm_mini_pma_gd", "adapm_full_rank_fit"]


@pytest.fixture(scope="module")
def out_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("adapm_fsdp")
    run_ranks("adapm_fsdp.py", [out], nproc=WORLD, launcher="torchrun", timeout=500)
    return out


@pytest.fixture(scope="module")
def results(out_dir):
    return json.loads((out_dir / "results.json").read_text())


def _no_crash(entry):
    assert not (isinstance(entry, dict) and "crash" in entry), entry.get("crash")
    return entry


@pytest.mark.parametrize("case", PARITY_CASES)
def test_fsdp2_matches_single_process_on_the_global_batch(results, case):
    entry = _no_crash(results[case])
    # Both sides run one algorithm in float64 (u = 1.1e-16); they differ only in the summation order of
    # FSDP2's gradient reduce-scatter and of AdaPM's all-reduced partial products (k x k Grams, r x n
    # gradients: relative error ~ n u each), amplified by the Gram solves' condition number (the
    # ridge bounds it at 1e12 in the worst case, in practice < 1e6): ~1e-9 of the update at most, so
    # 1e-6 of each step's update leaves three orders of margin and still fails any algorithmic slip.
    assert len(entry["diffs"]) >= 8  # refits at steps 1, 4, 7 (update_interval 3) inside the window
    for step, (diff, update) in enumerate(zip(entry["diffs"], entry["updates"]), start=1):
        assert update > 0
        assert diff <= 1e-6 * update, (case, step, diff, update)
    # the factors across the split axis are replicated: every rank must hold the same bits
    assert entry["replicated_spread"] == 0.0
    # both layouts of low-rank blocks are in the model: Conv1D c_attn (q/k: the rows are the block's
    # columns) and the MLP (the rows are the block's rows)
    assert {"transformer.h.0.attn.c_attn.weight", "transformer.h.0.mlp.c_fc.weight",
            "transformer.h.0.mlp.c_proj.weight"} <= set(entry["lowrank_params"])


# ---------------------------------------------------------------------------------------------- memory
V, C, D, LAYERS, R = 61, 15, 48, 2, 5  # the worker's GPT-2; rank = ceil(0.1 * 48) for every low-rank block


def rows(n, rank):
    """torch.chunk's (FSDP2's) share of n rows on `rank` of 2."""
    first = -(-n // WORLD)
    return first if rank == 0 else n - first


def adapm_elements(rank, mini=False, sharded=True):
    """Optimizer-state elements on one rank, parameter by parameter (independent of pma_dist's code)."""
    own = (lambda n: rows(n, rank)) if sharded else (lambda n: n)
    vec = lambda n: own(n) + (1 if mini else own(n))  # full momentum + second moment (mini: one per tensor)
    total = own(V) * D + own(C) * D  # wte, wpe: no momentum; per-entry second moment (also mini)
    for _ in range(LAYERS):
        total += 6 * vec(D)  # ln_1 w/b, ln_2 w/b, attn.c_proj.bias, mlp.c_proj.bias
        # c_attn (48, 144) Conv1D: q, k, v slices are (48 out, 48 in) blocks whose columns are the rows
        qk = R * D + R * own(D) + (4 if mini else D * own(D))  # L replicated, R split, v (mini: per head)
        value = D * own(D) + (D if mini else D * own(D))  # full momentum; v (mini: per output row, replicated)
        total += 2 * qk + value + vec(3 * D)
        total += own(D) if mini else own(D) * D  # attn.c_proj.weight: none; v (mini: per row, split with them)
        # mlp.c_fc (48, 192): the rows are the block's rows: L split, R replicated
        total += own(D) * R + R * 4 * D + (own(D) if mini else own(D) * 4 * D) + vec(4 * D)
        # mlp.c_proj (192, 48)
        total += own(4 * D) * R + R * D + (own(4 * D) if mini else own(4 * D) * D)
    total += 2 * vec(D)  # ln_f
    return total


def test_optimizer_state_bytes_per_rank(results):
    per_rank = _no_crash(results["memory"])
    for rank, got in enumerate(per_rank):
        assert got["fsdp2_adapm"] == 8 * adapm_elements(rank)  # float64 states, measured on the tensors
        assert got["fsdp2_adapm_report"] == got["fsdp2_adapm"]  # memory_report() agrees with them
        assert got["fsdp2_adapm_mini_report"] == 8 * adapm_elements(rank, mini=True)
        assert got["ddp_adapm"] == 8 * adapm_elements(rank, sharded=False)
        local_numel = (rows(V, rank) * D + rows(C, rank) * D
                       + LAYERS * (6 * rows(D, rank) + rows(D, rank) * 3 * D + rows(3 * D, rank) + rows(D, rank) * D
                                   + rows(D, rank) * 4 * D + rows(4 * D, rank) + rows(4 * D, rank) * D)
                       + 2 * rows(D, rank))
        assert got["fsdp2_adamw"] == 8 * 2 * local_numel  # exp_avg + exp_avg_sq of this rank's shard
        # replicated: the q/k L factors of c_attn and the R factors of the MLP blocks
        assert got["fsdp2_adapm_replicated"] == 8 * LAYERS * (2 * D * R + R * 4 * D + R * D)
        # mini adds its means over the split axis: per head of q and k (4 each), per row of the value
        # slice (48), per tensor of the 8 vectors of a layer (norms, biases) and of ln_f's 2
        assert got["fsdp2_adapm_mini_replicated"] == 8 * (LAYERS * (2 * D * R + R * 4 * D + R * D + 2 * 4 + D + 8) + 2)
    assert per_rank[0]["fsdp2_adapm"] < per_rank[0]["fsdp2_adamw"] < per_rank[0]["ddp_adapm"]


# ---------------------------------------------------------------------------------------------- communication
@pytest.mark.parametrize("case", ["ledger_adapm", "ledger_adapm_mini_pma_gd"])
def test_ledger_counts_adapm_phase_as_modelled(results, case):
    entry = _no_crash(results[case])
    assert entry["measured"] == entry["modelled"]  # per step: ops, message count, bytes
    refit, descent = entry["measured"][0], entry["measured"][1]
    assert refit[0] == ["all_reduce"] and refit[2] > descent[2] > 0  # the refit sends more than a descent step


# ---------------------------------------------------------------------------------------------- checkpoint
def test_dcp_resume_mid_period_is_bit_identical(results):
    entry = _no_crash(results["checkpoint"])
    assert entry["factor_keys"] > 0 and entry["state_keys_equal"]
    assert entry["params_bitwise_equal"] and entry["state_bitwise_equal"]
    assert entry["group_step"] == 9


def test_dcp_checkpoint_resumes_on_one_rank(out_dir, results):
    _no_crash(results["checkpoint"])
    run_ranks("adapm_fsdp.py", [out_dir, "resume"], nproc=1, launcher="torchrun", timeout=300)
    entry = json.loads((out_dir / "resume.json").read_text())
    assert entry["state_keys_equal"] and entry["step"] == 9
    # one rank sums in another order than two (same float64 algorithm): the parity bound above,
    # against the smallest update of that run
    assert entry["param_diff"] <= 1e-6 * min(results["adapm_mini_pma_gd"]["updates"])


def test_dcp_checkpoint_of_one_rank_resumes_on_two(out_dir, results):
    _no_crash(results["checkpoint"])
    if not (out_dir / "ckpt_one_rank").exists():  # written by the one-rank resume above
        run_ranks("adapm_fsdp.py", [out_dir, "resume"], nproc=1, launcher="torchrun", timeout=300)
    run_ranks("adapm_fsdp.py", [out_dir, "resume2"], nproc=WORLD, launcher="torchrun", timeout=300)
    entry = json.loads((out_dir / "resume2.json").read_text())
    assert entry["state_keys_equal"] and entry["step"] == 9
    assert entry["param_diff"] <= 1e-6 * min(results["adapm_mini_pma_gd"]["updates"])  # as above


def test_torch_parallel_setup_adapm_with_save_and_load(results):
    entry = _no_crash(results["trainer"])
    assert entry["optimizer"] == "AdaPM" and entry["bitwise_equal"]
    # the first trainer's ledger (micro-steps 0..4, refits at optimizer steps 1 and 4): FSDP2's own
    # traffic against pma_dist.comm.model, AdaPM's phase against pma_dist.comm.adapm_model, per micro-step
    assert "adapm" in entry["ledger_phases"] and entry["ledger_micro_steps"] == list(range(5))
    assert entry["ledger_problems"] == []
    # the run report rank 0 writes at close checks the engine's phases; phase "adapm" stays out of it
    assert entry["run_report_model"]["available"] and entry["run_report_model"]["agree"], entry["run_report_model"]


def test_fused_rows_split_by_the_shards_are_refused_by_name(results):
    error = _no_crash(results["refused_fused_rows"])["error"]
    assert error is not None and "'qkv_proj.weight'" in error and "policy_overrides" in error
