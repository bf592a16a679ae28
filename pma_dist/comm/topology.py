"""Cluster topologies and the alpha-beta cost of one collective on them.

A collective of ``S`` message bytes (the nccl-tests convention the ledger also counts: all-reduce
buffer, all-gather output, reduce-scatter input) over ``n`` ranks costs, for NCCL's ring algorithm,

    seconds = latency(op, n, nodes) + S * bus_factor(op, n) / bus_bandwidth

- ``bus_factor`` is nccl-tests' ratio of bus to algorithm bandwidth (NVIDIA/nccl-tests, doc/PERFORMANCE.md):
  all-reduce ``2(n-1)/n``, all-gather / reduce-scatter / all-to-all ``(n-1)/n``, broadcast / reduce ``1``.
  A ring moves exactly that many bytes over each rank's slowest link, so ``bus_bandwidth`` is the
  unidirectional bandwidth of the ring's bottleneck link -- the number nccl-tests prints as "busbw",
  which is what a calibration file supplies.
- ``latency`` follows NCCL's own tuning model for the ring algorithm with the Simple protocol
  (NVIDIA/nccl ``src/graph/tuning.cc``): a base latency of 8.4 us plus a per-step hardware latency of
  3.4 us (NVLink), 5.7 us (PCIe) or 9.6 us (network) for each of the ring's steps -- ``2(n-1)`` for
  all-reduce, ``n-1`` for all-gather / reduce-scatter, of which ``2(nodes-1)`` resp. ``nodes-1`` cross
  the network. Broadcast / reduce pipeline through the ring and pay one step latency.

Large messages are bandwidth bound, where NCCL runs rings (its tree all-reduce has the same bandwidth
term and only wins at small sizes), so the ring model is the one used for every op.

Presets (constants and their sources in :data:`SOURCES`): one node of 8 NVIDIA A40 on PCIe Gen4 with
NVLink-bridged pairs, and 2 or 4 such nodes over 100 or 200 Gb/s links (one NIC per node). A user
replaces the assumed bandwidths with measured ones through a calibration file written by
``pma-dist bandwidth`` (:mod:`pma_dist.comm.bandwidth`) or by hand (format in ``docs/comm_report.md``).
"""
from __future__ import annotations

import json
import math
import os
import statistics
from dataclasses import asdict, dataclass, field, replace
from fractions import Fraction
from typing import Dict, Optional

CALIBRATION_KIND = "pma-dist/bandwidth"
TOPOLOGY_KIND = "pma-dist/topology"

#: ring-algorithm bus factor (bus bytes per message byte) -- nccl-tests doc/PERFORMANCE.md
OPS = ("all_reduce", "all_gather", "reduce_scatter", "all_to_all", "broadcast", "reduce")

GB = 1e9  # bandwidths are in GB/s = 1e9 bytes/s, as nccl-tests prints them

# --- constants and where they come from ---------------------------------------------------------
NVLINK_BRIDGE_GBPS = 112.5 / 2      # A40 datasheet: NVLink bridge 112.5 GB/s bidirectional
PCIE_GEN4_X16_GBPS = 16 * 16 * (128 / 130) / 8  # 31.5 GB/s per direction: 16 GT/s x 16 lanes, 128b/130b
LINK_EFFICIENCY = 0.80              # assumed achievable fraction of the nominal link rate (see SOURCES)
NIC_EFFICIENCY = 0.90               # assumed achievable fraction of the network line rate
A40_BF16_DENSE_TFLOPS = 149.7       # A40 datasheet: BF16 Tensor Core 149.7 TFLOPS (299.4 with sparsity)
A40_MEMORY_GBPS = 696.0             # A40 datasheet: GDDR6 memory bandwidth 696 GB/s
A40_MEMORY_GB = 48.0                # A40 datasheet: 48 GB GDDR6 with ECC
NCCL_BASE_LATENCY_US = 8.4          # tuning.cc baseLat[Ring][Simple]
NCCL_HW_LATENCY_US = {"nvlink": 3.4, "pcie": 5.7, "network": 9.6}  # tuning.cc hwLat[*][Ring][Simple]

