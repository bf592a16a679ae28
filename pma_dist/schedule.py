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
#: ``"none"``: Algorithm 1's constant small-step rate. ``"periodic"``: the paper's periodic learning-rate
#: decay (§1, §3.2.2): small step tau of a period is scaled by a further 1/(tau+1), resetting at each
#: period boundary; off by default until the post-training benchmark has measured it.
LR_DECAYS = ("none", "periodic")


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
    lr_decay: str = "none"

    def __post_init__(self):
        if self.step < 1:
            raise ValueError(f"PMA step counts from 1, got step={self.step}")
        if self.period < 1:
            raise ValueError(f"PMA period must be >= 1, got period={self.period}")
        if self.lr_decay not in LR_DECAYS:
            raise ValueError(f"unknown PMA lr_decay {self.lr_decay!r}; expected one of {LR_DECAYS}")

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
        """Small steps are scaled by ``K**-power`` (AdamW-PMA: 0.5, Lion-PMA: 1), and with
        ``lr_decay="periodic"`` by a further ``1/(tau+1)``; large steps by 1."""
        if self.is_large:
            return 1.0
        decay = 1.0 / (self.tau + 1) if self.lr_decay == "periodic" else 1.0
        return self.period ** (-power) * decay

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



#: How a training method uses its K micro-batches (see :class:`MicroStepSchedule`).
PMA_KINDS = ("small", "large")
GA_KINDS = ("accumulate", "boundary")


@dataclass(frozen=True)
class MicroStepSchedule:
    """Which micro-step of a run steps the optimizer, synchronises gradients, or is a PMA large step.

    The one place that counts micro-steps; every integration, the comm ledger and model, the metrics and
    the post-training job read it. Micro-steps are indexed from 0 (``i``); the optimizer's own clock
    (``PMAPhase.step``) counts its steps from 1.

    ``accumulation``: micro-batches per optimizer step (gradient accumulation's K; 1 for PMA and for the
    no-accumulation baselines). ``period``: optimizer steps per PMA period (PMA's K; 1 otherwise).
    A *cycle* is ``accumulation * period`` micro-steps: the K micro-batches that GA turns into one update
    and PMA into one period, the unit in which methods are compared.
    """

    accumulation: int = 1
    period: int = 1

    def __post_init__(self):
        for name in ("accumulation", "period"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"MicroStepSchedule.{name} must be a positive int, got {value!r}")
        if self.accumulation > 1 and self.period > 1:
            raise ValueError(f"PMA replaces gradient accumulation: accumulation={self.accumulation} with PMA "
                             f"period={self.period} would stretch the period to {self.accumulation * self.period} "
                             "micro-batches")

    @classmethod
    def pma(cls, k: int) -> "MicroStepSchedule":
        return cls(accumulation=1, period=k)

    @classmethod
    def gradient_accumulation(cls, k: int) -> "MicroStepSchedule":
        return cls(accumulation=k, period=1)

    @classmethod
    def from_cycle(cls, cycle: int, pma: bool) -> "MicroStepSchedule":
        """The schedule a comm-ledger file describes with its ``period`` (micro-steps per cycle) and ``pma``."""
        return cls.pma(cycle) if pma else cls.gradient_accumulation(cycle)

    @property
    def is_pma(self) -> bool:
        return self.period > 1

    @property
    def cycle(self) -> int:
        """Micro-steps per cycle (the K of "PMA vs GA at the same K")."""
        return self.accumulation * self.period

    def steps_optimizer(self, i: int) -> bool:
        """Micro-step ``i`` ends with an optimizer step (and so synchronises gradients)."""
        return (i + 1) % self.accumulation == 0

    def optimizer_steps_after(self, micro_steps: int) -> int:
        """Optimizer steps taken in the first ``micro_steps`` micro-steps."""
        return micro_steps // self.accumulation

    def phase(self, i: int) -> PMAPhase:
        """The PMA phase of the optimizer step that micro-step ``i`` ends with (``steps_optimizer(i)``)."""
        if not self.steps_optimizer(i):
            raise ValueError(f"micro-step {i} accumulates: it takes no optimizer step")
        return PMAPhase(step=self.optimizer_steps_after(i + 1), period=self.period)

    def is_large(self, i: int, optimizer_step: int | None = None) -> bool:
        """Micro-step ``i`` is a PMA large step; ``optimizer_step`` (the coming step of the optimizer's
        own clock, which a skipped fp16 step does not advance) overrides the count from ``i``."""
        if not self.is_pma:
            return False
        if optimizer_step is not None:
            return PMAPhase(step=optimizer_step, period=self.period).is_large
        return self.steps_optimizer(i) and self.phase(i).is_large

    def kind(self, i: int, optimizer_step: int | None = None) -> str:
        """The comm ledger's label of micro-step ``i``: PMA "small"/"large", otherwise "accumulate"/"boundary"."""
        if self.is_pma:
            return PMA_KINDS[self.is_large(i, optimizer_step)]
        return GA_KINDS[self.steps_optimizer(i)]

    @property
    def kinds_per_cycle(self) -> dict:
        """How many micro-steps of each kind one cycle has."""
        kinds = PMA_KINDS if self.is_pma else GA_KINDS
        counts = {kinds[0]: self.cycle - 1, kinds[1]: 1}
        return {kind: n for kind, n in counts.items() if n}

    def cycle_of(self, i: int) -> int:
        """Which cycle (0-based) micro-step ``i`` belongs to."""
        return i // self.cycle

    def complete_cycles(self, micro_steps: int) -> int:
        """Whole cycles in ``micro_steps`` micro-steps."""
        return micro_steps // self.cycle

    def ends_cycle(self, micro_steps: int) -> bool:
        """After ``micro_steps`` micro-steps, a cycle is complete (the boundary at which methods compare)."""
        return micro_steps % self.cycle == 0

    def is_step_boundary(self, micro_steps: int) -> bool:
        """After ``micro_steps`` micro-steps no gradient is accumulated (the last one stepped)."""
        return micro_steps % self.accumulation == 0

    def describe(self) -> str:
        if self.is_pma:
            return f"PMA, period {self.period}"
        if self.accumulation > 1:
            return f"gradient accumulation over {self.accumulation} micro-batches"
        return "an optimizer step on every micro-batch"
