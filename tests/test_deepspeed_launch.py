"""The shipped CPU launch recipes (``launch/cpu/*.sh``) run a short PMA job to completion on 2 ranks.

Each recipe starts ``tests/workers/ds_launch.py`` the way a user starts ``launch/train.py``; the
job registers AdamW-PMA only through ``ds_configs/zero2_adamw_pma_fp32.json``, takes 2 steps and
ends through ``pma_dist.distributed.shutdown``.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.launching import MPIRUN_MISSING, REPO, WORKERS, find_mpirun, free_port, kill_tree, rank_env

TIMEOUT = 300


def run_recipe(launcher: str):
    env = rank_env({"MASTER_PORT": str(free_port()), "NPROC": "2",
                    "PATH": str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", ""),
                    "PYTHON": sys.executable})
    cmd = ["bash", str(REPO / "launch" / "cpu" / f"{launcher}.sh"), str(WORKERS / "ds_launch.py")]
    popen = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             start_new_session=True)
    try:
        stdout, stderr = popen.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        kill_tree(popen.pid)
        stdout, stderr = popen.communicate(timeout=60)
        pytest.fail(f"{launcher} recipe timed out after {TIMEOUT}s\n{stdout[-4000:]}\n{stderr[-4000:]}")
    facts = [json.loads(line.split("LAUNCH-OK ", 1)[1]) for line in stdout.splitlines() if "LAUNCH-OK " in line]
    return popen.returncode, sorted(facts, key=lambda f: f["rank"]), stdout, stderr


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["deepspeed", "torchrun", "mpirun"])
def test_launch_recipe_runs_pma_job_to_completion(launcher):
    if launcher == "mpirun" and find_mpirun() is None:
        pytest.skip(MPIRUN_MISSING)
    code, facts, stdout, stderr = run_recipe(launcher)
    assert code == 0, f"{launcher} exited {code}\nstdout:\n{stdout[-4000:]}\nstderr:\n{stderr[-4000:]}"
    assert "terminate called" not in stderr
    assert [f["rank"] for f in facts] == [0, 1], stdout[-4000:]
    for f in facts:
        assert f["world"] == 2 and f["env_local_rank"] == f["rank"]
        assert f["optimizer"] == "AdamWPMA" and f["group_steps"] == [2]
        # the deepspeed launcher appends --local_rank=N; the others pass the rank through the environment
        assert f["local_rank_arg"] == (f["rank"] if launcher == "deepspeed" else None)
        assert f["mpi"] == (launcher == "mpirun")
    segments = [f["shm_segment"] for f in facts]
    if launcher == "deepspeed":  # its launcher sets LOCAL_SIZE: DeepSpeed made one shared-memory segment per rank
        assert all(segments), facts
    # and pma_dist.distributed.shutdown unlinked them (DeepSpeed never does: each run left ~69 MB per rank in RAM)
    assert not [s for s in segments if s and Path("/dev/shm", s).exists()]