SOURCES = {
    "nvlink_bridge": "NVIDIA A40 datasheet: 'NVIDIA NVLink 112.5 GB/s (bidirectional)' for a 2-GPU bridge "
                     "-> 56.25 GB/s per direction",
    "pcie_gen4_x16": "PCI-SIG PCIe 4.0: 16 GT/s per lane x 16 lanes with 128b/130b encoding = 31.5 GB/s per "
                     "direction (NVIDIA datasheets quote 64 GB/s bidirectional)",
    "link_efficiency": f"assumed {LINK_EFFICIENCY:.0%} of nominal for GPU links (packet and protocol overhead; "
                       "an assumption, not a measurement) -- calibrate with pma-dist bandwidth",
    "nic_efficiency": f"assumed {NIC_EFFICIENCY:.0%} of line rate for InfiniBand/RoCE (an assumption, not a "
                      "measurement) -- calibrate with pma-dist bandwidth",
    "bus_bandwidth": "NVIDIA/nccl-tests doc/PERFORMANCE.md: busbw = algbw x 2(n-1)/n (all-reduce), "
                     "x (n-1)/n (all-gather, reduce-scatter), x 1 (broadcast, reduce)",
    "latency": "NVIDIA/nccl src/graph/tuning.cc, ring / Simple protocol: baseLat 8.4 us; hwLat 3.4 us "
               "(NVLink), 5.7 us (PCIe), 9.6 us (network) per ring step",
    "a40_compute": "NVIDIA A40 datasheet: BF16 Tensor Core 149.7 TFLOPS dense (299.4 TFLOPS with sparsity)",
    "a40_memory": "NVIDIA A40 datasheet: 48 GB GDDR6, 696 GB/s",
    "multi_node": "one NIC per node (typical for PCIe A40 servers): every ring crosses each node boundary "
                  "through it, so a multi-node ring's bus bandwidth is min(intra-node, NIC)",
}


def exact_bus_factor(op: str, n: int) -> Fraction:
    """Bytes each rank sends to its ring successor per message byte (nccl-tests' busbw / algbw), exactly.

    The link attribution (:mod:`pma_dist.comm.links`) splits these bytes by where the successor runs."""
    op = canonical_op(op)
    if n <= 1:
        return Fraction(0)
    if op == "all_reduce":
        return Fraction(2 * (n - 1), n)
    if op in ("all_gather", "reduce_scatter", "all_to_all"):
        return Fraction(n - 1, n)
    return Fraction(1)


def bus_factor(op: str, n: int) -> float:
    """Bytes each rank sends over its bottleneck link per message byte (nccl-tests' busbw / algbw)."""
    return float(exact_bus_factor(op, n))


def ring_steps(op: str, n: int) -> int:
    """Ring steps, each paying one hop latency (NCCL tuning.cc's nsteps)."""
    op = canonical_op(op)
    if op == "all_reduce":
        return 2 * (n - 1)
    if op in ("all_gather", "reduce_scatter", "all_to_all"):
        return n - 1
    return 1  # broadcast / reduce pipeline chunks along the ring: one hop latency before data flows


_ALIASES = {
    "allreduce": "all_reduce", "all_reduce_coalesced": "all_reduce", "inference_all_reduce": "all_reduce",
    "allgather": "all_gather", "all_gather_into_tensor": "all_gather", "all_gather_single": "all_gather",
    "_all_gather_base": "all_gather", "all_gather_base": "all_gather", "all_gather_coalesced": "all_gather",
    "reducescatter": "reduce_scatter", "reduce_scatter_tensor": "reduce_scatter",
    "reduce_scatter_single": "reduce_scatter", "_reduce_scatter_base": "reduce_scatter",
    "reduce_scatter_base": "reduce_scatter", "alltoall": "all_to_all", "all_to_all_single": "all_to_all",
    "bcast": "broadcast",
}


