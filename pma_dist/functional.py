"""Pure PMA update functions.

Each optimizer has a per-tensor function that reads like the equations in ``docs/math.md`` and a
multi-tensor (``torch._foreach_*``) function that performs the same floating-point operations in
the same order on lists of tensors, so the two agree bit for bit on CPU. Both take the step's
:class:`~pma_dist.schedule.PMAPhase` and plain hyper-parameters and read the step's scalars from
:mod:`pma_dist.coefficients` (as the fused kernel does); they own no state and no counters.

Low-precision parameters (bf16/fp16) are updated in fp32 against fp32 moments and rounded back
once per step; the moments (``exp_avg``, ``exp_avg_sq``) are always kept in fp32 for them.
"""
from __future__ import annotations

from typing import List, Sequence

import torch
from torch import Tensor

from .coefficients import AdamWStepCoefficients, LionStepCoefficients
from .schedule import PMAPhase

LOW_PRECISION = (torch.bfloat16, torch.float16)


def state_dtype(param: Tensor) -> torch.dtype:
    return torch.float32 if param.dtype in LOW_PRECISION else param.dtype


def _compute_view(t: Tensor) -> Tensor:
    return t.float() if t.dtype in LOW_PRECISION else t


# ----------------------------------------------------------------------------------------------
# AdamW-PMA
# ----------------------------------------------------------------------------------------------


def adamw_pma_tensor(
    param: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    *,
    phase: PMAPhase,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    variant: str,
) -> None:
    """One AdamW-PMA step of one tensor, in place."""
    c = AdamWStepCoefficients.for_step(phase, lr=lr, beta1=beta1, beta2=beta2, eps=eps,
                                       weight_decay=weight_decay, variant=variant)
    theta = _compute_view(param)
    g = _compute_view(grad)

    exp_avg.mul_(c.decay1).add_(g, alpha=c.grad_coef1)
    exp_avg_sq.mul_(c.decay2).addcmul_(g, g, value=c.grad_coef2)
    theta.mul_(c.param_scale)
    theta.addcdiv_(exp_avg, adamw_pma_denominator(exp_avg_sq, c), value=c.step_coef)
    if c.rescale != 1.0:
        exp_avg.mul_(c.rescale)
        exp_avg_sq.mul_(c.rescale)

    if theta is not param:
        param.copy_(theta)


def adamw_pma_denominator(exp_avg_sq: Tensor, c: AdamWStepCoefficients) -> Tensor:
    """The AdamW-PMA denominator (a new tensor): ``(sqrt(v) + eps) / divisor`` on the reference
    variant's small steps, ``sqrt(v) / divisor + eps`` otherwise (see ``docs/math.md``)."""
    if c.eps_before_divide:
        return exp_avg_sq.sqrt().add_(c.eps).div_(c.divisor)
    return exp_avg_sq.sqrt().div_(c.divisor).add_(c.eps)


def adamw_pma_foreach(
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
    """AdamW-PMA on lists of tensors of one device and dtype; same operations as the per-tensor path."""
    if not params:
        return
    c = AdamWStepCoefficients.for_step(phase, lr=lr, beta1=beta1, beta2=beta2, eps=eps,
                                       weight_decay=weight_decay, variant=variant)
    thetas, grads = _compute_views(params), _compute_views(grads)

    torch._foreach_mul_(exp_avgs, c.decay1)
    torch._foreach_add_(exp_avgs, grads, alpha=c.grad_coef1)
    torch._foreach_mul_(exp_avg_sqs, c.decay2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=c.grad_coef2)
    torch._foreach_mul_(thetas, c.param_scale)
    denom = torch._foreach_sqrt(exp_avg_sqs)
    if c.eps_before_divide:
        torch._foreach_add_(denom, c.eps)
        torch._foreach_div_(denom, c.divisor)
    else:
        torch._foreach_div_(denom, c.divisor)
        torch._foreach_add_(denom, c.eps)
    torch._foreach_addcdiv_(thetas, exp_avgs, denom, value=c.step_coef)
    if c.rescale != 1.0:
        torch._foreach_mul_(exp_avgs, c.rescale)
        torch._foreach_mul_(exp_avg_sqs, c.rescale)

    _write_back(params, thetas)


# ----------------------------------------------------------------------------------------------
# Lion-PMA
# ----------------------------------------------------------------------------------------------


def lion_pma_tensor(
    param: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    *,
    phase: PMAPhase,
    lr: float,
    beta1: float,
    beta2: float,
    weight_decay: float,
) -> None:
    """One Lion-PMA step of one tensor, in place. Weight decay uses the full lr on every step."""
    c = LionStepCoefficients.for_step(phase, lr=lr, beta1=beta1, beta2=beta2, weight_decay=weight_decay)
    theta = _compute_view(param)
    g = _compute_view(grad)

    theta.mul_(c.param_scale)
    direction = exp_avg.mul(c.decay1).add_(g, alpha=c.grad_coef1).sign_()
    theta.add_(direction, alpha=c.step_alpha)
    exp_avg.mul_(c.decay2).add_(g, alpha=c.grad_coef2)
    if c.rescale != 1.0:
        exp_avg.mul_(c.rescale)

    if theta is not param:
        param.copy_(theta)


def lion_pma_foreach(
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
    """Lion-PMA on lists of tensors of one device and dtype; same operations as the per-tensor path."""
    if not params:
        return
    c = LionStepCoefficients.for_step(phase, lr=lr, beta1=beta1, beta2=beta2, weight_decay=weight_decay)
    thetas, grads = _compute_views(params), _compute_views(grads)

    torch._foreach_mul_(thetas, c.param_scale)
    direction = torch._foreach_mul(exp_avgs, c.decay1)
    torch._foreach_add_(direction, grads, alpha=c.grad_coef1)
    torch._foreach_sign_(direction)
    torch._foreach_add_(thetas, direction, alpha=c.step_alpha)
    torch._foreach_mul_(exp_avgs, c.decay2)
    torch._foreach_add_(exp_avgs, grads, alpha=c.grad_coef2)
    if c.rescale != 1.0:
        torch._foreach_mul_(exp_avgs, c.rescale)

    _write_back(params, thetas)


# ----------------------------------------------------------------------------------------------


def _compute_views(tensors: Sequence[Tensor]) -> List[Tensor]:
    return [_compute_view(t) for t in tensors]


def _write_back(params: Sequence[Tensor], thetas: Sequence[Tensor]) -> None:
    for p, theta in zip(params, thetas):
        if theta is not p:
            p.copy_(theta)
