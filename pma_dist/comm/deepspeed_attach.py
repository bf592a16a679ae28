"""Attach a :class:`CommLedger` to a DeepSpeed engine: phases from the engine's own entry points.

``engine.forward`` / ``engine.backward`` / ``engine.step`` are wrapped on the instance, so everything a
ZeRO stage sends is attributed to the call that sent it: ZeRO-3's parameter all-gathers to "forward"
(and "backward", where it re-gathers), gradient reductions to "backward" (or "step" for ZeRO-0/1, which
reduce in ``step``), ZeRO-1/2's parameter all-gathers after the update to "step". A torch-style
``loss.backward()`` after ``engine(...)`` is still "backward": once forward returns, the phase stays
"backward" until ``step`` begins. ``engine.destroy`` closes the ledger (writes the files), because these
processes end with ``os._exit`` and never run interpreter-exit hooks.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
import torch.distributed as dist

from ..schedule import PMAPhase
from .ledger import CommLedger

CONFIG_KEYS = {"enabled", "output_dir", "keep_calls", "write_every", "report"}


def parse_comm_profile(cfg: Optional[dict]) -> Optional[dict]:
    """Validate a ``comm_profile`` section (or a whole DeepSpeed config holding one); None when off."""
    if cfg is None:
        return None
    if not isinstance(cfg, dict):
        raise TypeError(f"comm_profile must be a dict, got {type(cfg).__name__}: {cfg!r}")
    if "comm_profile" in cfg:
        return parse_comm_profile(cfg["comm_profile"])
    unknown = sorted(set(cfg) - CONFIG_KEYS)
    if unknown:
        raise ValueError(f"unknown comm_profile key(s) {unknown}; expected some of {sorted(CONFIG_KEYS)}")
    enabled = cfg.get("enabled", False)
    if not isinstance(enabled, bool):
        raise ValueError(f"comm_profile.enabled must be true or false, got {enabled!r}")
    if not enabled:
        return None
    output_dir = cfg.get("output_dir")
    if not isinstance(output_dir, str) or not output_dir:
        raise ValueError(f"comm_profile.output_dir must be a non-empty path when enabled, got {output_dir!r}")
    for key in ("keep_calls", "report"):
        if key in cfg and not isinstance(cfg[key], bool):
            raise ValueError(f"comm_profile.{key} must be true or false, got {cfg[key]!r}")
    write_every = cfg.get("write_every")
    if write_every is not None and (isinstance(write_every, bool) or not isinstance(write_every, int)
                                    or write_every < 1):
        raise ValueError(f"comm_profile.write_every must be a positive int, got {write_every!r}")
    return dict(cfg)


def base_optimizer(engine):
    """The user's optimizer under DeepSpeed's wrappers (ZeRO, fp16/bf16 optimizers)."""
    optimizer = getattr(engine, "basic_optimizer", None) or engine.optimizer
    seen = set()
    while hasattr(optimizer, "optimizer") and id(optimizer) not in seen:
        seen.add(id(optimizer))
        inner = optimizer.optimizer
        if not isinstance(inner, torch.optim.Optimizer):
            break
        optimizer = inner
    return optimizer


def _pma_period(optimizer) -> Optional[int]:
    periods = {group.get("period") for group in optimizer.param_groups}
    if None in periods:
        return None
    if len(periods) != 1:
        raise ValueError(f"comm profiling needs one PMA period for all param groups, got {sorted(periods)}")
    return periods.pop()


def _param_count(engine) -> int:
    # ZeRO-3 leaves empty placeholders in module.parameters(); ds_numel is the real size.
    return sum(getattr(p, "ds_numel", p.numel()) for p in engine.module.parameters())


def _model_dtype(engine) -> torch.dtype:
    if engine.bfloat16_enabled():
        return torch.bfloat16
    if engine.fp16_enabled():
        return torch.float16
    return torch.float32


def engine_meta(engine) -> dict:
    """What the analytical model needs to predict this engine's traffic."""
    optimizer = base_optimizer(engine)
    period = _pma_period(optimizer)
    dtype = _model_dtype(engine)
    count = _param_count(engine)
    zero_stage = engine.zero_optimization_stage()
    meta = {
        "backend": "deepspeed",
        "optimizer": type(optimizer).__name__,
        "pma": period is not None,
        "zero_stage": zero_stage,
        "period": period if period is not None else engine.gradient_accumulation_steps(),
        "gradient_accumulation_steps": engine.gradient_accumulation_steps(),
        "world_size": dist.get_world_size() if dist.is_initialized() else 1,
        "dp_world_size": engine.dp_world_size,
        "dtype": str(dtype).replace("torch.", ""),
        "communication_data_type": str(engine.communication_data_type).replace("torch.", ""),
        "param_count": count,
        "param_bytes": count * torch.finfo(dtype).bits // 8,
        "param_numels": [getattr(p, "ds_numel", p.numel()) for p in engine.module.parameters()
                         if p.requires_grad],
        "gradient_clipping": engine.gradient_clipping(),
    }
    if zero_stage > 0:
        zero = engine._config.zero_config
        meta.update(reduce_bucket_size=int(engine.zero_reduce_bucket_size()),
                    allgather_bucket_size=int(engine.zero_allgather_bucket_size()),
                    overlap_comm=bool(engine.zero_overlap_comm()),
                    contiguous_gradients=bool(engine.zero_contiguous_gradients()),
                    compute_grad_norm=bool(zero.compute_grad_norm),
                    check_grad_overflow=_check_grad_overflow(engine))
    if zero_stage in (1, 2):
        groups = getattr(engine.optimizer, "bit16_groups", None)
        if groups:
            meta["group_numels"] = [sum(p.numel() for p in group) for group in groups]
    if zero_stage == 3:
        zero = engine._config.zero_config
        meta.update(prefetch_bucket_size=int(engine.zero_prefetch_bucket_size()),
                    max_live_parameters=int(engine.zero_max_live_parameters()),
                    param_persistence_threshold=int(engine.zero_param_persistence_threshold()),
                    model_persistence_threshold=int(zero.model_persistence_threshold))
    return meta


