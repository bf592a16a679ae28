"""AdamW-PMA and Lion-PMA: thin ``torch.optim.Optimizer`` classes around :mod:`pma_dist.functional`.

Step counting. Each param group holds one counter, ``group["step"]`` (a plain int, so it travels
with ``state_dict()["param_groups"]``); a step of the group advances it by one and every tensor
updated in that step is updated with the group's phase, so a tensor that had no gradient for a
while is still in phase when it gets one again. Each tensor's state also records ``state["step"]``
(a 0-d fp32 tensor, as in ``torch.optim.AdamW``) for tools that read per-parameter state, such as
DeepSpeed's universal checkpoints; when an optimizer is first stepped after state was written
behind its back, the group counter is reconciled with the largest per-tensor step.

Integrations whose wrappers call ``step()`` in unusual ways use two context managers:
:meth:`PMAOptimizer.setup_steps` (calls only materialise state: DeepSpeed's setup steps with zero
gradients) and :meth:`PMAOptimizer.one_logical_step` (several calls advance each group at most
once: ZeRO-3 steps once per sub-group).
"""
from __future__ import annotations

import contextlib
import numbers
import warnings
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import torch
from torch import Tensor

try:  # torch >= 2.4
    from torch.distributed.tensor import DTensor
except ImportError:  # pragma: no cover - older torch or no distributed build
    DTensor = None

from . import functional as F
from . import kernels
from .kernels import compiled
from .schedule import LR_DECAYS, VARIANTS, PMAPhase

__all__ = ["PMAOptimizer", "AdamWPMA", "LionPMA"]

#: What ``fused=None`` (the default) means. ``True``: the fused CPU kernel for every bucket it supports
#: (CPU, fp32/bf16/fp16, contiguous) when ``foreach`` is also left unset, the foreach path for the
#: others (CUDA, float64, non-contiguous), and everywhere, after one warning, if the kernel cannot be
#: built. ``False`` would make the default the foreach path. The kernel is exact to a derived bound
#: (docs/performance.md) and the fastest CPU path measured (docs/BENCHMARKS.md).
FUSED_BY_DEFAULT = True
_warned_fused_unavailable = False


def _fused_kernel_loads() -> bool:
    global _warned_fused_unavailable
    reason = kernels.unavailable_reason()
    if reason is not None and not _warned_fused_unavailable:
        _warned_fused_unavailable = True
        warnings.warn(f"pma_dist: using the foreach path because the fused CPU kernel is unavailable: {reason}",
                      RuntimeWarning, stacklevel=3)
    return reason is None


