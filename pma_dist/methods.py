"""The training methods pma-dist compares, in one table: one spelling each, everywhere a user sees it.

A method is an optimizer family (AdamW or Lion; AdaPM counts as AdamW) and a way of spending K micro-batches:

======================  =========================================  ===================================
name                    what it is                                 schedule over K micro-batches
======================  =========================================  ===================================
``adamw_pma``           AdamW-PMA, ``variant="paper"`` (default)   K optimizer steps, a PMA period
``adamw_pma_reference`` AdamW-PMA, ``variant="reference"``         K optimizer steps, a PMA period
``lion_pma``            Lion-PMA                                   K optimizer steps, a PMA period
``adapm``               AdaPM with a PMA period (docs/adapm.md)    K optimizer steps, a PMA period
``adamw_ga``            ``torch.optim.AdamW`` + accumulation       1 optimizer step (AdamW-K)
``lion_ga``             Lion + accumulation                        1 optimizer step (Lion-K)
``adamw``               ``torch.optim.AdamW``, no accumulation     K optimizer steps, each plain
``lion``                Lion, no accumulation                      K optimizer steps, each plain
======================  =========================================  ===================================

Lion is ``LionPMA(period=1)``, which is Lion bit for bit (``docs/math.md``), so every Lion method
runs the same code on every device. Each :class:`Method` knows its builder, its
:class:`~pma_dist.schedule.MicroStepSchedule`, its DeepSpeed ``optimizer`` block and its display name;
``torch_parallel``, the DeepSpeed comm attachment, the post-training recipe, the benchmarks, the demo
and ``ds_configs/generate.py`` read them from here.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch

from .optim import AdamWPMA, LionPMA
from .schedule import MicroStepSchedule

__all__ = ["Method", "METHODS", "get_method", "method_names", "schedule_of_optimizer"]

PMA, GA, PLAIN = "pma", "ga", "plain"


@dataclass(frozen=True)
class Method:
    name: str
    display: str
    family: str  # "adamw" | "lion"
    accumulation: str  # PMA: a period of K steps; GA: one step per K micro-batches; PLAIN: a step per micro-batch
    variant: Optional[str] = None  # AdamW-PMA only
    named_params: bool = False  # built from named_parameters() (AdaPM chooses each block's momentum by name)

    @property
    def is_pma(self) -> bool:
        return self.accumulation == PMA

    @property
    def deepspeed_type(self) -> str:
        """``optimizer.type`` of the DeepSpeed JSON (registered by ``import pma_dist``)."""
        if self.name == "adapm":
            return "AdaPM"
        if self.family == "adamw":
            return "AdamWPMA" if self.is_pma else "AdamW"
        return "LionPMA"

    def schedule(self, k: int) -> MicroStepSchedule:
        """How this method spends ``k`` micro-batches (the no-accumulation methods ignore ``k``)."""
        if self.accumulation == PMA:
            return MicroStepSchedule.pma(k)
        if self.accumulation == GA:
            return MicroStepSchedule.gradient_accumulation(k)
        return MicroStepSchedule()

    def optimizer_params(self, k: int, hyper: Optional[dict] = None) -> dict:
        """The constructor keywords (besides the parameters) of this method's optimizer at ``k``."""
        params = dict(hyper or {})
        for key in ("period", "variant"):
            if key in params:
                raise ValueError(f"{self.name}: pass K as the method's k, not {key}={params[key]!r} in its "
                                 "hyper-parameters (the method fixes the period and the variant)")
        if self.family == "lion":
            params["period"] = k if self.is_pma else 1
        elif self.is_pma:
            params.update(period=k, variant=self.variant)
        return params

    @property
    def optimizer_class(self) -> type:
        """The class :meth:`build` instantiates (with :meth:`optimizer_params` as its keywords)."""
        if self.name == "adapm":
            from .adapm import AdaPM

            return AdaPM
        if self.family == "lion":
            return LionPMA
        return AdamWPMA if self.is_pma else torch.optim.AdamW

    def build(self, params, k: int, **hyper) -> torch.optim.Optimizer:
        """This method's optimizer over ``params``; ``k`` is the PMA period / GA length of the comparison."""
        return self.optimizer_class(params, **self.optimizer_params(k, hyper))

    def deepspeed_config(self, k: int, hyper: Optional[dict] = None) -> dict:
        """The ``optimizer`` block and ``gradient_accumulation_steps`` of a DeepSpeed config for this method."""
        params = self.optimizer_params(k, hyper)
        if self.deepspeed_type == "AdamW":
            # torch.optim.AdamW: the same kind of implementation as AdamWPMA and no JIT build
            # (drop "torch_adam" on GPU to use DeepSpeed's FusedAdam).
            params["torch_adam"] = True
        return {"optimizer": {"type": self.deepspeed_type, "params": params},
                "gradient_accumulation_steps": self.schedule(k).accumulation}


METHODS: Dict[str, Method] = {m.name: m for m in (
    Method("adamw_pma", "AdamW-PMA", "adamw", PMA, variant="paper"),
    Method("adamw_pma_reference", "AdamW-PMA (reference)", "adamw", PMA, variant="reference"),
    Method("lion_pma", "Lion-PMA", "lion", PMA),
    Method("adapm", "AdaPM", "adamw", PMA, variant="paper", named_params=True),
    Method("adamw_ga", "AdamW + GA", "adamw", GA),
    Method("lion_ga", "Lion + GA", "lion", GA),
    Method("adamw", "AdamW (no accumulation)", "adamw", PLAIN),
    Method("lion", "Lion (no accumulation)", "lion", PLAIN),
)}


def method_names(accumulation: Optional[str] = None, *, plain_params: bool = False) -> Tuple[str, ...]:
    """Method names, optionally of one accumulation kind; ``plain_params``: only those built from a plain
    parameter list (hooks that hand over no names, such as the HF Trainer's, cannot build AdaPM)."""
    return tuple(name for name, m in METHODS.items()
                 if (accumulation is None or m.accumulation == accumulation) and not (plain_params and m.named_params))


def get_method(name: str) -> Method:
    """The method called ``name``; a ValueError naming the valid names otherwise."""
    try:
        return METHODS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown training method {name!r}; expected one of {', '.join(METHODS)}") from None


def schedule_of_optimizer(optimizer: torch.optim.Optimizer, gradient_accumulation_steps: int = 1) -> MicroStepSchedule:
    """The micro-step schedule of ``optimizer`` under ``gradient_accumulation_steps``: the PMA period from its
    param groups (one period for all groups), the accumulation from the caller."""
    periods = {group.get("period", 1) for group in optimizer.param_groups}
    if len(periods) != 1:
        raise ValueError(f"one PMA period for all param groups is needed here, got periods {sorted(periods)}")
    return MicroStepSchedule(accumulation=int(gradient_accumulation_steps), period=int(periods.pop()))
