"""The communication ledger: one accounting layer under DeepSpeed, FSDP2, DDP and user code.

Every ``torch.distributed`` collective is a Python function in ``torch.distributed.distributed_c10d``,
re-exported as ``torch.distributed.<name>``. DeepSpeed's ``deepspeed.comm`` calls those functions (some
through references it captured at start-up), FSDP2 calls ``dist.all_gather_single`` /
``dist.reduce_scatter_single`` / ``dist.all_reduce`` as module attributes, user code calls either
spelling. Replacing the functions in both modules therefore sees all of them. DDP's reducer is C++ and
never calls Python collectives; :meth:`CommLedger.ddp_comm_hook` routes its bucket all-reduces through
the patched ``all_reduce`` so they are seen too.

Each collective is counted once: torch's own wrappers call each other (``all_gather_into_tensor`` ->
``all_gather_single``, ``reduce_scatter_tensor`` -> ``reduce_scatter_single``) and deepspeed.comm calls
torch, so a thread-local depth counter lets only the outermost patched call record.

Bytes follow the nccl-tests convention, the logical message and not the wire traffic: the full buffer,
i.e. all-gather OUTPUT, reduce-scatter INPUT, all-reduce / broadcast / reduce buffer (gloo implements
reduce-scatter as an all-reduce, which this deliberately does not show). Seconds are the wall time of
the Python call: for a blocking call the whole collective, for ``async_op=True`` only the time to issue it
(the wait happens elsewhere, often overlapped with compute).

Nothing is patched until :meth:`CommLedger.install`; with no ledger installed the functions are torch's
own, so "off" costs nothing. File format: see ``docs/comm_accounting.md``.
"""
from __future__ import annotations

import json
import os
import threading
import time
from collections import defaultdict
from contextlib import contextmanager
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import torch
import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d

from .placement import rank_placement

FORMAT_VERSION = 1
WRITE_BUDGET = 0.01  # periodic rewrites may take at most this share of the wall time ...
WRITE_FREE_SECONDS = 0.02  # ... once a single write takes longer than this
PHASES = ("forward", "backward", "step", "other", "adapm")  # adapm: AdaPM's sharded sums, inside its step
PMA_KINDS = ("small", "large")
GA_KINDS = ("accumulate", "boundary")
NO_KIND = "none"


def _nbytes(tensor) -> int:
    return tensor.numel() * tensor.element_size() if isinstance(tensor, torch.Tensor) else 0


def _list_nbytes(tensors) -> int:
    return sum(_nbytes(t) for t in tensors or ())


def _nested_nbytes(lists) -> int:
    return sum(_list_nbytes(inner) for inner in lists or ())


def _group_size(group) -> int:
    try:
        return dist.get_world_size(group)
    except Exception:  # not initialised or not a member: the message size is still the local buffer
        return 1


def _argument(args, kwargs, name: str, position: int):
    return args[position] if position < len(args) else kwargs.get(name)


def _group_ranks(group) -> Optional[Tuple[int, ...]]:
    """The group's global ranks; None for a group of every rank (the default group, DeepSpeed's
    data-parallel group); ``()`` for a group torch cannot name (a foreign object): counted, not attributed."""
    if group is None or group is getattr(c10d.GroupMember, "WORLD", None):
        return None
    try:
        ranks = tuple(dist.get_process_group_ranks(group))
    except Exception:
        return ()
    return None if ranks == tuple(range(dist.get_world_size())) else ranks


def _root(root_args, args, kwargs, ranks: Optional[Tuple[int, ...]]) -> Optional[int]:
    """A broadcast's / reduce's root as a global rank, from its ``_ROOT_ARGS`` entry."""
    (global_name, global_at), (local_name, local_at) = root_args
    root = _argument(args, kwargs, global_name, global_at)
    if root is None:
        local = _argument(args, kwargs, local_name, local_at)
        if local is None:
            return None
        return int(ranks[local]) if ranks else int(local)
    return int(root)


