"""Ranks that agree: work one rank does (or each rank does a share of) ends the same way on every rank.

When one rank reads the data or a checkpoint for all of them, an error it meets must stop every
rank before training, with the same message, instead of leaving the others waiting at the next
collective until the timeout. :func:`from_rank0` runs a function on rank 0 and hands its result, or
its error, to every rank; :func:`raise_first` turns the errors the ranks gathered into one exception
raised on all of them. Without a process group (or with one rank) both reduce to plain calls.

Only small objects travel (a status, a file list, a few digests): ``*_object`` collectives pickle
them, which is safe here because sender and receiver are ranks of the same job; nothing read from a
file is unpickled.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence, Tuple, Type

import torch.distributed as dist

#: exceptions that keep their type when another rank re-raises them (each takes one message argument)
_KNOWN: Dict[str, Type[Exception]] = {}


def known_error(cls: Type[Exception]) -> Type[Exception]:
    """Register an exception class that other ranks re-raise with its own type (used as a decorator or call)."""
    _KNOWN[cls.__name__] = cls
    return cls


def distributed() -> bool:
    return dist.is_initialized() and dist.get_world_size() > 1


def rank_and_world() -> Tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


Failure = Optional[Tuple[str, str]]  # (exception class name, message), or None for success


def failure(exc: BaseException) -> Tuple[str, str]:
    return type(exc).__name__, str(exc)


def rebuild(fail: Tuple[str, str], where: str) -> Exception:
    """The exception to raise for a failure another rank reported (its type if known, else RuntimeError)."""
    name, message = fail
    if name in _KNOWN:
        return _KNOWN[name](message)
    return RuntimeError(f"{where} failed: {name}: {message}")


def from_rank0(fn: Callable[[], object]):
    """``fn()`` run on rank 0 only; its return value on every rank, or its error raised on every rank.

    Rank 0 re-raises its own exception (with its traceback); the others raise the same type with the
    same message when the type is registered with :func:`known_error`, else a RuntimeError naming it."""
    rank, _ = rank_and_world()
    result, fail, original = None, None, None
    if rank == 0:
        try:
            result = fn()
        except Exception as exc:  # every failure must reach the other ranks, or they wait forever
            fail, original = failure(exc), exc
    if distributed():
        box = [(result, fail)]
        dist.broadcast_object_list(box, src=0)
        result, fail = box[0]
    if original is not None:
        raise original
    if fail is not None:
        raise rebuild(fail, "rank 0")
    return result


def gather(obj) -> List[object]:
    """Every rank's ``obj``, in rank order, on every rank."""
    if not distributed():
        return [obj]
    out: List[object] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def raise_first(fails: Sequence[Failure]) -> None:
    """Raise, on every rank, the failure of the lowest rank that reported one (``fails`` is gathered)."""
    for rank, fail in enumerate(fails):
        if fail is not None:
            raise rebuild(fail, f"rank {rank}")