def _as_float(name: str, value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        raise TypeError(f"Invalid {name}: {value!r} (must be a real number)") from None


def _check_lr(lr) -> None:
    if not _as_float("learning rate", lr) >= 0.0:  # also rejects NaN
        raise ValueError(f"Invalid learning rate: lr={lr!r} (must be >= 0)")


def _check_betas(betas) -> None:
    try:
        b1, b2 = betas
    except (TypeError, ValueError):
        raise ValueError(f"Invalid betas: {betas!r} (expected a pair (beta1, beta2))") from None
    for i, b in enumerate((b1, b2)):
        if isinstance(b, bool) or not isinstance(b, numbers.Real) or not 0.0 <= float(b) < 1.0:
            raise ValueError(f"Invalid beta{i + 1}: {b!r} in betas={betas!r} (each must be in [0, 1))")


def _check_period(period) -> None:
    if isinstance(period, bool) or not isinstance(period, numbers.Integral):
        raise TypeError(f"Invalid period: {period!r} (must be a positive int, the PMA period K)")
    if period < 1:
        raise ValueError(f"Invalid period: {period!r} (must be a positive int, the PMA period K)")


def _check_weight_decay(weight_decay) -> None:
    if not _as_float("weight_decay", weight_decay) >= 0.0:
        raise ValueError(f"Invalid weight_decay: {weight_decay!r} (must be >= 0)")


def _check_eps(eps) -> None:
    if not _as_float("eps", eps) > 0.0:
        raise ValueError(f"Invalid eps: {eps!r} (must be > 0)")


def _check_lr_decay(lr_decay) -> None:
    if lr_decay not in LR_DECAYS:
        raise ValueError(f"Invalid lr_decay: {lr_decay!r} (expected one of {', '.join(map(repr, LR_DECAYS))})")


def _check_variant(variant) -> None:
    if variant not in VARIANTS:
        raise ValueError(f"Invalid variant: {variant!r} (expected one of {', '.join(map(repr, VARIANTS))})")


_PMA_HYPER_KEYS = {"lr", "betas", "eps", "weight_decay", "period", "variant"}  # AdamWPMA's and LionPMA's together
# hyper-parameters added after state dicts were first saved: an older state without them loads with these
_LATER_HYPER_DEFAULTS = {"lr_decay": "none"}
_PMA_MOMENT_KEYS = {"exp_avg", "exp_avg_sq"}


class PMAOptimizer(torch.optim.Optimizer):
    """Shared machinery of the PMA optimizers: validation, the per-group clock, state, dispatch.

    Non-finite guard: with ``optimizer.skip_nonfinite = True`` a ``step()`` whose gradients hold a NaN or
    an inf changes nothing (no parameter, moment or clock moves: the phase does not advance) and adds one
    to ``nonfinite_steps_skipped``. When ``torch.distributed`` runs more than one rank the verdict is
    agreed by all ranks (a 1-element MAX all-reduce on the default group, on the process group object so
    the comm ledger does not bill it to the training): under ZeRO and FSDP each rank sees only its shard of
    the gradient, and without the vote a NaN in one shard would move the phase of the other shards only.
    Cost per ``step()``: one ``_foreach_norm`` over the gradients per (device, dtype), one device-to-host
    read of one flag, and with several ranks that all-reduce; off by default. Every rank must call
    ``step()`` equally often, so it is not for ZeRO-3, which steps once per sub-group; ZeRO-1/2 call it
    once per param group, so there a skip is decided per param group.

    Tensors without a gradient in a step are left untouched (no update, no weight decay) while the group's
    clock advances: a tensor whose first gradient arrives mid-period starts from zero moments, exactly as if
    it had received zero gradients since the period began (bit for bit with weight decay 0), so that first
    running mean is diluted by the micro-steps it missed; a tensor without a gradient at the large step keeps
    the period's running mean, which the next period then treats as its folded moment (that period's
    decay by ``beta`` is skipped). ``zero_grad(set_to_none=False)`` gives unused tensors zero gradients
    instead, and with them the regular fold. A ``step()`` in which no tensor of a group has a gradient does not
    advance that group's clock.
    """

    #: names of the moment buffers in ``self.state[p]``, in the order the update functions take them
    moment_names: Tuple[str, ...] = ()
    skip_nonfinite: bool = False
    nonfinite_steps_skipped: int = 0

    def __init__(self, params, defaults: dict, foreach: Optional[bool], fused: Optional[bool] = None):
        defaults = dict(defaults, foreach=foreach, fused=fused)
        self._setup_depth = 0
        self._logical_step_start: Optional[Dict[int, int]] = None
        self._clock_reconciled = False
        super().__init__(params, defaults)

    # ------------------------------------------------------------------ validation
    def _validate_group(self, group: dict) -> None:
        raise NotImplementedError

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)  # fills the defaults the checks read
        group = self.param_groups[-1]
        group.setdefault("step", 0)
        try:
            self._validate_group(group)
            self._validate_path(group)
            for p in group["params"]:
                if torch.is_complex(p):
                    raise TypeError(
                        f"{type(self).__name__} does not support complex parameters (got a {p.dtype} tensor "
                        f"of shape {tuple(p.shape)}); view it as real with torch.view_as_real")
        except (TypeError, ValueError, RuntimeError):
            self.param_groups.pop()  # a refused group leaves the optimizer as it was
            raise

    def _validate_path(self, group: dict) -> None:
        foreach, fused = group["foreach"], group.get("fused")
        for name, value in (("foreach", foreach), ("fused", fused)):
            if value is not None and not isinstance(value, bool):
                raise TypeError(f"Invalid {name}: {value!r} (must be True, False or None)")
        if fused and foreach is not None:
            raise ValueError(
                f"{type(self).__name__}: fused=True and foreach={foreach} both select an execution path; pass only one")
        if fused:
            # --- GPU path: fused=True on non-CPU tensors runs the compiled step (kernels/compiled.py) ---
            devices = {p.device.type for p in group["params"]}
            for device_type in sorted(devices - {"cpu"}):
                reason = compiled.unavailable_reason(device_type)
                if reason is not None:
                    raise RuntimeError(f"{type(self).__name__}(fused=True): the compiled step is unavailable: {reason}")
            if "cpu" not in devices:
                return  # no CPU tensor: the fused CPU kernel is not needed
            # --- end of the GPU path ---
            reason = kernels.unavailable_reason()
            if reason is not None:
                raise RuntimeError(f"{type(self).__name__}(fused=True): the fused CPU kernel is unavailable: {reason}")

    # --- GPU path (kernels/compiled.py): the branch for non-CPU tensors. ``fused=None`` there stays on the
    # foreach path until the compiled step is measured faster on a GPU (docs/performance.md, "The GPU path").
    def _use_compiled(self, group: dict, params) -> bool:
        """``fused=True`` on accelerator (non-CPU) tensors runs the compiled step."""
        return bool(group.get("fused")) and params[0].device.type != "cpu"
    # --- end of the GPU path ---

    def _use_fused(self, group: dict, params, grads, moments) -> bool:
        """``fused=True`` demands the fused kernel for every bucket; ``False`` uses foreach; ``None``
        follows :data:`FUSED_BY_DEFAULT`."""
        fused = group.get("fused")
        if fused is None:
            return (FUSED_BY_DEFAULT and group["foreach"] is None
                    and type(self)._update_fused is not PMAOptimizer._update_fused
                    and kernels.may_fuse(params) and _fused_kernel_loads()
                    and kernels.fused_unsupported_reason(params, grads, *moments) is None)
        if not fused:
            return False
        reason = kernels.fused_unsupported_reason(params, grads, *moments)
        if reason is not None:
            raise ValueError(f"{type(self).__name__}(fused=True) cannot update parameter group "
                             f"{self.param_groups.index(group)}: {reason}; use fused=None for the foreach path")
        return True

    # ------------------------------------------------------------------ clock
    @contextlib.contextmanager
    def setup_steps(self) -> Iterator[None]:
        """``step()`` calls inside create missing state but change no parameter, moment or counter."""
        self._setup_depth += 1
        try:
            yield
        finally:
            self._setup_depth -= 1

    @contextlib.contextmanager
    def one_logical_step(self) -> Iterator[None]:
        """All ``step()`` calls inside count as one step of each group (ZeRO-3 steps per sub-group)."""
        outer = self._logical_step_start is None
        if outer:
            self._logical_step_start = {}
        try:
            yield
        finally:
            if outer:
                self._logical_step_start = None

    def _next_step(self, group: dict) -> int:
        if self._logical_step_start is None:
            return group["step"] + 1
        return self._logical_step_start.setdefault(id(group), group["step"]) + 1

    def _reconcile_clock(self) -> None:
        """Adopt per-tensor steps written without ``load_state_dict`` (e.g. a universal checkpoint)."""
        for group in self.param_groups:
            steps = [int(self.state[p]["step"]) for p in group["params"] if "step" in self.state.get(p, {})]
            if steps:
                group["step"] = max([group["step"]] + steps)
        self._clock_reconciled = True

    def load_state_dict(self, state_dict: dict) -> None:
        """``torch.optim.Optimizer.load_state_dict``, refusing state of another optimizer at load time.

        The saved param groups must carry every hyper-parameter of this class (``period``, and for AdamWPMA
        ``eps`` and ``variant``) and none that marks another PMA optimizer; each saved tensor state must hold
        exactly this class's moments (``exp_avg``; AdamWPMA also ``exp_avg_sq``). A ``ValueError`` names what
        differs. A saved period or variant that differs from the constructor's replaces it (the state was
        built for it), with a warning naming both."""
        self._check_loadable(state_dict)
        before = [{key: group.get(key) for key in ("period", "variant")} for group in self.param_groups]
        super().load_state_dict(state_dict)
        for index, (group, old) in enumerate(zip(self.param_groups, before)):
            group.setdefault("step", 0)
            group.setdefault("fused", None)
            for key, default in _LATER_HYPER_DEFAULTS.items():
                if key in self.defaults:
                    group.setdefault(key, default)
            changed = [f"{key} {old[key]!r} -> {group.get(key)!r}" for key in old
                       if key in self.defaults and group.get(key) != old[key]]
            if changed:
                warnings.warn(f"{type(self).__name__}.load_state_dict: param group {index} takes {', '.join(changed)} "
                              f"from the loaded state (constructor's value replaced)", RuntimeWarning, stacklevel=2)
        self._reconcile_clock()

    def _check_loadable(self, state_dict: dict) -> None:
        name = type(self).__name__
        if not isinstance(state_dict, dict) or "param_groups" not in state_dict or "state" not in state_dict:
            raise ValueError(f"{name}.load_state_dict: expected a dict with 'state' and 'param_groups', got "
                             f"{type(state_dict).__name__} with keys {sorted(state_dict)[:8] if isinstance(state_dict, dict) else '-'}")
        hyper = set(self.defaults) - {"foreach", "fused"} - set(_LATER_HYPER_DEFAULTS)
        foreign_markers = _PMA_HYPER_KEYS - hyper  # keys only another PMA optimizer's groups have
        for index, group in enumerate(state_dict["param_groups"]):
            missing = sorted(hyper - set(group))
            foreign = sorted(foreign_markers & set(group))
            if missing or foreign:
                what = (f"missing {', '.join(missing)}" if missing else "") + \
                       ("; " if missing and foreign else "") + (f"has {', '.join(foreign)}" if foreign else "")
                raise ValueError(f"{name}.load_state_dict: saved param group {index} is not {name}'s ({what}); "
                                 f"it comes from another optimizer (e.g. torch.optim.AdamW or the other PMA class): "
                                 f"load it into the optimizer that saved it")
        wanted = set(self.moment_names)
        if not wanted:  # a subclass with its own state layout (AdaPM) checks that itself
            return
        for key, saved in state_dict["state"].items():
            moments = {k for k in saved if k in _PMA_MOMENT_KEYS}
            if moments != wanted:
                raise ValueError(f"{name}.load_state_dict: saved state of parameter {key} holds moments "
                                 f"{sorted(moments)}, {name} keeps {sorted(wanted)}: it comes from another optimizer")

    # ------------------------------------------------------------------ state
    def _init_state(self, p: Tensor, step: int) -> dict:
        state = self.state[p]
        if not state:
            state["step"] = torch.tensor(float(step), dtype=torch.float32)
            for name in self.moment_names:
                state[name] = torch.zeros_like(p, dtype=F.state_dtype(p), memory_format=torch.preserve_format)
        return state

    def _collect(self, group: dict, step_before: int) -> Tuple[List[Tensor], List[Tensor], List[List[Tensor]]]:
        params, grads = [], []
        moments: List[List[Tensor]] = [[] for _ in self.moment_names]
        for index, p in enumerate(group["params"]):
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise TypeError(
                    f"{type(self).__name__} does not support sparse gradients "
                    f"(parameter {index} of its group, shape {tuple(p.shape)}, layout {p.grad.layout})"
                )
            state = self._init_state(p, step_before)
            params.append(p)
            grads.append(p.grad)
            for bucket, name in zip(moments, self.moment_names):
                bucket.append(state[name])
        return params, grads, moments

    # ------------------------------------------------------------------ step
    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], float]] = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if not self._clock_reconciled:
            self._reconcile_clock()
        if self.skip_nonfinite and not self._setup_depth and not self._gradients_finite():
            self.nonfinite_steps_skipped += 1
            return loss

        for group in self.param_groups:
            t = self._next_step(group)
            params, grads, moments = self._collect(group, t - 1)
            if not params or self._setup_depth:
                continue
            phase = PMAPhase(step=t, period=group["period"], lr_decay=group.get("lr_decay", "none"))  # AdaPM has none
            params_l, grads_l, moments_l = _local_shards(params, grads, moments)
            if group["foreach"] is False:
                for i, (p, g) in enumerate(zip(params_l, grads_l)):
                    self._update_tensor(p, g, [m[i] for m in moments_l], phase, group)
            else:
                for p, g, *ms in _group_by_device_and_dtype(params_l, grads_l, *moments_l):
                    if self._use_compiled(group, p):  # GPU path
                        self._update_compiled(p, g, ms, phase, group)
                    elif self._use_fused(group, p, g, ms):
                        self._update_fused(p, g, ms, phase, group)
                    else:
                        self._update_foreach(p, g, ms, phase, group)
            for p in params:
                # fill_, not a copy from a CPU tensor: the counter may live on the GPU (torch's load_state_dict
                # moves it there for fused=True groups), and filling it queues a kernel without a host sync
                self.state[p]["step"].fill_(float(t))
            group["step"] = t
        return loss

    def _gradients_finite(self) -> bool:
        """True when every gradient is finite, on every rank (see the class docstring for the cost)."""
        buckets: Dict[Tuple[torch.device, torch.dtype], List[Tensor]] = {}
        for group in self.param_groups:
            for p in group["params"]:
                g = p.grad
                if g is None or g.is_sparse:  # sparse gradients are refused by the step itself
                    continue
                if DTensor is not None and isinstance(g, DTensor):
                    g = g.to_local()
                buckets.setdefault((g.device, g.dtype), []).append(g)
        # the max-norm keeps NaN and inf: a bucket is finite iff the max of its max-norms is
        device = next(iter(buckets))[0] if buckets else None
        flag = torch.zeros(1, device=device)
        for grads in buckets.values():
            worst = torch.stack(torch._foreach_norm(grads, float("inf"))).max().float().reshape(1)
            flag = torch.maximum(flag, (~torch.isfinite(worst)).float().to(flag.device))
        if torch.distributed.is_available() and torch.distributed.is_initialized() \
                and torch.distributed.get_world_size() > 1:
            flag = _agree_max(flag)
        return not bool(flag.item())

    def _update_tensor(self, p: Tensor, g: Tensor, moments: List[Tensor], phase: PMAPhase, group: dict) -> None:
        raise NotImplementedError

    def _update_foreach(self, ps, gs, moments: List[List[Tensor]], phase: PMAPhase, group: dict) -> None:
        raise NotImplementedError

    def _update_fused(self, ps, gs, moments: List[List[Tensor]], phase: PMAPhase, group: dict) -> None:
        raise NotImplementedError

    def _update_compiled(self, ps, gs, moments: List[List[Tensor]], phase: PMAPhase, group: dict) -> None:
        raise NotImplementedError


