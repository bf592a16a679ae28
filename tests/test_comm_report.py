"""Reports, topologies and projections: hand-computed alpha-beta costs, synthetic ledgers, bad inputs.

Synthetic ledgers follow the file format of ``docs/comm_accounting.md`` (``comm_rank{r}.json``); the
real 2-rank DeepSpeed run that feeds the same code is in ``tests/test_cli.py``.
"""
import json
import math

import pytest

from pma_dist.comm import projection, report, topology
from pma_dist.comm.topology import PRESETS, load_topology

PCIE = 16 * 16 * (128 / 130) / 8  # GB/s per direction, PCIe Gen4 x16


# --- synthetic ledger files ----------------------------------------------------------------------
def write_synthetic_run(run_dir, *, pma: bool, period: int = 4, periods: int = 3, world: int = 2,
                        param_bytes: int = 280, stage: int = 2, warmup_extra: bool = True, ranks=None,
                        micro_steps=None):
    """A ZeRO-2-like run: a gradient all-reduce every micro-step (backward), a parameter all-gather after
    every optimizer step (PMA: every micro-step; GA: at the boundary). Period 0 carries one extra
    broadcast (one-time set-up traffic) which the per-period numbers must leave out."""
    run_dir.mkdir(parents=True, exist_ok=True)
    steps = period * periods if micro_steps is None else micro_steps
    for rank in (range(world) if ranks is None else ranks):
        records = [{"micro_step": -1, "pma_kind": "none", "phase": "other", "op": "broadcast", "count": 5,
                    "bytes": 5 * param_bytes, "seconds": 1e-3}]
        for i in range(steps):
            boundary = (i + 1) % period == 0
            kind = ("large" if boundary else "small") if pma else ("boundary" if boundary else "accumulate")
            records.append({"micro_step": i, "pma_kind": kind, "phase": "backward", "op": "all_reduce",
                            "count": 1, "bytes": param_bytes, "seconds": 2e-3 * (rank + 1)})
            if pma or boundary:
                records.append({"micro_step": i, "pma_kind": kind, "phase": "step", "op": "all_gather",
                                "count": 1, "bytes": param_bytes, "seconds": 1e-3})
            if warmup_extra and i == 0:
                records.append({"micro_step": i, "pma_kind": kind, "phase": "step", "op": "broadcast",
                                "count": 1, "bytes": 8, "seconds": 1e-4})
        meta = {"backend": "deepspeed", "optimizer": "AdamWPMA" if pma else "AdamW", "pma": pma,
                "zero_stage": stage, "period": period, "world_size": world, "dtype": "float32",
                "param_count": param_bytes // 4, "param_bytes": param_bytes, "rank": rank,
                "micro_steps": steps, "format_version": 1}
        (run_dir / f"comm_rank{rank}.json").write_text(json.dumps({"meta": meta, "records": records}))
    return run_dir


def fake_traffic(setup, world, period, dtype, params, pma, layers=32):
    """A stand-in byte model for projection arithmetic tests (2 bytes per parameter messages)."""
    nbytes = 2 * params
    records = []
    for i in range(period):
        boundary = i == period - 1
        if setup in ("ZeRO-2", "ZeRO-3", "FSDP2") or pma or boundary:
            records.append(dict(micro_step=i, phase="backward", op="reduce_scatter", count=1, bytes=nbytes))
        if pma or boundary:
            records.append(dict(micro_step=i, phase="step", op="all_gather", count=1, bytes=nbytes))
    return records


# --- topology: hand-computed alpha-beta costs ----------------------------------------------------
def test_presets_exist_with_the_stated_links():
    assert set(PRESETS) == {"a40x8", "a40x8-2node-100g", "a40x8-2node-200g", "a40x8-4node-100g",
                            "a40x8-4node-200g"}
    one = PRESETS["a40x8"]
    assert one.world_size == 8 and one.nodes == 1
    assert one.intra_busbw == pytest.approx(PCIE * 0.8)
    assert one.pair_busbw == pytest.approx(112.5 / 2 * 0.8)
    assert PRESETS["a40x8-4node-200g"].world_size == 32
    assert PRESETS["a40x8-2node-100g"].network_busbw == pytest.approx(100 / 8 * 0.9)