def canonical_op(op: str) -> str:
    """The ledger's op names plus torch / nccl-tests spellings, mapped onto :data:`OPS`."""
    name = _ALIASES.get(op, op)
    if name not in OPS:
        raise ValueError(f"no cost model for collective {op!r}; known: {', '.join(OPS)}")
    return name


@dataclass(frozen=True)
class GPU:
    name: str
    peak_tflops: float   # dense bf16 tensor-core peak
    memory_gbps: float   # memory bandwidth (optimizer steps are memory bound)
    memory_gb: float


A40 = GPU("NVIDIA A40", A40_BF16_DENSE_TFLOPS, A40_MEMORY_GBPS, A40_MEMORY_GB)


@dataclass(frozen=True)
class Measured:
    """One op's calibration: bus bandwidth (GB/s) and fixed latency (s) fitted from measurements."""
    busbw_gbps: float
    latency_s: float


@dataclass(frozen=True)
class Topology:
    """Nodes x GPUs with the bus bandwidth (GB/s, one direction) a ring reaches on each kind of group.

    ``intra_busbw`` is a ring over all GPUs of one node, ``pair_busbw`` a 2-GPU group that has its own
    link (an NVLink-bridged pair; None if pairs are not special), ``network_busbw`` the per-node NIC.
    ``measured`` (from a calibration file) overrides bandwidth and latency per op.
    """
    name: str
    description: str
    nodes: int
    gpus_per_node: int
    intra_busbw: float
    intra_link: str = "pcie"
    pair_busbw: Optional[float] = None
    network_busbw: Optional[float] = None
    gpu: GPU = A40
    measured: Dict[str, Measured] = field(default_factory=dict)
    source: str = "preset"

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus_per_node

    def busbw(self, op: str, ranks: int, nodes: int) -> float:
        op = canonical_op(op)
        if op in self.measured:
            return self.measured[op].busbw_gbps
        if nodes > 1:
            if self.network_busbw is None:
                raise ValueError(f"topology {self.name!r} has no network bandwidth but a group spans {nodes} nodes")
            return min(self.intra_busbw, self.network_busbw)
        if ranks == 2 and self.pair_busbw is not None:
            return self.pair_busbw
        return self.intra_busbw

    def latency(self, op: str, ranks: int, nodes: int) -> float:
        op = canonical_op(op)
        if op in self.measured:
            return self.measured[op].latency_s
        steps = ring_steps(op, ranks)
        inter = ring_steps(op, nodes) if nodes > 1 and steps > 1 else 0
        intra_hw = "nvlink" if (ranks == 2 and nodes == 1 and self.pair_busbw is not None) else self.intra_link
        if nodes > 1 and steps == 1:
            intra_hw = "network"
        micros = (NCCL_BASE_LATENCY_US + (steps - inter) * NCCL_HW_LATENCY_US[intra_hw]
                  + inter * NCCL_HW_LATENCY_US["network"])
        return micros * 1e-6

    def collective_seconds(self, op: str, nbytes: float, *, ranks: Optional[int] = None,
                           nodes: Optional[int] = None, count: int = 1) -> float:
        """Seconds for ``count`` collectives moving ``nbytes`` message bytes in total over ``ranks`` ranks.

        ``ranks`` defaults to the whole topology and ``nodes`` to the fewest nodes that hold ``ranks``
        (a group of 8 on 8-GPU nodes stays inside one node, as ZeRO++ hpZ's secondary partition does).
        """
        ranks = self.world_size if ranks is None else int(ranks)
        if ranks < 1:
            raise ValueError(f"a collective needs at least 1 rank, got ranks={ranks}")
        nodes = math.ceil(ranks / self.gpus_per_node) if nodes is None else int(nodes)
        if ranks == 1 or count == 0:
            return 0.0
        bandwidth = self.busbw(op, ranks, nodes) * GB
        return count * self.latency(op, ranks, nodes) + nbytes * bus_factor(op, ranks) / bandwidth

    def to_dict(self) -> dict:
        out = asdict(self)
        out["world_size"] = self.world_size
        return out


