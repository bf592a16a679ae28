"""An output dir that holds a run is refused unless --resume / --overwrite; nothing another run wrote is deleted."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from recipes.posttrain import checkpoints, run_dir
from recipes.posttrain.config import ConfigError, resolve
from recipes.posttrain.metrics import MetricsError, MetricsLog, read_metrics
from tests.launching import REPO, rank_env


def _tag(save_dir: Path, name: str, lineage, age: float) -> Path:
    tag = save_dir / name
    tag.mkdir(parents=True)
    torch.save({"w": torch.zeros(2)}, tag / "mp_rank_00_model_states.pt")
    checkpoints.write_manifest(tag, {"micro_step": int(name[5:]), "lineage": lineage})
    stamp = time.time() - age
    os.utime(tag, (stamp, stamp))
    return tag


def test_rotation_deletes_only_this_lineages_checkpoints(tmp_path):
    old_run = [_tag(tmp_path, f"micro{n:08d}", "old", age=100 - n) for n in (36, 40)]
    legacy = _tag(tmp_path, "micro00000099", None, age=90)  # written before lineages existed
    ours = [_tag(tmp_path, f"micro{n:08d}", "new", age=10 - n) for n in (4, 8, 12)]
    checkpoints.publish(tmp_path, ours[-1].name, keep=2, lineage="new")
    assert (tmp_path / checkpoints.POINTER).read_text() == "micro00000012"
    assert not ours[0].exists() and ours[1].exists() and ours[2].exists()  # our oldest rotated away
    assert all(t.exists() for t in old_run) and legacy.exists()  # nothing of another run deleted


def _args(out, *extra):
    return ["--model", "builtin-fallback", "--output-dir", str(out), *extra]


def test_a_dir_holding_a_run_is_refused_without_resume_or_overwrite(tmp_path):
    for name in ("metrics.jsonl", "summary.json", "checkpoints/micro00000004/x"):
        out = tmp_path / name.split("/")[0].replace(".", "_")
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text("{}")
        cfg = resolve(_args(out))
        with pytest.raises(ConfigError, match=f"--output-dir {out} already holds a run .*pass --resume to continue "
                                              f"it, --overwrite to start a new run there"):
            run_dir.check(cfg)
        run_dir.check(resolve(_args(out, "--overwrite")))
        run_dir.check(resolve(_args(out, "--resume")))
    (tmp_path / "empty" / "checkpoints").mkdir(parents=True)  # an empty checkpoints dir is no run
    run_dir.check(resolve(_args(tmp_path / "empty")))
    with pytest.raises(ConfigError, match="--resume and --overwrite contradict each other"):
        resolve(_args(tmp_path, "--resume", "--overwrite"))


def test_save_model_over_a_saved_model_is_refused_without_overwrite(tmp_path):
    saved = tmp_path / "model"
    saved.mkdir()
    (saved / "config.json").write_text("{}")
    with pytest.raises(ConfigError, match=f"--save-model {saved} already holds a model"):
        run_dir.check(resolve(_args(tmp_path / "run", "--save-model", str(saved))))
    run_dir.check(resolve(_args(tmp_path / "run", "--save-model", str(saved), "--overwrite")))
    run_dir.check(resolve(_args(tmp_path / "run", "--save-model", str(tmp_path / "new"))))
    assert (saved / "config.json").read_text() == "{}"  # checking writes nothing over it


def test_set_aside_moves_the_old_run_and_deletes_nothing(tmp_path):
    (tmp_path / "checkpoints" / "micro00000040").mkdir(parents=True)
    (tmp_path / "checkpoints" / "micro00000040" / "f").write_text("weights")
    (tmp_path / "metrics.jsonl").write_text('{"micro_step": 4}\n')
    (tmp_path / "notes.txt").write_text("mine")  # not a run file: stays where it is
    moved = run_dir.set_aside(tmp_path)
    assert moved.parent == tmp_path and moved.name.startswith("replaced-")
    assert (moved / "checkpoints" / "micro00000040" / "f").read_text() == "weights"
    assert (moved / "metrics.jsonl").read_text() == '{"micro_step": 4}\n'
    assert (tmp_path / "notes.txt").read_text() == "mine"
    assert run_dir.held_run(tmp_path) == [] and run_dir.set_aside(tmp_path) is None


def test_output_dir_that_is_a_file_or_unwritable_is_named(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(ConfigError, match=f"--output-dir {afile} is a file, not a directory"):
        run_dir.check(resolve(_args(afile)))
    with pytest.raises(ConfigError, match="--output-dir /proc/nope/run is not writable"):
        run_dir.check(resolve(_args("/proc/nope/run")))
    with pytest.raises(ConfigError, match="--comm-profile /proc/nope/comm is not writable"):
        run_dir.check(resolve(_args(tmp_path / "ok", "--comm-profile", "/proc/nope/comm")))


def test_resume_of_a_half_written_metrics_log(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"micro_step": 4}\n{"micro_step": 8}\n{"micro_step": 12}\n{"micro_st')
    note = MetricsLog(path, enabled=True).truncate_after(8)
    assert note == f"{path}:4: dropped a half-written last line ('{{\"micro_st'...)"
    assert [r["micro_step"] for r in read_metrics(path)] == [4, 8]
    path.write_text('{"micro_step": 4}\ngarbage\n{"micro_step": 8}\n')
    with pytest.raises(MetricsError, match=f"{path}:2: not a metrics record"):
        MetricsLog(path, enabled=True).truncate_after(8)


# ------------------------------------------------------------------ the whole job, one process
def _train(out, *extra):
    argv = [sys.executable, str(REPO / "launch" / "train.py"), "--model", "builtin-fallback", "--period", "4",
            "--save-every", "4", "--eval-every", "0", "--eval-size", "8", "--max-length", "64",
            "--micro-batch-size", "2", "--output-dir", str(out), "--no-progress", *extra]
    proc = subprocess.run(argv, env=rank_env(), capture_output=True, text=True, timeout=300, cwd=REPO)
    return proc.returncode, proc.stdout + proc.stderr


@pytest.mark.slow
def test_job_refuses_overwrites_aside_and_resumes_with_new_lr(tmp_path):
    out = tmp_path / "run"
    code, log = _train(out, "--micro-steps", "8")
    assert code == 0, log
    before = sorted(p.name for p in (out / "checkpoints").iterdir())
    lines = (out / "metrics.jsonl").read_text()

    code, log = _train(out, "--micro-steps", "8")  # the forgotten --resume
    assert code == 2 and f"train.py: error: --output-dir {out} already holds a run" in log
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == before
    assert (out / "metrics.jsonl").read_text() == lines  # untouched

    # a resume that would change the data stream is refused, naming the difference
    code, log = _train(out, "--micro-steps", "12", "--resume", "--max-length", "32")
    assert code == 2 and "was written with max_length=64 (this run: 32)" in log

    # a resume with a new lr trains with it, says so, and the summary records it
    code, log = _train(out, "--micro-steps", "12", "--resume", "--lr", "3e-4")
    assert code == 0, log
    assert "--resume: lr 0.001 -> 0.0003 (this run's value applied" in log
    summary = json.loads((out / "summary.json").read_text())
    assert summary["lr"] == 3e-4 and summary["resumed_from"] == "micro00000008"

    code, log = _train(out, "--micro-steps", "4", "--overwrite")
    assert code == 0, log
    moved = [p for p in out.iterdir() if p.name.startswith("replaced-")]
    assert len(moved) == 1 and f"moved to {moved[0]}" in log
    assert sorted(p.name for p in (moved[0] / "checkpoints").iterdir()) == ["latest_verified", "micro00000008",
                                                                          "micro00000012"]
    assert [r["micro_step"] for r in read_metrics(out / "metrics.jsonl", "train")] == [4]


def test_a_corrupted_latest_checkpoint_points_to_the_intact_older_one(tmp_path):
    older = _tag(tmp_path, "micro00000004", "a", age=20)
    latest = _tag(tmp_path, "micro00000008", "a", age=10)
    victim = latest / "mp_rank_00_model_states.pt"
    raw = bytearray(victim.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    victim.write_bytes(bytes(raw))
    pointer = tmp_path / checkpoints.POINTER
    assert checkpoints.older_intact_hint(tmp_path, latest.name) == (
        f"; the older checkpoint {older} is intact: to resume from it, write its name into {pointer} "
        f"(echo micro00000004 > {pointer}) and --resume again")
    (older / "mp_rank_00_model_states.pt").write_bytes(b"")
    assert checkpoints.older_intact_hint(tmp_path, latest.name) == "; no older intact checkpoint was found"
