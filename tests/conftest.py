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
