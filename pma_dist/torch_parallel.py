"""PMA under PyTorch's own data parallelism: FSDP2 (``fully_shard``) and DDP.

The whole API is one function and one object::

    from pma_dist.torch_parallel import init_process_group, setup

    init_process_group()                              # under torchrun / deepspeed / mpirun
    trainer = setup(model, backend="fsdp",            # or "ddp"
                    optimizer="adamw_pma",            # any name of pma_dist.methods.METHODS
                    optimizer_kwargs=dict(lr=2e-5, betas=(0.9, 0.95)),
                    period=8)                         # K: PMA period or GA accumulation steps
    for batch in loader:                              # one micro-batch per call, per rank, on the device
        trainer.micro_step(lambda model: model(**batch).loss)
    trainer.save("ckpt/step-100")                     # torch.distributed.checkpoint, sharded
    trainer.load("ckpt/step-100")                     # resume continues bit-identically
    trainer.close()                                   # only needed with comm_profile (final ledger write)

Details, the communication model and the tests: ``docs/fsdp_ddp.md``.

``micro_step`` does the right thing for the optimizer family:

* PMA (``adamw_pma``, ``lion_pma``): gradients are synchronised and the optimizer steps on *every*
  micro-batch; ``period`` is the optimizer's K. There is no communication saving to be had here:
  the PMA update at micro-step t needs the all-rank mean gradient of micro-step t.
* GA baselines (``adamw_ga`` = ``torch.optim.AdamW``, ``lion_ga`` = Lion, i.e. ``LionPMA`` with K = 1,
  which is Lion exactly): the loss is divided by ``period`` and gradients accumulate over
  ``period`` micro-batches; only the last one synchronises (FSDP2
  ``set_requires_gradient_sync(False)`` before the others, DDP ``no_sync()``) and then the
  optimizer steps. This is the "AdamW-K" baseline of the paper.
* No-accumulation baselines (``adamw``, ``lion``): synchronise and step on every micro-batch.

Which micro-step synchronises, steps or is large is the method's
:class:`~pma_dist.schedule.MicroStepSchedule` (:mod:`pma_dist.methods`).

The process group must exist before ``setup`` (:func:`init_process_group` picks the backend and
device through DeepSpeed's accelerator API, so the same code runs on CUDA/NCCL and on CPU/gloo).

Step counting lives in the optimizers (:mod:`pma_dist.optim`); this module only decides when to
synchronise and when to step.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, List, Optional, Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .methods import METHODS, get_method
from .optim import PMAOptimizer

__all__ = ["BACKENDS", "ParallelTrainer", "init_process_group", "setup"]

BACKENDS = ("fsdp", "ddp")


def _accelerator():
    from deepspeed.accelerator import get_accelerator

    return get_accelerator()


def init_process_group(timeout: Optional[float] = None) -> None:
    """Join the job started by torchrun/deepspeed/mpirun with the accelerator's backend (NCCL, gloo, ...);
    ``timeout``: the collective timeout in seconds (default: :func:`pma_dist.distributed.collective_timeout`)."""
    from .distributed import init_distributed

    info = init_distributed(timeout=timeout)
    _accelerator().set_device(info.local_rank)


@dataclass
class MicroStepResult:
    loss: Tensor  # the unscaled micro-batch loss, detached
    optimizer_stepped: bool
    micro_step: int  # micro-steps done so far, this one included


class ParallelTrainer:
    """A model wrapped by FSDP2 or DDP, its optimizer, and the micro-step loop; build it with :func:`setup`."""

    def __init__(self, model: nn.Module, backend: str, optimizer_name: str, optimizer: torch.optim.Optimizer,
                 period: int, *, lr_scheduler=None, max_grad_norm: float = 0.0,
                 fsdp_units: Sequence[nn.Module] = ()):
        self.model = model
        self.backend = backend
        self.optimizer_name = optimizer_name
        self.optimizer = optimizer
        self.period = period
        self.schedule = get_method(optimizer_name).schedule(period)
        self.lr_scheduler = lr_scheduler
        self.max_grad_norm = max_grad_norm
        self.fsdp_units = list(fsdp_units)
        self.micro_steps = 0
        self.comm_ledger = None  # a pma_dist.comm.CommLedger once setup(comm_profile=...) switched it on

    @property
    def module(self) -> nn.Module:
        """The user's model: DDP's ``.module``; under FSDP2 the sharded model itself (same class)."""
        return self.model.module if self.backend == "ddp" else self.model

    # ------------------------------------------------------------------ training
    @property
    def uses_pma(self) -> bool:
        return self.schedule.is_pma

    @property
    def accumulation_steps(self) -> int:
        """Micro-batches per optimizer step: ``period`` for the GA baselines, 1 otherwise."""
        return self.schedule.accumulation

    def is_sync_step(self, micro_step: Optional[int] = None) -> bool:
        """Whether micro-step ``micro_step`` (0-based; default: the next one) synchronises gradients and steps."""
        return self.schedule.steps_optimizer(self.micro_steps if micro_step is None else micro_step)

    def micro_step(self, loss_fn: Callable[[nn.Module], Tensor]) -> MicroStepResult:
        """Forward+backward of one micro-batch via ``loss_fn(model)``; synchronise and step when due."""
        sync = self.is_sync_step()
        ledger = self.comm_ledger
        if ledger is not None:
            ledger.begin_micro_step(self.micro_steps, self._micro_step_kind())
        with self._gradient_sync(sync):
            with self._phase("forward"):
                loss = loss_fn(self.model)
            if not isinstance(loss, Tensor) or loss.numel() != 1:
                raise TypeError(f"loss_fn must return a scalar loss tensor, got {_describe(loss)}")
            with self._phase("backward"):
                (loss / self.accumulation_steps).backward()
        if sync:
            with self._phase("step"):
                if self.max_grad_norm > 0:
                    self._clip_gradients()
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                if self.lr_scheduler is not None:
                    self.lr_scheduler.step()
        self.micro_steps += 1
        if ledger is not None:
            ledger.end_micro_step()
        return MicroStepResult(loss.detach(), sync, self.micro_steps)

    @torch.no_grad()
    def _clip_gradients(self) -> None:
        """Scale gradients so their global L2 norm is at most ``max_grad_norm`` (torch's formula).

        FSDP2 gradients are shards: the squared norms of the local shards are summed with one fp32
        ``all_reduce`` through torch.distributed, where the ledger counts it (DTensor's own norm would
        reduce through functional collectives, which no Python-level hook sees). DDP gradients are
        already identical on every rank: no communication.
        """
        grads = [_local(p.grad) for p in self.model.parameters() if p.grad is not None]
        if not grads:
            return
        norms = torch._foreach_norm([g.float() for g in grads])
        squared = torch.stack(norms).square().sum()
        if self.backend == "fsdp":
            dist.all_reduce(squared)
        coef = (self.max_grad_norm / (squared.sqrt() + 1e-6)).clamp(max=1.0)
        torch._foreach_mul_(grads, coef.to(grads[0].dtype))

    def _micro_step_kind(self) -> str:
        """The ledger's label of the coming micro-step, PMA's judged by the optimizer's own clock."""
        coming = self.optimizer.param_groups[0]["step"] + 1 if self.schedule.is_pma else None
        return self.schedule.kind(self.micro_steps, coming)

    def _phase(self, name: str):
        return self.comm_ledger.in_phase(name) if self.comm_ledger is not None else contextlib.nullcontext()

    def close(self) -> None:
        """Finish communication accounting (final ledger write, rank 0's report); call on every rank."""
        if self.comm_ledger is not None:
            self.comm_ledger.close()

    def _gradient_sync(self, sync: bool):
        if self.backend == "fsdp":
            # Off also skips the reduce-scatter; FSDP2 keeps unsharded gradients until the sync step.
            self.model.set_requires_gradient_sync(sync)
            return contextlib.nullcontext()
        return contextlib.nullcontext() if sync else self.model.no_sync()

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        """Sharded model + optimizer state (DTensors under FSDP2), in the layout DCP saves and loads."""
        from torch.distributed.checkpoint.state_dict import get_state_dict

        # DCP materialises missing optimizer state by calling step() with zero gradients and lr 0;
        # for a PMA optimizer that would still advance the period clock and decay the moments.
        with self._setup_steps():
            model_state, optim_state = get_state_dict(self.model, self.optimizer)
        state = {"model": model_state, "optim": optim_state, "trainer": self._trainer_state()}
        if self.lr_scheduler is not None:
            state["lr_scheduler"] = self.lr_scheduler.state_dict()
        return state

    def save(self, directory) -> None:
        """Write a DCP checkpoint (one shard file per rank) to ``directory``; call on every rank."""
        import torch.distributed.checkpoint as dcp

        if not self.is_at_boundary():
            raise RuntimeError(
                f"cannot checkpoint {self.optimizer_name} in the middle of gradient accumulation "
                f"(micro-step {self.micro_steps} of a {self.accumulation_steps}-micro-step accumulation): "
                "accumulated gradients are not saved; save after a micro-step whose optimizer_stepped is True"
            )
        dcp.save(self.state_dict(), checkpoint_id=str(directory))

    def load(self, directory) -> None:
        """Restore a checkpoint written by :meth:`save` (any world size, FSDP2 or DDP); call on every rank."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import set_state_dict

        if not os.path.isdir(directory) or not os.path.exists(os.path.join(directory, ".metadata")):
            raise FileNotFoundError(f"no DCP checkpoint at {str(directory)!r} (expected a directory with .metadata)")
        state = self.state_dict()
        dcp.load(state, checkpoint_id=str(directory))
        self._check_trainer_state(state["trainer"], directory)
        with self._setup_steps():
            set_state_dict(self.model, self.optimizer,
                           model_state_dict=state["model"], optim_state_dict=state["optim"])
        if self.lr_scheduler is not None:
            if "lr_scheduler" not in state:
                raise ValueError(f"checkpoint {str(directory)!r} has no lr_scheduler state but this trainer has one")
            self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        self.micro_steps = int(state["trainer"]["micro_steps"])

    def is_at_boundary(self) -> bool:
        """No gradients are accumulated: the micro-steps so far ended with an optimizer step."""
        return self.schedule.is_step_boundary(self.micro_steps)

    def _setup_steps(self):
        if isinstance(self.optimizer, PMAOptimizer):
            return self.optimizer.setup_steps()
        return contextlib.nullcontext()

    def _trainer_state(self) -> dict:
        return {"micro_steps": self.micro_steps, "optimizer": self.optimizer_name, "period": self.period}

    def _check_trainer_state(self, saved: dict, directory) -> None:
        mine = self._trainer_state()
        if (saved["optimizer"], saved["period"]) != (mine["optimizer"], mine["period"]):
            raise ValueError(
                f"checkpoint {str(directory)!r} was written with optimizer={saved['optimizer']!r}, "
                f"period={saved['period']!r}; this trainer has optimizer={mine['optimizer']!r}, "
                f"period={mine['period']!r}"
            )


def setup(model: nn.Module, backend: str, optimizer: str = "adamw_pma", optimizer_kwargs: Optional[dict] = None,
          period: Optional[int] = None, *, lr_scheduler: Optional[Callable[[torch.optim.Optimizer], object]] = None,
          max_grad_norm: float = 0.0, fsdp_units: Optional[Iterable[nn.Module]] = None,
          fsdp_kwargs: Optional[dict] = None, ddp_kwargs: Optional[dict] = None,
          comm_profile: Optional[dict] = None) -> ParallelTrainer:
    """Wrap ``model`` for data parallelism and build its optimizer.

    Args:
        model: a plain ``nn.Module`` (same initial weights on every rank; DDP broadcasts rank 0's,
            FSDP2 keeps each rank's shard of its own copy).
        backend: ``"fsdp"`` (FSDP2 ``fully_shard``) or ``"ddp"``.
        optimizer: a training method of :mod:`pma_dist.methods`: ``"adamw_pma"``, ``"adamw_pma_reference"``,
            ``"lion_pma"``, ``"adapm"`` (step every micro-batch, PMA period K), the GA baselines ``"adamw_ga"``,
            ``"lion_ga"`` (step every K micro-batches) or ``"adamw"``, ``"lion"`` (no accumulation).
        optimizer_kwargs: hyper-parameters of the optimizer (lr, betas, weight_decay, ...; not ``period``).
        period: K, the PMA period or the baselines' gradient-accumulation steps (default 8; the
            no-accumulation methods take only 1 or None).
        lr_scheduler: ``optimizer -> scheduler``; stepped after every optimizer step and checkpointed.
        max_grad_norm: clip the global gradient norm before every optimizer step (0 = off).
        fsdp_units: modules that get their own ``fully_shard`` (one all-gather each); default: the
            classes named by the model's ``_no_split_modules`` (Hugging Face), else the root's
            direct children that hold parameters. The root is always sharded last.
        fsdp_kwargs / ddp_kwargs: passed to ``fully_shard`` / ``DistributedDataParallel``.
        comm_profile: the ``comm_profile`` section of ``docs/comm_accounting.md`` (``{"enabled": True,
            "output_dir": ...}``): count every collective into ``output_dir/comm_rank{r}.json``;
            under DDP a comm hook routes the C++ reducer's bucket all-reduces through the ledger.
            Call :meth:`ParallelTrainer.close` at the end (final write, rank 0's report).
    """
    from .comm.profile import parse_comm_profile

    comm_options = parse_comm_profile(comm_profile)  # a bad section fails before any wrapping
    period = _resolve_period(optimizer, period)
    _validate_setup(model, backend, optimizer, optimizer_kwargs, period, max_grad_norm,
                    fsdp_kwargs if backend == "fsdp" else ddp_kwargs, "fsdp_kwargs" if backend == "fsdp" else "ddp_kwargs")
    units = _fsdp_units(model, fsdp_units) if backend == "fsdp" else []
    if not dist.is_initialized():
        raise RuntimeError("torch.distributed is not initialised: call pma_dist.torch_parallel.init_process_group() "
                           "(or dist.init_process_group) under torchrun before setup()")
    if backend == "fsdp":
        wrapped = _wrap_fsdp(model, units, dict(fsdp_kwargs or {}))
    else:
        wrapped = _wrap_ddp(model, dict(ddp_kwargs or {}))
    method = get_method(optimizer)
    # AdaPM chooses each block's momentum by parameter name
    params = wrapped.named_parameters() if method.named_params else wrapped.parameters()
    built = method.build(params, period, **dict(optimizer_kwargs or {}))
    scheduler = lr_scheduler(built) if lr_scheduler is not None else None
    trainer = ParallelTrainer(wrapped, backend, optimizer, built, period, lr_scheduler=scheduler,
                              max_grad_norm=float(max_grad_norm), fsdp_units=units)
    if comm_options is not None:
        _attach_ledger(trainer, comm_options, dict(fsdp_kwargs or {}), dict(ddp_kwargs or {}))
    return trainer


def _validate_setup(model, backend, optimizer, optimizer_kwargs, period, max_grad_norm, wrapper_kwargs,
                    wrapper_kwargs_name) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {_describe(model)}")
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {', '.join(map(repr, BACKENDS))} "
                         "(DeepSpeed runs through pma_dist's DeepSpeed integration instead)")
    if optimizer_kwargs is not None and not isinstance(optimizer_kwargs, dict):
        raise TypeError(f"optimizer_kwargs must be a dict, got {_describe(optimizer_kwargs)}")
    if optimizer_kwargs and "period" in optimizer_kwargs:
        raise ValueError(f"pass the period as setup(period=...), not in optimizer_kwargs "
                         f"(got optimizer_kwargs period={optimizer_kwargs['period']!r})")
    if wrapper_kwargs is not None and not isinstance(wrapper_kwargs, dict):
        raise TypeError(f"{wrapper_kwargs_name} must be a dict, got {_describe(wrapper_kwargs)}")
    try:
        clip = float(max_grad_norm)
    except (TypeError, ValueError):
        raise TypeError(f"max_grad_norm must be a number, got {max_grad_norm!r}") from None
    if not clip >= 0:
        raise ValueError(f"max_grad_norm must be >= 0 (0 disables clipping), got {max_grad_norm!r}")


def _resolve_period(optimizer, period) -> int:
    if optimizer not in METHODS:
        raise ValueError(f"unknown optimizer {optimizer!r}; expected one of {', '.join(map(repr, METHODS))}")
    method = get_method(optimizer)
    if period is None:
        return 8 if method.accumulation != "plain" else 1
    if isinstance(period, bool) or not isinstance(period, int) or period < 1:
        raise ValueError(f"period must be a positive int (the PMA period K / GA accumulation steps), got {period!r}")
    if method.accumulation == "plain" and period != 1:
        raise ValueError(f"{optimizer!r} steps on every micro-batch (no accumulation), so period={period} means "
                         f"nothing; for gradient accumulation over {period} micro-batches use {optimizer + '_ga'!r}")
    return period


def _fsdp_units(model: nn.Module, requested: Optional[Iterable[nn.Module]]) -> List[nn.Module]:
    """The modules to ``fully_shard`` before the root, innermost first (FSDP2 shards bottom-up)."""
    names = {id(m): name for name, m in model.named_modules()}
    if requested is None:
        block_classes = set(getattr(model, "_no_split_modules", None) or ())
        if block_classes:
            units = [m for m in model.modules() if type(m).__name__ in block_classes]
        else:
            units = [child for child in model.children() if any(True for _ in child.parameters())]
    else:
        units = list(requested)
        for index, unit in enumerate(units):
            if unit is model:
                raise ValueError("fsdp_units must not contain the root model itself (it is always sharded last)")
            if id(unit) not in names:
                raise ValueError(f"fsdp_units[{index}] ({_describe(unit)[:80]}) is not a submodule of the model")
    return sorted(units, key=lambda unit: -names[id(unit)].count("."))


def _wrap_fsdp(model: nn.Module, units: List[nn.Module], fsdp_kwargs: dict) -> nn.Module:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = fsdp_kwargs.pop("mesh", None)
    if mesh is None:
        mesh = init_device_mesh(_accelerator().device_name(), (dist.get_world_size(),))
    for unit in units:
        fully_shard(unit, mesh=mesh, **fsdp_kwargs)
    return fully_shard(model, mesh=mesh, **fsdp_kwargs)


def _wrap_ddp(model: nn.Module, ddp_kwargs: dict) -> nn.Module:
    from torch.nn.parallel import DistributedDataParallel

    accelerator = _accelerator()
    model = model.to(accelerator.current_device_name())
    if accelerator.device_name() != "cpu" and "device_ids" not in ddp_kwargs:
        ddp_kwargs["device_ids"] = [accelerator.current_device()]
    return DistributedDataParallel(model, **ddp_kwargs)


# ---------------------------------------------------------------------- communication accounting
def _attach_ledger(trainer: ParallelTrainer, profile, fsdp_kwargs: dict, ddp_kwargs: dict) -> None:
    from .comm.profile import open_ledger

    ledger = open_ledger(profile, comm_meta(trainer, fsdp_kwargs, ddp_kwargs))
    if trainer.backend == "ddp":
        # DDP's C++ reducer never calls Python collectives; the hook all-reduces each bucket through
        # torch.distributed (the same averaging as DDP's default), where the ledger sees it.
        trainer.model.register_comm_hook(None, ledger.ddp_comm_hook())
    trainer.comm_ledger = ledger


def comm_meta(trainer: ParallelTrainer, fsdp_kwargs: Optional[dict] = None, ddp_kwargs: Optional[dict] = None):
    """What ``pma_dist.comm.model`` needs to predict this trainer's traffic (a :class:`~pma_dist.comm.profile.RunMeta`)."""
    from .comm.profile import RunMeta, dtype_name

    params = [p for p in trainer.model.parameters() if p.requires_grad]
    dtype = params[0].dtype if params else torch.float32
    world = dist.get_world_size()
    if trainer.backend == "fsdp":
        mp_policy = (fsdp_kwargs or {}).get("mp_policy")
        options = {
            "fsdp_param_dtype": dtype_name(getattr(mp_policy, "param_dtype", None) or dtype),
            "fsdp_reduce_dtype": dtype_name(getattr(mp_policy, "reduce_dtype", None)
                                            or getattr(mp_policy, "param_dtype", None) or dtype),
            "fsdp_units": _fsdp_unit_meta(trainer, (fsdp_kwargs or {}).get("reshard_after_forward")),
        }
        if hasattr(trainer.optimizer, "sharded_blocks"):  # AdaPM's own sums: pma_dist.comm.adapm_model
            options["fsdp_adapm"] = trainer.optimizer.sharded_blocks()
    else:
        from torch.distributed import _DEFAULT_FIRST_BUCKET_BYTES

        cap_mb = (ddp_kwargs or {}).get("bucket_cap_mb")
        cap_bytes = int((25 if cap_mb is None else cap_mb) * 1024 * 1024)
        options = {
            "ddp_bucket_cap_bytes": cap_bytes,
            "ddp_first_bucket_bytes": _DEFAULT_FIRST_BUCKET_BYTES if cap_mb is None else cap_bytes,
            "ddp_grad_numels": [p.numel() for p in params],
            "ddp_grad_element_size": params[0].element_size() if params else 4,
        }
    return RunMeta(
        backend="fsdp2" if trainer.backend == "fsdp" else "ddp", optimizer=type(trainer.optimizer).__name__,
        schedule=trainer.schedule, world_size=world, dp_world_size=world, dtype=dtype_name(dtype),
        param_numels=[p.numel() for p in params],  # full sizes, also for FSDP2's DTensors
        param_bytes=sum(p.numel() * p.element_size() for p in params),
        gradient_clipping=trainer.max_grad_norm, backend_options=options)


def _fsdp_unit_meta(trainer: ParallelTrainer, reshard_after_forward) -> List[dict]:
    """Each fully_shard call's own parameters (full shapes), innermost first, root last.

    A unit manages the parameters of its module that no nested unit manages; FSDP2 all-gathers them
    in one message in forward, again in backward if it resharded after forward, and reduce-scatters
    their gradients in one message. ``reshard_after_forward=None`` (FSDP2's default) means True for
    every unit but the root, whose parameters are used again right away by backward.
    """
    named_units = {id(m): name for name, m in trainer.model.named_modules()}
    claimed = set()
    units = []
    for module in trainer.fsdp_units + [trainer.model]:
        own = [p for p in module.parameters() if id(p) not in claimed]
        claimed.update(id(p) for p in own)
        is_root = module is trainer.model
        units.append({"name": named_units.get(id(module), ""), "root": is_root,
                      "reshard_after_forward": (reshard_after_forward is True) if is_root
                      else (True if reshard_after_forward is None else reshard_after_forward),
                      "param_shapes": [list(p.shape) for p in own]})
    return units


def _local(tensor: Tensor) -> Tensor:
    """This rank's part of a (possibly DTensor) tensor, as a plain tensor sharing its storage."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def _describe(value) -> str:
    if isinstance(value, Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    return f"{type(value).__name__} {value!r}"