def _a40_nodes(nodes: int, gbit: int) -> Topology:
    network = gbit / 8 * NIC_EFFICIENCY
    return Topology(
        name=f"a40x8-{nodes}node-{gbit}g",
        description=f"{nodes} nodes x 8 A40 (PCIe Gen4, NVLink-bridged pairs), one {gbit} Gb/s NIC per node",
        nodes=nodes, gpus_per_node=8, intra_busbw=PCIE_GEN4_X16_GBPS * LINK_EFFICIENCY,
        pair_busbw=NVLINK_BRIDGE_GBPS * LINK_EFFICIENCY, network_busbw=network)


# The 8-GPU ring alternates NVLink pairs and PCIe hops, so PCIe is the ring's bottleneck; a 2-rank group
# on a bridged pair runs at NVLink speed.
PRESETS: Dict[str, Topology] = {
    "a40x8": Topology(
        name="a40x8", description="1 node x 8 A40 on PCIe Gen4 with NVLink-bridged pairs",
        nodes=1, gpus_per_node=8, intra_busbw=PCIE_GEN4_X16_GBPS * LINK_EFFICIENCY,
        pair_busbw=NVLINK_BRIDGE_GBPS * LINK_EFFICIENCY),
    **{t.name: t for t in (_a40_nodes(n, g) for n in (2, 4) for g in (100, 200))},
}
DEFAULT_TOPOLOGY = "a40x8"


# --- calibration ---------------------------------------------------------------------------------
def fit_measurements(op: str, rows: list, where: str) -> Measured:
    """Bus bandwidth from the largest messages, latency from the smallest (nccl-tests reading).

    ``rows`` are ``{"bytes", "seconds", "busbw_gbps"}`` dicts. Large sizes are bandwidth bound, so busbw
    is the median busbw of the three largest sizes (the median, because one slow or fast outlier on a
    shared machine should not set the plateau); the smallest size is latency bound, so its time minus
    its bandwidth term is the fixed latency.
    """
    if not isinstance(rows, list) or not rows:
        raise ValueError(f"{where}: op {op!r} needs a non-empty list of measurements, got {rows!r}")
    clean = []
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise ValueError(f"{where}: {op}[{i}] must be an object with bytes/seconds/busbw_gbps, got {row!r}")
        for key in ("bytes", "seconds", "busbw_gbps"):
            value = row.get(key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 \
                    or not math.isfinite(value):
                raise ValueError(f"{where}: {op}[{i}].{key} must be a positive number, got {value!r}")
        clean.append(row)
    clean.sort(key=lambda r: r["bytes"])
    busbw = statistics.median(r["busbw_gbps"] for r in clean[-3:])
    smallest = clean[0]
    factor_time = smallest["seconds"] * smallest["busbw_gbps"] / busbw  # bandwidth term at the peak busbw
    latency = max(smallest["seconds"] - factor_time, 0.0) if len(clean) > 1 else 0.0
    return Measured(busbw_gbps=float(busbw), latency_s=float(latency))


def calibrated(base: Topology, calibration: dict, where: str) -> Topology:
    """``base`` with per-op bandwidth / latency replaced by a ``pma-dist bandwidth`` calibration."""
    ops = calibration.get("ops")
    if not isinstance(ops, dict) or not ops:
        raise ValueError(f"{where}: calibration needs an 'ops' object mapping op names to measurements, "
                         f"got {ops!r}")
    measured = {}
    for op, rows in ops.items():
        try:
            name = canonical_op(op)
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from None
        measured[name] = fit_measurements(op, rows, where)
    return replace(base, name=f"{base.name}+calibrated", measured=measured, source=where,
                   description=f"{base.description}; collectives calibrated from {where} "
                               f"({calibration.get('backend', '?')}, {calibration.get('world_size', '?')} ranks)")


def _topology_from_dict(data: dict, where: str) -> Topology:
    allowed = {"name", "description", "nodes", "gpus_per_node", "intra_busbw", "intra_link", "pair_busbw",
               "network_busbw", "gpu", "base", "calibration"}
    unknown = sorted(set(data) - allowed - {"kind"})
    if unknown:
        raise ValueError(f"{where}: unknown topology key(s) {unknown}; expected some of {sorted(allowed)}")
    base = load_topology(data["base"]) if "base" in data else PRESETS[DEFAULT_TOPOLOGY]
    fields = {k: data[k] for k in ("name", "description", "nodes", "gpus_per_node", "intra_busbw",
                                   "intra_link", "pair_busbw", "network_busbw") if k in data}
    for key in ("nodes", "gpus_per_node"):
        if key in fields and (isinstance(fields[key], bool) or not isinstance(fields[key], int) or fields[key] < 1):
            raise ValueError(f"{where}: {key} must be a positive int, got {fields[key]!r}")
    for key in ("intra_busbw", "pair_busbw", "network_busbw"):
        value = fields.get(key)
        if key in fields and value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                                   or not value > 0):
            raise ValueError(f"{where}: {key} must be a positive bandwidth in GB/s, got {value!r}")
    if fields.get("intra_link", "pcie") not in NCCL_HW_LATENCY_US:
        raise ValueError(f"{where}: intra_link must be one of {sorted(NCCL_HW_LATENCY_US)}, "
                         f"got {fields['intra_link']!r}")
    if "gpu" in data:
        gpu = data["gpu"]
        try:
            fields["gpu"] = GPU(**gpu)
        except TypeError:
            raise ValueError(f"{where}: gpu must be an object with name, peak_tflops, memory_gbps, memory_gb; "
                             f"got {gpu!r}") from None
    fields.setdefault("name", os.path.basename(where))
    topology = replace(base, source=where, **fields)
    if "calibration" in data:
        calibration_path = os.path.join(os.path.dirname(where), data["calibration"])
        topology = calibrated(topology, _read_json(calibration_path), calibration_path)
    return topology