def test_all_reduce_cost_on_one_node_matches_hand_computation():
    # ring over 8 GPUs: 2*7/8 of the buffer over the PCIe bottleneck; 8.4 us + 14 steps * 5.7 us
    seconds = PRESETS["a40x8"].collective_seconds("all_reduce", 1e9)
    expected = 1e9 * (14 / 8) / (PCIE * 0.8 * 1e9) + (8.4 + 14 * 5.7) * 1e-6
    assert seconds == pytest.approx(expected, rel=1e-12)
    assert seconds == pytest.approx(0.069516, abs=1e-6)


def test_nvlink_pair_and_multi_node_costs():
    one = PRESETS["a40x8"]
    pair = one.collective_seconds("all_gather_into_tensor", 1e8, ranks=2)  # torch spelling accepted
    assert pair == pytest.approx(1e8 * 0.5 / 45e9 + (8.4 + 3.4) * 1e-6, rel=1e-12)
    two = PRESETS["a40x8-2node-100g"]
    rs = two.collective_seconds("reduce_scatter", 1e9)  # 16 ranks, NIC-bound at 11.25 GB/s
    assert rs == pytest.approx(1e9 * 15 / 16 / 11.25e9 + (8.4 + 14 * 5.7 + 1 * 9.6) * 1e-6, rel=1e-12)
    # a group of 8 on 8-GPU nodes stays inside one node (ZeRO++ hpZ)
    assert two.collective_seconds("all_gather", 1e9, ranks=8) == pytest.approx(
        one.collective_seconds("all_gather", 1e9), rel=1e-12)
    assert one.collective_seconds("all_reduce", 1e9, ranks=1) == 0.0
    assert one.collective_seconds("all_reduce", 4e6, count=4) == pytest.approx(
        4 * (8.4 + 14 * 5.7) * 1e-6 + 4e6 * 1.75 / (PCIE * 0.8 * 1e9), rel=1e-12)


def test_bus_factors_follow_nccl_tests():
    assert topology.bus_factor("all_reduce", 8) == pytest.approx(1.75)
    assert topology.bus_factor("all_gather", 8) == pytest.approx(0.875)
    assert topology.bus_factor("reduce_scatter", 4) == pytest.approx(0.75)
    assert topology.bus_factor("broadcast", 8) == 1.0
    with pytest.raises(ValueError, match="'gossip'"):
        topology.canonical_op("gossip")


def calibration(tmp_path, ops=None, **extra):
    ops = ops if ops is not None else {
        "all_reduce": [{"bytes": 1024, "seconds": 1e-4, "busbw_gbps": 1024 / 1e-4 / 1e9},
                       {"bytes": 1 << 20, "seconds": 2e-3, "busbw_gbps": (1 << 20) / 2e-3 / 1e9},
                       {"bytes": 1 << 22, "seconds": 8e-3, "busbw_gbps": (1 << 22) / 8e-3 / 1e9}]}
    path = tmp_path / "bw.json"
    path.write_text(json.dumps({"kind": "pma-dist/bandwidth", "version": 1, "backend": "gloo", "world_size": 2,
                                "ops": ops, **extra}))
    return path


def test_calibration_file_sets_bandwidth_and_latency(tmp_path):
    topo = load_topology(str(calibration(tmp_path)))
    measured = topo.measured["all_reduce"]
    peak = (1 << 22) / 8e-3 / 1e9  # 2 ranks: busbw == algbw for all-reduce
    assert measured.busbw_gbps == pytest.approx(peak)
    assert measured.latency_s == pytest.approx(1e-4 - 1024 / (peak * 1e9))
    # measured ops use the calibration, the others keep the preset
    assert topo.collective_seconds("all_reduce", 1e8, ranks=2) == pytest.approx(
        measured.latency_s + 1e8 * 1.0 / (peak * 1e9))
    assert topo.collective_seconds("all_gather", 1e8, ranks=2) == pytest.approx(
        PRESETS["a40x8"].collective_seconds("all_gather", 1e8, ranks=2))
    assert topo.gpu == PRESETS["a40x8"].gpu


