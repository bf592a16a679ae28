"""``pma-dist`` CLI: reports from real 2-rank DeepSpeed runs, the bandwidth benchmark, bad inputs.

One launch (``tests/workers/report_ds_run.py``) runs ZeRO-2, K = 4, AdamW-PMA and the GA baseline from
the DeepSpeed JSON config with ``"comm_profile"``; the tests below read its folders.
"""
import json
import subprocess
import sys

import pytest

from pma_dist.comm import cli
from pma_dist.comm import model
from pma_dist.comm.topology import load_topology
from tests.launching import REPO, rank_env, run_ranks
from tests.test_comm_report import calibration, write_synthetic_run

PERIOD = 4


@pytest.fixture(scope="module")
def ds_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ds_runs")
    run_ranks("report_ds_run.py", [root, "--stage", 2, "--period", PERIOD, "--periods", 3],
              nproc=2, launcher="torchrun", timeout=300)
    return root / "pma", root / "ga"


@pytest.mark.slow
def test_rank0_writes_the_run_report_when_the_engine_is_destroyed(ds_runs):
    pma_dir, ga_dir = ds_runs
    for run_dir, optimizer in ((pma_dir, "AdamWPMA"), (ga_dir, None)):
        assert {"report.json", "report.md", "bytes_per_micro_step.png", "projection.png"} <= \
            {p.name for p in run_dir.iterdir()}
        rep = json.loads((run_dir / "report.json").read_text())
        run = rep["run"]
        assert (run["zero_stage"], run["period"], run["world_size"], run["micro_steps"]) == (2, PERIOD, 2, 12)
        assert run["ranks"] == [0, 1] and run["ranks_agree"] and run["steady"]
        if optimizer:
            assert run["optimizer"] == optimizer and run["pma"]
        for op in run["collectives"].values():
            assert set(op) == {"per_period", "per_micro_step", "total"}
            assert set(op["per_period"]) == {"count", "bytes", "seconds"}
        assert rep["model"]["available"] and rep["model"]["agree"], rep["model"]
        assert rep["model"]["micro_step_mismatches"] == []
        # phase attribution: ZeRO-2's parameter all-gather belongs to the optimizer step
        assert set(run["by_phase_per_period"]["all_gather"]) == {"step"}


@pytest.mark.slow
def test_cli_report_ratios_match_the_model(ds_runs, tmp_path, capsys):
    pma_dir, ga_dir = ds_runs
    out = tmp_path / "cmp"
    assert cli.main(["report", str(pma_dir), "--baseline", str(ga_dir), "--output", str(out)]) == 0
    assert "all_gather: PMA/GA bytes per period = 4" in capsys.readouterr().out
    rep = json.loads((out / "report.json").read_text())
    ratios = rep["ratios_vs_baseline"]["per_period"]
    assert ratios["all_gather"]["bytes"] == 4.0 and ratios["all_gather"]["count"] == 4.0
    meta = json.loads((pma_dir / "comm_rank0.json").read_text())["meta"]
    expected = model.pma_vs_ga(model.Setup.from_meta(meta))
    assert set(ratios) == set(expected)
    for op, want in expected.items():
        assert ratios[op]["bytes"] == pytest.approx(want["bytes_ratio"]), op
    assert rep["ratios_vs_baseline"]["notes"] == []
    text = (out / "report.md").read_text()
    assert "| all_gather | 4 | 4 |" in text and "equals the model byte for byte" in text


