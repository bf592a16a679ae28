"""Checkpoints that are complete, verified and loaded without running code from them.

DeepSpeed writes a checkpoint tag directory from every rank. We add, after all ranks finished:
``manifest.json`` (size and sha256 of every file in the tag) and then the pointer file
``latest_verified`` (atomic rename). A run killed mid-save therefore still points at the previous
complete checkpoint, and a truncated or corrupted file is caught before DeepSpeed touches it, with
an error naming the file. Hashing is shared: on saving and on ``--resume`` every rank hashes its
:func:`shares` of the files (balanced by size) in parallel and the digests or the verdict are
gathered, so no rank reads the whole checkpoint and every rank raises the same error. Loading goes through :class:`SafeCheckpointEngine`, which calls
``torch.load(weights_only=True)`` with an allow-list of the few DeepSpeed types a checkpoint
holds; anything else is refused unless the user passes ``--trust-checkpoint``.
"""
from __future__ import annotations

import hashlib
import heapq
import json
import os
import pickle
import shutil
import zipfile
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from . import agree

POINTER = "latest_verified"
MANIFEST = "manifest.json"


@agree.known_error  # raised on every rank with the same message when one rank finds the problem
class CheckpointError(RuntimeError):
    """A checkpoint that is missing, incomplete, corrupted or unsafe to load; names the file."""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# ------------------------------------------------------------------------------ hashing in shares
def shares(sizes: Sequence[Tuple[str, int]], world: int) -> List[List[str]]:
    """Which files each of ``world`` ranks hashes: ``sizes`` is ``(name, bytes)`` in listing order.

    Largest file first, each to the rank with the fewest bytes so far (ties: the lowest rank), so
    every rank's total is within the largest file of the mean. A deterministic function of the list,
    so each rank computes everyone's share alike. DeepSpeed's per-rank names are not used: under
    ZeRO-0/1/2 ``mp_rank_00_model_states.pt`` (all the weights) is rank 0's, which would leave rank 0
    with far more than its share. Each rank's names keep the listing order."""
    loads = [(0, r) for r in range(world)]
    owner: Dict[str, int] = {}
    for name, size in sorted(sizes, key=lambda item: (-item[1], item[0])):
        load, rank = heapq.heappop(loads)
        owner[name] = rank
        heapq.heappush(loads, (load + size, rank))
    out: List[List[str]] = [[] for _ in range(world)]
    for name, _ in sizes:
        out[owner[name]].append(name)
    return out


def _comm(collective: bool):
    """(rank, world, run-on-rank-0-and-share, gather) for a collective call, or their one-process forms."""
    if collective:
        rank, world = agree.rank_and_world()
        return rank, world, agree.from_rank0, agree.gather
    return 0, 1, (lambda fn: fn()), (lambda obj: [obj])


def write_manifest(tag_dir: Path, client_state: dict, collective: bool = False) -> None:
    """Record every file of a finished checkpoint (after all ranks saved): ``manifest.json``, written by rank 0.

    ``collective``: every rank calls it and hashes its :func:`shares` of the files (in parallel), the
    digests are gathered on every rank, rank 0 writes the manifest; an unreadable file is an error on
    every rank. The manifest is the same as the one-process call writes."""
    rank, world, on_rank0, gather = _comm(collective)
    listing = on_rank0(lambda: [(str(p.relative_to(tag_dir)), p.stat().st_size)
                                for p in sorted(tag_dir.rglob("*")) if p.is_file() and p.name != MANIFEST])
    entries, fail = {}, None
    try:
        for name in shares(listing, world)[rank]:
            path = tag_dir / name
            entries[name] = {"bytes": path.stat().st_size, "sha256": _sha256(path)}
    except OSError as exc:
        fail = ("CheckpointError", f"cannot hash checkpoint file {exc.filename}: {exc.strerror}")
    gathered = gather((entries, fail))
    agree.raise_first([f for _, f in gathered])
    if rank == 0:
        merged = {name: entry for part, _ in gathered for name, entry in part.items()}
        files = {name: merged[name] for name, _ in listing}
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


def _read_manifest(tag_dir: Path) -> dict:
    manifest_path = tag_dir / MANIFEST
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
        for entry in files.values():
            if not (isinstance(entry["bytes"], int) and isinstance(entry["sha256"], str)):
                raise TypeError(f"an entry {entry!r} lacks an integer 'bytes' or a string 'sha256'")
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {tag_dir} has no {MANIFEST}: it was not completely saved") from None
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
        raise CheckpointError(f"{manifest_path} is corrupted ({exc})") from None
    return manifest


def _problem(tag_dir: Path, name: str, expected: dict) -> Optional[str]:
    """What is wrong with one file of the checkpoint, or None."""
    path = tag_dir / name
    if not path.exists():
        return f"checkpoint file missing: {path}"
    try:
        size = path.stat().st_size
        if size != expected["bytes"]:
            return (f"checkpoint file truncated or changed: {path} has {size} bytes, "
                    f"the manifest recorded {expected['bytes']}")
        if _sha256(path) != expected["sha256"]:
            return f"checkpoint file corrupted: {path} (sha256 differs from the manifest)"
    except OSError as exc:  # unreadable on this rank: a verdict like any other, not a hang of the peers
        return f"checkpoint file unreadable: {path} ({exc.strerror})"
    return None


def verify(tag_dir: Path, collective: bool = False) -> dict:
    """Check sizes and hashes against the manifest; return the saved client state.

    ``collective``: every rank calls it, rank 0 reads the manifest for all, each rank checks its
    :func:`shares` of the files (by the recorded sizes) and the verdict is gathered, so every rank
    returns the same state or raises the same :class:`CheckpointError`, naming the first bad file
    (in manifest order) and how many more there are."""
    rank, world, on_rank0, gather = _comm(collective)
    manifest = on_rank0(lambda: _read_manifest(tag_dir))
    files = manifest["files"]
    mine = shares([(name, entry["bytes"]) for name, entry in files.items()], world)[rank]
    bad = {}
    for name in mine:
        problem = _problem(tag_dir, name, files[name])
        if problem is not None:
            bad[name] = problem
            if not collective:
                break  # alone, stop at the first: the message is the same
    found = {name: problem for part in gather(bad) for name, problem in part.items()}
    if found:
        ordered = [found[name] for name in files if name in found]
        more = f" (and {len(ordered) - 1} more bad file(s) in this checkpoint)" if len(ordered) > 1 else ""
        raise CheckpointError(ordered[0] + more)
    return manifest.get("client_state", {})


def older_intact_hint(save_dir: Path, bad_tag: str, collective: bool = False) -> str:
    """'; the older checkpoint X is intact: ...' naming the newest other tag that verifies, or ''.

    ``collective``: every rank calls it (with the same verdict on ``bad_tag``); rank 0 lists the tags."""
    pointer = save_dir / POINTER
    _, _, on_rank0, _ = _comm(collective)
    others = on_rank0(lambda: [p.name for p in sorted(
        (p for p in save_dir.iterdir() if p.name != bad_tag and (p / MANIFEST).exists()),
        key=lambda p: p.stat().st_mtime, reverse=True)])
    for name in others:
        tag_dir = save_dir / name
        try:
            verify(tag_dir, collective)
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
