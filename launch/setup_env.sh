#!/usr/bin/env bash
# Create a virtual environment with everything pma-dist needs, from nothing.
#   bash launch/setup_env.sh [VENV_DIR]        (default: .venv in the repository)
# torch is installed FIRST and pinned: an unpinned `torch` requirement pulls a multi-GB CUDA build.
# Override the pin for a GPU machine with e.g. TORCH_SPEC="torch==2.13.0" PIP_EXTRA_INDEX_URL=<your CUDA index>.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=${1:-$repo/.venv}
torch_spec=${TORCH_SPEC:-torch==2.13.0}
deepspeed_spec=${DEEPSPEED_SPEC:-deepspeed==0.19.8}
python=${PYTHON:-python3}

if [ ! -x "$venv/bin/python" ]; then
  echo "[setup_env] creating $venv"
  "$python" -m venv "$venv"
fi
pip() { "$venv/bin/python" -m pip "$@"; }
pip install -q --upgrade pip setuptools wheel
echo "[setup_env] installing $torch_spec"
pip install -q "$torch_spec" numpy
# DeepSpeed builds from source: without --no-build-isolation its build environment would fetch its own torch.
echo "[setup_env] installing $deepspeed_spec"
pip install -q --no-build-isolation "$deepspeed_spec"

extras=test
if command -v mpicc >/dev/null 2>&1; then
  extras=test,mpi
else
  echo "[setup_env] no MPI compiler (mpicc) found: skipping the mpi4py extra (apt-get install libopenmpi-dev openmpi-bin)"
fi
echo "[setup_env] installing pma-dist[$extras]"
pip install -q -e "$repo[$extras]"
"$venv/bin/python" -c "import torch, deepspeed, transformers, pma_dist; print('[setup_env] ready: torch', torch.__version__, '| deepspeed', deepspeed.__version__, '| transformers', transformers.__version__, '| pma_dist', pma_dist.__version__)"