@pytest.mark.parametrize("content, match", [
    ("{not json", "not valid JSON"),
    ('["a list"]', "JSON object"),
    ('{"kind": "something-else"}', "'something-else'"),
    ('{"kind": "pma-dist/bandwidth", "ops": {}}', "'ops'"),
    ('{"kind": "pma-dist/bandwidth", "ops": {"gossip": [{"bytes": 1, "seconds": 1, "busbw_gbps": 1}]}}', "'gossip'"),
    ('{"kind": "pma-dist/bandwidth", "ops": {"all_reduce": [{"bytes": 1024, "seconds": -1, "busbw_gbps": 1}]}}',
     r"all_reduce\[0\]\.seconds must be a positive number, got -1"),
    ('{"kind": "pma-dist/bandwidth", "ops": {"all_reduce": []}}', "non-empty list"),
    ('{"kind": "pma-dist/bandwidth", "base_topology": "dgx", "ops": {}}', "base_topology 'dgx'"),
    ('{"kind": "pma-dist/topology", "nodes": 0}', "nodes must be a positive int, got 0"),
    ('{"kind": "pma-dist/topology", "intra_busbw": "fast"}', "intra_busbw must be a positive bandwidth"),
    ('{"kind": "pma-dist/topology", "colour": "red"}', "unknown topology key"),
])
def test_malformed_topology_files_name_the_problem(tmp_path, content, match):
    path = tmp_path / "broken.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=match) as info:
        load_topology(str(path))
    assert "broken.json" in str(info.value)


def test_unknown_topology_name_lists_the_presets():
    with pytest.raises(ValueError, match="unknown topology 'dgx-h100'.*a40x8"):
        load_topology("dgx-h100")


def test_custom_topology_file(tmp_path):
    path = tmp_path / "mine.json"
    path.write_text(json.dumps({"kind": "pma-dist/topology", "name": "mine", "nodes": 2, "gpus_per_node": 4,
                                "intra_busbw": 20.0, "network_busbw": 5.0}))
    topo = load_topology(str(path))
    assert topo.world_size == 8
    assert topo.collective_seconds("all_gather", 8e9) == pytest.approx(
        8e9 * 7 / 8 / 5e9 + (8.4 + 6 * 5.7 + 9.6) * 1e-6)


# --- report on synthetic ledgers -----------------------------------------------------------------
@pytest.fixture(scope="module")
def synthetic_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    return (write_synthetic_run(root / "pma", pma=True), write_synthetic_run(root / "ga", pma=False))


def test_summary_counts_steady_state_periods(synthetic_runs):
    pma_dir, _ = synthetic_runs
    s = report.summarize(report.load_run(pma_dir))
    assert (s["optimizer"], s["zero_stage"], s["period"], s["world_size"], s["micro_steps"]) == \
        ("AdamWPMA", 2, 4, 2, 12)
    assert s["complete_periods"] == 3 and s["periods_averaged"] == 2 and s["steady"] and s["ranks_agree"]
    # the first period's extra broadcast is set-up traffic: not in the per-period numbers
    assert set(s["collectives"]) == {"all_gather", "all_reduce", "broadcast"}
    assert s["collectives"]["broadcast"]["per_period"]["count"] == 0
    assert s["collectives"]["broadcast"]["total"]["count"] == 1
    assert s["collectives"]["all_gather"]["per_period"] == {"count": 4, "bytes": 1120, "seconds": pytest.approx(4e-3)}
    assert s["collectives"]["all_gather"]["per_micro_step"]["bytes"] == 280
    # seconds: mean over ranks (rank 0 logs 2 ms, rank 1 4 ms per all-reduce)
    assert s["collectives"]["all_reduce"]["per_period"]["seconds"] == pytest.approx(4 * 3e-3)
    assert s["setup"] == "ZeRO-2"
    assert s["before_training"]["broadcast"] == {"count": 5, "bytes": 1400, "seconds": pytest.approx(1e-3)}
    assert s["by_phase_per_period"]["all_gather"] == {"step": {"count": 4, "bytes": 1120,
                                                               "seconds": pytest.approx(4e-3)}}
    assert s["by_kind_per_micro_step"]["large"]["all_gather"]["bytes"] == 280
    assert s["by_kind_per_micro_step"]["small"]["all_gather"]["bytes"] == 280


