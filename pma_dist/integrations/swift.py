"""PMA optimizers in ms-swift, the PMA paper's framework: ``swift sft --optimizer adamw_pma --optim_args period=8``.

ms-swift (interface of 4.6.0) builds its optimizer through a callback class looked up by ``--optimizer``
in ``swift.optimizers.optimizers_map``; ``--external_plugins FILE`` imports a Python file first. This
file is such a plugin: passed as ``--external_plugins "$(python -c 'import pma_dist.integrations.swift as s;
print(s.__file__)')"``, importing it registers ``adamw_pma``, ``adamw_pma_reference`` and ``lion_pma``.

Each callback builds the optimizer the way the Trainer builds its default one (two param groups, the
decayed one at ``--weight_decay``), with ``--learning_rate``, ``--adam_beta1/2`` and ``--adam_epsilon``
for AdamW-PMA (Lion-PMA keeps its own betas unless ``optim_args`` gives ``beta1``/``beta2``), and
``--optim_args`` (``period=8``, also ``variant=``, ``eps=``, ``beta1=``, ``beta2=``, ``weight_decay=``,
``lr=``) on top. It also adds :class:`~pma_dist.integrations.hf.PMACallback` to the trainer, so
ms-swift's gradient accumulation (which it may choose by itself) is refused before the first step.

Tested against that interface, not the installed package: ms-swift 4.6.0 requires ``datasets<4.8.5``
and this project's environment has datasets 5.2.0 (see ``docs/integrations.md``).
"""
from __future__ import annotations

from typing import Dict, Optional

from ..methods import get_method, method_names
from .hf import PMACallback, optimizer_cls_and_kwargs

__all__ = ["parse_optim_args", "optimizer_callback_class", "register", "PMA_OPTIMIZERS"]

# adamw_pma, adamw_pma_reference, lion_pma (AdaPM needs named parameters, which the plugin hook does not give)
PMA_OPTIMIZERS = method_names("pma", plain_params=True)

_TYPES = {"period": int, "variant": str, "lr": float, "eps": float, "weight_decay": float,
          "beta1": float, "beta2": float}


def parse_optim_args(text: Optional[str]) -> Dict[str, object]:
    """``"period=8,eps=1e-6"`` -> ``{"period": 8, "eps": 1e-6}``; an unknown key or bad value is a ValueError."""
    parsed: Dict[str, object] = {}
    for item in (text or "").replace(" ", "").split(","):
        if not item:
            continue
        key, sep, value = item.partition("=")
        if not sep or key not in _TYPES:
            raise ValueError(f"--optim_args: cannot use {item!r}; expected key=value with key in {', '.join(_TYPES)}")
        try:
            parsed[key] = _TYPES[key](value)
        except ValueError:
            raise ValueError(f"--optim_args: {key}={value!r} is not a {_TYPES[key].__name__}") from None
    return parsed


def _optimizer_keywords(name: str, args) -> dict:
    method = get_method(name)
    extra = parse_optim_args(getattr(args, "optim_args", None))
    if "period" not in extra:
        raise ValueError(f"--optimizer {name} needs --optim_args period=K (the PMA period, what "
                         "--gradient_accumulation_steps would have been; then run with "
                         "--gradient_accumulation_steps 1)")
    hyper = {"lr": float(args.learning_rate)}
    if method.family == "adamw":
        hyper.update(betas=(float(args.adam_beta1), float(args.adam_beta2)), eps=float(args.adam_epsilon))
    if "variant" in extra:
        variant = extra.pop("variant")
        if method.variant != variant:  # the variant is the method's name in the table
            raise ValueError(f"--optim_args variant={variant!r}: use --optimizer adamw_pma (paper) or "
                             "adamw_pma_reference (reference)")
    beta1, beta2 = extra.pop("beta1", None), extra.pop("beta2", None)
    if beta1 is not None or beta2 is not None:
        default = hyper.get("betas", (0.9, 0.99))
        hyper["betas"] = (default[0] if beta1 is None else beta1, default[1] if beta2 is None else beta2)
    hyper.update(extra)
    return hyper


def optimizer_callback_class(name: str, base: Optional[type] = None) -> type:
    """The ms-swift optimizer callback of method ``name`` (``base``: ms-swift's ``OptimizerCallback``)."""
    if name not in PMA_OPTIMIZERS:
        raise ValueError(f"{name!r} is not a PMA method; expected one of {', '.join(PMA_OPTIMIZERS)}")
    if base is None:
        from swift.optimizers import OptimizerCallback as base

    class PMAOptimizerCallback(base):
        method = name

        def create_optimizer(self, model=None):
            trainer = self.trainer
            # the Trainer's default builder (param groups, weight decay) with this class and keywords
            trainer.optimizer_cls_and_kwargs = optimizer_cls_and_kwargs(name, **_optimizer_keywords(name, self.args))
            if not any(isinstance(c, PMACallback) for c in trainer.callback_handler.callbacks):
                trainer.add_callback(PMACallback())
            return super().create_optimizer(model)

    PMAOptimizerCallback.__name__ = PMAOptimizerCallback.__qualname__ = f"PMAOptimizerCallback_{name}"
    return PMAOptimizerCallback


def register(optimizers_map: Optional[dict] = None, base: Optional[type] = None) -> None:
    """Add the PMA methods to ms-swift's ``optimizers_map`` (``--optimizer adamw_pma`` ...)."""
    if optimizers_map is None:
        from swift.optimizers import optimizers_map
    for name in PMA_OPTIMIZERS:
        optimizers_map[name] = optimizer_callback_class(name, base)


try:  # imported as ms-swift's --external_plugins: register now
    import swift.optimizers  # noqa: F401
except ImportError:
    pass
else:
    register()
