"""Fused CPU update functions with the signatures of :mod:`pma_dist.functional`'s foreach functions.

They run the C++ kernel of ``pma_cpu.cpp`` on contiguous CPU tensors whose parameters and gradients
are float32, bfloat16 or float16 (moments float32). :func:`fused_unsupported_reason` tells a caller
whether a bucket qualifies before it commits to this path.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from ..schedule import PMAPhase
from .build import load_cpu_kernels
from ..coefficients import AdamWStepCoefficients, LionStepCoefficients

FUSED_PARAM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def may_fuse(params: Sequence[Tensor]) -> bool:
    """Cheap first look (no build): could the kernel take a bucket of these parameters at all?"""
    return bool(params) and params[0].device.type == "cpu" and params[0].dtype in FUSED_PARAM_DTYPES


def fused_unsupported_reason(params: Sequence[Tensor], grads: Sequence[Tensor],
                             *moment_lists: Sequence[Tensor]) -> Optional[str]:
    """``None`` if the fused CPU kernel can update these lists, otherwise a sentence saying why not.

    The device and dtype of the first parameter are checked here, so that lists the kernel could never
    take (CUDA, float64) never trigger its build; the per-tensor checks run in C++ (they are per step).
    """
    if not params:
        return None
    first = params[0]
    if first.device.type != "cpu":
        return f"parameter 0 is on {first.device}; the fused kernel runs on CPU tensors only"
    if first.dtype not in FUSED_PARAM_DTYPES:
        return f"parameter 0 is {first.dtype}; the fused kernel supports float32, bfloat16 and float16"
    problem = load_cpu_kernels().unsupported_reason([list(params), list(grads)] + [list(m) for m in moment_lists])
    return problem or None


def adamw_pma_fused(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    exp_avgs: Sequence[Tensor],
    exp_avg_sqs: Sequence[Tensor],
    *,
    phase: PMAPhase,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    variant: str,
) -> None:
    """AdamW-PMA in one pass over memory; same result as :func:`pma_dist.functional.adamw_pma_foreach`."""
    if not params:
        return
    c = AdamWStepCoefficients.for_step(phase, lr=lr, beta1=beta1, beta2=beta2, eps=eps,
                                       weight_decay=weight_decay, variant=variant)
    load_cpu_kernels().adamw_pma_step(
        list(params), list(grads), list(exp_avgs), list(exp_avg_sqs), c.decay1, c.grad_coef1, c.decay2,
        c.grad_coef2, c.param_scale, c.eps, c.divisor, c.eps_before_divide, c.step_coef, c.rescale)


def lion_pma_fused(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    exp_avgs: Sequence[Tensor],
    *,
    phase: PMAPhase,
    lr: float,
    beta1: float,
    beta2: float,
    weight_decay: float,
) -> None:
    """Lion-PMA in one pass over memory; same result as :func:`pma_dist.functional.lion_pma_foreach`."""
    if not params:
        return
    c = LionStepCoefficients.for_step(phase, lr=lr, beta1=beta1, beta2=beta2, weight_decay=weight_decay)
    load_cpu_kernels().lion_pma_step(
        list(params), list(grads), list(exp_avgs), c.param_scale, c.decay1, c.grad_coef1, c.step_alpha,
        c.decay2, c.grad_coef2, c.rescale)