# torch function name -> (normalised op, argument holding the message, its position in torch's signature,
# how its bytes are counted). "times_group" sizes a message from one rank's piece when no full buffer is
# passed (gather/scatter on non-root ranks; their ``group`` is at _GROUP_POSITION).
# Positions are written down, not read with inspect.signature: another tool may already have replaced a
# collective with a ``(*args, **kwargs)`` wrapper, whose signature names no argument. They are torch's
# public signatures; tests/test_comm_ledger.py checks them against the installed torch.
_COLLECTIVES: Dict[str, Tuple[str, str, int, str]] = {
    "all_reduce": ("all_reduce", "tensor", 0, "tensor"),
    "all_reduce_coalesced": ("all_reduce", "tensors", 0, "list"),
    "broadcast": ("broadcast", "tensor", 0, "tensor"),
    "reduce": ("reduce", "tensor", 0, "tensor"),
    "all_gather": ("all_gather", "tensor_list", 0, "list"),
    "all_gather_single": ("all_gather", "output_tensor", 0, "tensor"),
    "all_gather_into_tensor": ("all_gather", "output_tensor", 0, "tensor"),
    "_all_gather_base": ("all_gather", "output_tensor", 0, "tensor"),
    "all_gather_coalesced": ("all_gather", "output_tensor_lists", 0, "nested"),
    "reduce_scatter": ("reduce_scatter", "input_list", 1, "list"),
    "reduce_scatter_single": ("reduce_scatter", "input", 1, "tensor"),
    "reduce_scatter_tensor": ("reduce_scatter", "input", 1, "tensor"),
    "_reduce_scatter_base": ("reduce_scatter", "input", 1, "tensor"),
    "all_to_all_single": ("all_to_all", "input", 1, "tensor"),
    "all_to_all": ("all_to_all", "input_tensor_list", 1, "list"),
    "gather": ("gather", "tensor", 0, "times_group"),
    "scatter": ("scatter", "tensor", 0, "times_group"),
    "barrier": ("barrier", "", -1, "none"),
    "monitored_barrier": ("barrier", "", -1, "none"),
    "send": ("send", "tensor", 0, "tensor"),
    "isend": ("send", "tensor", 0, "tensor"),
    "recv": ("recv", "tensor", 0, "tensor"),
    "irecv": ("recv", "tensor", 0, "tensor"),
}
# Where each collective takes its ``group`` and (broadcast / reduce) its root, as (name, position) in
# torch's signatures (checked in tests/test_comm_ledger.py): the link attribution
# (pma_dist.comm.links) needs the group's ranks, and a broadcast's or reduce's root.
_GROUP_POSITION: Dict[str, int] = {
    "all_reduce": 2, "all_reduce_coalesced": 2, "broadcast": 2, "reduce": 3, "all_gather": 2,
    "all_gather_single": 2, "all_gather_into_tensor": 2, "_all_gather_base": 2, "all_gather_coalesced": 2,
    "reduce_scatter": 3, "reduce_scatter_single": 3, "reduce_scatter_tensor": 3, "_reduce_scatter_base": 3,
    "all_to_all_single": 4, "all_to_all": 2, "gather": 3, "scatter": 3, "barrier": 0, "monitored_barrier": 0,
    "send": 2, "isend": 2, "recv": 2, "irecv": 2,
}
# (global root, its position), (root within the group, its position)
_ROOT_ARGS: Dict[str, Tuple[Tuple[str, int], Tuple[str, int]]] = {
    "broadcast": (("src", 1), ("group_src", 4)),
    "reduce": (("dst", 1), ("group_dst", 5)),
}
# Object collectives (all_gather_object, broadcast_object_list, ...) are left alone on purpose: they are
# built from the tensor collectives above, which count the real messages they send.

_MEASURE = {"tensor": _nbytes, "list": _list_nbytes, "nested": _nested_nbytes}