def _read_json(path: str) -> dict:
    try:
        with open(path) as f:
            data = json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"topology file {path!r} does not exist") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"topology file {path!r} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError(f"topology file {path!r} must hold a JSON object, got {type(data).__name__}")
    return data


def load_topology(spec) -> Topology:
    """A preset name, a :class:`Topology`, or a JSON file: a ``pma-dist bandwidth`` calibration or a topology.

    A calibration file keeps the GPU and shape of its ``base_topology`` (default: the 1-node A40 preset)
    and takes every measured op's bus bandwidth and latency from the measurements.
    """
    if isinstance(spec, Topology):
        return spec
    if spec is None:
        return PRESETS[DEFAULT_TOPOLOGY]
    if not isinstance(spec, (str, os.PathLike)):
        raise TypeError(f"topology must be a preset name or a JSON file path, got {spec!r}")
    spec = str(spec)
    if spec in PRESETS:
        return PRESETS[spec]
    if not os.path.exists(spec):
        raise ValueError(f"unknown topology {spec!r}: not a preset ({', '.join(PRESETS)}) and no such file")
    data = _read_json(spec)
    kind = data.get("kind")
    if kind == CALIBRATION_KIND:
        base_name = data.get("base_topology", DEFAULT_TOPOLOGY)
        if base_name not in PRESETS:
            raise ValueError(f"{spec}: base_topology {base_name!r} is not a preset ({', '.join(PRESETS)})")
        return calibrated(PRESETS[base_name], data, spec)
    if kind == TOPOLOGY_KIND:
        return _topology_from_dict(data, spec)
    raise ValueError(f"{spec}: 'kind' must be {CALIBRATION_KIND!r} (from pma-dist bandwidth) or "
                     f"{TOPOLOGY_KIND!r}, got {kind!r}")
