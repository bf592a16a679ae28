"""Analytical model of the collectives a training run sends, PMA vs gradient accumulation (GA).

For a setup (backend and ZeRO stage, world size N, period K, dtype, the trainable tensors' sizes and the
few DeepSpeed options that change the traffic) it predicts, per micro-step and per phase, every op's
message count and bytes in the ledger's convention (``docs/comm_accounting.md``). The tests run the
real thing under a :class:`~pma_dist.comm.ledger.CommLedger` and assert measured == model, byte for
byte. What each rule stands on (DeepSpeed 0.19.8 source):

- ZeRO-0 (``engine.allreduce_gradients``): at an accumulation boundary, the gradients are all-reduced in
  buckets of ``MEMORY_OPT_ALLREDUCE_SIZE`` elements; with ``gradient_clipping > 0`` an fp32 run's step
  all-reduces one fp32 norm (bf16/fp16 wrappers clip locally).
- ZeRO-1/2 (``stage_1_and_2.py``): gradients are all-reduced in ``reduce_bucket_size`` buckets, ZeRO-2 on
  every micro-step, ZeRO-1 at the boundary only. The step all-reduces a uint8 overflow flag (bf16 with
  ``check_grad_overflow``, fp16) and an fp32 norm (``compute_grad_norm``), then all-gathers each param
  group's flat buffer, padded to a multiple of ``2 * N`` elements (``nccl_start_alignment_factor``).
- ZeRO-3 (``stage3.py``, ``partitioned_param_coordinator.py``): each tensor is padded to a multiple of N.
  Tensors of at most ``param_persistence_threshold`` elements are persistent: never released, so they are
  all-gathered one by one after each step instead of in forward. The others are all-gathered in
  forward (one coalesced message while the whole model fits one prefetch bucket and stays live,
  ``exact`` is False otherwise) and gradients are reduce-scattered in ``reduce_bucket_size`` buckets on
  every micro-step; the step all-reduces one fp64 norm. The first two micro-steps record and check the
  module trace (extra broadcasts, re-gathers in backward): they are ``warmup_micro_steps`` and not
  modelled.

PMA runs with ``gradient_accumulation_steps = 1``: every micro-step is a boundary with a full optimizer
step (small and large steps send the same). GA runs with ``gradient_accumulation_steps = K``.

Other backends register a rule with :func:`register_backend` (``"fsdp2"``, ``"ddp"``).
"""
from __future__ import annotations

import math
import sys
from collections import defaultdict
from dataclasses import dataclass, field, replace
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

from ..schedule import MicroStepSchedule

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
MEMORY_OPT_ALLREDUCE_SIZE = 500_000_000  # deepspeed.runtime.engine, elements per ZeRO-0 bucket
NCCL_START_ALIGNMENT_FACTOR = 2  # stage_1_and_2.py: flat buffers padded to a multiple of 2 * N elements
FP32_SCALAR, FP64_SCALAR, UINT8_SCALAR = 4, 8, 1


