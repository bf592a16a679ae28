"""The report's ``links`` section: each rank's measured traffic split into intra- and inter-node bytes.

The placement comes from every rank's ledger file (``meta.placement``, :mod:`pma_dist.comm.placement`);
the split is :func:`pma_dist.comm.links.sent_bytes` applied to each rank's own records, with the group
and root each record names. Per period means the same counted periods as the rest of the report; total
is every training micro-step (collectives before the first micro-step are left out, as in
``collectives.total``).
"""
from __future__ import annotations

from collections import defaultdict
from fractions import Fraction
from typing import Dict, List

from . import links
from .placement import node_map


def _pair() -> List[Fraction]:
    return [Fraction(0), Fraction(0)]


def _out(pair) -> dict:
    return {"intra": links.as_number(pair[0]), "inter": links.as_number(pair[1])}


def link_summary(run, summary: dict) -> dict:
    """``{"available", "algorithm", "placement", "per_rank", "per_period", "total", "by_op_per_period",
    "unattributed_per_period", "notes"}`` -- or ``{"available": False, "reason"}``."""
    world = summary["world_size"]
    placements = {rank: ledger.meta.get("placement") for rank, ledger in run.ranks.items()}
    missing = [r for r in range(world) if not isinstance(placements.get(r), dict)]
    if missing:
        return {"available": False,
                "reason": f"no placement for rank(s) {missing}: their ledger files are missing or were written "
                          "before the ledger recorded placements"}
    try:
        node_of = node_map(placements)
    except ValueError as exc:
        return {"available": False, "reason": str(exc)}
    period, first, n = summary["period"], summary["first_counted_period"], summary["periods_averaged"]
    counted = range(first * period, (first + n) * period)
    per_rank, by_op = {}, defaultdict(_pair)
    per_period_all, total_all = _pair(), _pair()
    unattributed: Dict[str, int] = defaultdict(int)
    notes: List[str] = []
    for rank, ledger in sorted(run.ranks.items()):
        period_sum, total = _pair(), _pair()
        for (micro_step, op, group, root), nbytes in sorted(ledger.routes.items(), key=str):
            if micro_step < 0 or not nbytes:
                continue
            if not links.attributable(op) or group == ():
                if micro_step in counted:
                    unattributed[op] += nbytes
                continue
            members = list(range(world)) if group is None else list(group)
            try:
                intra, inter = links.sent_bytes(op, nbytes, members, node_of, root)[rank]
            except (KeyError, ValueError) as exc:
                return {"available": False, "reason": f"rank {rank}, micro-step {micro_step}, {op}: {exc}"}
            total[0] += intra
            total[1] += inter
            if micro_step in counted:
                period_sum[0] += intra
                period_sum[1] += inter
                by_op[op][0] += intra / n
                by_op[op][1] += inter / n
        mean = [period_sum[0] / n, period_sum[1] / n]
        per_rank[str(rank)] = {"node": node_of[rank], "per_period": _out(mean), "total": _out(total)}
        for i in (0, 1):
            per_period_all[i] += mean[i]
            total_all[i] += total[i]
    nodes: Dict[str, List[int]] = defaultdict(list)
    for rank in sorted(node_of):
        nodes[node_of[rank]].append(rank)
    hosts = sorted({placements[r]["host"] for r in node_of})
    if len(nodes) > len(hosts):
        sources = sorted({str(placements[r].get("node_rank_from")) for r in node_of})
        notes.append(f"{len(nodes)} nodes on {len(hosts)} host(s): the nodes are told apart by the launcher's node "
                     f"rank ({', '.join(sources)}), so the 'inter-node' bytes of this run travelled over the host's "
                     "loopback; they are what the same placement would send between real nodes")
    if unattributed:
        notes.append("not attributed to links (no ring model, or a group torch could not name), message bytes per "
                     "period (rank sum): " + ", ".join(f"{op} {b / n:g} B" for op, b in sorted(unattributed.items())))
    return {
        "available": True,
        "algorithm": links.ALGORITHM,
        "placement": {"nodes": dict(nodes), "hosts": hosts,
                      "ranks_per_node": sorted({len(v) for v in nodes.values()})},
        "per_rank": per_rank,
        "per_period": _out(per_period_all),
        "total": _out(total_all),
        "by_op_per_period": {op: _out(v) for op, v in sorted(by_op.items())},
        "unattributed_per_period": {op: links.as_number(Fraction(b) / n) for op, b in sorted(unattributed.items())},
        "notes": notes,
    }
