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

from ..methods import schedule_of_optimizer
from ..schedule import MicroStepSchedule
from .ledger import CommLedger
from .profile import RunMeta, dtype_name, open_ledger, parse_comm_profile

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


def _model_dtype(engine) -> torch.dtype:
    if engine.bfloat16_enabled():
        return torch.bfloat16
    if engine.fp16_enabled():
        return torch.float16
    return torch.float32


def engine_schedule(engine) -> MicroStepSchedule:
    """The engine's micro-step schedule: DeepSpeed's accumulation around the optimizer's own period
    (LionPMA(period=1) under accumulation is the Lion GA baseline, not PMA)."""
    return schedule_of_optimizer(base_optimizer(engine), engine.gradient_accumulation_steps())


def engine_meta(engine) -> RunMeta:
    """What the analytical model needs to predict this engine's traffic."""
    optimizer = base_optimizer(engine)
    dtype = _model_dtype(engine)
    # ZeRO-3 leaves empty placeholders in module.parameters(); ds_numel is the real size.
    numels = [getattr(p, "ds_numel", p.numel()) for p in engine.module.parameters() if p.requires_grad]
    zero_stage = engine.zero_optimization_stage()
    options = {"communication_data_type": dtype_name(engine.communication_data_type)}
    if zero_stage > 0:
        zero = engine._config.zero_config
        options.update(reduce_bucket_size=int(engine.zero_reduce_bucket_size()),
                       allgather_bucket_size=int(engine.zero_allgather_bucket_size()),
                       overlap_comm=bool(engine.zero_overlap_comm()),
                       contiguous_gradients=bool(engine.zero_contiguous_gradients()),
                       compute_grad_norm=bool(zero.compute_grad_norm),
                       check_grad_overflow=_check_grad_overflow(engine))
    if zero_stage in (1, 2):
        groups = getattr(engine.optimizer, "bit16_groups", None)
        if groups:
            options["group_numels"] = [sum(p.numel() for p in group) for group in groups]
    if zero_stage == 3:
        zero = engine._config.zero_config
        options.update(prefetch_bucket_size=int(engine.zero_prefetch_bucket_size()),
                       max_live_parameters=int(engine.zero_max_live_parameters()),
                       param_persistence_threshold=int(engine.zero_param_persistence_threshold()),
                       model_persistence_threshold=int(zero.model_persistence_threshold))
    return RunMeta(
        backend="deepspeed", optimizer=type(optimizer).__name__, schedule=engine_schedule(engine),
        zero_stage=zero_stage, world_size=dist.get_world_size() if dist.is_initialized() else 1,
        dp_world_size=engine.dp_world_size, dtype=dtype_name(dtype),
        param_numels=numels,
        param_bytes=sum(numels) * torch.finfo(dtype).bits // 8,
        gradient_clipping=engine.gradient_clipping(), backend_options=options)


def _check_grad_overflow(engine) -> bool:
    # engine._configure_zero_optimizer's rule: bf16 follows its config, fp16 always, fp32 never.
    if engine.bfloat16_enabled():
        return bool(engine._config.bfloat16_config.check_grad_overflow)
    return bool(engine.fp16_enabled())


def attach_to_engine(engine, cfg: Optional[dict]) -> Optional[CommLedger]:
    """Start counting ``engine``'s collectives as configured by ``cfg`` (a ``comm_profile`` section).

    Returns the installed ledger, or None when profiling is off (then nothing is patched or wrapped).
    The ledger rewrites ``OUTPUT_DIR/comm_rank{r}.json`` after every period and closes itself (final
    write, then rank 0's report unless ``"report": false``) in ``engine.destroy()``.
    """
    profile = parse_comm_profile(cfg)
    if profile is None:
        return None
    meta = engine_meta(engine)
    ledger = open_ledger(profile, meta)
    _wrap_engine(engine, ledger, base_optimizer(engine), meta.schedule)
    engine.comm_ledger = ledger
    return ledger


def _wrap_engine(engine, ledger: CommLedger, optimizer, schedule: MicroStepSchedule) -> None:
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
            # PMA's large step is judged by the optimizer's own clock (a skipped fp16 step does not advance it)
            coming = optimizer.param_groups[0]["step"] + 1 if schedule.is_pma else None
            ledger.begin_micro_step(engine.micro_steps, schedule.kind(engine.micro_steps, coming))
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