def _agree_max(flag: Tensor) -> Tensor:
    """MAX of a 1-element flag over the default group, through the process-group object (unbilled)."""
    from torch.distributed import distributed_c10d as c10d

    group = c10d._get_default_group()
    if flag.device.type == "cpu" and torch.distributed.get_backend(group) != "gloo":
        # a rank without gradients still votes, on the device its backend reduces on (NCCL: the accelerator)
        accelerator = torch.accelerator.current_accelerator()
        if accelerator is not None:
            flag = flag.to(torch.device(accelerator.type, torch.accelerator.current_device_index()))
    opts = torch.distributed.AllreduceOptions()
    opts.reduceOp = torch.distributed.ReduceOp.MAX
    group.allreduce([flag], opts).wait()
    return flag


def _local_shards(params: List[Tensor], grads: List[Tensor], moments: List[List[Tensor]]):
    """Swap DTensors (FSDP2 shards) for their local tensors when gradient and moments share the
    parameter's placement: the update is element-wise, so it can run on the shards directly, without
    DTensor dispatch and on paths (the fused kernel) that need plain tensors."""
    if DTensor is None or not any(isinstance(p, DTensor) for p in params):
        return params, grads, moments
    params, grads, moments = list(params), list(grads), [list(m) for m in moments]
    for i, p in enumerate(params):
        group = [p, grads[i]] + [m[i] for m in moments]
        if all(isinstance(t, DTensor) and t.device_mesh == p.device_mesh and t.placements == p.placements
               for t in group):
            params[i], grads[i] = p.to_local(), grads[i].to_local()
            for m in moments:
                m[i] = m[i].to_local()
    return params, grads, moments


