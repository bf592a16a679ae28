"""Fault tolerance of launch/train.py: SIGKILL one rank mid-run, relaunch with --resume."""
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from recipes.posttrain.metrics import read_metrics
from tests.launching import REPO, free_port, launcher_command, rank_env, require_shared_data, run_ranks

pytestmark = pytest.mark.slow

TRAIN = REPO / "launch" / "train.py"
SAVE_EVERY = 8
MICRO_STEPS = 40


def _rank_pid(out: Path, rank: int):
    """PID of the training process of ``rank`` for this output dir (read from /proc)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(b"launch/train.py" in arg for arg in cmdline) and str(out).encode() in cmdline \
                and f"RANK={rank}".encode() in environ and b"-m" not in cmdline:
            return int(entry.name)
    return None


def _latest(out: Path):
    pointer = out / "checkpoints" / "latest_verified"
    return int(pointer.read_text().strip().removeprefix("micro")) if pointer.exists() else 0


def test_sigkill_one_rank_then_resume_loses_at_most_one_interval(tmp_path):
    model = require_shared_data("models", "stories260K")
    data = require_shared_data("sft", "alpaca_mix_train.jsonl")
    out = tmp_path / "run"
    args = ["--task", "sft", "--model", model, "--train-data", data, "--optimizer", "adamw_pma", "--period", "4",
            "--lr", "3e-3", "--micro-batch-size", "2", "--max-length", "128", "--eval-size", "16",
            "--eval-every", "0", "--micro-steps", str(MICRO_STEPS), "--save-every", str(SAVE_EVERY),
            "--output-dir", out, "--no-progress"]
    cmd = launcher_command("deepspeed", 2, TRAIN, free_port()) + [str(a) for a in args]
    first = subprocess.Popen(cmd, cwd=REPO, env=rank_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True, start_new_session=True)
    try:
        deadline = time.time() + 420
        while _latest(out) < 2 * SAVE_EVERY:  # let two checkpoints complete, then strike mid-interval
            assert first.poll() is None, f"training ended before the fault was injected:\n{first.stdout.read()[-4000:]}"
            assert time.time() < deadline, "no checkpoint within the time limit"
            time.sleep(0.2)
        victim = _rank_pid(out, 1)
        assert victim is not None, "could not find rank 1's process"
        os.kill(victim, signal.SIGKILL)
        checkpoint_at_kill = _latest(out)
        progress_at_kill = max([r["micro_step"] for r in read_metrics(out / "metrics.jsonl", "train")], default=0)
        first.wait(timeout=120)
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
            first.wait()
    assert first.returncode != 0  # the launcher noticed the dead rank and stopped the job
    assert progress_at_kill < MICRO_STEPS

    second = run_ranks(TRAIN, args + ["--resume"], nproc=2, launcher="deepspeed", timeout=420)
    resumed_at = int(second.stdout.split("resumed from ")[1].split(" at micro-step ")[1].split()[0])
    assert resumed_at >= checkpoint_at_kill >= 2 * SAVE_EVERY
    assert progress_at_kill - resumed_at <= SAVE_EVERY  # lost at most one checkpoint interval

    train = read_metrics(out / "metrics.jsonl", "train")
    assert [r["micro_step"] for r in train] == list(range(4, MICRO_STEPS + 1, 4))  # no gap, no duplicate
    assert [r["optimizer_steps"] for r in train] == list(range(4, MICRO_STEPS + 1, 4))
    assert train[-1]["train_loss"] < train[0]["train_loss"]
    walls = [r["wall_clock"] for r in train]
    assert walls == sorted(walls)  # the training clock continues across the restart

    # a corrupted checkpoint: the relaunch stops before loading it, naming the file
    tag = (out / "checkpoints" / "latest_verified").read_text().strip()
    victim_file = sorted((out / "checkpoints" / tag).glob("*model_states.pt"))[0]
    raw = bytearray(victim_file.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    victim_file.write_bytes(bytes(raw))
    third = run_ranks(TRAIN, args + ["--resume", "--micro-steps", str(MICRO_STEPS + SAVE_EVERY)], nproc=2,
                      launcher="deepspeed", timeout=420, check=False)
    assert third.returncode != 0
    assert f"train.py: error: checkpoint file corrupted: {victim_file}" in third.stdout + third.stderr
    assert "; the older checkpoint " in third.stdout + third.stderr  # the way back is named
