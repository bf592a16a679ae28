"""Analytical model of AdaPM's own collectives under FSDP2 (``pma_dist.adapm.sharding``).

The ledger counts them in phase ``"adapm"`` (inside the optimizer step). Every one is an
``all_reduce`` of one flattened message over the parameter's mesh; its bytes are the elements times
the state dtype's size, except the refit's k x k Grams, which are float64. Per block of a sharded
parameter (``blocks`` from :meth:`pma_dist.adapm.AdaPM.sharded_blocks`), with ``k = min(r + 8, m, n)``:

low-rank, rows split (the weight's rows are the block's rows, e.g. an MLP matrix):
  * descent step (each of ``inner_steps``): the ``R`` step's gradient and ``L``'s Gram, ``r (n + r)``;
  * refit: two Gram-QR Grams ``k^2`` for the probe's range; with ``2 r < min(m, n)`` two power
    iterations, each ``M^T Q`` (``n k``) and two Grams ``k^2``; then ``Q^T M`` (``k n``);
low-rank, columns split (a fused-QKV slice of a Conv1D weight): the transpose of the above,
  * descent step: the ``L`` step's gradient and ``R``'s Gram, ``r (m + r)``;
  * refit: ``M P`` (``m k``); with power iterations twice two Grams ``k^2`` and ``M Z`` (``m k``);
    then two Grams ``k^2`` for the Gram QR of ``B^T``;
AdaPM-mini means that span the split axis: one element per tensor (vectors), one per head, or one
per row when the block's columns are split.
Element-wise blocks (full / none momentum, AdamW second moments) send nothing.
"""
from __future__ import annotations

from typing import Dict, Iterable, List, Tuple

from .model import Message

PHASE = "adapm"
_OVERSAMPLE = 8  # pma_dist.adapm.lowrank._OVERSAMPLE
_GRAM_QR_PASSES = 2  # pma_dist.adapm.lowrank.gram_qr: two passes, one k x k Gram each
GRAM_BYTES = 8  # the Grams are summed in float64 whatever the state dtype


def lowrank_messages(shape: Tuple[int, int], rank: int, split: str, *, refit: bool, inner_steps: int,
                     dtype_bytes: int) -> List[int]:
    """Bytes of the all-reduces one low-rank block sends in one step (Grams in float64)."""
    m, n = shape
    if not refit:
        return [rank * ((n if split == "rows" else m) + rank) * dtype_bytes] * inner_steps
    k = min(rank + _OVERSAMPLE, m, n)
    grams = [k * k * GRAM_BYTES] * _GRAM_QR_PASSES
    power = 2 * rank < min(m, n)
    if split == "rows":
        out = list(grams)
        if power:
            out += ([n * k * dtype_bytes] + grams) * 2
        return out + [k * n * dtype_bytes]
    out = [m * k * dtype_bytes]
    if power:
        out += (grams + [m * k * dtype_bytes]) * 2
    return out + grams


def step_messages(blocks: Iterable[dict], step: int) -> List[Message]:
    """AdaPM's messages of optimizer step ``step`` (1-based; a block refits at steps 1, 1 + T, ...)."""
    out = []
    for block in blocks:
        size = block["dtype_bytes"]
        if block["kind"] == "lowrank":
            refit = (step - 1) % block["update_interval"] == 0
            for nbytes in lowrank_messages(tuple(block["shape"]), block["rank"], block["split"], refit=refit,
                                           inner_steps=block["inner_steps"], dtype_bytes=size):
                out.append(Message(PHASE, "all_reduce", nbytes))
        if block["mini_sum_elements"]:
            out.append(Message(PHASE, "all_reduce", block["mini_sum_elements"] * size))
    return out


def compare(ledger_file: dict) -> List[str]:
    """Mismatches between a ``pma_dist.torch_parallel`` FSDP2 + AdaPM ledger file and the models: the
    engine's phases against :func:`pma_dist.comm.model.compare`, phase ``"adapm"`` against
    :func:`step_messages` (AdaPM steps on every micro-step: micro-step i is optimizer step i + 1)."""
    from . import model

    blocks = ledger_file["meta"]["fsdp_adapm"]
    engine = dict(ledger_file, records=[r for r in ledger_file["records"] if r["phase"] != PHASE])
    problems = model.compare(engine)
    for i in range(ledger_file["meta"]["micro_steps"]):
        got = {}
        for r in ledger_file["records"]:
            if r["phase"] == PHASE and r["micro_step"] == i:
                count, nbytes = got.get(r["op"], (0, 0))
                got[r["op"]] = (count + r["count"], nbytes + r["bytes"])
        want = totals(step_messages(blocks, i + 1))
        if got != want:
            problems.append(f"micro-step {i} phase {PHASE}: measured {sorted(got.items())} "
                            f"!= model {sorted(want.items())}")
    return problems


def totals(messages: Iterable[Message]) -> Dict[str, Tuple[int, int]]:
    """op -> (count, bytes)."""
    out: Dict[str, Tuple[int, int]] = {}
    for msg in messages:
        count, nbytes = out.get(msg.op, (0, 0))
        out[msg.op] = (count + 1, nbytes + msg.bytes)
    return out
