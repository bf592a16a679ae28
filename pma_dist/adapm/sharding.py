"""AdaPM on FSDP2 (``fully_shard``) parameters: which rows of a weight this rank holds, and the sums
over ranks that complete the low-rank algebra and AdaPM-mini's block means.

FSDP2 gives each rank a ``Shard(0)`` slice of every parameter, the way ``torch.chunk`` splits its first
axis (``ceil(rows / world)`` rows per rank, the last ranks possibly fewer or none). AdaPM updates each
parameter on that slice: element-wise states are split with it, the low-rank factor along the split
axis is split too and the other factor is replicated (see :mod:`pma_dist.adapm.lowrank`).

The sums are ``torch.distributed.all_reduce`` over the parameter's own mesh group, one flattened
message per call, inside the comm ledger's ``"adapm"`` phase when a ledger is installed.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import torch.distributed as dist
from torch import Tensor

try:
    from torch.distributed.tensor import DTensor, Replicate, Shard
except ImportError:  # pragma: no cover - torch without distributed
    DTensor = None

LEDGER_PHASE = "adapm"


@dataclass(frozen=True)
class RowShard:
    """Rows ``[start, stop)`` of a parameter with ``rows`` rows, split over ``mesh``'s one dimension."""

    mesh: object
    rows: int
    start: int
    stop: int

    @property
    def group(self):
        return self.mesh.get_group()

    def sum(self, *tensors: Tensor) -> Tuple[Tensor, ...]:
        """The elementwise sum over the ranks of each tensor, in one all-reduce."""
        flat = torch.cat([t.reshape(-1) for t in tensors])
        with _ledger_phase():
            dist.all_reduce(flat, group=self.group)
        out, offset = [], 0
        for t in tensors:
            out.append(flat[offset:offset + t.numel()].view(t.shape))
            offset += t.numel()
        return tuple(out)

    def state(self, local: Tensor, global_shape: Tuple[int, ...], split_dim: Optional[int]) -> Tensor:
        """A state tensor as a DTensor on this mesh (split along ``split_dim`` like the weight's rows,
        or replicated), so torch.distributed.checkpoint saves and reshards it."""
        placement = Replicate() if split_dim is None else Shard(split_dim)
        stride = tuple(math.prod(global_shape[i + 1:]) for i in range(len(global_shape)))
        return DTensor.from_local(local, self.mesh, (placement,), run_check=False, shape=torch.Size(global_shape),
                                  stride=stride)


def row_shard_of(name: str, p: Tensor) -> Optional[RowShard]:
    """``None`` for a plain tensor; this rank's rows of an FSDP2 parameter; an error for other layouts."""
    if DTensor is None or not isinstance(p, DTensor):
        return None
    mesh, placements = p.device_mesh, tuple(p.placements)
    if mesh.ndim != 1 or placements != (Shard(0),):
        raise TypeError(
            f"AdaPM supports DTensor parameters sharded FSDP2-style, Shard(0) on a 1-D mesh; parameter {name!r} "
            f"has placements {placements} on a {mesh.ndim}-D mesh. Use fully_shard on a 1-D mesh, DDP, or a "
            "single process.")
    rows, world, rank = p.shape[0], mesh.size(), mesh.get_local_rank()
    chunk = -(-rows // world)
    start = min(rank * chunk, rows)
    stop = min(start + chunk, rows)
    local_rows = p.to_local().shape[0]
    if local_rows != stop - start:
        raise TypeError(
            f"AdaPM cannot locate the rows of parameter {name!r} on rank {rank}: its local shard has {local_rows} "
            f"of {rows} rows, torch.chunk's split over {world} ranks gives {stop - start}")
    return RowShard(mesh, rows, start, stop)


def local(t: Tensor) -> Tensor:
    """This rank's part of a (possibly DTensor) tensor, sharing its storage."""
    return t.to_local() if DTensor is not None and isinstance(t, DTensor) else t


def _ledger_phase():
    from ..comm.ledger import active_ledger

    ledger = active_ledger()
    return ledger.in_phase(LEDGER_PHASE) if ledger is not None else contextlib.nullcontext()
