"""Project PMA's communication cost onto 8xA40-class nodes: seconds per period, GA vs PMA, per ZeRO stage.

Bytes come from the analytical model (:mod:`pma_dist.comm.model`, the one place that knows what each
ZeRO stage sends); this module only prices them on a :class:`~pma_dist.comm.topology.Topology` and sets
them beside compute. Every assumption is a named constant below and is printed in the report.

Per micro-step of a period (K micro-steps; GA steps the optimizer once, PMA every micro-step):

- compute: ``6 * params * tokens`` FLOPs per GPU per micro-batch (forward 2, backward 4; no activation
  recomputation) at ``mfu`` of the GPU's dense bf16 peak; forward is 1/3 of it, backward 2/3.
- optimizer step: memory bound, bytes touched per locally owned parameter (all of them at ZeRO-0, 1/N at
  ZeRO-1/2/3) at ``MEMORY_EFFICIENCY`` of the memory bandwidth. GA's step is one fused pass
  (``OPTIMIZER_BYTES_PER_PARAM``, DeepSpeed's FusedAdam); PMA's is priced for the execution path that
  would run (:data:`PMA_OPTIMIZER_BYTES_PER_PARAM`): by default the foreach path, which is what
  ``AdamWPMA(fused=None)`` runs on GPU tensors; ``pma_optimizer_path="compiled"`` prices ``fused=True``.
- communication: each collective priced by the topology's alpha-beta cost. Two readings:
  ``serial`` (nothing overlaps) and ``overlapped``: where the set-up can overlap (:data:`OVERLAPPABLE`),
  forward-phase traffic (ZeRO-3 / FSDP2 prefetched parameter all-gathers) hides behind forward compute
  and backward-phase traffic (gradient reduction with ``overlap_comm``, re-gathers) behind backward
  compute; step-phase traffic (ZeRO-1/2's parameter all-gather after the update) is always exposed.
  Only the part of a phase's communication longer than its compute window is exposed.

PMA's overhead = (PMA period time - GA period time) / GA period time.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Iterable, List, Optional

import torch

from .. import memory
from ..kernels.compiled import STEP_BYTES_PER_PARAM
from .links import as_number, records_link_bytes
from .placement import grid_node_map
from .topology import Topology, load_topology

# The paper's models (PMA paper, Table 1: Qwen2-0.5B, Phi-2-2.7B, Llama2-7B); parameter counts and layer
# counts from the models' published configs. Layers set FSDP2's units (one fully_shard per layer).
MODEL_SIZES = {"0.5B (Qwen2-0.5B)": 494_032_768, "2.7B (Phi-2)": 2_779_683_840, "7B (Llama-2-7B)": 6_738_415_616}
MODEL_LAYERS = {"0.5B (Qwen2-0.5B)": 24, "2.7B (Phi-2)": 32, "7B (Llama-2-7B)": 32}
#: the shapes the memory model (pma_dist.memory) needs for the "fits" check
MODEL_SHAPES = {"0.5B (Qwen2-0.5B)": "Qwen2-0.5B", "2.7B (Phi-2)": "Phi-2 2.7B", "7B (Llama-2-7B)": "Llama-2-7B"}
#: share of the GPU memory the modelled peak may use (the rest: CUDA context, allocator cache, fragmentation)
MEMORY_HEADROOM = 0.9
DEFAULT_LAYERS = 32
#: the set-ups priced: DeepSpeed ZeRO 0-3, PyTorch FSDP2 (one unit per layer) and DDP
SETUPS = ("ZeRO-0", "ZeRO-1", "ZeRO-2", "ZeRO-3", "FSDP2", "DDP")

MICRO_BATCH_SEQUENCES = 4    # the paper's SFT batch B = 32 over 8 GPUs (Sec. 5.1) -> 4 sequences per GPU
SEQUENCE_LENGTH = 1024       # assumed; the paper does not state it
DEFAULT_MFU = 0.40           # assumed model FLOPs utilisation of the dense bf16 peak
OPTIMIZER_BYTES_PER_PARAM = 32  # AdamW, fp32 master: read param/grad/m/v (16 B), write param/m/v (12 B),
                                # write the bf16 model copy (2 B) and read the bf16 grad (2 B)
MEMORY_EFFICIENCY = 0.80     # assumed achievable fraction of the memory bandwidth for the fused update
#: DeepSpeed's own traffic around an fp32-master step of a bf16 model: read the bf16 grad, write the bf16 copy
BF16_COPY_BYTES_PER_PARAM = 4
#: PMA's step by execution path on GPU tensors (pma_dist/kernels/compiled.py counts each path's fp32 bytes):
#: foreach 88 + 4, compiled 28 + 4 (the same single pass as GA's FusedAdam)
PMA_OPTIMIZER_BYTES_PER_PARAM = {path: STEP_BYTES_PER_PARAM[("adamw", path, torch.float32)] + BF16_COPY_BYTES_PER_PARAM
                                 for path in ("foreach", "compiled")}
#: what ``AdamWPMA(fused=None)`` runs on GPU tensors today (pma_dist/optim.py, docs/performance.md)
DEFAULT_PMA_OPTIMIZER_PATH = "foreach"
PMA_PATH_NOTE = {"foreach": "foreach path: what AdamWPMA(fused=None) runs on GPU tensors",
                 "compiled": "compiled step: AdamWPMA(fused=True) on GPU tensors"}
MODEL_STATE_BYTES = {"ZeRO-0": (16, 0), "ZeRO-1": (4, 12), "ZeRO-2": (2, 14), "ZeRO-3": (0, 16), "FSDP2": (0, 16),
                     "DDP": (16, 0)}  # (replicated, partitioned) B/param:
# bf16 params 2 + bf16 grads 2 + fp32 master/m/v 12 (ZeRO paper, Rajbhandari et al. 2020, Sec. 3.1)
PAPER_CLAIM = ("\"on a 7B model, AdamW-PMA is only about 2% slower per iteration than AdamW\" "
               "(PMA paper, Sec. 5.4 'Additional properties', paragraph 'PMA incurs minimal extra per-step "
               "overhead'; 8x NVIDIA A40, Sec. 5.1 'Implementation')")
PHASES = ("forward", "backward", "step", "other")

#: ``traffic(setup, world_size, period, dtype, param_count, pma, layers=L) -> records`` for ONE period:
#: ``{"micro_step": 0..K-1, "phase", "op", "count", "bytes"}`` -- the ledger's record layout.
TrafficModel = Callable[..., List[dict]]
# called as traffic(setup, world_size, period, dtype, param_count, pma, layers=L), setup one of SETUPS


@dataclass(frozen=True)
class Assumptions:
    mfu: float = DEFAULT_MFU
    micro_batch_sequences: int = MICRO_BATCH_SEQUENCES
    sequence_length: int = SEQUENCE_LENGTH
    optimizer_bytes_per_param: int = OPTIMIZER_BYTES_PER_PARAM  # GA's step
    memory_efficiency: float = MEMORY_EFFICIENCY
    pma_optimizer_path: str = DEFAULT_PMA_OPTIMIZER_PATH

    def __post_init__(self):
        if not 0.0 < self.mfu <= 1.0:
            raise ValueError(f"mfu must be in (0, 1], got {self.mfu!r}")
        if self.pma_optimizer_path not in PMA_OPTIMIZER_BYTES_PER_PARAM:
            raise ValueError(f"pma_optimizer_path must be one of {sorted(PMA_OPTIMIZER_BYTES_PER_PARAM)}, "
                             f"got {self.pma_optimizer_path!r}")

    @property
    def pma_optimizer_bytes_per_param(self) -> int:
        return PMA_OPTIMIZER_BYTES_PER_PARAM[self.pma_optimizer_path]

    @property
    def tokens(self) -> int:
        return self.micro_batch_sequences * self.sequence_length


def compute_seconds(param_count: int, topology: Topology, a: Assumptions) -> float:
    return 6.0 * param_count * a.tokens / (topology.gpu.peak_tflops * 1e12 * a.mfu)


def optimizer_seconds(param_count: int, setup: str, world_size: int, topology: Topology, a: Assumptions,
                      pma: bool = False) -> float:
    """One optimizer step of the locally owned parameters: GA's fused pass, or PMA's step on its path."""
    owned = param_count if setup in ("ZeRO-0", "DDP") else param_count / world_size
    nbytes = a.pma_optimizer_bytes_per_param if pma else a.optimizer_bytes_per_param
    return owned * nbytes / (topology.gpu.memory_gbps * 1e9 * a.memory_efficiency)


def model_state_gb(param_count: int, setup: str, world_size: int) -> float:
    replicated, partitioned = MODEL_STATE_BYTES[setup]
    return param_count * (replicated + partitioned / world_size) / 1e9


def price_period(records: Iterable[dict], topology: Topology, period: int, *,
                 group_of: Optional[Callable[[dict], dict]] = None) -> List[Dict[str, float]]:
    """Communication seconds per micro-step of the period, split by phase: ``[{phase: seconds}] * K``.

    ``group_of(record)`` may return ``{"ranks": r, "nodes": m}`` for collectives on a sub-group
    (ZeRO++ hpZ's intra-node secondary partition); default: the whole topology.
    """
    steps = [dict.fromkeys(PHASES, 0.0) for _ in range(period)]
    for r in records:
        if r["count"] == 0 or r["op"] == "barrier":
            continue
        group = group_of(r) if group_of else {}
        phase = r["phase"] if r["phase"] in PHASES else "other"
        steps[r["micro_step"] % period][phase] += topology.collective_seconds(
            r["op"], r["bytes"], count=r["count"], **group)
    return steps


#: phases whose communication can run under compute, per set-up (the "overlapped" reading): DeepSpeed
#: ZeRO-0 all-reduces after backward has finished (engine.allreduce_gradients), ZeRO-1/2 overlap the
#: gradient reduction with backward when ``overlap_comm`` is on (DeepSpeed's default only for ZeRO-3),
#: ZeRO-3 and FSDP2 also prefetch forward all-gathers, DDP overlaps its bucket all-reduces with backward.
OVERLAPPABLE = {"ZeRO-0": (), "ZeRO-1": ("backward",), "ZeRO-2": ("backward",), "ZeRO-3": ("forward", "backward"),
                "FSDP2": ("forward", "backward"), "DDP": ("backward",)}


def period_seconds(comm_steps: List[Dict[str, float]], compute: float, optimizer: float, pma: bool,
                   overlappable: Iterable[str] = ("forward", "backward")) -> dict:
    """Period time, serial and overlapped, from per-micro-step communication and compute."""
    period = len(comm_steps)
    window = {"forward": compute / 3.0, "backward": 2.0 * compute / 3.0}
    hidden = {phase: window[phase] for phase in overlappable}
    comm = sum(sum(s.values()) for s in comm_steps)
    exposed = sum(sum(max(0.0, seconds - hidden.get(phase, 0.0)) for phase, seconds in s.items())
                  for s in comm_steps)
    steps = period if pma else 1
    base = period * compute + steps * optimizer
    return {"comm_s": comm, "exposed_comm_s": exposed, "compute_s": period * compute,
            "optimizer_s": steps * optimizer, "serial_s": base + comm, "overlapped_s": base + exposed}


def model_period_records(setup: str, world_size: int, period: int, dtype: str, param_count: int,
                         pma: bool, layers: int = DEFAULT_LAYERS) -> List[dict]:
    """One period of :mod:`pma_dist.comm.model`'s messages for a ``param_count`` model, as ledger records.

    ZeRO stages: ``model.projected_period_records`` (which covers ZeRO-3's large-model re-gathers in
    backward). FSDP2 and DDP: the model's rules for a model of ``layers`` equal layers, one FSDP2 unit
    per layer (``reshard_after_forward`` True; the embeddings counted inside the layers).
    """
    from . import model

    if setup.startswith("ZeRO-"):
        return model.projected_period_records(int(setup[-1]), world_size, period, dtype, param_count, pma)
    per_layer, rest = divmod(param_count, layers)
    numels = [per_layer] * layers
    numels[-1] += rest
    extra = ({"fsdp_units": [{"param_shapes": [[n]], "reshard_after_forward": True} for n in numels]}
             if setup == "FSDP2" else {"ddp_grad_numels": numels})
    s = model.Setup(backend=setup.lower(), zero_stage=None, world_size=world_size,
                    period=period, pma=pma, dtype=dtype, param_numels=tuple(numels), extra=extra)
    records = []
    for i in range(period):
        for (phase, op), (count, nbytes) in sorted(model.micro_step_totals(s, i).items()):
            records.append({"micro_step": i, "phase": phase, "op": op, "count": count, "bytes": nbytes})
    return records


def link_bytes(records: Iterable[dict], topology: Topology) -> Dict[str, float]:
    """Bytes all GPUs send per period over intra- / inter-node links (:mod:`pma_dist.comm.links`, the same
    ring attribution the measured report uses), ranks numbered node by node as launchers do."""
    node_of = grid_node_map(topology.nodes, topology.gpus_per_node)
    intra, inter = records_link_bytes(records, sorted(node_of), node_of)
    return {"intra": as_number(intra), "inter": as_number(inter)}


def memory_fit(label: str, setup: str, world: int, dtype: str, a: "Assumptions", memory_gb: float) -> dict:
    """Modelled peak GB per GPU (pma_dist.memory) for SFT and DPO (cached reference), with and without
    activation checkpointing; ``fits`` is SFT without checkpointing within :data:`MEMORY_HEADROOM`.
    A model without a known shape falls back to its model states alone (``memory_model`` False)."""
    if label not in MODEL_SHAPES:
        state_gb = model_state_gb(MODEL_SIZES.get(label, 0), setup, world)
        return {"memory_model": False, "fits": state_gb < MEMORY_HEADROOM * memory_gb}
    shape = memory.SHAPES[MODEL_SHAPES[label]]
    peaks = {}
    for task in ("sft", "dpo"):
        for checkpointing in (False, True):
            work = memory.Workload(task=task, micro_batch=a.micro_batch_sequences, seq_len=a.sequence_length,
                                   activation_checkpointing=checkpointing)
            peaks[task + ("_ac" if checkpointing else "")] = (
                memory.estimate(shape, setup, world, work, dtype=dtype)["total"] / 1e9)
    limit = MEMORY_HEADROOM * memory_gb
    return {"memory_model": True, "peak_gb_per_gpu": peaks,
            "fits": peaks["sft"] <= limit, "fits_with_checkpointing": peaks["sft_ac"] <= limit,
            "dpo_fits": peaks["dpo"] <= limit, "dpo_fits_with_checkpointing": peaks["dpo_ac"] <= limit}


def _default_traffic() -> TrafficModel:
    return model_period_records


def project(topology=None, *, period: int = 8, dtype: str = "bfloat16", mfu: Optional[float] = None,
            setups: Iterable[str] = SETUPS, model_sizes: Optional[Dict[str, int]] = None,
            traffic: Optional[TrafficModel] = None, pma_optimizer_path: str = DEFAULT_PMA_OPTIMIZER_PATH) -> dict:
    """The projection table: for each model size and set-up (ZeRO stage, FSDP2, DDP), GA vs PMA per period.

    ``pma_optimizer_path``: the PMA step's execution path to price, ``"foreach"`` (what ``fused=None``
    runs on GPUs) or ``"compiled"`` (``fused=True``)."""
    if isinstance(period, bool) or not isinstance(period, int) or period < 1:
        raise ValueError(f"period must be a positive int, got {period!r}")
    setups = list(setups)
    unknown = [x for x in setups if x not in SETUPS]
    if unknown:
        raise ValueError(f"unknown set-up(s) {unknown}; expected some of {SETUPS}")
    topology = load_topology(topology)
    a = Assumptions(mfu=DEFAULT_MFU if mfu is None else float(mfu), pma_optimizer_path=pma_optimizer_path)
    traffic = traffic or _default_traffic()
    world = topology.world_size
    rows = []
    for label, params in (model_sizes or MODEL_SIZES).items():
        compute = compute_seconds(params, topology, a)
        for setup in setups:
            optimizer = {pma: optimizer_seconds(params, setup, world, topology, a, pma) for pma in (False, True)}
            state_gb = model_state_gb(params, setup, world)
            row = {"model": label, "params": params, "setup": setup,
                   "zero_stage": int(setup[-1]) if setup.startswith("ZeRO-") else None,
                   "model_state_gb_per_gpu": state_gb}
            row.update(memory_fit(label, setup, world, dtype, a, topology.gpu.memory_gb))
            for name, pma in (("ga", False), ("pma", True)):
                records = traffic(setup, world, period, dtype, params, pma,
                                  layers=MODEL_LAYERS.get(label, DEFAULT_LAYERS))
                steps = price_period(records, topology, period)
                row[name] = period_seconds(steps, compute, optimizer[pma], pma, OVERLAPPABLE[setup])
                row[name]["bytes"] = sum(r["bytes"] for r in records)
                row[name]["link_bytes"] = link_bytes(records, topology)
                row[name]["latency_share"] = latency_share(records, topology)
                if setup == "ZeRO-3":
                    row[name]["zeropp"] = zeropp_variants(records, topology, period, compute, optimizer[pma], pma)
            for reading in ("serial", "overlapped"):
                ga, pm = row["ga"][f"{reading}_s"], row["pma"][f"{reading}_s"]
                row[f"overhead_{reading}_pct"] = 100.0 * (pm - ga) / ga
            rows.append(row)
    return {
        "topology": topology.to_dict(),
        "period": period,
        "dtype": dtype,
        "assumptions": {"mfu": a.mfu, "micro_batch_sequences": a.micro_batch_sequences,
                        "sequence_length": a.sequence_length, "tokens_per_micro_batch_per_gpu": a.tokens,
                        "flops_per_token": "6 x params (forward 2, backward 4, no recomputation)",
                        "peak_tflops": topology.gpu.peak_tflops,
                        "optimizer_bytes_per_param": a.optimizer_bytes_per_param,
                        "pma_optimizer_path": a.pma_optimizer_path,
                        "pma_optimizer_bytes_per_param": a.pma_optimizer_bytes_per_param,
                        "memory_efficiency": a.memory_efficiency,
                        "overlap": "overlapped: where the set-up can overlap (ZeRO-1/2 backward with "
                                   "overlap_comm, ZeRO-3/FSDP2 forward+backward, DDP backward; never ZeRO-0 or "
                                   "the step), forward comm hides behind 1/3 of compute and backward comm behind "
                                   "2/3; serial: nothing overlaps"},
        "paper_claim": PAPER_CLAIM,
        "rows": rows,
    }


# --- ZeRO++ and the other options the recommendations weigh --------------------------------------
QWZ_BYTES_FACTOR = 0.5  # ZeRO++ qwZ: bf16 weights sent as int8 blocks (Wang et al. 2023, "ZeRO++", Sec. 3.1:
                        # half the all-gather volume; the per-block scales are ignored)


def zeropp_variants(records: List[dict], topology: Topology, period: int, compute: float, optimizer: float,
                    pma: bool) -> dict:
    """ZeRO-3 period time with ZeRO++ hpZ (backward re-gathers inside a node) and qwZ (int8 weights)."""
    intra = {"ranks": min(topology.gpus_per_node, topology.world_size), "nodes": 1}

    def hpz(r):
        return intra if r["op"] == "all_gather" and r["phase"] == "backward" else {}

    def qwz(rs):
        return [dict(r, bytes=r["bytes"] * QWZ_BYTES_FACTOR) if r["op"] == "all_gather" and
                r["phase"] in ("forward", "backward") else r for r in rs]

    out = {}
    for name, recs, group_of in (("hpz", records, hpz), ("qwz", qwz(records), None),
                                 ("hpz+qwz", qwz(records), hpz)):
        out[name] = period_seconds(price_period(recs, topology, period, group_of=group_of), compute, optimizer, pma,
                                   OVERLAPPABLE["ZeRO-3"])
    return out


def latency_share(records: Iterable[dict], topology: Topology) -> float:
    """Fraction of the communication time that is per-message latency (what bucket sizes change)."""
    latency = total = 0.0
    for r in records:
        if r["count"] == 0 or r["op"] == "barrier":
            continue
        nodes = -(-topology.world_size // topology.gpus_per_node)
        latency += r["count"] * topology.latency(r["op"], topology.world_size, nodes)
        total += topology.collective_seconds(r["op"], r["bytes"], count=r["count"])
    return latency / total if total else 0.0


def _pct(new: float, old: float) -> str:
    return f"{100 * (new - old) / old:+.1f}%"


def _row(projection: dict, model: str, setup: str) -> Optional[dict]:
    return next((r for r in projection["rows"] if r["model"] == model and r["setup"] == setup), None)


def recommendations(projection: dict) -> List[dict]:
    """Which stage / option pays least for PMA, each with the projected number behind it."""
    rows, out = projection["rows"], []
    topo = projection["topology"]["name"]
    k = projection["period"]
    models = list(dict.fromkeys(r["model"] for r in rows))
    for model in models[::-1][:1]:  # the largest model: where the choice matters most
        fitting = [r for r in rows if r["model"] == model and r["fits"]]
        candidates = fitting or [r for r in rows if r["model"] == model]
        best = min(candidates, key=lambda r: r["overhead_overlapped_pct"])
        # set-ups within 0.1 percentage point of the best are equally good answers
        winners = [r for r in candidates if r["overhead_overlapped_pct"] - best["overhead_overlapped_pct"] < 0.1]
        names = " and ".join(r["setup"] for r in winners)
        others = ", ".join(f"{r['setup']} {r['overhead_overlapped_pct']:+.1f}%"
                           + ("" if r["fits"] else " (does not fit: memory model)")
                           for r in rows if r["model"] == model and r not in winners)
        out.append({"option": names,
                    "text": f"{model} on {topo}, K={k}: {names} pay{'s' if len(winners) == 1 else ''} least for PMA, "
                            f"{best['overhead_overlapped_pct']:+.1f}% period time vs GA (overlapped reading); "
                            f"others: {others}.",
                    "value_pct": best["overhead_overlapped_pct"]})
        z3 = _row(projection, model, "ZeRO-3")
        if z3:
            extra_bytes = z3["pma"]["bytes"] - z3["ga"]["bytes"]
            extra_opt = z3["pma"]["optimizer_s"] - z3["ga"]["optimizer_s"]
            out.append({"option": "ZeRO-3",
                        "text": f"ZeRO-3 already gathers parameters and reduce-scatters gradients every micro-step, "
                                f"so PMA adds {extra_bytes:,.0f} B of messages per period and "
                                f"{extra_opt:.3g} s of optimizer steps ({model}, {topo}); its overhead is "
                                f"{z3['overhead_overlapped_pct']:+.1f}% (overlapped), "
                                f"{z3['overhead_serial_pct']:+.1f}% (serial).",
                        "value_pct": z3["overhead_overlapped_pct"]})
            variants = z3["pma"].get("zeropp", {})
            if variants:
                parts = "; ".join(
                    f"{name}: {_pct(v['serial_s'], z3['pma']['serial_s'])} serial, "
                    f"{_pct(v['overlapped_s'], z3['pma']['overlapped_s'])} overlapped"
                    for name, v in variants.items())
                best_name = min(variants, key=lambda v: variants[v]["serial_s"])
                out.append({"option": "ZeRO++",
                            "text": f"ZeRO++ on ZeRO-3 with PMA ({model}, {topo}), change of PMA period time -- "
                                    f"{parts}. qwZ halves the weight all-gathers; hpZ keeps the backward "
                                    f"re-gather inside a node, so it only helps across nodes. Where prefetch "
                                    f"already hides the gathers (overlapped reading), neither changes much.",
                            "value_pct": 100 * (variants[best_name]["serial_s"] - z3["pma"]["serial_s"])
                            / z3["pma"]["serial_s"]})
        z2 = _row(projection, model, "ZeRO-2")
        if z2:
            hidden = z2["pma"]["serial_s"] - z2["pma"]["overlapped_s"]
            step_comm = z2["pma"]["exposed_comm_s"]
            out.append({"option": "overlap_comm",
                        "text": f"ZeRO-2 with overlap_comm hides {hidden:.3g} s per period of gradient reduction "
                                f"behind backward ({model}, {topo}); PMA's parameter all-gather after every "
                                f"update cannot overlap and stays exposed ({step_comm:.3g} s per period vs "
                                f"{z2['ga']['exposed_comm_s']:.3g} s for GA). PMA overhead: "
                                f"{z2['overhead_serial_pct']:+.1f}% serial, {z2['overhead_overlapped_pct']:+.1f}% "
                                f"overlapped (GA gains more from overlap than PMA does).",
                        "value_pct": z2["overhead_overlapped_pct"]})
            share = z2["pma"].get("latency_share")
            if share is not None:
                out.append({"option": "bucket sizes",
                            "text": f"Message latency is {100 * share:.2g}% of PMA's ZeRO-2 communication time "
                                    f"({model}, {topo}, default 5e8-element buckets): bucket sizes barely matter "
                                    f"at this scale; bandwidth does. Do not shrink buckets below a few MB.",
                            "value_pct": 100 * share})
    return out


def _peaks(row: dict) -> str:
    peaks = row.get("peak_gb_per_gpu")
    if not peaks:
        return "n/a"
    limit_ok = {"sft": row["fits"], "sft_ac": row["fits_with_checkpointing"], "dpo": row["dpo_fits"],
                "dpo_ac": row["dpo_fits_with_checkpointing"]}
    cell = {k: f"{v:.1f}" + ("" if limit_ok[k] else "*") for k, v in peaks.items()}
    return f"{cell['sft']} ({cell['sft_ac']}) / {cell['dpo']} ({cell['dpo_ac']})"


def format_projection_markdown(projection: dict) -> str:
    t = projection["topology"]
    a = projection["assumptions"]
    lines = [
        f"### Projection onto {t['name']}: {t['description']}",
        "",
        f"K = {projection['period']}, {projection['dtype']}, {t['world_size']} GPUs; per-GPU micro-batch "
        f"{a['micro_batch_sequences']} x {a['sequence_length']} tokens; compute {a['flops_per_token']} at "
        f"{100 * a['mfu']:.0f}% of {a['peak_tflops']} TFLOPS; optimizer step: GA {a['optimizer_bytes_per_param']} "
        f"B/param (one fused pass), PMA {a['pma_optimizer_bytes_per_param']} B/param "
        f"({PMA_PATH_NOTE[a['pma_optimizer_path']]}), at {100 * a['memory_efficiency']:.0f}% of memory bandwidth; "
        f"{a['overlap']}.",
        "",
        "| model | set-up | states GB/GPU | peak GB/GPU SFT (ckpt) / DPO (ckpt) | compute s/period | "
        "GA comm s/period | PMA comm s/period | PMA extra opt s | overhead serial | overhead overlapped |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in projection["rows"]:
        lines.append(
            f"| {r['model']} | {r['setup']} | {r['model_state_gb_per_gpu']:.1f} | {_peaks(r)} | "
            f"{r['ga']['compute_s']:.3g} | {r['ga']['comm_s']:.3g} | {r['pma']['comm_s']:.3g} | "
            f"{r['pma']['optimizer_s'] - r['ga']['optimizer_s']:.3g} | {r['overhead_serial_pct']:+.1f}% | "
            f"{r['overhead_overlapped_pct']:+.1f}% |")
    largest = projection["rows"][-1]["model"] if projection["rows"] else None
    lines += ["", f"Bytes all {t['world_size']} GPUs send per period over intra- / inter-node links, {largest} "
                  f"({t['nodes']} node(s) x {t['gpus_per_node']}, ring attribution of pma_dist.comm.links):", "",
              "| set-up | GA intra-node GB | GA inter-node GB | PMA intra-node GB | PMA inter-node GB |",
              "|---|---|---|---|---|"]
    for r in projection["rows"]:
        if r["model"] == largest:
            ga, pm = r["ga"]["link_bytes"], r["pma"]["link_bytes"]
            lines.append(f"| {r['setup']} | {ga['intra'] / 1e9:.4g} | {ga['inter'] / 1e9:.4g} | "
                         f"{pm['intra'] / 1e9:.4g} | {pm['inter'] / 1e9:.4g} |")
    lines += ["", f"Peak GB/GPU: pma_dist.memory (model states, activations, logits, ZeRO/FSDP transients; DPO "
                  f"with the cached reference), '(ckpt)' with activation checkpointing; a value marked * does not "
                  f"fit in {100 * MEMORY_HEADROOM:.0f}% of {t.get('gpu', {}).get('memory_gb', '?')} GB. Modelled, "
                  f"not measured on a GPU; the model is checked against CPU peak RSS at 25M and 95M "
                  f"parameters (benchmarks/memory.py, docs/BENCHMARKS.md).",
              "", f"Paper: {projection['paper_claim']}."]
    return "\n".join(lines)