def test_ratios_against_a_ga_baseline(synthetic_runs):
    pma_dir, ga_dir = synthetic_runs
    pma, ga = (report.summarize(report.load_run(d)) for d in synthetic_runs)
    assert ga["by_kind_per_micro_step"]["boundary"]["all_gather"]["bytes"] == 280
    assert "all_gather" not in ga["by_kind_per_micro_step"]["accumulate"]
    ratios = report.compare(pma, ga)
    assert ratios["per_period"]["all_gather"]["bytes"] == 4.0
    assert ratios["per_period"]["all_gather"]["count"] == 4.0
    assert ratios["per_period"]["all_reduce"]["bytes"] == 1.0
    assert ratios["per_period"]["broadcast"]["bytes"] == 1.0  # 0 / 0: both send none
    assert ratios["total"]["bytes"] == pytest.approx((4 + 4) / (4 + 1))
    assert ratios["notes"] == []


def test_ratio_is_undefined_when_the_baseline_sends_none(tmp_path):
    pma = report.summarize(report.load_run(write_synthetic_run(tmp_path / "p", pma=True)))
    ga = dict(report.summarize(report.load_run(write_synthetic_run(tmp_path / "g", pma=False))))
    ga["collectives"] = {k: v for k, v in ga["collectives"].items() if k != "all_gather"}
    ratios = report.compare(pma, ga)
    assert ratios["per_period"]["all_gather"]["bytes"] is None
    assert any("all_gather: the baseline sends none" in n for n in ratios["notes"])


def test_mismatched_baseline_is_flagged(tmp_path):
    pma = report.summarize(report.load_run(write_synthetic_run(tmp_path / "p", pma=True)))
    ga = report.summarize(report.load_run(write_synthetic_run(tmp_path / "g", pma=False, period=2)))
    assert any("period differs: run 4 vs baseline 2" in n for n in report.compare(pma, ga)["notes"])


def test_incomplete_period_and_missing_rank_are_noted(tmp_path):
    run = write_synthetic_run(tmp_path / "p", pma=True, micro_steps=10, ranks=[0])
    s = report.summarize(report.load_run(run))
    assert s["complete_periods"] == 2
    assert any("2 micro-step(s) after the last complete period" in n for n in s["notes"])
    assert any("rank(s) [1] are missing" in n for n in s["notes"])


def test_bad_run_folders_name_the_problem(tmp_path):
    with pytest.raises(report.ReportError, match="'.*nowhere' does not exist"):
        report.load_run(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(report.ReportError, match="holds no comm_rank"):
        report.load_run(tmp_path / "empty")
    (tmp_path / "afile").write_text("x")
    with pytest.raises(report.ReportError, match="is not a directory"):
        report.load_run(tmp_path / "afile")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "comm_rank0.json").write_text("{truncated")
    with pytest.raises(report.ReportError, match="comm_rank0.json' is not valid JSON"):
        report.load_run(bad)
    (bad / "comm_rank0.json").write_text(json.dumps({"meta": {"format_version": 99}, "records": []}))
    with pytest.raises(report.ReportError, match="format_version 99"):
        report.load_run(bad)
    (bad / "comm_rank0.json").write_text(json.dumps({"meta": {"format_version": 1, "period": 4}, "records": []}))
    with pytest.raises(report.ReportError, match=r"lacks meta field\(s\) \['optimizer'"):
        report.load_run(bad)
    short = write_synthetic_run(tmp_path / "short", pma=True, micro_steps=3)
    with pytest.raises(report.ReportError, match="3 micro-step.*fewer than one period"):
        report.summarize(report.load_run(short))
    mixed = write_synthetic_run(tmp_path / "mixed", pma=True, ranks=[0])
    write_synthetic_run(tmp_path / "other", pma=False, ranks=[1])
    (tmp_path / "other" / "comm_rank1.json").rename(mixed / "comm_rank1.json")
    with pytest.raises(report.ReportError, match="meta.optimizer='AdamW' differs"):
        report.load_run(mixed)


