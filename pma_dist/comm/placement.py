"""Where a rank runs: its host and its launcher node, read from what the launchers set.

The ledger writes :func:`rank_placement` into every rank's file (``meta.placement``); the report builds
the node of every rank from those (:func:`node_map`) and splits each collective's bytes between
intra- and inter-node links (:mod:`pma_dist.comm.links`).

A node is a (host, launcher node rank) pair. On a cluster the host names differ and the node rank only
repeats that; on one host that emulates several nodes (two torchrun agents, or DeepSpeed's launcher run
once per ``--node_rank`` without ssh) the host is the same and the node rank tells the nodes apart --
then "inter-node" bytes travel over loopback, and the report says so. What the launchers set:

- torchrun (torch.distributed.elastic, ``local_elastic_agent.py``): ``GROUP_RANK`` (the agent's rank,
  one agent per node), ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``.
- DeepSpeed's launcher (``deepspeed/launcher/launch.py``): ``CROSS_RANK`` (its ``--node_rank``),
  ``CROSS_SIZE`` (nodes), ``LOCAL_RANK``, ``LOCAL_SIZE``.
- Slurm ``srun``: ``SLURM_NODEID``, ``SLURM_LOCALID``.
- Open MPI ``mpirun``: ``OMPI_COMM_WORLD_LOCAL_RANK`` / ``_LOCAL_SIZE`` and no node index (its
  ``OMPI_COMM_WORLD_NODE_RANK`` is a rank within the node, not the node's index): the host alone
  names the node.
"""
from __future__ import annotations

import os
import socket
from typing import Dict, Mapping, Optional

#: the node index, in the order looked for: torchrun, DeepSpeed's launcher, Slurm
NODE_RANK_VARS = ("GROUP_RANK", "CROSS_RANK", "SLURM_NODEID")
LOCAL_RANK_VARS = ("LOCAL_RANK", "SLURM_LOCALID", "OMPI_COMM_WORLD_LOCAL_RANK")
LOCAL_SIZE_VARS = ("LOCAL_WORLD_SIZE", "LOCAL_SIZE", "OMPI_COMM_WORLD_LOCAL_SIZE")


def _first_int(env: Mapping[str, str], names) -> tuple:
    for name in names:
        value = env.get(name)
        if value is None or value == "":
            continue
        try:
            return int(value), name
        except ValueError:
            raise ValueError(f"launcher variable {name}={value!r} is not an integer") from None
    return None, None


def rank_placement(env: Optional[Mapping[str, str]] = None, hostname: Optional[str] = None) -> dict:
    """This process's placement: ``{"host", "node_rank", "node_rank_from", "local_rank", "local_world_size"}``.

    ``node_rank`` is None when no launcher variable names the node (plain ``mpirun``, a single process);
    ``node_rank_from`` names the variable it came from."""
    env = os.environ if env is None else env
    node_rank, node_from = _first_int(env, NODE_RANK_VARS)
    local_rank, _ = _first_int(env, LOCAL_RANK_VARS)
    local_size, _ = _first_int(env, LOCAL_SIZE_VARS)
    return {"host": hostname if hostname is not None else socket.gethostname(), "node_rank": node_rank,
            "node_rank_from": node_from, "local_rank": local_rank, "local_world_size": local_size}


def node_name(placement: dict) -> str:
    """The node a placement names: the host, plus the launcher's node rank when it has one."""
    host = placement.get("host")
    if not isinstance(host, str) or not host:
        raise ValueError(f"placement needs a non-empty 'host', got {placement!r}")
    node_rank = placement.get("node_rank")
    return host if node_rank is None else f"{host}/node{node_rank}"


def node_map(placements: Mapping[int, dict]) -> Dict[int, str]:
    """``{global rank: node name}`` from every rank's placement."""
    return {int(rank): node_name(p) for rank, p in placements.items()}


def grid_node_map(nodes: int, ranks_per_node: int) -> Dict[int, str]:
    """The placement launchers give ``nodes`` x ``ranks_per_node``: global rank = node * ranks_per_node + local."""
    if nodes < 1 or ranks_per_node < 1:
        raise ValueError(f"a placement needs at least 1 node and 1 rank per node, got {nodes} x {ranks_per_node}")
    return {node * ranks_per_node + local: f"node{node}" for node in range(nodes) for local in range(ranks_per_node)}
