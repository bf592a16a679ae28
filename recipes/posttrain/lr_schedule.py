"""The learning rate as a function of samples seen: one schedule for every training method.

The schedule is indexed by the micro-step (so by samples), not by optimizer steps: a GA run at K
steps once per K micro-batches, at the rate of the micro-step its step completes; PMA and the
no-accumulation baselines step on every micro-batch at that micro-step's rate. Comparing methods at the
same samples therefore compares them at the same point of the same schedule, which an
optimizer-step-indexed schedule (K times shorter for GA) would not.

``warmup_cosine``: linear warm-up over the first ``warmup`` micro-steps to the peak rate, then a
half cosine down to 0 at the end of the run (the shape of transformers' ``get_cosine_schedule_with_warmup``,
by samples). PMA's own ``lr_decay="periodic"`` multiplies on top of it, inside the optimizer.
"""
from __future__ import annotations

import math

LR_SCHEDULES = ("constant", "warmup_cosine")


def warmup_steps(total: int, fraction: float) -> int:
    return int(round(fraction * total))


def lr_factor(schedule: str, micro_step: int, total: int, warmup: int) -> float:
    """The multiple of the peak rate used by a step taken at 0-based ``micro_step`` of ``total``."""
    if schedule == "constant":
        return 1.0
    if schedule != "warmup_cosine":
        raise ValueError(f"unknown lr schedule {schedule!r}; expected one of {LR_SCHEDULES}")
    if micro_step < warmup:
        return (micro_step + 1) / warmup
    progress = (micro_step - warmup) / max(total - warmup, 1)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def apply(optimizer, peak_lr: float, schedule: str, micro_step: int, total: int, warmup: int) -> float:
    """Set every param group's lr for the step of ``micro_step``; returns the rate set."""
    lr = peak_lr * lr_factor(schedule, micro_step, total, warmup)
    for group in optimizer.param_groups:
        group["lr"] = lr
    return lr
