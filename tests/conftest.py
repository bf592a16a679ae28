import os
import sys

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")

# As if the venv were activated (the README runs `.venv/bin/python -m pytest` without activating it): its
# tools come first for this process and every launcher and rank it starts. Otherwise this process would
# build the C++ extensions with another ninja (e.g. /usr/bin/ninja 1.11) than the ranks started through
# the venv's launchers (its ninja 1.13), and each switch rebuilds them all in the shared build cache.
_VENV_BIN = os.path.dirname(sys.executable)
if os.environ.get("PATH", "").split(os.pathsep)[0] != _VENV_BIN:
    os.environ["PATH"] = _VENV_BIN + os.pathsep + os.environ.get("PATH", "")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: multi-process or long test (CI runs them)")
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU; skipped with the reason on machines without one "
                                       "(run them there with: python benchmarks/gpu_check.py --out DIR)")


NO_CUDA_REASON = ("needs a CUDA GPU and torch.cuda.is_available() is False here; on a GPU machine run "
                  "`python benchmarks/gpu_check.py --out DIR` (or `pytest -m cuda`)")


def pytest_collection_modifyitems(config, items):
    cuda_items = [item for item in items if item.get_closest_marker("cuda") is not None]
    if not cuda_items:
        return
    import pytest
    import torch

    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason=NO_CUDA_REASON)
        for item in cuda_items:
            item.add_marker(skip)
