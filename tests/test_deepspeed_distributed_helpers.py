"""``pma_dist.distributed`` in one process: argv clean-up, MPI environment translation, clear errors,
and the launch recipes' syntax. (``shutdown`` and mpi4py discovery run in every launched worker.)"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from pma_dist import distributed
from tests.launching import REPO

TORCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
MPI_VARS = ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK",
            "OMPI_COMM_WORLD_LOCAL_SIZE", "PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID", "MPI_LOCALNRANKS")


@pytest.fixture
def clean_env(monkeypatch):
    saved = dict(os.environ)  # the code under test exports variables: none may leak into later tests
    for name in TORCH_VARS + MPI_VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setitem(sys.modules, "mpi4py", None)  # take the environment-variable path
    yield monkeypatch
    os.environ.clear()
    os.environ.update(saved)


def test_inherited_rank_variables_do_not_override_mpi(clean_env):
    for name, value in zip(MPI_VARS[:4], ("0", "2", "0", "2")):
        clean_env.setenv(name, value)
    clean_env.setenv("RANK", "1")  # stale, e.g. left in the shell: two ranks would both be 1
    clean_env.setenv("LOCAL_RANK", "1")
    assert distributed.setup_env_from_mpi() == distributed.RankInfo(0, 2, 0, 2)
    assert (os.environ["RANK"], os.environ["LOCAL_RANK"]) == ("0", "0")


@pytest.mark.parametrize("argv, expected, rest", [
    (["train.py", "--local_rank=3", "--lr", "1"], 3, ["train.py", "--lr", "1"]),
    (["train.py", "--lr", "1", "--local_rank", "1"], 1, ["train.py", "--lr", "1"]),
    (["train.py", "--local-rank=2"], 2, ["train.py"]),
    (["train.py", "--lr", "1"], None, ["train.py", "--lr", "1"]),
])
def test_pop_local_rank_arg(argv, expected, rest):
    assert distributed.pop_local_rank_arg(argv) == expected
    assert argv == rest


def test_outside_mpi_setup_is_a_no_op(clean_env):
    assert not distributed.in_mpi_env()
    assert distributed.setup_env_from_mpi() is None
    assert "RANK" not in os.environ
    assert distributed.rank_info() == distributed.RankInfo(0, 1, 0, 1)


def test_open_mpi_variables_become_torch_variables(clean_env):
    for name, value in zip(MPI_VARS[:4], ("1", "2", "1", "2")):
        clean_env.setenv(name, value)
    clean_env.setenv("MASTER_PORT", "31234")
    info = distributed.setup_env_from_mpi()
    assert info == distributed.RankInfo(rank=1, world_size=2, local_rank=1, local_world_size=2)
    assert [os.environ[n] for n in TORCH_VARS] == ["1", "2", "1", "2", "127.0.0.1", "31234"]
    assert distributed.rank_info() == info


def test_mpich_variables_are_understood(clean_env):
    clean_env.setenv("PMI_RANK", "0")
    clean_env.setenv("PMI_SIZE", "4")
    clean_env.setenv("MPI_LOCALNRANKS", "4")
    info = distributed.setup_env_from_mpi(master_port=29777)
    assert info == distributed.RankInfo(0, 4, 0, 4)
    assert os.environ["MASTER_PORT"] == "29777"


def test_multi_host_mpi_without_mpi4py_needs_master_addr(clean_env):
    for name, value in zip(MPI_VARS[:4], ("0", "16", "0", "8")):
        clean_env.setenv(name, value)
    with pytest.raises(RuntimeError, match="MASTER_ADDR"):
        distributed.setup_env_from_mpi()


def test_bad_rank_variable_is_named(clean_env):
    clean_env.setenv("RANK", "zero")
    with pytest.raises(ValueError, match="RANK='zero'"):
        distributed.rank_info()


def test_multi_rank_init_without_rendezvous_names_the_missing_variables(clean_env):
    clean_env.setenv("WORLD_SIZE", "2")
    clean_env.setenv("RANK", "0")
    with pytest.raises(RuntimeError, match="MASTER_ADDR, MASTER_PORT"):
        distributed.init_distributed()


def test_launch_recipes_are_valid_bash():
    scripts = sorted((REPO / "launch").glob("*/*.sh"))
    assert {p.relative_to(REPO / "launch").as_posix() for p in scripts} >= {
        "cpu/deepspeed.sh", "cpu/torchrun.sh", "cpu/mpirun.sh", "gpu/deepspeed.sh", "gpu/torchrun.sh",
        "gpu/mpirun.sh", "gpu/multinode_deepspeed.sh"}
    for script in scripts:
        check = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
        assert check.returncode == 0, f"{script}: {check.stderr}"
        assert os.access(script, os.X_OK), f"{script} is not executable"


def test_recipe_without_script_prints_usage():
    proc = subprocess.run(["bash", str(REPO / "launch" / "cpu" / "torchrun.sh")], capture_output=True, text=True)
    assert proc.returncode != 0 and "usage:" in proc.stderr


def test_hostfile_example_has_slots_per_host():
    lines = [l for l in (REPO / "launch" / "hostfile.example").read_text().splitlines()
             if l.strip() and not l.startswith("#")]
    assert lines and all(len(l.split()) == 2 and l.split()[1].startswith("slots=") for l in lines)
