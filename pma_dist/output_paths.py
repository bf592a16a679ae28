"""Output locations checked before any work: a run that cannot write its results must fail at start.

A check creates the directory (what the run would do first anyway) and writes and removes a probe file
in it, so every cause (a missing parent under ``/proc``, a read-only mount, no permission, root on a
read-only file system) gives the same one-line :class:`OutputPathError` naming the path, before a model
loads or a measurement runs. ``os.access`` alone is not enough: it answers "yes" to root for paths no
one can create.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

__all__ = ["OutputPathError", "check_writable_dir", "check_writable_file"]


class OutputPathError(ValueError):
    """An output path that cannot be written; the message names it, what it is for, and why."""


def check_writable_dir(path, what: str) -> Path:
    """Create ``path`` if needed and prove a file can be written in it; returns it as a Path."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputPathError(f"{what} {path} is a file, not a directory: remove it or pick another path")
    reason = _unwritable_reason(path)
    if reason:
        raise OutputPathError(f"{what} {path} is not writable ({reason}): pick a directory you can write")
    return path


def _unwritable_reason(directory: Path) -> str:
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".pma_dist_write_probe_", dir=directory)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        return exc.strerror or type(exc).__name__
    return ""


def check_writable_file(path, what: str) -> Path:
    """``path`` names a file that can be (re)written: not a directory, its directory writable."""
    path = Path(path)
    if path.is_dir():
        raise OutputPathError(f"{what} {path} is a directory: give a file name, such as {path / 'out.json'}")
    if path.exists() and not os.access(path, os.W_OK):
        raise OutputPathError(f"{what} {path} exists and is not writable")
    reason = _unwritable_reason(path.parent)
    if reason:
        raise OutputPathError(f"{what} {path} cannot be written: its directory {path.parent} is not writable "
                              f"({reason})")
    return path
