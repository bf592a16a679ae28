"""PMA optimizers inside DeepSpeed: JSON registration, the GA rule, and DeepSpeed's stepping quirks.

DeepSpeed (tested: 0.19.8) has no optimizer plugin registry: a config ``optimizer.type`` resolves
only to a DeepSpeed built-in or a ``torch.optim`` attribute, ZeRO refuses optimizers outside its
list of tested ones, and ZeRO-Offload refuses client optimizers. This module teaches the engine
class about a small registry instead of asking users to add config keys. When ``deepspeed`` is
imported (now, or later through an import hook, so ``import pma_dist`` stays cheap), it wraps
four ``DeepSpeedEngine`` methods:

- ``_is_supported_optimizer``: registered names (case-insensitive) pass the sanity check;
- ``_do_sanity_check``: an unknown ``optimizer.type`` is an error naming the registered types (DeepSpeed's
  own is a bare assertion);
- ``_configure_basic_optimizer``: a registered name is built from ``optimizer.params``, and a key
  the optimizer does not take is an error naming the key;
- ``_configure_optimizer``: for a PMA optimizer (from the config, a client instance, or a client
  callable) it enforces gradient_accumulation_steps == 1, lists the class as ZeRO-supported,
  lets ZeRO-Offload accept it, keeps DeepSpeed's setup-time ``step()`` calls with zero gradients
  inside :meth:`~pma_dist.optim.PMAOptimizer.setup_steps`, and makes every ``step()`` of the
  DeepSpeed wrapper one logical PMA step (ZeRO-3 steps once per sub-group).

``deepspeed.initialize`` itself is wrapped only to honour a ``"comm_profile"`` config section
(see ``pma_dist.comm``). :func:`initialize` is the same call for users who prefer it explicit.
See ``docs/deepspeed.md`` for the mechanism, its limits and the checkpoint story.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import importlib.abc
import inspect
import logging
import sys
from typing import Dict, Optional, Tuple

import torch

from .optim import AdamWPMA, LionPMA, PMAOptimizer

__all__ = ["register_optimizer", "registered_optimizers", "initialize", "build_optimizer", "check_optimizer_params",
           "check_gradient_accumulation", "install", "TESTED_DEEPSPEED_VERSIONS"]

logger = logging.getLogger(__name__)

TESTED_DEEPSPEED_VERSIONS = ("0.19.8",)
COMM_PROFILE_KEY = "comm_profile"

# lower-cased name -> (name as registered, class)
_REGISTRY: Dict[str, Tuple[str, type]] = {}


# ---------------------------------------------------------------------------------------------- registry
def register_optimizer(name: str, cls: type) -> None:
    """Make ``{"optimizer": {"type": name, "params": {...}}}`` build ``cls(model_parameters, **params)``.

    Names are matched case-insensitively. A name DeepSpeed or ``torch.optim`` already resolves is
    refused (it would silently change what existing configs mean); re-registering a name with the
    same class is a no-op.
    """
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"optimizer name must be a non-empty string, got {name!r}")
    if not (isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)):
        raise TypeError(f"register_optimizer({name!r}, ...) needs a torch.optim.Optimizer subclass, got {cls!r}")
    key = name.lower()
    if key in _REGISTRY:
        if _REGISTRY[key][1] is cls:
            return
        raise ValueError(f"optimizer name {name!r} is already registered for {_REGISTRY[key][1].__qualname__}")
    builtin = _builtin_optimizer_name(key)
    if builtin is not None:
        raise ValueError(f"optimizer name {name!r} would shadow the built-in {builtin!r}; pick another name")
    _REGISTRY[key] = (name, cls)


def registered_optimizers() -> Dict[str, type]:
    return {name: cls for name, cls in _REGISTRY.values()}


def _lookup(name: Optional[str]) -> Optional[Tuple[str, type]]:
    return _REGISTRY.get(name.lower()) if isinstance(name, str) else None


def _builtin_optimizer_name(key: str) -> Optional[str]:
    for attr in dir(torch.optim):
        obj = getattr(torch.optim, attr)
        if attr.lower() == key and isinstance(obj, type) and issubclass(obj, torch.optim.Optimizer):
            return f"torch.optim.{attr}"
    ds_config = sys.modules.get("deepspeed.runtime.config")
    if ds_config is not None and key in getattr(ds_config, "DEEPSPEED_OPTIMIZERS", ()):
        return f"DeepSpeed's {key!r}"
    return None


def _accepted_keys(cls: type) -> Optional[list]:
    """Keyword arguments ``cls`` takes besides the parameters; None if it takes ``**kwargs``."""
    keys = []
    for index, parameter in enumerate(inspect.signature(cls.__init__).parameters.values()):
        if parameter.kind is parameter.VAR_KEYWORD:
            return None
        if index < 2 or parameter.kind is parameter.VAR_POSITIONAL:  # self, params
            continue
        keys.append(parameter.name)
    return keys


def _registered_names() -> str:
    return ", ".join(n for n, _ in _REGISTRY.values())


def build_optimizer(name: str, params: Optional[dict], model_parameters, *,
                    source: str = "DeepSpeed config") -> torch.optim.Optimizer:
    """Build the registered optimizer ``name`` from a config's ``optimizer.params``.

    The one validation of an ``optimizer`` block of a registered type: its keys against the constructor's,
    its values by the constructor's own checks (so ``period`` 0, 2.5, ``true`` or ``"8"`` is refused here
    exactly as ``AdamWPMA(period=...)`` refuses it). ``source`` (a file name) leads the error message.
    :func:`check_optimizer_params` runs the same checks before any model exists."""
    entry = _lookup(name)
    if entry is None:
        raise ValueError(f"{source}: optimizer type {name!r} is not registered with pma_dist "
                         f"(registered: {_registered_names()})")
    registered_name, cls = entry
    params = dict(params or {})
    accepted = _accepted_keys(cls)
    if accepted is not None:
        unknown = sorted(set(params) - set(accepted))
        if unknown:
            raise ValueError(
                f"{source}: optimizer {registered_name!r}: unknown key(s) {', '.join(map(repr, unknown))} "
                f"in optimizer.params; valid keys are {', '.join(accepted)}")
    try:
        return cls(model_parameters, **params)
    except (TypeError, ValueError) as error:
        raise type(error)(f"{source}: optimizer {registered_name!r}, optimizer.params={params}: {error}") from None


def check_optimizer_params(name: str, params: Optional[dict], *, source: str = "DeepSpeed config") -> type:
    """Validate a registered type's ``optimizer.params`` as :func:`build_optimizer` would, on a one-element
    stand-in parameter (no model needed); returns the class."""
    stand_in = torch.nn.Parameter(torch.zeros(1))
    return type(build_optimizer(name, params, [stand_in], source=source))


def _is_pma(optimizer) -> bool:
    """Optimizers that step per micro-batch and accumulate over a ``period`` themselves."""
    return isinstance(optimizer, PMAOptimizer) or "period" in getattr(optimizer, "defaults", {})


# ---------------------------------------------------------------------------------------------- GA rule
def check_gradient_accumulation(optimizer, gradient_accumulation_steps: int, *, train_batch_size=None,
                                micro_batch_size=None, data_parallel_size=None) -> None:
    """PMA replaces gradient accumulation: GA > 1 would stretch the period to K x GA micro-steps.

    A period of 1 in every group is not PMA (AdamWPMA "paper" is AdamW, LionPMA is Lion) and may
    accumulate: that is how the GA baselines run.
    """
    if not _is_pma(optimizer) or gradient_accumulation_steps <= 1:
        return
    periods = sorted({group.get("period", 1) for group in optimizer.param_groups})
    if periods == [1]:  # period 1 is the plain optimizer (e.g. LionPMA(period=1) is Lion): GA is the baseline
        return
    name = type(optimizer).__name__
    period_text = ", ".join(map(str, periods))
    implied = ""
    if train_batch_size is not None and micro_batch_size is not None and data_parallel_size is not None:
        implied = (f" (train_batch_size={train_batch_size} = train_micro_batch_size_per_gpu={micro_batch_size}"
                   f" x gradient_accumulation_steps={gradient_accumulation_steps}"
                   f" x {data_parallel_size} data-parallel rank(s))")
    raise ValueError(
        f"{name} steps on every micro-batch and averages over its own period, so DeepSpeed must not "
        f"accumulate gradients: got gradient_accumulation_steps={gradient_accumulation_steps}{implied}. "
        f"Set \"gradient_accumulation_steps\": 1 (train_batch_size = micro batch x ranks) and set the "
        f"optimizer's \"period\" to {gradient_accumulation_steps} to average the same number of micro-batches "
        f"(current period: {period_text}).")


# ---------------------------------------------------------------------------------------------- engine patch
def _is_ours(optimizer) -> bool:
    return _is_pma(optimizer) or any(type(optimizer) is cls for _, cls in _REGISTRY.values())


def _optimizer_setup(engine, optimizer, stack: contextlib.ExitStack) -> None:
    """Apply the GA rule and admit ``optimizer`` into ZeRO; the setup window closes with ``stack``."""
    if not _is_ours(optimizer):
        return
    check_gradient_accumulation(optimizer, engine.gradient_accumulation_steps(),
                                train_batch_size=engine.train_batch_size(),
                                micro_batch_size=engine.train_micro_batch_size_per_gpu(),
                                data_parallel_size=engine.dp_world_size)
    if hasattr(optimizer, "check_deepspeed_engine"):  # e.g. AdaPM refuses flat ZeRO partitions, before any work
        optimizer.check_deepspeed_engine(engine)
    from deepspeed.runtime.zero import utils as zero_utils
    if type(optimizer) not in zero_utils.ZERO_SUPPORTED_OPTIMIZERS:
        zero_utils.ZERO_SUPPORTED_OPTIMIZERS.append(type(optimizer))
    # ZeRO-Offload refuses client optimizers that are not DeepSpeedCPUAdam/Lion; ours run on the
    # offloaded fp32 partitions with plain torch ops, so accept them for this engine only.
    engine.zero_force_ds_cpu_optimizer = lambda: False
    stack.callback(vars(engine).pop, "zero_force_ds_cpu_optimizer", None)
    if hasattr(optimizer, "setup_steps"):
        stack.enter_context(optimizer.setup_steps())
    if _is_pma(optimizer):
        _warn_implicit_clipping(engine, optimizer)


def _warn_implicit_clipping(engine, optimizer) -> None:
    raw = getattr(engine._config, "_param_dict", None) or {}
    if "gradient_clipping" not in raw and engine.gradient_clipping() > 0 and engine.global_rank == 0:
        logger.warning(
            "%s with DeepSpeed's default gradient_clipping=%s clips every micro-batch gradient (not an accumulated "
            "one); set \"gradient_clipping\" explicitly (0.0 disables it). See docs/deepspeed.md.",
            type(optimizer).__name__, engine.gradient_clipping())


def _one_logical_step_per_call(wrapper, optimizer) -> None:
    """Make each ``wrapper.step()`` advance the PMA clock once, however often it steps ``optimizer``."""
    if wrapper is optimizer or not hasattr(optimizer, "one_logical_step"):
        return
    step = wrapper.step

    @functools.wraps(step)
    def step_once(*args, **kwargs):
        with optimizer.one_logical_step():
            return step(*args, **kwargs)

    wrapper.step = step_once


def _patch_engine(engine_cls) -> None:
    if engine_cls.__dict__.get("_pma_dist_patched"):
        return
    is_supported = engine_cls._is_supported_optimizer
    configure_basic = engine_cls._configure_basic_optimizer
    configure = engine_cls._configure_optimizer
    sanity_check = engine_cls._do_sanity_check

    @functools.wraps(is_supported)
    def _is_supported_optimizer(self, optimizer_name):
        return _lookup(optimizer_name) is not None or is_supported(self, optimizer_name)

    @functools.wraps(sanity_check)
    def _do_sanity_check(self):
        name = None if self.client_optimizer else self.optimizer_name()
        if name is not None and not self._is_supported_optimizer(name):
            # DeepSpeed's own answer is a bare assertion; name what would have been accepted
            raise ValueError(f"DeepSpeed config optimizer type {name!r} is not a DeepSpeed optimizer, a torch.optim "
                             f"class or one registered with pma_dist (registered: {_registered_names()})")
        return sanity_check(self)

    @functools.wraps(configure_basic)
    def _configure_basic_optimizer(self, model_parameters):
        if _lookup(self.optimizer_name()) is None:
            return configure_basic(self, model_parameters)
        optimizer = build_optimizer(self.optimizer_name(), self.optimizer_params(), model_parameters)
        stack = getattr(self, "_pma_setup_stack", None)
        if stack is not None:
            _optimizer_setup(self, optimizer, stack)
        return optimizer

    @functools.wraps(configure)
    def _configure_optimizer(self, client_optimizer, model_parameters):
        with contextlib.ExitStack() as stack:
            self._pma_setup_stack = stack
            stack.callback(vars(self).pop, "_pma_setup_stack", None)
            if isinstance(client_optimizer, torch.optim.Optimizer):
                _optimizer_setup(self, client_optimizer, stack)
            elif callable(client_optimizer):
                make_optimizer = client_optimizer

                @functools.wraps(make_optimizer)
                def client_optimizer(params):
                    optimizer = make_optimizer(params)
                    _optimizer_setup(self, optimizer, stack)
                    return optimizer
            configure(self, client_optimizer, model_parameters)
        _one_logical_step_per_call(self.optimizer, self.basic_optimizer)

    engine_cls._is_supported_optimizer = _is_supported_optimizer
    engine_cls._do_sanity_check = _do_sanity_check
    engine_cls._configure_basic_optimizer = _configure_basic_optimizer
    engine_cls._configure_optimizer = _configure_optimizer
    engine_cls._pma_dist_patched = True


# ---------------------------------------------------------------------------------------------- initialize
def _config_dict(args, config, config_params) -> Tuple[Optional[dict], str]:
    """The config as DeepSpeed will read it, and which argument it came from."""
    if config is not None:
        source, value = "config", config
    elif config_params is not None:
        source, value = "config_params", config_params
    elif getattr(args, "deepspeed_config", None) is not None:
        source, value = "args", args.deepspeed_config
    else:
        return None, "none"
    if isinstance(value, dict):
        return value, source
    from deepspeed.runtime.tensor_parallel.init_utils import load_ds_config
    return load_ds_config(value), source


def _split_comm_profile(args, config, config_params):
    """Take ``comm_profile`` out of the config (without touching the caller's objects)."""
    cfg, source = _config_dict(args, config, config_params)
    if not isinstance(cfg, dict) or COMM_PROFILE_KEY not in cfg:
        return None, args, config, config_params
    comm_profile = cfg[COMM_PROFILE_KEY]
    stripped = {key: value for key, value in cfg.items() if key != COMM_PROFILE_KEY}
    if source == "args":
        args = copy.copy(args)
        args.deepspeed_config = None
        config = stripped
    elif source == "config":
        config = stripped
    else:
        config_params = stripped
    return comm_profile, args, config, config_params


def _bind(ds_initialize, args, kwargs) -> Optional[inspect.BoundArguments]:
    """The call's arguments by name, or None when they cannot be matched to DeepSpeed's signature (then
    DeepSpeed, called unchanged, reports the mistake in its own words)."""
    try:
        bound = inspect.signature(ds_initialize).bind(*args, **kwargs)
    except (TypeError, ValueError):
        return None
    return bound if {"args", "config", "config_params"} <= set(bound.signature.parameters) else None


def _wrap_initialize(ds_initialize):
    """``deepspeed.initialize`` that forwards every argument, as given, to DeepSpeed's own; only a
    ``comm_profile`` config section is taken out first (DeepSpeed would reject the unknown key)."""
    if getattr(ds_initialize, "_pma_dist_wrapped", False):
        return ds_initialize

    @functools.wraps(ds_initialize)
    def initialize(*args, **kwargs):
        bound = _bind(ds_initialize, args, kwargs)
        if bound is None:
            return ds_initialize(*args, **kwargs)
        given = bound.arguments
        comm_profile, ds_args, config, config_params = _split_comm_profile(
            given.get("args"), given.get("config"), given.get("config_params"))
        if comm_profile is None:
            return ds_initialize(*args, **kwargs)
        from pma_dist.comm.profile import parse_comm_profile
        profile = parse_comm_profile(comm_profile)  # a bad section is an error before the engine is built
        for name, value in (("args", ds_args), ("config", config), ("config_params", config_params)):
            if name in given or value is not None:
                given[name] = value
        result = ds_initialize(*bound.args, **bound.kwargs)
        if profile is not None:
            from pma_dist.comm import attach_to_engine
            attach_to_engine(result[0], comm_profile)
        return result

    initialize._pma_dist_wrapped = True
    return initialize


def install(deepspeed_module=None) -> None:
    """Patch DeepSpeed now (idempotent). Runs automatically when ``deepspeed`` is imported."""
    if deepspeed_module is None:
        import deepspeed as deepspeed_module
    from deepspeed.runtime.engine import DeepSpeedEngine

    version = getattr(deepspeed_module, "__version__", "?")
    if version not in TESTED_DEEPSPEED_VERSIONS:
        logger.warning("pma_dist's DeepSpeed integration was tested with DeepSpeed %s, found %s",
                       ", ".join(TESTED_DEEPSPEED_VERSIONS), version)
    _patch_engine(DeepSpeedEngine)
    deepspeed_module.initialize = _wrap_initialize(deepspeed_module.initialize)


def initialize(*args, **kwargs):
    """``deepspeed.initialize`` with the PMA registration guaranteed; same arguments (all forwarded as
    given), same return value."""
    import deepspeed
    install(deepspeed)
    return deepspeed.initialize(*args, **kwargs)


# ---------------------------------------------------------------------------------------------- import hook
class _InstallAfterImport(importlib.abc.MetaPathFinder):
    """Runs :func:`install` right after the ``deepspeed`` package finishes importing.

    It decorates the real loader's ``exec_module`` of the spec it hands out and leaves
    ``sys.meta_path`` once the package has been executed: a mere ``importlib.util.find_spec``
    (libraries probing whether DeepSpeed is installed) must not use it up.
    """

    def find_spec(self, fullname, path, target=None):
        if fullname != "deepspeed":
            return None
        for finder in sys.meta_path:
            find_spec = getattr(finder, "find_spec", None)
            spec = find_spec(fullname, path, target) if finder is not self and find_spec else None
            if spec is not None:
                break
        else:
            return None
        loader = spec.loader
        if loader is None or not hasattr(loader, "exec_module"):
            return spec
        exec_module = loader.exec_module

        def exec_then_install(module):
            exec_module(module)
            vars(loader).pop("exec_module", None)
            if self in sys.meta_path:
                sys.meta_path.remove(self)
            install(module)

        loader.exec_module = exec_then_install
        return spec


def _install_when_deepspeed_is_imported() -> None:
    if "deepspeed" in sys.modules:
        install(sys.modules["deepspeed"])
    elif not any(isinstance(finder, _InstallAfterImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, _InstallAfterImport())


register_optimizer("AdamWPMA", AdamWPMA)
register_optimizer("LionPMA", LionPMA)
_install_when_deepspeed_is_imported()
