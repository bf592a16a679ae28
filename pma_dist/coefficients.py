"""The scalars one PMA step applies to every element, computed once from :class:`~pma_dist.schedule.PMAPhase`.

Every execution path reads them from here: the per-tensor and foreach paths of :mod:`pma_dist.functional`
pass them to torch ops, the fused kernel (:mod:`pma_dist.kernels`) takes them as plain numbers and,
rounding each to float where torch would, reproduces the foreach path bit for bit
(``tests/test_kernels.py``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from .schedule import PMAPhase, bias_corrections

ADAMW_SMALL_LR_POWER = 0.5  # AdamW-PMA small steps use lr / sqrt(K)
LION_SMALL_LR_POWER = 1.0  # Lion-PMA small steps use lr / K


@dataclass(frozen=True)
class AdamWStepCoefficients:
    """``m <- decay1*m + grad_coef1*g``; ``v <- decay2*v + grad_coef2*g*g``; ``p <- param_scale*p``;
    ``p <- p + step_coef*m / denom`` with ``denom = (sqrt(v) + eps)/divisor`` if ``eps_before_divide``
    else ``sqrt(v)/divisor + eps``; then ``m, v <- rescale*m, rescale*v``."""

    decay1: float
    grad_coef1: float
    decay2: float
    grad_coef2: float
    param_scale: float
    eps: float
    divisor: float
    eps_before_divide: bool
    step_coef: float
    rescale: float

    @classmethod
    def for_step(cls, phase: PMAPhase, *, lr: float, beta1: float, beta2: float, eps: float,
                 weight_decay: float, variant: str) -> "AdamWStepCoefficients":
        bc1, bc2 = bias_corrections(phase, beta1, beta2, variant)
        step_lr = lr * phase.lr_factor(ADAMW_SMALL_LR_POWER)
        eps_before_divide = variant == "reference" and not phase.is_large
        return cls(
            decay1=phase.decay(beta1),
            grad_coef1=(1 - beta1) * phase.grad_weight,
            decay2=phase.decay(beta2),
            grad_coef2=(1 - beta2) * phase.grad_weight,
            param_scale=1 - step_lr * weight_decay,
            eps=eps,
            divisor=bc2 if eps_before_divide else math.sqrt(bc2),
            eps_before_divide=eps_before_divide,
            step_coef=-step_lr / bc1,
            rescale=phase.state_rescale() if variant == "paper" and phase.is_large else 1.0,
        )


@dataclass(frozen=True)
class LionStepCoefficients:
    """``p <- param_scale*p``; ``p <- p + step_alpha*sign(decay1*m + grad_coef1*g)``;
    ``m <- decay2*m + grad_coef2*g``; then ``m <- rescale*m``."""

    param_scale: float
    decay1: float
    grad_coef1: float
    step_alpha: float
    decay2: float
    grad_coef2: float
    rescale: float

    @classmethod
    def for_step(cls, phase: PMAPhase, *, lr: float, beta1: float, beta2: float,
                 weight_decay: float) -> "LionStepCoefficients":
        w = phase.grad_weight
        return cls(
            param_scale=1 - lr * weight_decay,
            decay1=phase.decay(beta1),
            grad_coef1=(1 - beta1) * w,
            step_alpha=-lr * phase.lr_factor(LION_SMALL_LR_POWER),
            decay2=phase.decay(beta2),
            grad_coef2=(1 - beta2) * w,
            rescale=phase.state_rescale() if phase.is_large else 1.0,
        )
