"""Checkpoints that are complete, verified and loaded without running code from them.

DeepSpeed writes a checkpoint tag directory from every rank. We add, after all ranks finished:
``manifest.json`` (size and sha256 of every file in the tag) and then the pointer file
``latest_verified`` (atomic rename). A run killed mid-save therefore still points at the previous
complete checkpoint, and a truncated or corrupted file is caught before DeepSpeed touches it, with
an error naming the file. Loading goes through :class:`SafeCheckpointEngine`, which calls
``torch.load(weights_only=True)`` with an allow-list of the few DeepSpeed types a checkpoint
holds; anything else is refused unless the user passes ``--trust-checkpoint``.
"""
from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import zipfile
from pathlib import Path
from typing import Optional

import torch

POINTER = "latest_verified"
MANIFEST = "manifest.json"


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, incomplete, corrupted or unsafe to load; names the file."""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_manifest(tag_dir: Path, client_state: dict) -> None:
    """Record every file of a finished checkpoint (rank 0, after all ranks saved)."""
    files = {str(p.relative_to(tag_dir)): {"bytes": p.stat().st_size, "sha256": _sha256(p)}
             for p in sorted(tag_dir.rglob("*")) if p.is_file() and p.name != MANIFEST}
    _atomic_write(tag_dir / MANIFEST, json.dumps({"files": files, "client_state": client_state}, indent=1))


def publish(save_dir: Path, tag: str, keep: int, lineage: str) -> None:
    """Point ``latest_verified`` at ``tag`` and delete all but the newest ``keep`` verified tags of ``lineage``.

    A lineage is one run and its resumptions (the id is in each manifest's client state); checkpoints of
    any other run, or without a lineage (written before it existed), are never deleted."""
    _atomic_write(save_dir / POINTER, tag)
    ours = [p for p in save_dir.iterdir() if (p / MANIFEST).exists() and _lineage(p) == lineage]
    ours.sort(key=lambda p: p.stat().st_mtime)
    for old in ours[:-keep] if keep > 0 else []:
        if old.name != tag:
            shutil.rmtree(old, ignore_errors=True)


def _lineage(tag_dir: Path) -> Optional[str]:
    try:
        return json.loads((tag_dir / MANIFEST).read_text()).get("client_state", {}).get("lineage")
    except (OSError, json.JSONDecodeError, AttributeError):
        return None  # unreadable: not provably ours, so kept


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def latest_tag(save_dir: Path) -> Optional[str]:
    pointer = save_dir / POINTER
    if not pointer.exists():
        return None
    tag = pointer.read_text().strip()
    if not tag or not (save_dir / tag).is_dir():
        raise CheckpointError(f"{pointer} names checkpoint {tag!r}, but {save_dir / tag} does not exist")
    return tag


def verify(tag_dir: Path) -> dict:
    """Check sizes and hashes against the manifest; return the saved client state."""
    manifest_path = tag_dir / MANIFEST
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {tag_dir} has no {MANIFEST}: it was not completely saved") from None
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{manifest_path} is corrupted ({exc})") from None
    for name, expected in files.items():
        path = tag_dir / name
        if not path.exists():
            raise CheckpointError(f"checkpoint file missing: {path}")
        size = path.stat().st_size
        if size != expected["bytes"]:
            raise CheckpointError(f"checkpoint file truncated or changed: {path} has {size} bytes, "
                                  f"the manifest recorded {expected['bytes']}")
        if _sha256(path) != expected["sha256"]:
            raise CheckpointError(f"checkpoint file corrupted: {path} (sha256 differs from the manifest)")
    return manifest.get("client_state", {})


def older_intact_hint(save_dir: Path, bad_tag: str) -> str:
    """'; the older checkpoint X is intact: ...' naming the newest other tag that verifies, or ''."""
    pointer = save_dir / POINTER
    others = [p for p in save_dir.iterdir() if p.name != bad_tag and (p / MANIFEST).exists()]
    for tag_dir in sorted(others, key=lambda p: p.stat().st_mtime, reverse=True):
        try:
            verify(tag_dir)
        except CheckpointError:
            continue
        return (f"; the older checkpoint {tag_dir} is intact: to resume from it, write its name into {pointer} "
                f"(echo {tag_dir.name} > {pointer}) and --resume again")
    return "; no older intact checkpoint was found"


# ------------------------------------------------------------------------------ safe loading
def _deepspeed_safe_globals() -> list:
    """DeepSpeed types that plain ZeRO 0-3 checkpoints pickle; all are plain data."""
    allowed = []
    try:
        from deepspeed.runtime.zero.config import ZeroStageEnum
        allowed.append(ZeroStageEnum)
    except ImportError:
        pass
    try:
        from deepspeed.utils.tensor_fragment import fragment_address
        allowed.append(fragment_address)
    except ImportError:
        pass
    try:
        from deepspeed.runtime.fp16.loss_scaler import LossScaler, DynamicLossScaler
        allowed += [LossScaler, DynamicLossScaler]
    except ImportError:
        pass
    return allowed


def load_file(path: str, map_location=None, trust: bool = False):
    """``torch.load`` a checkpoint file: weights-only unless ``trust``; errors name the file."""
    try:
        if trust:
            return torch.load(path, map_location=map_location, weights_only=False)
        with torch.serialization.safe_globals(_deepspeed_safe_globals()):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        if "weights_only" in str(exc) or "Unsupported global" in str(exc):
            raise CheckpointError(f"{path}: refusing to unpickle a non-tensor object ({str(exc).splitlines()[0]}); "
                                  f"pass --trust-checkpoint only if you trust where this file came from") from None
        raise CheckpointError(f"{path}: corrupted checkpoint file ({exc})") from None
    except (EOFError, RuntimeError, zipfile.BadZipFile, OSError) as exc:
        raise CheckpointError(f"{path}: truncated or corrupted checkpoint file ({type(exc).__name__}: {exc})") from None


def install_safe_engine(engine, trust: bool = False) -> None:
    """Make ``engine.load_checkpoint`` read files through :func:`load_file`."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    if not isinstance(engine.checkpoint_engine, TorchCheckpointEngine):
        return  # another engine (e.g. Nebula, decoupled) was configured on purpose: leave it alone
    original = engine.checkpoint_engine

    class SafeCheckpointEngine(type(original)):
        def load(self, path, map_location=None):
            return load_file(path, map_location=map_location, trust=trust)

    original.__class__ = SafeCheckpointEngine