def _check_grad_overflow(engine) -> bool:
    # engine._configure_zero_optimizer's rule: bf16 follows its config, fp16 always, fp32 never.
    if engine.bfloat16_enabled():
        return bool(engine._config.bfloat16_config.check_grad_overflow)
    return bool(engine.fp16_enabled())


def micro_step_kind(engine, optimizer, period_is_pma: bool) -> str:
    """PMA: is the coming optimizer step small or large? GA: accumulate or boundary?"""
    if period_is_pma:
        group = optimizer.param_groups[0]
        return "large" if PMAPhase(step=group["step"] + 1, period=group["period"]).is_large else "small"
    return "boundary" if engine.is_gradient_accumulation_boundary() else "accumulate"


def _write_report(ledger: CommLedger) -> None:
    """Rank 0 turns all ranks' files into the run report, once every rank has written its file."""
    if dist.is_initialized():
        dist.barrier()  # the ledger is uninstalled by now: this barrier is not counted
    if ledger.rank != 0:
        return
    try:
        from . import report
    except ImportError:
        return
    write_run_report = getattr(report, "write_run_report", None)
    if write_run_report is not None:
        write_run_report(ledger.output_dir)


def attach_to_engine(engine, cfg: Optional[dict]) -> Optional[CommLedger]:
    """Start counting ``engine``'s collectives as configured by ``cfg`` (a ``comm_profile`` section).

    Returns the installed ledger, or None when profiling is off (then nothing is patched or wrapped).
    The ledger rewrites ``OUTPUT_DIR/comm_rank{r}.json`` after every period and closes itself (final
    write, then rank 0's report unless ``"report": false``) in ``engine.destroy()``.
    """
    options = parse_comm_profile(cfg)
    if options is None:
        return None
    meta = engine_meta(engine)
    optimizer = base_optimizer(engine)
    ledger = CommLedger(options["output_dir"], meta, keep_calls=options.get("keep_calls", False),
                        write_every=options.get("write_every"))
    if options.get("report", True):
        ledger.on_close(_write_report)
    _wrap_engine(engine, ledger, optimizer, meta["pma"])
    engine.comm_ledger = ledger
    return ledger.install()


def _wrap_engine(engine, ledger: CommLedger, optimizer, pma: bool) -> None:
    original_forward, original_backward = engine.forward, engine.backward
    original_step, original_destroy = engine.step, engine.destroy
    state = {"in_micro_step": False}

    @functools.wraps(original_forward)
    def forward(*args, **kwargs):
        if not (engine.module.training and torch.is_grad_enabled()):
            # evaluation is no micro-step: its collectives count as "other" of the step before it
            with ledger.in_phase("other"):
                return original_forward(*args, **kwargs)
        if not state["in_micro_step"]:
            ledger.begin_micro_step(engine.micro_steps, micro_step_kind(engine, optimizer, pma))
            state["in_micro_step"] = True
        ledger.mark_phase("forward")
        result = original_forward(*args, **kwargs)
        ledger.mark_phase("backward")  # until step: torch-style loss.backward() counts as backward
        return result

    @functools.wraps(original_backward)
    def backward(*args, **kwargs):
        with ledger.in_phase("backward"):
            return original_backward(*args, **kwargs)

    @functools.wraps(original_step)
    def step(*args, **kwargs):
        ledger.mark_phase("step")
        try:
            return original_step(*args, **kwargs)
        finally:
            state["in_micro_step"] = False
            if not ledger.closed:
                ledger.end_micro_step()

    @functools.wraps(original_destroy)
    def destroy(*args, **kwargs):
        ledger.close()
        for name, original in (("forward", original_forward), ("backward", original_backward),
                               ("step", original_step), ("destroy", original_destroy)):
            engine.__dict__.pop(name, None)
        return original_destroy(*args, **kwargs)

    engine.forward, engine.backward, engine.step, engine.destroy = forward, backward, step, destroy
