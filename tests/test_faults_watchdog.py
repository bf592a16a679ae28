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