# --- projection arithmetic (with a stand-in byte model; the real one is used in test_cli) ---------
def test_projection_prices_periods_from_the_byte_model():
    p = projection.project("a40x8", period=4, traffic=fake_traffic, model_sizes={"1B": 10**9}, setups=("ZeRO-2",))
    (row,) = p["rows"]
    topo = PRESETS["a40x8"]
    a = projection.Assumptions()
    compute = 6 * 1e9 * 4096 / (149.7e12 * 0.4)
    optimizer = 1e9 / 8 * 32 / (696e9 * 0.8)  # GA: one fused pass, 32 B/param
    pma_optimizer = 1e9 / 8 * 92 / (696e9 * 0.8)  # PMA on the foreach path (fused=None on GPUs): 88 + 4 B/param
    rs = topo.collective_seconds("reduce_scatter", 2e9)
    ag = topo.collective_seconds("all_gather", 2e9)
    assert projection.compute_seconds(10**9, topo, a) == pytest.approx(compute)
    assert row["ga"]["comm_s"] == pytest.approx(4 * rs + ag)
    assert row["pma"]["comm_s"] == pytest.approx(4 * (rs + ag))
    assert row["ga"]["serial_s"] == pytest.approx(4 * compute + optimizer + 4 * rs + ag)
    assert row["pma"]["serial_s"] == pytest.approx(4 * compute + 4 * pma_optimizer + 4 * (rs + ag))
    # overlapped: each reduce-scatter hides behind its micro-step's backward (2/3 of compute)
    assert rs < 2 * compute / 3
    assert row["pma"]["overlapped_s"] == pytest.approx(4 * compute + 4 * pma_optimizer + 4 * ag)
    assert row["overhead_serial_pct"] == pytest.approx(
        100 * (row["pma"]["serial_s"] - row["ga"]["serial_s"]) / row["ga"]["serial_s"])
    assert row["model_state_gb_per_gpu"] == pytest.approx((2 + 14 / 8))
    assert p["paper_claim"].startswith("\"on a 7B model, AdamW-PMA is only about 2% slower")


def test_projection_prices_the_pma_optimizer_path_that_runs_and_says_which():
    common = dict(period=4, traffic=fake_traffic, model_sizes={"1B": 10**9}, setups=("ZeRO-3",))
    default, fused = projection.project("a40x8", **common), projection.project("a40x8", pma_optimizer_path="compiled", **common)
    one_pass = 1e9 / 8 * 32 / (696e9 * 0.8)
    assert default["assumptions"]["pma_optimizer_path"] == "foreach"  # what AdamWPMA(fused=None) runs on GPUs
    assert default["assumptions"]["pma_optimizer_bytes_per_param"] == 92
    assert default["rows"][0]["pma"]["optimizer_s"] == pytest.approx(4 * one_pass * 92 / 32)
    assert fused["assumptions"]["pma_optimizer_bytes_per_param"] == 32
    assert fused["rows"][0]["pma"]["optimizer_s"] == pytest.approx(4 * one_pass)
    assert default["rows"][0]["ga"]["optimizer_s"] == fused["rows"][0]["ga"]["optimizer_s"] == pytest.approx(one_pass)
    text = projection.format_projection_markdown(default)
    assert "GA 32 B/param (one fused pass), PMA 92 B/param (foreach path: what AdamWPMA(fused=None) runs" in text
    assert "PMA 32 B/param (compiled step: AdamWPMA(fused=True)" in projection.format_projection_markdown(fused)
    with pytest.raises(ValueError, match="pma_optimizer_path must be one of \\['compiled', 'foreach'\\], got 'fused'"):
        projection.project("a40x8", pma_optimizer_path="fused", **common)