@pytest.mark.slow
def test_bandwidth_benchmark_writes_a_calibration_the_report_accepts(tmp_path):
    calib = tmp_path / "bw.json"
    proc = subprocess.run([sys.executable, "-m", "pma_dist.comm.cli", "bandwidth", "--nproc", "2", "--output", str(calib),
                           "--min-bytes", "4K", "--max-bytes", "64K", "--iters", "2", "--warmup", "1"],
                          cwd=REPO, env=rank_env(), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "busbw GB/s" in proc.stdout
    doc = json.loads(calib.read_text())
    assert doc["kind"] == "pma-dist/bandwidth" and doc["world_size"] == 2 and doc["backend"] == "gloo"
    assert set(doc["ops"]) == {"all_reduce", "all_gather", "reduce_scatter", "broadcast"}
    for op, rows in doc["ops"].items():
        assert [r["bytes"] for r in rows] == [4096 << i for i in range(5)], op
        for r in rows:
            assert r["algbw_gbps"] == pytest.approx(r["bytes"] / r["seconds"] / 1e9)
            factor = 0.5 if op in ("all_gather", "reduce_scatter") else 1.0  # 2 ranks
            assert r["busbw_gbps"] == pytest.approx(r["algbw_gbps"] * factor)
    topo = load_topology(str(calib))
    assert set(topo.measured) == set(doc["ops"])
    run = write_synthetic_run(tmp_path / "run", pma=True)
    assert cli.main(["report", str(run), "--topology", str(calib), "--no-plots"]) == 0
    rep = json.loads((run / "report.json").read_text())
    assert rep["projection"]["topology"]["source"] == str(calib)


def test_report_of_synthetic_runs_with_a_preset(tmp_path, capsys):
    pma = write_synthetic_run(tmp_path / "pma", pma=True)
    ga = write_synthetic_run(tmp_path / "ga", pma=False)
    assert cli.main(["report", str(pma), "--baseline", str(ga), "--topology", "a40x8-2node-100g",
                     "--no-plots", "--period", "8", "--mfu", "0.3"]) == 0
    rep = json.loads((pma / "report.json").read_text())
    assert rep["ratios_vs_baseline"]["per_period"]["all_gather"]["bytes"] == 4.0
    assert rep["projection"]["topology"]["name"] == "a40x8-2node-100g"
    assert rep["projection"]["period"] == 8 and rep["projection"]["assumptions"]["mfu"] == 0.3
    assert rep["model"]["available"] is False  # synthetic files carry no param_numels
    assert rep["plots"] == [] and not (pma / "projection.png").exists()
    sizes = {r["model"] for r in rep["projection"]["rows"]}
    assert sizes == {"0.5B (Qwen2-0.5B)", "2.7B (Phi-2)", "7B (Llama-2-7B)"}
    assert [r["setup"] for r in rep["projection"]["rows"][:6]] == ["ZeRO-0", "ZeRO-1", "ZeRO-2", "ZeRO-3",
                                                                   "FSDP2", "DDP"]
    assert rep["recommendations"] and all("%" in r["text"] for r in rep["recommendations"])
    assert "about 2% slower per iteration" in (pma / "report.md").read_text()


def test_project_and_topologies_commands(tmp_path, capsys):
    out = tmp_path / "proj.json"
    assert cli.main(["project", "--topology", "a40x8-4node-200g", "--period", "16", "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "a40x8-4node-200g" in printed and "| 7B (Llama-2-7B) | ZeRO-3 |" in printed
    projection = json.loads(out.read_text())
    assert projection["period"] == 16 and projection["topology"]["world_size"] == 32
    assert cli.main(["topologies"]) == 0
    listing = capsys.readouterr().out
    assert "a40x8-2node-200g" in listing and "112.5 GB/s" in listing and "tuning.cc" in listing


def _fails(argv, capsys, *fragments):
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    for fragment in fragments:
        assert fragment in err, err
    return err


def test_bad_inputs_give_clear_errors(tmp_path, capsys):
    _fails(["report", str(tmp_path / "missing")], capsys, "run folder", "missing' does not exist")
    (tmp_path / "empty").mkdir()
    _fails(["report", str(tmp_path / "empty")], capsys, "holds no comm_rank*.json")
    run = write_synthetic_run(tmp_path / "run", pma=True)
    _fails(["report", str(run), "--baseline", str(tmp_path / "nope")], capsys, "nope' does not exist")
    _fails(["report", str(run), "--topology", "dgx-h100"], capsys, "unknown topology 'dgx-h100'", "a40x8")
    broken = tmp_path / "broken.json"
    broken.write_text('{"kind": "pma-dist/bandwidth", "ops": {"all_reduce": [{"bytes": 1}]}}')
    _fails(["report", str(run), "--topology", str(broken)], capsys, "broken.json", "all_reduce[0].seconds")
    _fails(["report", str(run), "--mfu", "2"], capsys, "mfu must be in (0, 1], got 2.0")
    _fails(["report", str(run), "--period", "0"], capsys, "period must be a positive int, got 0")
    _fails(["bandwidth", "--ops", "gossip"], capsys, "'gossip'")
    _fails(["bandwidth", "--min-bytes", "12Q"], capsys, "invalid message size '12Q'")
    _fails(["bandwidth", "--min-bytes", "1M", "--max-bytes", "4K"], capsys, "min size 1048576 B is larger")
    _fails(["bandwidth", "--nproc", "1"], capsys, "--nproc must be >= 2")
    _fails(["bandwidth", "--base-topology", "tpu"], capsys, "unknown base topology 'tpu'")
    _fails(["bandwidth", "--dtype", "int3"], capsys, "invalid dtype 'int3'")
    assert not (run / "report.json").exists()  # nothing half-written by the failing calls


def test_calibrated_topology_changes_the_projection(tmp_path):
    run = write_synthetic_run(tmp_path / "run", pma=True)
    calib = calibration(tmp_path)
    assert cli.main(["report", str(run), "--topology", str(calib), "--no-plots"]) == 0
    calibrated = json.loads((run / "report.json").read_text())["projection"]
    assert cli.main(["report", str(run), "--no-plots"]) == 0
    preset = json.loads((run / "report.json").read_text())["projection"]
    # ZeRO-0 sends only all-reduces, which the (slow, CPU-measured) calibration prices
    assert calibrated["rows"][0]["pma"]["comm_s"] > 10 * preset["rows"][0]["pma"]["comm_s"]