def _group_by_device_and_dtype(*lists: List[Tensor]):
    """Split parallel lists into buckets whose first list shares one (device, dtype)."""
    buckets: Dict[Tuple[torch.device, torch.dtype], List[List[Tensor]]] = {}
    for items in zip(*lists):
        key = (items[0].device, items[0].dtype)
        bucket = buckets.setdefault(key, [[] for _ in lists])
        for column, item in zip(bucket, items):
            column.append(item)
    return list(buckets.values())


def _period_or_alias(cls_name: str, period, accumulate_steps):
    """``period``, or its deprecated alias ``accumulate_steps`` (the authors' keyword); 8 if neither is given."""
    if accumulate_steps is None:
        return 8 if period is None else period
    if period is not None:
        raise ValueError(f"{cls_name}: pass period or accumulate_steps, not both (got period={period!r}, "
                         f"accumulate_steps={accumulate_steps!r}); accumulate_steps is the old name of period")
    warnings.warn(f"{cls_name}(accumulate_steps=...) is a deprecated alias of period=... (the PMA period K); "
                  "pass period instead", DeprecationWarning, stacklevel=3)
    return accumulate_steps


class AdamWPMA(PMAOptimizer):
    """AdamW with periodical moving average (PMA) of the moments; steps on every micro-batch.

    Args:
        params: iterable of parameters or param-group dicts (each group may override any default).
        lr: learning rate of the large steps; small steps use ``lr / sqrt(period)``.
        betas: EMA coefficients of the first and second moment across periods.
        eps: added to the denominator (honoured by both variants).
        weight_decay: decoupled weight decay, scaled like the step's learning rate.
        period: K, the number of micro-steps per period (what gradient accumulation would call K); default 8.
        accumulate_steps: deprecated alias of ``period`` (the keyword of the authors' code), with a
            DeprecationWarning; passing both is an error.
        variant: ``"paper"`` (the default: the printed algorithm, whose momentum is GA's at the end of
            every period; K = 1 is exactly ``torch.optim.AdamW``) or ``"reference"`` (the authors'
            released code). The default was chosen by the post-training benchmark; see ``docs/math.md``.
        lr_decay: ``"none"`` (Algorithm 1) or ``"periodic"`` (the paper's text: small step tau also
            scaled by 1/(tau+1), reset every period; not yet measured, see ``docs/math.md``).
        foreach: ``True`` selects the multi-tensor path, ``False`` the per-tensor path.
        fused: ``True`` runs the fused single-pass CPU kernel (:mod:`pma_dist.kernels`; CPU tensors,
            float32/bfloat16/float16 parameters), raising if it cannot; on GPU tensors it runs the
            compiled step (:mod:`pma_dist.kernels.compiled`); ``False`` the foreach path. Left unset
            (with ``foreach`` unset too), each CPU bucket the kernel supports takes it and the rest the
            foreach path. See ``docs/performance.md``.
    """

    moment_names = ("exp_avg", "exp_avg_sq")

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas: Tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        period: Optional[int] = None,
        variant: str = "paper",
        *,
        lr_decay: str = "none",
        foreach: Optional[bool] = None,
        fused: Optional[bool] = None,
        accumulate_steps: Optional[int] = None,
    ):
        period = _period_or_alias(type(self).__name__, period, accumulate_steps)
        defaults = dict(lr=lr, betas=tuple(betas) if isinstance(betas, list) else betas, eps=eps,
                        weight_decay=weight_decay, period=period, variant=variant, lr_decay=lr_decay)
        super().__init__(params, defaults, foreach, fused)

    def _validate_group(self, group: dict) -> None:
        _check_lr(group["lr"])
        _check_betas(group["betas"])
        _check_eps(group["eps"])
        _check_weight_decay(group["weight_decay"])
        _check_period(group["period"])
        _check_variant(group["variant"])
        _check_lr_decay(group["lr_decay"])

    def _hyper(self, group: dict) -> dict:
        beta1, beta2 = group["betas"]
        return dict(lr=float(group["lr"]), beta1=float(beta1), beta2=float(beta2), eps=float(group["eps"]),
                    weight_decay=float(group["weight_decay"]), variant=group["variant"])

    def _update_tensor(self, p, g, moments, phase, group):
        F.adamw_pma_tensor(p, g, *moments, phase=phase, **self._hyper(group))

    def _update_foreach(self, ps, gs, moments, phase, group):
        F.adamw_pma_foreach(ps, gs, *moments, phase=phase, **self._hyper(group))

    def _update_fused(self, ps, gs, moments, phase, group):
        kernels.adamw_pma_fused(ps, gs, *moments, phase=phase, **self._hyper(group))

    def _update_compiled(self, ps, gs, moments, phase, group):
        compiled.adamw_pma_compiled(ps, gs, *moments, phase=phase, **self._hyper(group))


