"""PMA optimizers in the Hugging Face ``Trainer`` and TRL's trainers (``SFTTrainer``, ``DPOTrainer``, ...).

Two pieces:

- :func:`optimizer_cls_and_kwargs` turns a method name of :mod:`pma_dist.methods` into the
  ``(class, keywords)`` pair that ``Trainer(optimizer_cls_and_kwargs=...)`` (and every TRL trainer,
  which subclasses it) builds the optimizer from;
- :class:`PMACallback` checks a run before its first step: it refuses ``gradient_accumulation_steps > 1``
  with a PMA optimizer, warns about per-micro-batch gradient clipping, and says what step-based
  settings now count.

What the method names mean here. The Trainer accumulates gradients itself
(``TrainingArguments.gradient_accumulation_steps``), so a name only chooses the optimizer:

- ``adamw_pma``, ``adamw_pma_reference``, ``lion_pma``: the PMA optimizer with ``period=K`` (required);
  PMA replaces accumulation, so the Trainer must run with ``gradient_accumulation_steps=1`` and steps
  the optimizer on every micro-batch;
- ``adamw_ga`` / ``lion_ga`` and ``adamw`` / ``lion`` give the same optimizer (``torch.optim.AdamW``,
  or Lion as ``LionPMA(period=1)``): the GA baseline is that optimizer with
  ``gradient_accumulation_steps=K``, the no-accumulation baseline the same with 1.
  :func:`gradient_accumulation_steps` gives the value for a name; passing ``period`` to one of these
  names is an error (the Trainer's setting is the accumulation there).

The Trainer builds two param groups (decayed, not decayed) whose ``weight_decay`` is
``TrainingArguments.weight_decay``; with ``optimizer_cls_and_kwargs`` the learning rate is the
optimizer's ``lr`` (pass ``lr=`` here), not ``TrainingArguments.learning_rate``; :class:`PMACallback`
warns when they differ.
"""
from __future__ import annotations

import warnings
from typing import Optional, Tuple

try:
    from transformers import TrainerCallback
except ImportError as error:  # pragma: no cover - exercised only without transformers
    raise ImportError("pma_dist.integrations.hf needs transformers (pip install 'pma-dist[integrations]')") from error

from ..methods import get_method
from ..optim import PMAOptimizer

__all__ = ["optimizer_cls_and_kwargs", "gradient_accumulation_steps", "PMACallback", "PMASettingsWarning",
           "find_pma_optimizer"]


class PMASettingsWarning(UserWarning):
    """A Trainer setting whose meaning changes when every micro-batch is an optimizer step."""


def optimizer_cls_and_kwargs(name: str, **hyper_parameters) -> Tuple[type, dict]:
    """``(optimizer class, constructor keywords)`` of the method ``name`` for ``Trainer(optimizer_cls_and_kwargs=...)``.

    PMA names need ``period=K``; the other names refuse it (see the module docstring). The remaining
    keywords (``lr``, ``betas``, ``eps``, ``weight_decay``, ...) go to the optimizer unchanged.
    """
    method = get_method(name)
    if method.named_params:
        raise ValueError(f"{name}: AdaPM chooses each block's momentum by parameter name, which the Trainer's "
                         f"(class, kwargs) hook cannot pass; build it yourself and hand it over: "
                         f"Trainer(optimizers=(pma_dist.AdaPM(model.named_parameters(), period=K, ...), None))")
    hyper = dict(hyper_parameters)
    period = hyper.pop("period", None)
    if method.is_pma:
        if period is None:
            raise ValueError(f"{name}: pass period=K, the number of micro-batches per PMA period (what "
                             "gradient_accumulation_steps would have been); the Trainer then runs with "
                             "gradient_accumulation_steps=1")
        k = period
    else:
        if period is not None:
            raise ValueError(f"{name} is not a PMA method, so period={period!r} has no meaning here: the Trainer "
                             f"accumulates, set TrainingArguments(gradient_accumulation_steps=K) for {name} "
                             f"(see gradient_accumulation_steps({name!r}, K)), or use a *_pma name with period=K")
        k = 1
    return method.optimizer_class, method.optimizer_params(k, hyper)


def gradient_accumulation_steps(name: str, k: int) -> int:
    """``TrainingArguments.gradient_accumulation_steps`` for method ``name`` compared at ``k`` micro-batches:
    ``k`` for the GA baselines, 1 for PMA (it accumulates itself) and the no-accumulation baselines."""
    return get_method(name).schedule(k).accumulation


def find_pma_optimizer(optimizer) -> Optional[PMAOptimizer]:
    """The PMA optimizer inside ``optimizer`` and its wrappers (accelerate's ``AcceleratedOptimizer``,
    DeepSpeed's ZeRO optimizers all keep the wrapped one in ``.optimizer``), or None."""
    seen = set()
    while optimizer is not None and id(optimizer) not in seen:
        if isinstance(optimizer, PMAOptimizer):
            return optimizer
        seen.add(id(optimizer))
        optimizer = getattr(optimizer, "optimizer", None)
    return None


