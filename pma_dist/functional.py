"""Pure PMA update functions.

Each optimizer has a per-tensor function that reads like the equations in ``docs/math.md`` and a
multi-tensor (``torch._foreach_*``) function that performs the same floating-point operations in
the same order on lists of tensors, so the two agree bit for bit on CPU. Both take the step's
:class:`~pma_dist.schedule.PMAPhase` and plain hyper-parameters; they own no state and no counters.

Low-precision parameters (bf16/fp16) are updated in fp32 against fp32 moments and rounded back
once per step; the moments (``exp_avg``, ``exp_avg_sq``) are always kept in fp32 for them.
"""
from __future__ import annotations

import math
from typing import List, Sequence

import torch
from torch import Tensor

from .schedule import PMAPhase, bias_corrections

ADAMW_SMALL_LR_POWER = 0.5  # AdamW-PMA small steps use lr / sqrt(K)
LION_SMALL_LR_POWER = 1.0  # Lion-PMA small steps use lr / K

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
    theta = _compute_view(param)
    g = _compute_view(grad)
    bc1, bc2 = bias_corrections(phase, beta1, beta2, variant)
    step_lr = lr * phase.lr_factor(ADAMW_SMALL_LR_POWER)

    exp_avg.mul_(phase.decay(beta1)).add_(g, alpha=(1 - beta1) * phase.grad_weight)
    exp_avg_sq.mul_(phase.decay(beta2)).addcmul_(g, g, value=(1 - beta2) * phase.grad_weight)
    theta.mul_(1 - step_lr * weight_decay)
    theta.addcdiv_(exp_avg, adamw_pma_denominator(exp_avg_sq, phase, bc2, eps, variant), value=-step_lr / bc1)
    if variant == "paper" and phase.is_large:
        exp_avg.mul_(phase.state_rescale())
        exp_avg_sq.mul_(phase.state_rescale())

    if theta is not param:
        param.copy_(theta)


def adamw_pma_denominator(exp_avg_sq: Tensor, phase: PMAPhase, bc2: float, eps: float, variant: str) -> Tensor:
    """The AdamW-PMA denominator D (a new tensor): the reference's small steps divide by bc2 after
    adding eps; every other step is sqrt(v / bc2) + eps."""
    if variant == "reference" and not phase.is_large:
        return exp_avg_sq.sqrt().add_(eps).div_(bc2)
    return exp_avg_sq.sqrt().div_(math.sqrt(bc2)).add_(eps)


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
    thetas, grads = _compute_views(params), _compute_views(grads)
    bc1, bc2 = bias_corrections(phase, beta1, beta2, variant)
    step_lr = lr * phase.lr_factor(ADAMW_SMALL_LR_POWER)

    torch._foreach_mul_(exp_avgs, phase.decay(beta1))
    torch._foreach_add_(exp_avgs, grads, alpha=(1 - beta1) * phase.grad_weight)
    torch._foreach_mul_(exp_avg_sqs, phase.decay(beta2))
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=(1 - beta2) * phase.grad_weight)
    torch._foreach_mul_(thetas, 1 - step_lr * weight_decay)
    denom = torch._foreach_sqrt(exp_avg_sqs)
    if variant == "reference" and not phase.is_large:
        torch._foreach_add_(denom, eps)
        torch._foreach_div_(denom, bc2)
    else:
        torch._foreach_div_(denom, math.sqrt(bc2))
        torch._foreach_add_(denom, eps)
    torch._foreach_addcdiv_(thetas, exp_avgs, denom, value=-step_lr / bc1)
    if variant == "paper" and phase.is_large:
        torch._foreach_mul_(exp_avgs, phase.state_rescale())
        torch._foreach_mul_(exp_avg_sqs, phase.state_rescale())

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
    theta = _compute_view(param)
    g = _compute_view(grad)
    w = phase.grad_weight

    theta.mul_(1 - lr * weight_decay)
    direction = exp_avg.mul(phase.decay(beta1)).add_(g, alpha=(1 - beta1) * w).sign_()
    theta.add_(direction, alpha=-lr * phase.lr_factor(LION_SMALL_LR_POWER))
    exp_avg.mul_(phase.decay(beta2)).add_(g, alpha=(1 - beta2) * w)
    if phase.is_large:
        exp_avg.mul_(phase.state_rescale())

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
    thetas, grads = _compute_views(params), _compute_views(grads)
    w = phase.grad_weight

    torch._foreach_mul_(thetas, 1 - lr * weight_decay)
    direction = torch._foreach_mul(exp_avgs, phase.decay(beta1))
    torch._foreach_add_(direction, grads, alpha=(1 - beta1) * w)
    torch._foreach_sign_(direction)
    torch._foreach_add_(thetas, direction, alpha=-lr * phase.lr_factor(LION_SMALL_LR_POWER))
    torch._foreach_mul_(exp_avgs, phase.decay(beta2))
    torch._foreach_add_(exp_avgs, grads, alpha=(1 - beta2) * w)
    if phase.is_large:
        torch._foreach_mul_(exp_avgs, phase.state_rescale())

    _write_back(params, thetas)


# ----------------------------------------------------------------------------------------------


def _compute_views(tensors: Sequence[Tensor]) -> List[Tensor]:
    return [_compute_view(t) for t in tensors]


def _write_back(params: Sequence[Tensor], thetas: Sequence[Tensor]) -> None:
    for p, theta in zip(params, thetas):
        if theta is not p:
            p.copy_(theta)