def test_projection_rejects_bad_settings():
    with pytest.raises(ValueError, match="period must be a positive int, got 0"):
        projection.project("a40x8", period=0, traffic=fake_traffic)
    with pytest.raises(ValueError, match="mfu must be in \\(0, 1\\], got 1.5"):
        projection.project("a40x8", mfu=1.5, traffic=fake_traffic)


def test_recommendations_carry_numbers():
    p = projection.project("a40x8-2node-100g", period=8, traffic=fake_traffic)
    recs = projection.recommendations(p)
    assert {r["option"] for r in recs} >= {"overlap_comm", "bucket sizes"}
    for r in recs:
        assert math.isfinite(r["value_pct"]) and "%" in r["text"]


# --- the model check ----------------------------------------------------------------------------
def write_model_run(run_dir, *, corrupt_step=None, period=4, periods=3):
    """Ledger files whose engine traffic is the model's own prediction, plus loss-logging all-reduces."""
    from pma_dist.comm import model

    meta = {"backend": "deepspeed", "optimizer": "AdamWPMA", "pma": True, "zero_stage": 2, "period": period,
            "world_size": 2, "dtype": "float32", "param_count": 118, "param_bytes": 472,
            "param_numels": [54, 9, 45, 5, 5], "gradient_clipping": 1.0, "micro_steps": period * periods,
            "format_version": 1}
    setup = model.Setup.from_meta(meta)
    run_dir.mkdir(parents=True)
    for rank in (0, 1):
        records = []
        for i in range(period * periods):
            kind = "large" if (i + 1) % period == 0 else "small"
            for (phase, op), (count, nbytes) in model.micro_step_totals(setup, i).items():
                nbytes += 4 if i == corrupt_step and op == "all_gather" else 0
                records.append({"micro_step": i, "pma_kind": kind, "phase": phase, "op": op, "count": count,
                                "bytes": nbytes, "seconds": 1e-3})
            records.append({"micro_step": i, "pma_kind": kind, "phase": "other", "op": "all_reduce", "count": 1,
                            "bytes": 8, "seconds": 1e-4})
        (run_dir / f"comm_rank{rank}.json").write_text(json.dumps({"meta": dict(meta, rank=rank),
                                                                   "records": records}))
    return run_dir


def test_model_check_covers_engine_phases_and_lists_the_loops_own_traffic(tmp_path):
    run = report.load_run(write_model_run(tmp_path / "ok"))
    check = report.model_check(report.summarize(run), run)
    assert check["available"] and check["agree"], check
    assert check["micro_steps_checked"] == [4, 12]
    assert check["outside_engine_per_period"] == {"all_reduce": {"count": 4, "bytes": 32,
                                                                 "seconds": pytest.approx(4e-4)}}
    # one micro-step with 4 stray bytes: the per-period means and the per-micro-step check both catch it
    bad = report.load_run(write_model_run(tmp_path / "bad", corrupt_step=9))
    check = report.model_check(report.summarize(bad), bad)
    assert not check["agree"]
    assert len(check["micro_step_mismatches"]) == 1 and check["micro_step_mismatches"][0].startswith("micro-step 9:")


def test_zero0_cannot_overlap_but_ddp_can():
    p = projection.project("a40x8", period=4, traffic=fake_traffic, model_sizes={"1B": 10**9},
                           setups=("ZeRO-0", "DDP"))
    zero0, ddp = p["rows"]
    # DeepSpeed ZeRO-0 all-reduces after backward: nothing hides; DDP overlaps its buckets with backward
    assert zero0["pma"]["overlapped_s"] == pytest.approx(zero0["pma"]["serial_s"])
    assert zero0["pma"]["exposed_comm_s"] == pytest.approx(zero0["pma"]["comm_s"])
    rs = PRESETS["a40x8"].collective_seconds("reduce_scatter", 2e9)
    ag = PRESETS["a40x8"].collective_seconds("all_gather", 2e9)
    assert ddp["pma"]["exposed_comm_s"] == pytest.approx(4 * ag)  # only the step-phase gathers remain
    assert ddp["pma"]["comm_s"] == pytest.approx(4 * (rs + ag))
