"""Build every C++ extension the test suite JIT-compiles, all at once, before pytest starts.

In a fresh venv every extension is compiled from scratch (pip gives torch's headers new mtimes, so even a
warm build cache is out of date). Left to the tests, the builds run one after another, each where a test
first needs it: the fused PMA kernel once per SIMD level (tests/test_kernels.py forces the narrower ones
in child runs; one translation unit each, so one core) and DeepSpeed's shared-memory comm op (built by
every CPU ``deepspeed.init_distributed``; two unequal translation units). Started together here they
keep both cores busy, and no build runs inside a multi-rank test, where it would count against the
launch's hard timeout (a rank killed mid-build also leaves the build's lock file behind). The tests
then load the same builds: same names, flags, interpreter and ninja.

Usage (the venv's python, venv activated): ``python .ci/prebuild_extensions.py``. Exits 1, with the
build's output, if one fails.
"""
from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
KERNEL = "from pma_dist.kernels.build import load_cpu_kernels; print(load_cpu_kernels().__name__)"
# What deepspeed.comm's TorchBackend runs at init (``import deepspeed.comm.torch as m`` would bind torch).
SHM = ("from deepspeed.comm.torch import build_shm_op; op = build_shm_op(); "
       "print('deepspeed_shm_comm' if op is not None else 'deepspeed_shm_comm: not compatible here, not built')")


def jobs():
    from pma_dist.kernels import build

    # The levels tests/test_kernels.py runs: this process's and every narrower one (ATEN_CPU_CAPABILITY).
    levels = build.CAPABILITIES[:build.CAPABILITIES.index(build.capability()) + 1]
    out = [(f"pma_dist kernel {level}", KERNEL, {"ATEN_CPU_CAPABILITY": level.lower()}) for level in levels]
    out.append(("deepspeed shm comm op", SHM, {"DS_ACCELERATOR": "cpu"}))
    return out


def run_build(name, code, env, started, results):
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
    results.append((name, proc, time.monotonic() - started))


def main() -> int:
    # As tests/conftest.py: this interpreter's tools (the venv's ninja) first, or the tests would rebuild.
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
               PATH=os.pathsep.join(filter(None, [os.path.dirname(sys.executable), os.environ.get("PATH")])))
    started, results = time.monotonic(), []
    threads = [threading.Thread(target=run_build, args=(name, code, dict(env, **extra), started, results))
               for name, code, extra in jobs()]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    failed = False
    for name, proc, took in results:
        if proc.returncode != 0:
            failed = True
            print(f"[prebuild] {name}: FAILED (exit {proc.returncode}) after {took:.0f} s\n{proc.stdout[-4000:]}",
                  file=sys.stderr)
        else:
            print(f"[prebuild] {name}: {proc.stdout.strip().splitlines()[-1]} after {took:.0f} s")
    print(f"[prebuild] all done in {time.monotonic() - started:.0f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
