"""AdaPM: AdamW with partial momentum per transformer block (AdaPM paper, Algorithm 1).

The thin class around :mod:`pma_dist.adapm.lowrank` and :mod:`pma_dist.adapm.policy`: it plans
each parameter's blocks at construction (from names), keeps the per-group clock of
:class:`pma_dist.optim.PMAOptimizer`, and applies for each block

    u     = momentum of the block's kind (none: g; full: EMA; lowrank: debiased L R)   / bc1
    v     = AdamW second moment (or one per Adam-mini block with ``mini=True``)
    theta = theta * (1 - lr * wd) - lr * clip(u / (sqrt(v / bc2) + eps), update_clip)

Composition with PMA: ``period=K > 1`` reads :class:`pma_dist.schedule.PMAPhase` for the moment
decays and gradient weights (applied to the full momentum, to ``L R`` and to ``v``), the small-step
learning-rate factor and the bias corrections, exactly like AdamW-PMA; ``period=1`` with the
default ``variant="paper"`` is plain AdaPM.

FSDP2: parameters sharded by ``fully_shard`` (``Shard(0)`` DTensors) are updated on their local rows
(:mod:`pma_dist.adapm.sharding`); the states are DTensors split like the rows they belong to, the
low-rank factor across the split axis replicated, and the few sums over ranks the low-rank algebra and
AdaPM-mini's block means need are all-reduces over the parameter's mesh.
"""
from __future__ import annotations

import math
import numbers
import sys
import warnings
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .. import functional as F
from ..optim import (PMAOptimizer, _check_betas, _check_eps, _check_lr, _check_period, _check_variant,
                     _check_weight_decay)
from ..coefficients import ADAMW_SMALL_LR_POWER, AdamWStepCoefficients
from ..schedule import PMAPhase, bias_corrections
from . import lowrank
from .sharding import RowShard, local, row_shard_of
from .policy import ParamPlan, Segment, check_overrides, plan_param

__all__ = ["AdaPM"]


