"""Run a worker script on several local ranks (gloo, CPU) with a hard timeout.

Multi-process tests write a small worker under ``tests/workers/`` and call :func:`run_ranks`. The
worker is started by a real launcher (``torchrun`` by default, or ``deepspeed`` / ``mpirun``), so the
tests exercise the same entry points users do.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Iterable, Optional

import pytest

REPO = Path(__file__).resolve().parents[1]
WORKERS = Path(__file__).resolve().parent / "workers"
SHARED_DATA = (REPO.parent / "shared" / "data").resolve()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


RENDEZVOUS_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK",
                   "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID")


def rank_env(extra: Optional[dict] = None) -> dict:
    """The launcher's environment: this process's, minus rendezvous variables the launcher sets itself."""
    env = {k: v for k, v in os.environ.items() if k not in RENDEZVOUS_VARS}
    env.update(
        OMP_NUM_THREADS="1",
        PYTHONPATH=str(REPO) + os.pathsep + env.get("PYTHONPATH", ""),
        DS_ACCELERATOR="cpu",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        PYTHONUNBUFFERED="1",
    )
    env.update(extra or {})
    return env


def find_mpirun() -> Optional[str]:
    """The mpirun of this interpreter's environment (``launch/setup_env.sh`` installs one from wheels
    when the machine has no MPI; found even when the venv is not activated), else the one on PATH."""
    beside = Path(sys.executable).parent / "mpirun"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which("mpirun")


MPIRUN_MISSING = "mpirun is not installed (bash launch/setup_env.sh installs Open MPI from wheels)"


def launcher_command(launcher: str, nproc: int, script: Path, port: int) -> list:
    bindir = Path(sys.executable).parent
    if launcher == "torchrun":
        return [str(bindir / "torchrun"), "--standalone", f"--nproc_per_node={nproc}", str(script)]
    if launcher == "deepspeed":
        return [str(bindir / "deepspeed"), f"--num_gpus={nproc}", f"--master_port={port}", str(script)]
    if launcher == "mpirun":
        mpirun = find_mpirun()
        if mpirun is None:
            pytest.skip(MPIRUN_MISSING)
        return [mpirun, "--allow-run-as-root", "--oversubscribe", "-np", str(nproc),
                "-x", "MASTER_ADDR=127.0.0.1", "-x", f"MASTER_PORT={port}", sys.executable, str(script)]
    raise ValueError(f"unknown launcher {launcher!r}")


def _descendants(pid: int) -> list:
    """Every process below ``pid`` (Linux /proc), found before any is killed."""
    children: dict = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def kill_tree(pid: int) -> None:
    """SIGKILL a launcher, its session and every descendant: ranks (and a JIT build's compilers under them)
    may sit in sessions of their own, out of reach of the launcher's killpg, and would hold the pipes open."""
    below = _descendants(pid) if Path("/proc").is_dir() else []
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    for child in below:
        try:
            os.kill(child, signal.SIGKILL)
        except ProcessLookupError:
            pass


def run_ranks(script, args: Iterable[str] = (), *, nproc: int = 2, launcher: str = "torchrun",
              timeout: float = 300, env: Optional[dict] = None, check: bool = True) -> subprocess.CompletedProcess:
    """Launch ``script`` on ``nproc`` ranks; fail the test on timeout or (with ``check``) non-zero exit."""
    script = Path(script)
    if not script.is_absolute():
        script = WORKERS / script
    port = free_port()
    cmd = launcher_command(launcher, nproc, script, port) + [str(a) for a in args]
    run_env = rank_env(env)
    run_env.setdefault("MASTER_PORT", str(port))
    popen = subprocess.Popen(cmd, cwd=REPO, env=run_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, start_new_session=True)
    try:
        stdout, stderr = popen.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(popen.pid)
        stdout, stderr = popen.communicate(timeout=60)
        pytest.fail(f"{launcher} run of {script.name} timed out after {timeout}s\n"
                    f"stdout:\n{stdout[-6000:]}\nstderr:\n{stderr[-6000:]}")
    proc = subprocess.CompletedProcess(cmd, popen.returncode, stdout, stderr)
    if check and proc.returncode != 0:
        pytest.fail(f"{launcher} run of {script.name} exited {proc.returncode}\n"
                    f"stdout:\n{proc.stdout[-6000:]}\nstderr:\n{proc.stderr[-6000:]}")
    return proc


def load_script(relative: str):
    """A repository script (e.g. ``benchmarks/post_training.py``) imported as a module, to test its functions."""
    import importlib.util

    path = REPO / relative
    spec = importlib.util.spec_from_file_location("script_" + path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is created
    spec.loader.exec_module(module)
    return module


def require_shared_data(*relative: str) -> Path:
    """Path into ``../shared/data``; skip the test with the reason when it is missing."""
    path = SHARED_DATA.joinpath(*relative)
    if not path.exists():
        pytest.skip(f"shared data not found at {path} (this test reads the real data next to the repo)")
    return path