@dataclass(frozen=True)
class Setup:
    """Everything the traffic depends on. ``from_meta`` builds it from a ledger file's ``meta``."""

    zero_stage: int
    world_size: int
    period: int
    pma: bool
    dtype: str
    param_numels: Tuple[int, ...]
    backend: str = "deepspeed"
    group_numels: Optional[Tuple[int, ...]] = None  # ZeRO-1/2 param groups; default one group of all
    communication_data_type: Optional[str] = None  # gradient messages; default dtype
    gradient_clipping: float = 0.0
    reduce_bucket_size: int = 500_000_000
    check_grad_overflow: bool = True
    compute_grad_norm: bool = True
    param_persistence_threshold: int = 100_000
    model_persistence_threshold: int = sys.maxsize
    prefetch_bucket_size: int = 50_000_000
    max_live_parameters: int = 1_000_000_000
    extra: dict = field(default_factory=dict, compare=False)

    def __post_init__(self):
        if self.dtype not in DTYPE_BYTES:
            raise ValueError(f"unknown dtype {self.dtype!r}; expected one of {sorted(DTYPE_BYTES)}")
        if self.backend in _BACKENDS_WITH_STAGES and self.zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"unknown ZeRO stage {self.zero_stage!r}; expected 0, 1, 2 or 3")
        for name in ("world_size", "period"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not self.param_numels or any(n < 1 for n in self.param_numels):
            raise ValueError(f"param_numels must be positive tensor sizes, got {self.param_numels!r}")

    @property
    def param_count(self) -> int:
        return sum(self.param_numels)

    @property
    def schedule(self) -> MicroStepSchedule:
        """``period`` micro-steps are one PMA period (``pma``) or one accumulated GA step."""
        return MicroStepSchedule.from_cycle(self.period, self.pma)

    @property
    def dtype_bytes(self) -> int:
        return DTYPE_BYTES[self.dtype]

    @property
    def grad_bytes(self) -> int:
        return DTYPE_BYTES[self.communication_data_type or self.dtype]

    @classmethod
    def for_param_count(cls, param_count: int, *, tensor_numel: int = 50_000_000, **kwargs) -> "Setup":
        """A model of ``param_count`` parameters in tensors of ``tensor_numel`` (for projections)."""
        full, rest = divmod(int(param_count), tensor_numel)
        return cls(param_numels=(tensor_numel,) * full + ((rest,) if rest else ()), **kwargs)

    @classmethod
    def from_meta(cls, meta: dict) -> "Setup":
        """The setup a ledger file describes (``meta`` of ``comm_rank{r}.json``)."""
        known = {f for f in cls.__dataclass_fields__ if f != "extra"}
        kwargs = {k: meta[k] for k in known if k in meta and meta[k] is not None}
        kwargs["param_numels"] = tuple(meta["param_numels"])
        if "group_numels" in kwargs:
            kwargs["group_numels"] = tuple(kwargs["group_numels"])
        kwargs["period"] = int(meta["period"])
        kwargs["pma"] = bool(meta.get("pma", True))
        kwargs.setdefault("zero_stage", None)  # FSDP2 / DDP runs have no ZeRO stage
        kwargs["extra"] = {k: v for k, v in meta.items() if k.startswith(("fsdp_", "ddp_"))}
        return cls(**kwargs)


@dataclass(frozen=True)
class Message:
    phase: str
    op: str
    bytes: int


def _pad(numel: int, multiple: int) -> int:
    return -(-numel // multiple) * multiple


def _buckets(numels: Iterable[int], bucket_size: int) -> List[int]:
    """Greedy buckets in backward (reverse) order: a bucket is flushed when the next tensor would overflow."""
    buckets: List[int] = []
    current = 0
    for numel in reversed(list(numels)):
        if current and current + numel > bucket_size:
            buckets.append(current)
            current = 0
        current += numel
    if current:
        buckets.append(current)
    return buckets


def _split(numel: int, size: int) -> List[int]:
    full, rest = divmod(numel, size)
    return [size] * full + ([rest] if rest else [])


def _zero0(s: Setup, boundary: bool) -> List[Message]:
    if not boundary:
        return []
    out = [Message("backward", "all_reduce", n * s.grad_bytes)
           for n in _buckets(s.param_numels, MEMORY_OPT_ALLREDUCE_SIZE)]
    if s.gradient_clipping > 0 and s.dtype == "float32":
        # engine._take_model_step clips fp32 itself (a norm all-reduce); the bf16/fp16 wrappers clip
        # the already all-reduced gradients locally and send nothing.
        out.append(Message("step", "all_reduce", FP32_SCALAR))
    return out


def _zero12(s: Setup, boundary: bool) -> List[Message]:
    out: List[Message] = []
    if boundary or s.zero_stage == 2:
        out += [Message("backward", "all_reduce", n * s.grad_bytes)
                for n in _buckets(s.param_numels, s.reduce_bucket_size)]
    if boundary:
        if s.dtype == "float16" or (s.dtype == "bfloat16" and s.check_grad_overflow):
            out.append(Message("step", "all_reduce", UINT8_SCALAR))
        if s.compute_grad_norm:
            out.append(Message("step", "all_reduce", FP32_SCALAR))
        alignment = NCCL_START_ALIGNMENT_FACTOR * s.world_size
        if s.world_size > 1:
            out += [Message("step", "all_gather", _pad(n, alignment) * s.dtype_bytes)
                    for n in (s.group_numels or (s.param_count,))]
    return out


def zero3_persistent(s: Setup) -> List[bool]:
    """Which tensors ZeRO-3 keeps gathered (``parameter_offload.mark_persistent_parameters``)."""
    flags, total = [], 0
    for numel in s.param_numels:
        persist = numel + total <= s.model_persistence_threshold and numel <= s.param_persistence_threshold
        total += numel if persist else 0
        flags.append(persist)
    return flags


def _zero3(s: Setup, boundary: bool) -> List[Message]:
    padded = [_pad(n, s.world_size) for n in s.param_numels]
    persistent = zero3_persistent(s)
    gathered = sum(p for p, keep in zip(padded, persistent) if not keep)
    out: List[Message] = []
    if gathered and zero3_exact(s):
        out.append(Message("forward", "all_gather", gathered * s.dtype_bytes))
    elif gathered:
        # Approximation for models larger than what stays live: prefetch-bucket-sized gathers in forward,
        # and the same again in backward, where the released parameters are fetched once more.
        pieces = _split(gathered, s.prefetch_bucket_size)
        out += [Message("forward", "all_gather", n * s.dtype_bytes) for n in pieces]
        out += [Message("backward", "all_gather", n * s.dtype_bytes) for n in pieces]
    out += [Message("backward", "reduce_scatter", n * s.grad_bytes) for n in _buckets(padded, s.reduce_bucket_size)]
    if boundary:
        out.append(Message("step", "all_reduce", FP64_SCALAR))
        out += [Message("step", "all_gather", p * s.dtype_bytes) for p, keep in zip(padded, persistent) if keep]
    return out


def zero3_exact(s: Setup) -> bool:
    """Is the one-forward-message rule exact (the whole gathered model fits a prefetch bucket and stays live)?"""
    gathered = sum(_pad(n, s.world_size) for n, keep in zip(s.param_numels, zero3_persistent(s)) if not keep)
    return gathered <= min(s.prefetch_bucket_size, s.max_live_parameters)


Rule = Callable[[Setup, bool], List[Message]]
_RULES: Dict[Tuple[str, Optional[int]], Rule] = {
    ("deepspeed", 0): _zero0, ("deepspeed", 1): _zero12, ("deepspeed", 2): _zero12, ("deepspeed", 3): _zero3,
}
_BACKENDS_WITH_STAGES = {"deepspeed"}
_WARMUP: Dict[Tuple[str, Optional[int]], int] = {("deepspeed", 3): 2}


def register_backend(backend: str, rule: Rule, *, zero_stage: Optional[int] = None, warmup_micro_steps: int = 0):
    """Add a rule ``rule(setup, boundary) -> [Message]`` for another backend (e.g. "fsdp2", "ddp")."""
    _RULES[(backend, zero_stage)] = rule
    _WARMUP[(backend, zero_stage)] = warmup_micro_steps


def _key(s: Setup) -> Tuple[str, Optional[int]]:
    key = (s.backend, s.zero_stage if s.backend in _BACKENDS_WITH_STAGES else None)
    if key not in _RULES:
        raise ValueError(f"no communication model for backend {s.backend!r} (ZeRO stage {s.zero_stage}); "
                         f"known: {sorted(_RULES, key=str)}")
    return key


def warmup_micro_steps(s: Setup) -> int:
    return _WARMUP.get(_key(s), 0)


def is_boundary(s: Setup, micro_step: int) -> bool:
    """Whether micro-step ``micro_step`` (0-based) ends with an optimizer step (PMA: every one)."""
    return s.schedule.steps_optimizer(micro_step)


def micro_step_messages(s: Setup, micro_step: int) -> List[Message]:
    return _RULES[_key(s)](s, is_boundary(s, micro_step))


Totals = Dict[Tuple[str, str], Tuple[int, int]]  # (phase, op) -> (count, bytes)


def aggregate(messages: Iterable[Message]) -> Totals:
    totals: Dict[Tuple[str, str], List[int]] = defaultdict(lambda: [0, 0])
    for m in messages:
        totals[(m.phase, m.op)][0] += 1
        totals[(m.phase, m.op)][1] += m.bytes
    return {k: (c, b) for k, (c, b) in totals.items()}


def micro_step_totals(s: Setup, micro_step: int) -> Totals:
    return aggregate(micro_step_messages(s, micro_step))


def period_totals(s: Setup) -> Dict[str, Tuple[int, int]]:
    """Per op (all phases): (count, bytes) over one period of K micro-steps."""
    out: Dict[str, List[int]] = defaultdict(lambda: [0, 0])
    for i in range(s.period):
        for m in micro_step_messages(s, i):
            out[m.op][0] += 1
            out[m.op][1] += m.bytes
    return {op: (c, b) for op, (c, b) in out.items()}


def pma_vs_ga(s: Setup) -> Dict[str, dict]:
    """Per op: PMA and GA bytes per period and the ratio PMA/GA (None when GA sends nothing)."""
    pma, ga = period_totals(replace(s, pma=True)), period_totals(replace(s, pma=False))
    out = {}
    for op in sorted(set(pma) | set(ga)):
        p, g = pma.get(op, (0, 0)), ga.get(op, (0, 0))
        out[op] = {"pma_count": p[0], "pma_bytes": p[1], "ga_count": g[0], "ga_bytes": g[1],
                   "bytes_ratio": (p[1] / g[1]) if g[1] else None}
    return out


def measured_totals(records: Sequence[dict]) -> Dict[int, Totals]:
    """Ledger records -> micro_step -> (phase, op) -> (count, bytes)."""
    out: Dict[int, Dict[Tuple[str, str], List[int]]] = defaultdict(lambda: defaultdict(lambda: [0, 0]))
    for r in records:
        entry = out[r["micro_step"]][(r["phase"], r["op"])]
        entry[0] += r["count"]
        entry[1] += r["bytes"]
    return {m: {k: (c, b) for k, (c, b) in t.items()} for m, t in out.items()}


def compare(ledger_file: dict) -> List[str]:
    """Mismatches between one rank's ledger file and the model, after warm-up; empty when they agree."""
    s = Setup.from_meta(ledger_file["meta"])
    measured = measured_totals(ledger_file["records"])
    n = ledger_file["meta"]["micro_steps"]
    problems = []
    for i in range(warmup_micro_steps(s), n):
        got, want = measured.get(i, {}), micro_step_totals(s, i)
        if got != want:
            problems.append(f"micro-step {i}: measured {sorted(got.items())} != model {sorted(want.items())}")
    extra = sorted(m for m in measured if m < 0 or m >= n)
    if extra:
        problems.append(f"collectives outside micro-steps 0..{n - 1}: {extra}")
    return problems


# --- entry points for the report (pma_dist.comm.report / projection) ----------------------------
def predict_from_meta(meta: dict) -> Dict[str, Dict[str, int]]:
    """Per op: {"count", "bytes"} over one steady-state period, for the run a ledger ``meta`` describes."""
    return {op: {"count": c, "bytes": b} for op, (c, b) in period_totals(Setup.from_meta(meta)).items()}


def projected_period_records(zero_stage: int, world_size: int, period: int, dtype: str, param_count: int,
                             pma: bool) -> List[dict]:
    """One period of ledger-style records for a model of ``param_count`` parameters (projections)."""
    s = Setup.for_param_count(param_count, zero_stage=zero_stage, world_size=world_size, period=period,
                              pma=pma, dtype=dtype)
    records = []
    for i in range(period):
        kind = s.schedule.kind(i)
        for (phase, op), (count, nbytes) in sorted(micro_step_totals(s, i).items()):
            records.append({"micro_step": i, "pma_kind": kind, "phase": phase, "op": op, "count": count,
                            "bytes": nbytes})
    return records


# --- PyTorch FSDP2 and DDP (pma_dist.torch_parallel writes the meta keys read here) ---------------------
def _fsdp2_padded_numel(shape: Sequence[int], world_size: int) -> int:
    """FSDP2 shards dim 0 into N equal chunks, padding it to a multiple of N (a 0-d tensor counts as [1])."""
    shape = list(shape) or [1]
    rest = math.prod(shape[1:])
    return _pad(shape[0], world_size) * rest


def _fsdp2(s: Setup, boundary: bool) -> List[Message]:
    """FSDP2 ``fully_shard`` (torch 2.13 ``_fsdp_collectives.py``, ``_fsdp_state.py``).

    Each unit (one ``fully_shard`` call) sends one all-gather of its padded parameters in forward,
    another in backward if it resharded after forward (FSDP2's default: every unit but the root), and
    at a sync step one reduce-scatter of its padded gradients (GA skips it with
    ``set_requires_gradient_sync(False)``). Gradient clipping all-reduces one fp32 scalar in the step.
    """
    units = s.extra.get("fsdp_units")
    if not units:
        raise ValueError("the FSDP2 model needs meta.fsdp_units (written by pma_dist.torch_parallel)")
    if s.world_size < 2:
        raise ValueError(f"the FSDP2 model covers world_size >= 2, got {s.world_size}")
    gather_bytes = DTYPE_BYTES[s.extra.get("fsdp_param_dtype", s.dtype)]
    reduce_bytes = DTYPE_BYTES[s.extra.get("fsdp_reduce_dtype", s.dtype)]
    out: List[Message] = []
    for unit in units:
        if not unit["param_shapes"]:
            continue  # a root that only groups other units sends nothing itself
        reshard = unit["reshard_after_forward"]
        if not isinstance(reshard, bool):
            raise ValueError(f"the FSDP2 model covers reshard_after_forward True/False, got {reshard!r}")
        padded = sum(_fsdp2_padded_numel(shape, s.world_size) for shape in unit["param_shapes"])
        out.append(Message("forward", "all_gather", padded * gather_bytes))
        if reshard:
            out.append(Message("backward", "all_gather", padded * gather_bytes))
        if boundary:
            out.append(Message("backward", "reduce_scatter", padded * reduce_bytes))
    if boundary and s.gradient_clipping > 0:
        out.append(Message("step", "all_reduce", FP32_SCALAR))
    return out


def _ddp_buckets(numels: Sequence[int], element_size: int, first_bucket_bytes: int, bucket_bytes: int) -> List[int]:
    """DDP's bucket assignment: reverse registration order, the first bucket capped lower than the rest."""
    buckets: List[int] = []
    current = 0
    for numel in reversed(list(numels)):
        cap = first_bucket_bytes if not buckets else bucket_bytes
        if current and (current + numel) * element_size > cap:
            buckets.append(current)
            current = 0
        current += numel
    if current:
        buckets.append(current)
    return buckets


def _ddp(s: Setup, boundary: bool) -> List[Message]:
    """DDP: at a sync step one all-reduce per gradient bucket (GA skips it with ``no_sync()``).

    Bytes are exact (every gradient element is all-reduced once). The count assumes the buckets follow
    reverse registration order, which DDP's rebuild after the first iteration keeps when gradients
    become ready in that order (a plain chain of layers); gradient clipping needs no communication.
    """
    if s.world_size < 2:
        raise ValueError(f"the DDP model covers world_size >= 2, got {s.world_size}")
    element_size = s.extra.get("ddp_grad_element_size", s.dtype_bytes)
    cap = s.extra.get("ddp_bucket_cap_bytes", 25 * 1024 * 1024)
    first = s.extra.get("ddp_first_bucket_bytes", 1024 * 1024)
    if not boundary:
        return []
    return [Message("backward", "all_reduce", n * element_size)
            for n in _ddp_buckets(s.extra.get("ddp_grad_numels", s.param_numels), element_size, first, cap)]


register_backend("fsdp2", _fsdp2)
register_backend("ddp", _ddp)
