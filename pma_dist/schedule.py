"""The PMA schedule: the one place that says what step ``t`` of period ``K`` does.

Both optimizers (and every execution path of each) read the phase from here, so the meaning of a
"large step", the averaging weights, the small-step learning-rate factor and the bias-correction
exponent cannot disagree between AdamW-PMA and Lion-PMA.

Notation (see ``docs/math.md``): ``t = 1, 2, ...`` counts optimizer steps (one per micro-batch),
``tau = t mod K``. A *large* step is ``tau == 0`` (t = K, 2K, ...); the others are *small* steps.
"""
from __future__ import annotations

from dataclasses import dataclass

VARIANTS = ("reference", "paper")


@dataclass(frozen=True)
class PMAPhase:
    """Everything an update needs to know about its place in the period.

    A moment ``s`` with EMA coefficient ``beta`` is updated as
    ``s <- decay(beta) * s + grad_weight * (1 - beta) * g``:
    large step: ``decay = beta``, ``grad_weight = 1/K``; small step: ``decay = tau/(tau+1)``,
    ``grad_weight = 1/(tau+1)``, i.e. a uniform running mean inside the period.
    """

    step: int
    period: int

    def __post_init__(self):
        if self.step < 1:
            raise ValueError(f"PMA step counts from 1, got step={self.step}")
        if self.period < 1:
            raise ValueError(f"PMA period must be >= 1, got period={self.period}")

    @property
    def tau(self) -> int:
        return self.step % self.period

    @property
    def is_large(self) -> bool:
        return self.tau == 0

    def decay(self, beta: float) -> float:
        return beta if self.is_large else self.tau / (self.tau + 1)

    @property
    def grad_weight(self) -> float:
        return 1.0 / self.period if self.is_large else 1.0 / (self.tau + 1)

    def lr_factor(self, power: float) -> float:
        """Small steps are scaled by ``K**-power`` (AdamW-PMA: 0.5, Lion-PMA: 1); large steps by 1."""
        return 1.0 if self.is_large else self.period ** (-power)

    def bias_exponent(self, variant: str) -> int:
        """AdamW-PMA debias exponent L: reference ``floor(t/K) + 1``, paper ``ceil(t/K)``."""
        if variant == "reference":
            return self.step // self.period + 1
        if variant == "paper":
            return -(-self.step // self.period)
        raise ValueError(f"unknown AdamW-PMA variant {variant!r}; expected one of {VARIANTS}")

    def state_rescale(self) -> float:
        """Factor applied to the stored moments after a large step (paper AdamW-PMA and Lion-PMA)."""
        return float(self.period) if self.is_large else 1.0


def bias_corrections(phase: PMAPhase, beta1: float, beta2: float, variant: str) -> tuple[float, float]:
    exponent = phase.bias_exponent(variant)
    return 1.0 - beta1**exponent, 1.0 - beta2**exponent