class LionPMA(PMAOptimizer):
    """Lion with periodical moving average (PMA) of the momentum; steps on every micro-batch.

    Args:
        params: iterable of parameters or param-group dicts.
        lr: learning rate of the large steps; small steps move by ``lr / period``.
        betas: ``beta1`` interpolates the update direction, ``beta2`` the momentum across periods.
        weight_decay: decoupled weight decay, applied with the full lr on every step.
        period: K, the number of micro-steps per period; default 8.
        accumulate_steps: deprecated alias of ``period`` (see AdamWPMA).
        lr_decay: ``"none"`` or ``"periodic"`` (see AdamWPMA).
        foreach: ``True`` selects the multi-tensor path, ``False`` the per-tensor path.
        fused: ``True`` runs the fused single-pass CPU kernel (the compiled step on GPU tensors), raising
            if it cannot; unset, the CPU kernel takes every bucket it supports (see AdamWPMA).
    """

    moment_names = ("exp_avg",)

    def __init__(
        self,
        params,
        lr: float = 1e-4,
        betas: Tuple[float, float] = (0.9, 0.99),
        weight_decay: float = 0.0,
        period: Optional[int] = None,
        *,
        lr_decay: str = "none",
        foreach: Optional[bool] = None,
        fused: Optional[bool] = None,
        accumulate_steps: Optional[int] = None,
    ):
        period = _period_or_alias(type(self).__name__, period, accumulate_steps)
        defaults = dict(lr=lr, betas=tuple(betas) if isinstance(betas, list) else betas,
                        weight_decay=weight_decay, period=period, lr_decay=lr_decay)
        super().__init__(params, defaults, foreach, fused)

    def _validate_group(self, group: dict) -> None:
        _check_lr(group["lr"])
        _check_betas(group["betas"])
        _check_weight_decay(group["weight_decay"])
        _check_period(group["period"])
        _check_lr_decay(group["lr_decay"])

    def _hyper(self, group: dict) -> dict:
        beta1, beta2 = group["betas"]
        return dict(lr=float(group["lr"]), beta1=float(beta1), beta2=float(beta2),
                    weight_decay=float(group["weight_decay"]))

    def _update_tensor(self, p, g, moments, phase, group):
        F.lion_pma_tensor(p, g, *moments, phase=phase, **self._hyper(group))

    def _update_foreach(self, ps, gs, moments, phase, group):
        F.lion_pma_foreach(ps, gs, *moments, phase=phase, **self._hyper(group))

    def _update_fused(self, ps, gs, moments, phase, group):
        kernels.lion_pma_fused(ps, gs, *moments, phase=phase, **self._hyper(group))

    def _update_compiled(self, ps, gs, moments, phase, group):
        compiled.lion_pma_compiled(ps, gs, *moments, phase=phase, **self._hyper(group))
