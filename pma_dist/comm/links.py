"""Which links a collective's bytes cross: intra-node or inter-node, by rank placement.

The one place that turns a collective's message bytes into the bytes each rank SENDS over an
intra-node or an inter-node link. The algorithm is the one the projection prices
(:mod:`pma_dist.comm.topology`): NCCL's ring, with each node's ranks contiguous on the ring.

Ring order. The group's ranks grouped by node -- nodes in the order of their lowest member rank,
ranks ascending within a node -- so ``r_0 .. r_{n-1}``; rank ``r_i`` sends only to its successor
``r_{i+1 mod n}``. NCCL's ring search builds rings this way on a homogeneous cluster (each node's GPUs in
one stretch, one hop into the next node). The bytes ``r_i`` sends are inter-node when its successor is on
another node, intra-node otherwise. With the ranks on ``m`` nodes the ring therefore has exactly ``m``
inter-node hops when ``m >= 2`` (one out of every node) and none when ``m = 1``.

Bytes each rank sends, for a message of ``S`` bytes (the ledger's nccl-tests convention) over ``n`` ranks:

- all-reduce (``S`` = the buffer): reduce-scatter then all-gather around the ring, ``2(n-1)`` steps of
  ``S/n`` each: ``2(n-1)/n * S`` per rank.
- all-gather (``S`` = the output), reduce-scatter (``S`` = the input): ``n-1`` steps of ``S/n``:
  ``(n-1)/n * S`` per rank.
  These are :func:`~pma_dist.comm.topology.exact_bus_factor` ``* S`` -- exactly the bytes nccl-tests' busbw
  counts per rank, which is why a ring's time is those bytes over its slowest (inter-node) hop.
- broadcast from ``root``: a pipelined chain ``root -> succ(root) -> ... -> pred(root)``: every rank but
  ``pred(root)`` sends ``S``.
- reduce to ``root``: the chain ``succ(root) -> ... -> root``: every rank but ``root`` sends ``S``.

So over the whole group, with ``E`` the bytes per hop and ``m >= 2`` nodes: all-reduce / all-gather /
reduce-scatter send ``m * E`` inter-node and ``(n - m) * E`` intra-node; a broadcast's chain drops the
hop into the root, so it crosses ``m - 1`` node boundaries when the root is the first rank of its node on
the ring and ``m`` otherwise (a reduce likewise with the hop out of the root and the root's node's last
rank). 2 nodes x 1 rank: everything inter-node; 1 node x 2: everything intra-node.

Not attributed (their bytes are reported apart, as message bytes): all-to-all, gather, scatter,
send / recv (point to point, not rings) and collectives on a group torch could not name.

Byte counts are :class:`fractions.Fraction` (``2(n-1)/n * S`` need not be whole), exact for tests.
"""
from __future__ import annotations

from fractions import Fraction
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

from .topology import canonical_op, exact_bus_factor

LINK_CLASSES = ("intra", "inter")
RING_OPS = ("all_reduce", "all_gather", "reduce_scatter")
CHAIN_OPS = ("broadcast", "reduce")
ATTRIBUTED_OPS = RING_OPS + CHAIN_OPS
ALGORITHM = ("NCCL ring, each node's ranks contiguous (nodes ordered by lowest rank, ranks ascending); a rank's "
             "bytes are inter-node when its ring successor is on another node. Per rank: all_reduce 2(n-1)/n x S, "
             "all_gather / reduce_scatter (n-1)/n x S, broadcast S except the root's predecessor, reduce S "
             "except the root (S = message bytes, n = group size)")


def attributable(op: str) -> bool:
    """Whether :func:`sent_bytes` has a model for ``op`` (the ledger's op names)."""
    try:
        return canonical_op(op) in ATTRIBUTED_OPS
    except ValueError:
        return False


def ring_order(ranks: Iterable[int], node_of: Mapping[int, str]) -> List[int]:
    """The group's ranks in ring order: grouped by node, nodes by their lowest rank, ranks ascending."""
    ranks = sorted(set(int(r) for r in ranks))
    missing = [r for r in ranks if r not in node_of]
    if missing:
        raise ValueError(f"no placement for rank(s) {missing} (known: {sorted(node_of)})")
    first_rank_of_node: Dict[str, int] = {}
    for r in ranks:
        first_rank_of_node.setdefault(node_of[r], r)
    return sorted(ranks, key=lambda r: (first_rank_of_node[node_of[r]], r))


def sent_bytes(op: str, nbytes, ranks: Sequence[int], node_of: Mapping[int, str],
               root: Optional[int] = None) -> Dict[int, Tuple[Fraction, Fraction]]:
    """``{rank: (intra, inter)}``: bytes each member of the group sends over intra- / inter-node links
    for collectives of ``nbytes`` message bytes in total (the formula: this module's docstring).

    ``root`` (broadcast / reduce) is a global rank; None takes the ring's first rank."""
    op = canonical_op(op)
    if op not in ATTRIBUTED_OPS:
        raise ValueError(f"no link model for {op!r}; attributed: {', '.join(ATTRIBUTED_OPS)}")
    ring = ring_order(ranks, node_of)
    n = len(ring)
    if n < 1:
        raise ValueError(f"a collective needs at least one rank, got group {list(ranks)!r}")
    root = ring[0] if root is None else int(root)
    if op in CHAIN_OPS and root not in ring:
        raise ValueError(f"{op} root {root} is not in its group {ring}")
    size = Fraction(nbytes)
    out: Dict[int, Tuple[Fraction, Fraction]] = {}
    for i, rank in enumerate(ring):
        successor = ring[(i + 1) % n]
        if op in RING_OPS:
            sent = exact_bus_factor(op, n) * size
        elif op == "broadcast":
            sent = Fraction(0) if successor == root else size
        else:  # reduce
            sent = Fraction(0) if rank == root else size
        crosses = node_of[successor] != node_of[rank]
        out[rank] = (Fraction(0), sent) if crosses else (sent, Fraction(0))
    return out


def records_link_bytes(records: Iterable[dict], ranks: Sequence[int],
                       node_of: Mapping[int, str]) -> Tuple[Fraction, Fraction]:
    """(intra, inter) all ranks send for ledger-style records (``op``, ``bytes``; optional ``root``) that
    every one of ``ranks`` issues -- the analytical model's view of one rank, as the projection uses it.
    Ops without a link model are skipped."""
    per_byte: Dict[tuple, Tuple[Fraction, Fraction]] = {}  # the split is linear in the message bytes
    intra = inter = Fraction(0)
    for r in records:
        if not r.get("bytes") or not attributable(r["op"]):
            continue
        key = (canonical_op(r["op"]), r.get("root"))
        if key not in per_byte:
            per_byte[key] = summed(sent_bytes(key[0], 1, ranks, node_of, key[1]))
        a, b = per_byte[key]
        intra += a * r["bytes"]
        inter += b * r["bytes"]
    return intra, inter


def summed(per_rank: Mapping[int, Tuple[Fraction, Fraction]]) -> Tuple[Fraction, Fraction]:
    """(intra, inter) over all ranks."""
    return (sum((v[0] for v in per_rank.values()), Fraction(0)), sum((v[1] for v in per_rank.values()), Fraction(0)))


def as_number(value: Fraction):
    """An exact byte count for JSON: an int when whole, else a float."""
    return int(value) if value.denominator == 1 else float(value)
