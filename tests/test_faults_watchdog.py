"""A stopped (SIGSTOP) rank is named by the watchdog within the collective timeout and the job exits non-zero."""
import datetime
import re
import socket
import time

import pytest

from pma_dist import distributed
from tests.launching import run_ranks

TIMEOUT_S = 8.0


def test_collective_timeout_flag_env_and_default(monkeypatch):
    monkeypatch.delenv(distributed.TIMEOUT_ENV, raising=False)
    assert distributed.collective_timeout() == datetime.timedelta(seconds=600)
    monkeypatch.setenv(distributed.TIMEOUT_ENV, "42")
    assert distributed.collective_timeout() == datetime.timedelta(seconds=42)
    assert distributed.collective_timeout(5) == datetime.timedelta(seconds=5)  # an explicit value wins
    monkeypatch.setenv(distributed.TIMEOUT_ENV, "soon")
    with pytest.raises(ValueError, match="environment variable PMA_DIST_COLLECTIVE_TIMEOUT='soon' is not a number"):
        distributed.collective_timeout()
    with pytest.raises(ValueError, match="collective timeout must be > 0 seconds, got 0"):
        distributed.collective_timeout(0)


@pytest.mark.slow
def test_a_stopped_rank_is_named_within_the_timeout():
    began = time.monotonic()
    proc = run_ranks("train_watchdog.py", [str(TIMEOUT_S)], nproc=2, launcher="torchrun", timeout=180, check=False)
    elapsed = time.monotonic() - began
    assert proc.returncode != 0
    pid = re.search(r"rank 1 pid (\d+) stops", proc.stdout).group(1)
    report = re.search(rf"pma_dist watchdog on rank 0: rank 1 \(host {re.escape(socket.gethostname())}, pid {pid}\) "
                       rf"sent no heartbeat for ([\d.]+) s, last at step 3: it is stopped or hung; ending the job "
                       rf"with exit code {distributed.HUNG_PEER_EXIT_CODE}", proc.stderr)
    assert report is not None, proc.stderr[-3000:]
    # silent for more than half the timeout (the threshold) and reported before the timeout itself,
    # one polling interval (timeout / 8) after the threshold at the latest
    assert TIMEOUT_S / 2 - 0.05 <= float(report.group(1)) <= TIMEOUT_S / 2 + TIMEOUT_S / 8 + 0.5
    assert "not reached" not in proc.stdout
    # torchrun needs up to 30 s to SIGKILL the stopped rank after SIGTERM; the whole job stays bounded
    assert elapsed < 120


@pytest.mark.slow
def test_the_training_job_names_a_stopped_rank_and_exits_non_zero(tmp_path):
    """launch/train.py under the deepspeed launcher, --collective-timeout 10: SIGSTOP rank 1 mid-training."""
    import os
    import signal
    import subprocess

    from recipes.posttrain.metrics import read_metrics
    from tests.launching import REPO, free_port, launcher_command, rank_env
    from tests.test_train_faults import _rank_pid

    out = tmp_path / "run"
    args = ["--model", "builtin-fallback", "--period", "2", "--micro-batch-size", "2", "--max-length", "64",
            "--eval-size", "8", "--eval-every", "0", "--log-every", "2", "--micro-steps", "100000",
            "--collective-timeout", "10", "--output-dir", str(out), "--no-progress"]
    cmd = launcher_command("deepspeed", 2, REPO / "launch" / "train.py", free_port()) + args
    job = subprocess.Popen(cmd, cwd=REPO, env=rank_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                           start_new_session=True)
    victim = None
    try:
        deadline = time.monotonic() + 300
        while not (out / "metrics.jsonl").exists() or not read_metrics(out / "metrics.jsonl", "train"):
            assert job.poll() is None, job.stdout.read()[-3000:]
            assert time.monotonic() < deadline, "no training progress within the time limit"
            time.sleep(0.2)
        victim = _rank_pid(out, 1)
        assert victim is not None
        time.sleep(3)  # > one heartbeat interval (1.25 s) into the loop, so the last beat carries a micro-step
        os.kill(victim, signal.SIGSTOP)
        stopped = time.monotonic()
        log, _ = job.communicate(timeout=120)
        ended = time.monotonic() - stopped
    finally:
        if victim is not None:
            try:
                os.kill(victim, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
            job.wait()
    assert job.returncode != 0
    assert re.search(rf"pma_dist watchdog on rank 0: rank 1 \(host {re.escape(socket.gethostname())}, pid {victim}\) "
                     rf"sent no heartbeat for [\d.]+ s, last at micro-step \d+: it is stopped or hung", log), log[-3000:]
    # reported after half the timeout; the launcher then needs up to 30 s to SIGKILL the stopped rank
    assert ended < 10 + 30 + 15