class _Interceptor:
    """The patched functions, shared by whichever ledger is active (at most one at a time)."""

    def __init__(self):
        self.originals: Dict[Tuple[object, str], Callable] = {}
        self.local = threading.local()
        self.ledger: Optional["CommLedger"] = None
        # id(group) -> (group, its ranks): a collective's group is looked up once, not per call (the
        # group is held, so its id cannot be reused by a new group while the entry exists)
        self.group_cache: Dict[int, Tuple[object, Optional[Tuple[int, ...]]]] = {}

    def group_ranks(self, group) -> Optional[Tuple[int, ...]]:
        if group is None:
            return None
        entry = self.group_cache.get(id(group))
        if entry is None or entry[0] is not group:
            entry = self.group_cache[id(group)] = (group, _group_ranks(group))
        return entry[1]

    def install(self, ledger: "CommLedger") -> None:
        if self.ledger is not None:
            raise RuntimeError(
                f"a CommLedger is already installed (output_dir={self.ledger.output_dir!r}); "
                "close it before installing another")
        self.ledger = ledger
        wrapped: Dict[int, Callable] = {}
        for name, spec in _COLLECTIVES.items():
            for module in (c10d, dist):
                original = getattr(module, name, None)
                if original is None:
                    continue
                if id(original) not in wrapped:
                    wrapped[id(original)] = self._wrap(name, spec, original)
                self.originals[(module, name)] = original
                setattr(module, name, wrapped[id(original)])

    def uninstall(self) -> None:
        for (module, name), original in self.originals.items():
            setattr(module, name, original)
        self.originals.clear()
        self.group_cache.clear()
        self.ledger = None

    def _wrap(self, name: str, spec: Tuple[str, str, int, str], original: Callable) -> Callable:
        op, arg_name, arg_index, how = spec
        group_index = _GROUP_POSITION[name]
        root_args = _ROOT_ARGS.get(name)
        local = self.local
        interceptor = self

        def counted(*args, **kwargs):
            depth = getattr(local, "depth", 0)
            ledger = interceptor.ledger
            if depth or ledger is None:
                return original(*args, **kwargs)
            local.depth = 1
            try:
                start = time.perf_counter()
                result = original(*args, **kwargs)
                seconds = time.perf_counter() - start
            finally:
                local.depth = 0
            group = _argument(args, kwargs, "group", group_index)
            if arg_index < 0:
                nbytes = 0
            else:
                arg = args[arg_index] if arg_index < len(args) else kwargs.get(arg_name)
                if how == "times_group":
                    nbytes = _nbytes(arg) * _group_size(group)
                else:
                    nbytes = _MEASURE[how](arg)
            ranks = interceptor.group_ranks(group)
            root = _root(root_args, args, kwargs, ranks) if root_args else None
            ledger.record(op, nbytes, seconds, name, group=ranks, root=root)
            return result

        counted.__wrapped__ = original
        counted.__name__ = name
        counted.__doc__ = original.__doc__
        return counted


def _record_order(item) -> tuple:
    (m, k, p, op, group, root), _ = item
    return (m, k, p, op, group is not None, group or (), root is not None, root or 0)


_INTERCEPTOR = _Interceptor()
_OPEN_LEDGERS: List["CommLedger"] = []


def active_ledger() -> Optional["CommLedger"]:
    """The installed ledger, or None (then no collective function is patched)."""
    return _INTERCEPTOR.ledger


def close_all() -> None:
    """Close every open ledger (writes their files). Call before ``os._exit``; safe to call twice."""
    for ledger in list(_OPEN_LEDGERS):
        ledger.close()