def _periods(optimizer: PMAOptimizer) -> int:
    periods = {int(group["period"]) for group in optimizer.param_groups}
    if len(periods) != 1:
        raise ValueError(f"PMACallback: one PMA period for all param groups is needed, got {sorted(periods)}")
    return periods.pop()


# step-counting settings of TrainingArguments, with the strategy that makes each one a step count
_STEP_SETTINGS = (("warmup_steps", None), ("logging_steps", "logging_strategy"),
                  ("eval_steps", "eval_strategy"), ("save_steps", "save_strategy"))


def _step_settings(args, max_steps: Optional[int]) -> list:
    found = []
    if max_steps is not None and max_steps > 0:
        found.append(("max_steps (the scheduler's length)", max_steps))
    for field, strategy in _STEP_SETTINGS:
        value = getattr(args, field, None)
        if strategy is not None and str(getattr(getattr(args, strategy, None), "value",
                                                getattr(args, strategy, None))) != "steps":
            continue
        if value and value >= 1:  # a value below 1 is a fraction of max_steps: it keeps its meaning
            found.append((field, int(value) if float(value).is_integer() else value))
    return found


class PMACallback(TrainerCallback):
    """Checks a Trainer run with a PMA optimizer before its first step.

    ``Trainer(..., callbacks=[PMACallback()])``. With a PMA optimizer of period K > 1 (period 1 is
    plain AdamW / Lion and is left alone):

    - ``gradient_accumulation_steps > 1`` is a ValueError: the Trainer would sum G micro-batches into
      each step and PMA would average K such steps, a period of G*K micro-batches (K^2 for G = K);
    - ``max_grad_norm > 0`` gives a :class:`PMASettingsWarning`: the Trainer (or DeepSpeed's
      ``gradient_clipping: "auto"``) now clips each micro-batch's gradient, where under accumulation it
      clipped the accumulated one;
    - a :class:`PMASettingsWarning` lists the step-counting settings in force (``max_steps``, which is
      also the LR scheduler's length, ``warmup_steps``, ``logging_steps``, ``eval_steps``,
      ``save_steps``): each counts micro-batches now, K times as many as a GA run's optimizer steps;
    - an optimizer ``lr`` other than ``TrainingArguments.learning_rate`` gives a warning.

    The checks run when the Trainer is built if it was handed the optimizer (``optimizers=``), else
    when training begins (after the optimizer is created, before any step).
    """

    def __init__(self):
        self.checked = False
        self.period: Optional[int] = None

    def on_init_end(self, args, state, control, optimizer=None, **kwargs):
        if optimizer is not None:
            self._check(args, optimizer, max_steps=args.max_steps)

    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
        self._check(args, optimizer, max_steps=state.max_steps)

    def _check(self, args, optimizer, max_steps: Optional[int]) -> None:
        pma = find_pma_optimizer(optimizer)
        if pma is None:
            return
        period = _periods(pma)
        self.period = period
        if period == 1:
            return
        name = f"{type(pma).__name__}(period={period})"
        accumulation = int(args.gradient_accumulation_steps)
        if accumulation > 1:
            raise ValueError(
                f"gradient_accumulation_steps={accumulation} with {name}: the Trainer would sum {accumulation} "
                f"micro-batches into every optimizer step and PMA would average {period} such steps, a period of "
                f"{accumulation * period} micro-batches. PMA replaces gradient accumulation: set "
                f"TrainingArguments(gradient_accumulation_steps=1) (--gradient_accumulation_steps 1) and keep "
                f"period={period}")
        if self.checked:
            return
        self.checked = True
        clip = getattr(args, "max_grad_norm", None)
        if clip is not None and clip > 0:
            warnings.warn(
                f"max_grad_norm={clip} with {name}: the gradient of every micro-batch is clipped to norm {clip} "
                "(under gradient accumulation the accumulated gradient was). Keep it if that is what you want, "
                "choose a per-micro-batch threshold, or set max_grad_norm=0 to turn clipping off",
                PMASettingsWarning, stacklevel=2)
        steps = _step_settings(args, max_steps)
        if steps:
            listed = ", ".join(f"{field}={value}" for field, value in steps)
            warnings.warn(
                f"with {name} every micro-batch is an optimizer step, so step counts are micro-batches, {period} "
                f"times a gradient-accumulation run's steps: {listed}. Multiply a GA recipe's values by {period} "
                f"to keep their meaning ({period} micro-steps make one PMA period)",
                PMASettingsWarning, stacklevel=2)
        lrs = {float(group.get("initial_lr", group["lr"])) for group in pma.param_groups}
        if lrs != {float(args.learning_rate)}:
            warnings.warn(
                f"{name} has lr {sorted(lrs)} but TrainingArguments.learning_rate={args.learning_rate}: an optimizer "
                "passed through optimizer_cls_and_kwargs or optimizers= keeps its own lr (pass lr= to it)",
                PMASettingsWarning, stacklevel=2)
