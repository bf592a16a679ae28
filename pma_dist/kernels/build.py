"""Just-in-time build of the fused CPU kernels (``pma_cpu.cpp``) with ``torch.utils.cpp_extension``.

The extension is compiled once per machine and cached by torch (``$TORCH_EXTENSIONS_DIR``, default
``~/.cache/torch_extensions``); later imports only load the shared library. It is compiled for the
SIMD level torch itself dispatches to on this CPU (AVX512, AVX2 or plain), and that level is part of
the extension's name so a cache shared by different machines never loads code the CPU cannot run.

Following torch's level (not the CPU's) keeps the kernel and the foreach path on the same code path:
torch's narrower levels round differently (its plain level, like the kernel's, has no FMA). To run
a narrower level on a wider CPU, set torch's own switch before starting Python,
``ATEN_CPU_CAPABILITY=avx2`` or ``=default``: torch and the kernel (a separate extension,
``pma_dist_cpu_kernels_avx2`` / ``_default``) both take it. The tests use it to check every level a
machine can run (``tests/test_kernels.py``).

Nothing here raises at import: :func:`load_cpu_kernels` returns the module or raises
:class:`FusedKernelUnavailable` with the reason (no compiler, build error, unsupported platform), and
:func:`unavailable_reason` reports the same reason without raising.
"""
from __future__ import annotations

import contextlib
import os
import platform
import shutil
import sys
import threading
from pathlib import Path
from typing import Optional

import torch

SOURCE = Path(__file__).with_name("pma_cpu.cpp")

# Flags per torch CPU capability. -ffp-contract=off keeps the compiler from fusing a multiply and an
# add that torch rounds separately (the kernels match the foreach path bit for bit).
_CAPABILITY_FLAGS = {
    "AVX512": ["-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512",
               "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c"],
    "AVX2": ["-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2", "-mavx2", "-mfma", "-mf16c"],
    "DEFAULT": ["-DCPU_CAPABILITY=DEFAULT"],
}
_COMMON_FLAGS = ["-O3", "-ffp-contract=off", "-fno-math-errno", "-fopenmp"]


class FusedKernelUnavailable(RuntimeError):
    """The fused CPU kernels cannot be built or loaded here; the message says why."""


_lock = threading.Lock()
_module = None
_error: Optional[str] = None


#: torch's x86 CPU capabilities the kernel is built for, narrowest first.
CAPABILITIES = ("DEFAULT", "AVX2", "AVX512")


def capability() -> str:
    """The SIMD level the kernel is (or will be) built for: torch's own, DEFAULT for any other."""
    level = torch.backends.cpu.get_cpu_capability()
    return level if level in _CAPABILITY_FLAGS else "DEFAULT"


def _compiler() -> str:
    return os.environ.get("CXX", "c++")


def load_cpu_kernels():
    """Build (first time) and load the extension; raise :class:`FusedKernelUnavailable` on failure."""
    global _module, _error
    with _lock:
        if _module is not None:
            return _module
        if _error is not None:
            raise FusedKernelUnavailable(_error)
        try:
            _module = _build()
        except FusedKernelUnavailable as exc:
            _error = str(exc)
            raise
        except Exception as exc:  # a compiler or loader failure: keep the first lines of its output
            detail = str(exc).strip().splitlines()
            _error = (f"building the fused PMA CPU kernels from {SOURCE} failed: "
                      + " | ".join(detail[:8]) + (" | ..." if len(detail) > 8 else ""))
            raise FusedKernelUnavailable(_error) from exc
        return _module


def unavailable_reason() -> Optional[str]:
    """``None`` if the kernels load, otherwise why not (builds them on first call)."""
    try:
        load_cpu_kernels()
    except FusedKernelUnavailable as exc:
        return str(exc)
    return None


@contextlib.contextmanager
def _interpreter_tools_first():
    """The interpreter's own bin directory (a venv's: the ninja pip installed) first on PATH while
    building. torch runs whichever ``ninja`` PATH names, and two ninja versions (a system one and the
    venv's) disagree about what is up to date, so a process with the venv activated and one without
    would rebuild the kernel in turn."""
    bindir = os.path.dirname(sys.executable)
    path = os.environ.get("PATH", "")
    if not os.path.isfile(os.path.join(bindir, "ninja")) or path.split(os.pathsep)[0] == bindir:
        yield
        return
    os.environ["PATH"] = bindir + os.pathsep + path
    try:
        yield
    finally:
        os.environ["PATH"] = path


def _build():
    if platform.system() == "Windows":
        raise FusedKernelUnavailable("the fused PMA CPU kernels are built with GCC/Clang flags; not supported on Windows")
    compiler = _compiler()
    if shutil.which(compiler) is None:
        raise FusedKernelUnavailable(
            f"no C++ compiler: {compiler!r} (from $CXX, default 'c++') is not on PATH; install g++ or clang++ "
            f"or select the foreach path (fused=False)")
    from torch.utils.cpp_extension import load  # imported lazily: it pulls in setuptools

    level = capability()
    flags = _COMMON_FLAGS + _CAPABILITY_FLAGS[level]
    with _interpreter_tools_first():
        return load(
            name=f"pma_dist_cpu_kernels_{level.lower()}",
            sources=[str(SOURCE)],
            extra_cflags=flags,
            extra_ldflags=["-fopenmp"],
            verbose=os.environ.get("PMA_DIST_VERBOSE_BUILD") == "1",
        )