class CommLedger:
    """Counts collectives per (micro-step, PMA/GA kind, phase, op, sub-group, root) and writes
    ``comm_rank{r}.json`` with this rank's placement (:mod:`pma_dist.comm.placement`) in its meta.

    Args:
        output_dir: folder for ``comm_rank{rank}.json`` (created on first write).
        meta: run description copied into the file (optimizer, zero_stage, period, world_size, dtype,
            param_count, param_bytes, backend, ...). ``period`` also sets how often the file is rewritten.
        keep_calls: also keep every call (op, torch function, bytes, phase, micro-step) in
            ``"calls"`` — for debugging a model mismatch; off by default (files stay small).
        write_every: rewrite the file after this many micro-steps (default: the period, else 1).
    """

    def __init__(self, output_dir: str, meta: Optional[dict] = None, *, keep_calls: bool = False,
                 write_every: Optional[int] = None):
        if not isinstance(output_dir, (str, os.PathLike)) or not str(output_dir):
            raise ValueError(f"comm ledger output_dir must be a non-empty path, got {output_dir!r}")
        self.output_dir = str(output_dir)
        self.meta = dict(meta or {})
        period = self.meta.get("period")
        write_every = write_every if write_every is not None else (period if period else 1)
        if isinstance(write_every, bool) or not isinstance(write_every, int) or write_every < 1:
            raise ValueError(f"comm ledger write_every must be a positive int, got {write_every!r}")
        self.write_every = write_every
        self.keep_calls = keep_calls
        self.phase = "other"
        self.micro_step = -1
        self.kind = NO_KIND
        self.micro_steps = 0
        # (micro_step, kind, phase, op, group ranks or None, root or None) -> [count, bytes, seconds]
        self.totals: Dict[tuple, List[float]] = defaultdict(lambda: [0, 0, 0.0])
        # read now, so a malformed launcher variable stops the run before it trains
        self.placement = rank_placement()
        self.calls: List[dict] = []
        self.installed = False
        self.closed = False
        self._close_callbacks: List[Callable[["CommLedger"], None]] = []
        self._lock = threading.Lock()
        self._next_write_at = 0.0

    # --- switching on and off -------------------------------------------------------------
    def install(self) -> "CommLedger":
        if self.closed:
            raise RuntimeError(f"CommLedger({self.output_dir!r}) is closed; create a new one")
        if not self.installed:
            _INTERCEPTOR.install(self)
            self.installed = True
            if self not in _OPEN_LEDGERS:
                _OPEN_LEDGERS.append(self)
        return self

    def uninstall(self) -> None:
        if self.installed:
            _INTERCEPTOR.uninstall()
            self.installed = False

    def __enter__(self) -> "CommLedger":
        return self.install()

    def __exit__(self, *exc) -> None:
        self.close()

    # --- attribution ----------------------------------------------------------------------
    def mark_phase(self, phase: str) -> None:
        if phase not in PHASES:
            raise ValueError(f"unknown phase {phase!r}; expected one of {PHASES}")
        self.phase = phase

    @contextmanager
    def in_phase(self, phase: str) -> Iterator[None]:
        previous = self.phase
        self.mark_phase(phase)
        try:
            yield
        finally:
            self.phase = previous

    def begin_micro_step(self, index: int, kind: str) -> None:
        """Start micro-step ``index``; ``kind`` is "small"/"large" (PMA) or "accumulate"/"boundary" (GA)."""
        if kind not in PMA_KINDS + GA_KINDS + (NO_KIND,):
            raise ValueError(f"unknown micro-step kind {kind!r}; expected one of {PMA_KINDS + GA_KINDS}")
        self.micro_step = int(index)
        self.kind = kind
        self.micro_steps += 1

    def end_micro_step(self) -> None:
        """Micro-step finished (after the optimizer step): rewrite the file every ``write_every`` steps.

        The file holds every micro-step, so a rewrite grows with the run. A write that took longer than
        ``WRITE_FREE_SECONDS`` defers the next periodic one until at most ``WRITE_BUDGET`` of the wall
        time has gone into writing; small files (every test, short runs) are written every period.
        """
        self.phase = "other"
        if self.micro_steps % self.write_every == 0 and time.monotonic() >= self._next_write_at:
            start = time.monotonic()
            self.write()
            took = time.monotonic() - start
            if took > WRITE_FREE_SECONDS:
                self._next_write_at = start + took / WRITE_BUDGET

    def record(self, op: str, nbytes: int, seconds: float, function: str = "", *,
               group: Optional[Tuple[int, ...]] = None, root: Optional[int] = None) -> None:
        """Count one collective. ``group``: its global ranks (None: the whole world; ``()``: a group
        torch could not name); ``root``: a broadcast's / reduce's global root."""
        with self._lock:
            entry = self.totals[(self.micro_step, self.kind, self.phase, op, group, root)]
            entry[0] += 1
            entry[1] += nbytes
            entry[2] += seconds
            if self.keep_calls:
                call = {"micro_step": self.micro_step, "phase": self.phase, "op": op, "function": function,
                        "bytes": nbytes}
                if group is not None:
                    call["group"] = list(group)
                if root is not None:
                    call["root"] = root
                self.calls.append(call)

    # --- DDP ------------------------------------------------------------------------------
    def ddp_comm_hook(self, process_group=None):
        """A DDP comm hook (``ddp.register_comm_hook(None, ledger.ddp_comm_hook())``).

        DDP's C++ reducer all-reduces its buckets without calling Python collectives; this hook does
        the same averaging all-reduce through ``torch.distributed.all_reduce``, so the ledger counts
        each bucket (phase "backward") exactly like any other collective.
        """
        ledger = self

        def allreduce_and_count(_state, bucket):
            group = process_group if process_group is not None else c10d._get_default_group()
            buffer = bucket.buffer().div_(dist.get_world_size(group))
            with ledger.in_phase("backward"):
                work = dist.all_reduce(buffer, group=group, async_op=True)
            return work.get_future().then(lambda fut: fut.value()[0])

        return allreduce_and_count

    # --- files ----------------------------------------------------------------------------
    @property
    def rank(self) -> int:
        return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0

    @property
    def path(self) -> str:
        return os.path.join(self.output_dir, f"comm_rank{self.rank}.json")

    def to_dict(self) -> dict:
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        everyone = tuple(range(world))
        with self._lock:
            merged: Dict[tuple, List[float]] = defaultdict(lambda: [0, 0, 0.0])
            for (m, k, p, op, group, root), (c, b, s) in self.totals.items():
                group = None if group == everyone else group  # e.g. DeepSpeed's data-parallel group of all
                entry = merged[(m, k, p, op, group, root)]
                entry[0] += c
                entry[1] += b
                entry[2] += s
            calls = list(self.calls)
        records = []
        for (m, k, p, op, group, root), (c, b, s) in sorted(merged.items(), key=_record_order):
            record = {"micro_step": m, "pma_kind": k, "phase": p, "op": op, "count": int(c), "bytes": int(b),
                      "seconds": s}
            if group is not None:
                record["group"] = list(group)
            if root is not None:
                record["root"] = root
            records.append(record)
        meta = dict(self.meta, rank=self.rank, placement=self.placement, micro_steps=self.micro_steps,
                    format_version=FORMAT_VERSION)
        out = {"meta": meta, "records": records}
        if self.keep_calls:
            out["calls"] = calls
        return out

    def write(self) -> str:
        """Write ``comm_rank{r}.json`` atomically (a reader never sees half a file)."""
        os.makedirs(self.output_dir, exist_ok=True)
        path = self.path
        tmp = f"{path}.tmp{os.getpid()}"
        text = json.dumps(self.to_dict(), separators=(",", ":"))  # one write: json.dump's chunks are slower
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, path)
        return path

    def on_close(self, callback: Callable[["CommLedger"], None]) -> None:
        """Run ``callback(ledger)`` after the final write (e.g. rank 0 writing the run report)."""
        self._close_callbacks.append(callback)

    def close(self) -> None:
        """Stop counting, write the file, run the close callbacks. Idempotent."""
        if self.closed:
            return
        self.uninstall()
        self.closed = True
        if self in _OPEN_LEDGERS:
            _OPEN_LEDGERS.remove(self)
        self.write()
        for callback in self._close_callbacks:
            callback(self)