class AdaPM(PMAOptimizer):
    """Adaptive partial momentum (AdaPM) with an optional AdaPM-mini second moment and PMA averaging.

    Args:
        params: ``model.named_parameters()`` (recommended: names choose each block's momentum),
            plain parameters together with ``param_names``, or param-group dicts of either.
        lr, betas, eps, weight_decay: as in ``torch.optim.AdamW``.
        rank_ratio: rank of the low-rank momentum as a fraction of the block's smaller dimension
            (rounded up, at least 1); the paper uses 0.05.
        update_interval: T, the number of steps between exact (SVD) refits of the low-rank factors;
            in between they follow the momentum by warm-started descent. The paper uses 100.
        inner_steps: descent iterations per step on ``||L R - m||`` (0: keep the factors until the next
            refit; the residual correction then carries everything the factors miss).
        solver: ``"scaled_gd"`` (default, Gram-preconditioned) or ``"gd"`` (plain, step 1/sigma_max^2).
        update_clip: element-wise clip of the normalised update (Alg. 1 line 9: 1.0); ``None`` disables.
        residual_correction: apply eq. (4) (default); ``False`` uses the factors ``L R`` alone as the
            momentum (the paper's ablation, Fig. 4a).
        mini: AdaPM-mini: one second moment per Adam-mini block instead of one per entry.
        num_heads: attention heads, for AdaPM-mini's per-head query/key second moment (else per row).
        num_kv_heads: key-value heads of grouped-query attention (keys are shared per kv head);
            defaults to ``num_heads``.
        qkv_sizes: (q, k, v) output sizes of fused QKV weights when they are not equal thirds (GQA).
        policy_overrides: ``{regex: "none" | "lowrank" | "full"}`` searched in parameter names before
            the built-in rules (first match wins); a match on a fused QKV weight takes it whole.
        param_names: optional ``{parameter: name}`` for parameters passed without names (DeepSpeed's
            ``engine.param_names`` has this form).
        period, variant: PMA composition (see the module doc); ``period=1`` is plain AdaPM.
        foreach: accepted for API symmetry; blocks are updated one by one (their states differ).
    """

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas: Tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        rank_ratio: float = 0.05,
        update_interval: int = 100,
        inner_steps: int = 2,
        solver: str = "scaled_gd",
        update_clip: Optional[float] = 1.0,
        residual_correction: bool = True,
        mini: bool = False,
        num_heads: Optional[int] = None,
        num_kv_heads: Optional[int] = None,
        qkv_sizes: Optional[Sequence[int]] = None,
        policy_overrides: Optional[Mapping[str, str]] = None,
        param_names: Optional[Mapping[Tensor, str]] = None,
        period: int = 1,
        variant: str = "paper",
        *,
        foreach: Optional[bool] = None,
    ):
        _check_fraction("rank_ratio", rank_ratio)
        _check_int("num_heads", num_heads, minimum=1, optional=True)
        _check_int("num_kv_heads", num_kv_heads, minimum=1, optional=True)
        if not isinstance(mini, bool):
            raise TypeError(f"Invalid mini: {mini!r} (must be True or False)")
        if qkv_sizes is not None:
            if (not isinstance(qkv_sizes, Sequence) or len(qkv_sizes) != 3
                    or not all(isinstance(s, numbers.Integral) and not isinstance(s, bool) and s > 0
                               for s in qkv_sizes)):
                raise ValueError(f"Invalid qkv_sizes: {qkv_sizes!r} (expected three positive ints (q, k, v))")
        if param_names is not None and not isinstance(param_names, Mapping):
            raise TypeError(f"Invalid param_names: {type(param_names).__name__} (expected a mapping parameter -> name)")
        self._overrides = check_overrides(policy_overrides)
        self._structure = dict(rank_ratio=float(rank_ratio), num_heads=num_heads, num_kv_heads=num_kv_heads,
                               qkv_sizes=tuple(qkv_sizes) if qkv_sizes is not None else None)
        self.mini = mini
        self._param_names = param_names or {}
        self._plans: Dict[Tensor, ParamPlan] = {}
        self._shards: Dict[Tensor, Optional[RowShard]] = {}  # FSDP2: this rank's rows of each parameter
        self._fresh: set = set()  # params whose low-rank factors were created this step: fit by SVD
        defaults = dict(lr=lr, betas=tuple(betas) if isinstance(betas, list) else betas, eps=eps,
                        weight_decay=weight_decay, update_interval=update_interval, inner_steps=inner_steps,
                        solver=solver, update_clip=update_clip, residual_correction=residual_correction,
                        period=period, variant=variant)
        super().__init__(params, defaults, foreach)

    # ------------------------------------------------------------------ construction
    def _validate_group(self, group: dict) -> None:
        _check_lr(group["lr"])
        _check_betas(group["betas"])
        _check_eps(group["eps"])
        _check_weight_decay(group["weight_decay"])
        _check_period(group["period"])
        _check_variant(group["variant"])
        _check_int("update_interval", group["update_interval"], minimum=1)
        _check_int("inner_steps", group["inner_steps"], minimum=0)
        if group["solver"] not in lowrank.SOLVERS:
            raise ValueError(f"Invalid solver: {group['solver']!r} (expected one of {lowrank.SOLVERS})")
        if not isinstance(group["residual_correction"], bool):
            raise TypeError(f"Invalid residual_correction: {group['residual_correction']!r} (must be True or False)")
        clip = group["update_clip"]
        if clip is not None and (isinstance(clip, bool) or not isinstance(clip, numbers.Real) or not clip > 0):
            raise ValueError(f"Invalid update_clip: {clip!r} (must be > 0, or None to disable clipping)")

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        names = group.get("param_names")
        if names is None:
            names = [self._param_names.get(p) or _deepspeed_param_name(p) for p in group["params"]]
            if any(n is None for n in names):
                warnings.warn(
                    "AdaPM got parameters without names: those blocks use full momentum (AdamW-like). Pass "
                    "model.named_parameters() or param_names= to get the paper's per-block momentum policy.",
                    stacklevel=3)
            names = [n if n is not None else f"<unnamed {i}>" for i, n in enumerate(names)]
        for name, p in zip(names, group["params"]):
            shard = row_shard_of(name, p)
            plan = plan_param(name, tuple(p.shape), overrides=self._overrides, **self._structure)
            _check_shardable(plan, shard)
            self._plans[p], self._shards[p] = plan, shard

    def plan(self, p: Tensor) -> ParamPlan:
        try:
            return self._plans[p]
        except KeyError:
            raise RuntimeError(
                f"AdaPM was asked to update a parameter it was not constructed with (shape {tuple(p.shape)}). "
                "AdaPM plans each weight matrix by name and shape at construction; DeepSpeed ZeRO stages 1-3 "
                "(flat 1-D partitions) and its bf16/fp16 wrappers (fp32 master copies) swap in other tensors, "
                "which AdaPM does not support. For sharded training use FSDP2 instead (fully_shard); else ZeRO "
                "stage 0 in fp32, DDP, or a single process.") from None

    def check_deepspeed_engine(self, engine) -> None:
        """Refuse DeepSpeed set-ups that hand the optimizer other tensors than the model's weights."""
        stage = engine.zero_optimization_stage()
        if stage:
            raise ValueError(
                f"AdaPM cannot run under DeepSpeed ZeRO stage {stage}: ZeRO-1/2/3 give the optimizer flat 1-D "
                "partitions, which lose the weight matrices' shapes that AdaPM's low-rank momentum and block "
                'policy need. For sharded training use FSDP2 instead (torch.distributed.fsdp.fully_shard, then '
                'AdaPM(model.named_parameters(), ...): AdaPM updates its row shards); or DeepSpeed with '
                '"zero_optimization": {"stage": 0} (fp32), or DDP.')
        for flag, enabled in (("bf16", engine.bfloat16_enabled()), ("fp16", engine.fp16_enabled())):
            if enabled:
                raise ValueError(
                    f"AdaPM cannot run under DeepSpeed's {flag} optimizer wrapper (it steps fp32 master copies "
                    f"AdaPM was not built with): disable \"{flag}\" or train with torch.autocast under DDP.")

    # ------------------------------------------------------------------ state
    def _init_state(self, p: Tensor, step: int) -> dict:
        state = self.state[p]
        if state:
            return state
        plan, shard = self.plan(p), self._shards.get(p)
        dtype = F.state_dtype(p)
        state["step"] = torch.tensor(float(step), dtype=torch.float32)
        for key, (shape, split) in self._state_layout(plan).items():
            if shard is None:
                state[key] = torch.zeros(shape, dtype=dtype, device=p.device)
            else:
                zeros = torch.zeros(_local_shape(shape, split, shard), dtype=dtype, device=local(p).device)
                state[key] = shard.state(zeros, shape, split)
        if any(seg.kind == "lowrank" for seg in plan.segments):
            self._fresh.add(p)
        return state

    def _state_shapes(self, plan: ParamPlan) -> Dict[str, Tuple[int, ...]]:
        """Name -> (whole, unsharded) shape of every state tensor of one parameter (besides ``step``)."""
        return {key: shape for key, (shape, _) in self._state_layout(plan).items()}

    def _state_layout(self, plan: ParamPlan) -> Dict[str, Tuple[Tuple[int, ...], Optional[int]]]:
        """Name -> (shape, the axis split like the weight's rows under FSDP2, or None: replicated)."""
        layout = {}
        for i, seg in enumerate(plan.segments):
            suffix = _suffix(i, plan)
            mshape = seg.matrix_shape(plan.shape)
            split = _split_axis(seg, len(plan.shape))  # the block matrix's axis that holds the weight's rows
            if seg.kind == "full":
                layout["exp_avg" + suffix] = (mshape, split)
            elif seg.kind == "lowrank":
                layout["exp_avg_L" + suffix] = ((mshape[0], seg.rank), 0 if split == 0 else None)
                layout["exp_avg_R" + suffix] = ((seg.rank, mshape[1]), 1 if split == 1 else None)
            vshape = _second_moment_shape(seg, mshape, self.mini)
            keeps_rows = not self.mini or seg.partition == "element" or (seg.partition == "row" and split == 0)
            layout["exp_avg_sq" + suffix] = (vshape, split if keeps_rows else None)
        return layout

    def load_state_dict(self, state_dict: dict) -> None:
        """Refuse, before loading anything, state whose tensors do not fit this optimizer's plan."""
        saved_ids = [i for group in state_dict.get("param_groups", []) for i in group["params"]]
        params = [p for group in self.param_groups for p in group["params"]]
        for index, p in zip(saved_ids, params):
            saved = state_dict.get("state", {}).get(index)
            if not saved:
                continue
            plan = self.plan(p)
            expected = self._state_shapes(plan)
            got = {k: tuple(v.shape) for k, v in saved.items() if k != "step" and torch.is_tensor(v)}
            if got != expected:
                raise ValueError(
                    f"AdaPM checkpoint does not fit parameter {plan.name!r}: saved state {got}, this optimizer "
                    f"expects {expected}. Was it saved with another rank_ratio, mini, num_heads, num_kv_heads, qkv_sizes or "
                    "policy_overrides?")
        super().load_state_dict(state_dict)
        # loaded factors continue; only parameters still without state get the first-step fit
        self._fresh = {p for p in self._fresh if not self.state.get(p)}

    # ------------------------------------------------------------------ memory
    def memory_report(self) -> List[dict]:
        """Per parameter: its blocks' policies and the bytes of AdaPM's state vs AdamW's.

        Computed from the plan (no step needed). ``momentum_bytes`` counts ``exp_avg`` and the
        low-rank factors, ``second_moment_bytes`` counts ``exp_avg_sq``; AdamW keeps one full
        ``exp_avg`` and ``exp_avg_sq`` each. The 4-byte ``step`` scalar, common to both, is left out.
        Under FSDP2 every count is this rank's: its rows' share of the split states plus the whole
        replicated ones (a low-rank block's factor across the split axis, AdaPM-mini's per-head and
        per-tensor means), which ``replicated_bytes`` repeats; AdamW's are its shard of the weight.
        """
        rows = []
        for group in self.param_groups:
            for p in group["params"]:
                plan, shard = self.plan(p), self._shards.get(p)
                item = torch.finfo(F.state_dtype(p)).bits // 8
                momentum = second = replicated = 0
                for key, (shape, split) in self._state_layout(plan).items():
                    size = math.prod(_local_shape(shape, split, shard)) * item
                    if key.startswith("exp_avg_sq"):
                        second += size
                    else:
                        momentum += size
                    if shard is not None and split is None:
                        replicated += size
                numel = local(p).numel()
                rows.append(dict(name=plan.name, shape=plan.shape,
                                 policy="+".join(f"{s.role}:{s.kind}" + (f"(r={s.rank})" if s.rank else "")
                                                 for s in plan.segments),
                                 momentum_bytes=momentum, second_moment_bytes=second, replicated_bytes=replicated,
                                 adamw_momentum_bytes=numel * item, adamw_second_moment_bytes=numel * item))
        return rows

    def state_bytes(self) -> Dict[str, int]:
        """Bytes actually held in ``self.state`` on this rank per parameter name (``step`` excluded)."""
        out = {}
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state.get(p, {})
                out[self.plan(p).name] = sum(local(t).numel() * local(t).element_size() for k, t in state.items()
                                             if k != "step" and torch.is_tensor(t))
        return out

    def sharded_blocks(self) -> List[dict]:
        """The blocks of FSDP2-sharded parameters, as :mod:`pma_dist.comm.adapm_model` reads them: kind,
        whole matrix shape, rank, which axis of the block the row shards split, the elements of
        AdaPM-mini's per-step sum over ranks (0 if none), the group's refit interval and descent steps,
        and the state dtype's size."""
        out = []
        for group in self.param_groups:
            for p in group["params"]:
                plan, shard = self.plan(p), self._shards.get(p)
                if shard is None:
                    continue
                ndim = len(plan.shape)
                for seg in plan.segments:
                    split = _split_axis(seg, ndim)
                    mshape = seg.matrix_shape(plan.shape)
                    mini_sum = 0
                    if self.mini and seg.partition == "tensor":
                        mini_sum = 1
                    elif self.mini and seg.partition == "head":
                        mini_sum = seg.heads
                    elif self.mini and seg.partition == "row" and split == 1:
                        mini_sum = mshape[0]
                    out.append(dict(name=plan.name, kind=seg.kind, shape=list(mshape), rank=seg.rank,
                                    split="rows" if split == 0 else "cols", mini_sum_elements=mini_sum,
                                    update_interval=group["update_interval"], inner_steps=group["inner_steps"],
                                    dtype_bytes=torch.finfo(F.state_dtype(p)).bits // 8))
        return out

    # ------------------------------------------------------------------ step
    def _collect(self, group, step_before):
        # Local gradients keep the base class from swapping FSDP2 parameters for their local shards:
        # the update needs the DTensor itself (its plan, its rows, its mesh).
        params, grads, moments = super()._collect(group, step_before)
        return params, [local(g) for g in grads], moments

    def _update_foreach(self, ps, gs, moments, phase, group):
        for p, g in zip(ps, gs):
            self._update_tensor(p, g, [], phase, group)

    def _update_tensor(self, p: Tensor, g: Tensor, moments, phase: PMAPhase, group: dict) -> None:
        plan, shard = self.plan(p), self._shards.get(p)
        state = {key: local(t) for key, t in self.state[p].items()}
        refit = p in self._fresh or (phase.step - 1) % group["update_interval"] == 0
        self._fresh.discard(p)
        beta1, beta2 = (float(b) for b in group["betas"])
        # the AdamW-PMA scalars of this step; AdaPM clips m_hat / D before the lr, so it also needs
        # the lr and bc1 that AdamW-PMA folds into one step coefficient
        scalars = AdamWStepCoefficients.for_step(phase, lr=float(group["lr"]), beta1=beta1, beta2=beta2,
                                                 eps=float(group["eps"]), weight_decay=float(group["weight_decay"]),
                                                 variant=group["variant"])
        bc1, _ = bias_corrections(phase, beta1, beta2, group["variant"])
        lr = float(group["lr"]) * phase.lr_factor(ADAMW_SMALL_LR_POWER)
        clip = group["update_clip"]

        p_local = local(p)
        theta = F._compute_view(p_local)
        grad = F._compute_view(g)
        theta.mul_(scalars.param_scale)
        ndim = len(plan.shape)
        for i, seg in enumerate(plan.segments):
            suffix = _suffix(i, plan)
            split = _split_axis(seg, ndim) if shard is not None else None
            gs = _segment_view(seg, grad, ndim, split)
            if seg.kind == "none":
                direction = gs
            elif seg.kind == "full":
                exp_avg = state["exp_avg" + suffix]
                exp_avg.mul_(scalars.decay1).add_(gs, alpha=scalars.grad_coef1)
                direction = exp_avg / bc1
            else:
                L, R = state["exp_avg_L" + suffix], state["exp_avg_R" + suffix]
                corrected, _ = lowrank.debiased_lowrank_momentum(
                    gs, L, R, beta1=beta1, decay=phase.decay(beta1), grad_weight=phase.grad_weight, refit=refit,
                    inner_steps=group["inner_steps"], solver=group["solver"], seed=phase.step,
                    layout=_block_layout(seg, plan, shard))
                if not group["residual_correction"]:  # the paper's ablation: the plain low-rank momentum
                    corrected = L @ R
                direction = corrected.div_(bc1)
            exp_avg_sq = state["exp_avg_sq" + suffix]
            blocks = _Blocks(seg, plan, shard, split)
            exp_avg_sq.mul_(scalars.decay2).add_(blocks.mean_sq(gs, self.mini), alpha=scalars.grad_coef2)
            denom = F.adamw_pma_denominator(blocks.expand(exp_avg_sq, gs.shape, self.mini), scalars)
            update = direction / denom
            if clip is not None:
                update.clamp_(-float(clip), float(clip))
            _segment_view(seg, theta, ndim, split).add_(update, alpha=-lr)
            if scalars.rescale != 1.0:  # the paper variant's large step
                for key in ("exp_avg", "exp_avg_L", "exp_avg_sq"):
                    if key + suffix in state:
                        state[key + suffix].mul_(scalars.rescale)
        if theta is not p_local:
            p_local.copy_(theta)


# ---------------------------------------------------------------------------------------------- helpers


def _suffix(index: int, plan: ParamPlan) -> str:
    return "" if len(plan.segments) == 1 else f".{index}"


def _second_moment_shape(seg: Segment, mshape: Tuple[int, ...], mini: bool) -> Tuple[int, ...]:
    if not mini or seg.partition == "element":
        return mshape
    if seg.partition == "tensor":
        return ()
    if seg.partition == "row":
        return (mshape[0],)
    return (seg.heads,)


class _Blocks:
    """AdaPM-mini's second-moment blocks of one segment: the squared gradient summed per block (over
    ranks where a block spans the split axis), divided by the block's whole size, and expanded back.
    Sums then one division on both paths, so a single process and FSDP2 compute the same numbers."""

    def __init__(self, seg: Segment, plan: ParamPlan, shard: Optional[RowShard], split: Optional[int]):
        self.seg, self.shard, self.split = seg, shard, split
        self.whole = seg.matrix_shape(plan.shape)
        self.row_start = shard.start if split == 0 else 0  # global index of this rank's first block row

    def _sum(self, t: Tensor, over_split: bool) -> Tensor:
        return self.shard.sum(t)[0] if over_split and self.split is not None else t

    def mean_sq(self, g: Tensor, mini: bool) -> Tensor:
        sq = g * g
        seg = self.seg
        if not mini or seg.partition == "element":
            return sq
        if seg.partition == "tensor":
            return self._sum(sq.sum(), True) / math.prod(self.whole)
        row_sums = sq.sum(dim=1)
        if seg.partition == "row":
            return self._sum(row_sums, self.split == 1) / self.whole[1]
        rows_per_head = self.whole[0] // seg.heads
        heads = torch.arange(self.row_start, self.row_start + g.shape[0], device=g.device) // rows_per_head
        head_sums = torch.zeros(seg.heads, dtype=sq.dtype, device=sq.device).index_add_(0, heads, row_sums)
        return self._sum(head_sums, True) / (rows_per_head * self.whole[1])

    def expand(self, v: Tensor, gshape, mini: bool) -> Tensor:
        seg = self.seg
        if not mini or seg.partition in ("element", "tensor"):
            return v
        if seg.partition == "row":
            return v[:, None]
        rows = v.repeat_interleave(self.whole[0] // seg.heads)
        return rows[self.row_start:self.row_start + gshape[0]][:, None]


def _split_axis(seg: Segment, ndim: int) -> int:
    """The axis of the segment's matrix (or of a vector/other tensor) that runs along the weight's rows."""
    return 1 if ndim == 2 and seg.out_axis == 1 else 0


def _segment_view(seg: Segment, t: Tensor, ndim: int, split: Optional[int]) -> Tensor:
    if split == 0 and ndim == 2:  # rows split: the segment is the whole local shard (_check_shardable)
        return t
    return seg.view(t, ndim)


def _block_layout(seg: Segment, plan: ParamPlan, shard: Optional[RowShard]) -> lowrank.BlockLayout:
    whole = seg.matrix_shape(plan.shape)
    if shard is None:
        return lowrank.BlockLayout(whole)
    if seg.out_axis == 0:
        return lowrank.BlockLayout(whole, sum_rows=shard.sum)
    return lowrank.BlockLayout(whole, sum_cols=shard.sum, col_start=shard.start)


def _local_shape(shape: Tuple[int, ...], split: Optional[int], shard: Optional[RowShard]) -> Tuple[int, ...]:
    if shard is None or split is None:
        return tuple(shape)
    return tuple(shard.stop - shard.start if axis == split else size for axis, size in enumerate(shape))


def _check_shardable(plan: ParamPlan, shard: Optional[RowShard]) -> None:
    """Blocks cut along the split rows (a fused QKV stored ``(3d, d)``) have no DTensor layout for their
    states (on any mesh: a checkpoint must reshard onto other world sizes); refuse them before any
    work, naming the way out."""
    if shard is None or len(plan.shape) != 2:
        return
    if any(seg.out_axis == 0 for seg in plan.segments) and len(plan.segments) > 1:
        raise ValueError(
            f"AdaPM under FSDP2 cannot split parameter {plan.name!r} of shape {plan.shape} into "
            f"{'/'.join(s.role for s in plan.segments)} blocks along its sharded first axis (FSDP2's row "
            "shards do not follow the block boundaries). Store the fused weight as (in, 3 * out) like GPT-2's "
            "Conv1D, use separate q/k/v projections, or pass policy_overrides={<its name>: 'lowrank' | 'full' | "
            "'none'} to treat it as one block.")


def _deepspeed_param_name(p: Tensor) -> Optional[str]:
    """The name a DeepSpeedEngine under construction recorded for ``p`` (config-built optimizers get
    bare tensors; every engine maps its model's parameters to names before building the optimizer)."""
    debug = sys.modules.get("deepspeed.utils.debug")
    names = getattr(debug, "param_names", None)
    if names is None or p not in names:
        return None
    return names[p]


def _check_int(name: str, value, *, minimum: int, optional: bool = False) -> None:
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"Invalid {name}: {value!r} (must be an int >= {minimum})")


def _check_fraction(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 < float(value) <= 1.0:
        raise ValueError(f"Invalid {name}: {value!r} (must be in (0, 1])")
