"""The few operations the post-training loop needs from a data-parallel backend, for DeepSpeed and FSDP2/DDP.

The loop (:mod:`recipes.posttrain.trainer`) only ever: runs one training micro-step
(:meth:`micro_step`: forward, backward, and the optimizer step when it is due), reads the bare
module for evaluation, switches train/eval mode, counts optimizer steps, saves and loads a checkpoint
tag, and releases the backend. :class:`DeepSpeedBackend` maps these onto a DeepSpeed engine;
:class:`TorchBackend` onto :class:`pma_dist.torch_parallel.ParallelTrainer`, which already owns the
PMA-vs-GA accumulation (FSDP2 ``set_requires_gradient_sync`` / DDP ``no_sync``), DCP checkpoints and
the communication ledger. Nothing about those is re-decided here.
"""
from __future__ import annotations

import dataclasses
import gc
from pathlib import Path
from typing import Callable, Optional

import torch

from . import checkpoints


class DeepSpeedBackend:
    """A DeepSpeed engine: ``engine.backward`` + ``engine.step`` per micro-batch (DeepSpeed accumulates GA)."""

    checkpoint_format = "deepspeed"

    def __init__(self, engine, trust_checkpoint: bool):
        self.engine = engine
        checkpoints.install_safe_engine(engine, trust=trust_checkpoint)

    @property
    def module(self) -> torch.nn.Module:
        return self.engine.module

    @property
    def optimizer(self):
        engine = self.engine
        return engine.basic_optimizer if getattr(engine, "basic_optimizer", None) is not None else engine.optimizer

    @property
    def global_steps(self) -> int:
        return int(self.engine.global_steps)

    def train(self) -> None:
        self.engine.train()

    def eval(self) -> None:
        self.engine.eval()

    def micro_step(self, loss_fn: Callable[[torch.nn.Module], torch.Tensor]) -> torch.Tensor:
        loss = loss_fn(self.engine)
        self.engine.backward(loss)
        self.engine.step()
        return loss

    def full_state_dict(self) -> Optional[dict]:
        """The whole model's weights on rank 0 (None elsewhere); collective under ZeRO-3, which gathers
        one layer at a time so no rank holds the model twice."""
        if self.engine.zero_optimization_partition_weights():
            return self.engine._zero3_consolidated_16bit_state_dict()  # training dtype despite its name
        return self.engine.module.state_dict() if torch.distributed.get_rank() == 0 else None

    def save(self, ckpt_dir: Path, tag: str, client_state: dict) -> None:
        self.engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client_state, save_latest=False)

    def load(self, ckpt_dir: Path, tag: str) -> None:
        path, _ = self.engine.load_checkpoint(str(ckpt_dir), tag=tag)
        if path is None:
            raise checkpoints.CheckpointError(f"DeepSpeed could not load checkpoint {ckpt_dir / tag}")

    def release(self) -> None:
        """Free the engine so a benchmark can build the next one in the same process."""
        try:
            self.engine.destroy()
        except Exception:  # older DeepSpeed without destroy(): dropping references is enough on CPU
            pass
        self.engine = None
        gc.collect()


class TorchBackend:
    """FSDP2 or DDP through :func:`pma_dist.torch_parallel.setup`; checkpoints are DCP directories."""

    checkpoint_format = "dcp"

    def __init__(self, trainer):
        self.trainer = trainer

    @property
    def module(self) -> torch.nn.Module:
        return self.trainer.module

    @property
    def optimizer(self):
        return self.trainer.optimizer

    @property
    def global_steps(self) -> int:
        # the same meaning as DeepSpeed's counter: optimizer steps taken so far
        return self.trainer.micro_steps // self.trainer.accumulation_steps

    def train(self) -> None:
        self.trainer.model.train()

    def eval(self) -> None:
        self.trainer.model.eval()

    def micro_step(self, loss_fn: Callable[[torch.nn.Module], torch.Tensor]) -> torch.Tensor:
        return self.trainer.micro_step(loss_fn).loss

    def full_state_dict(self) -> Optional[dict]:
        """The whole model's weights on rank 0 (None elsewhere): FSDP2's shards gathered to the host, one
        tensor at a time (collective on every rank)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(self.trainer.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return full if torch.distributed.get_rank() == 0 else None

    def save(self, ckpt_dir: Path, tag: str, client_state: dict) -> None:
        # client_state goes into the manifest (checkpoints.write_manifest), as under DeepSpeed
        self.trainer.save(ckpt_dir / tag)

    def load(self, ckpt_dir: Path, tag: str) -> None:
        try:
            self.trainer.load(ckpt_dir / tag)
        except (FileNotFoundError, ValueError) as exc:
            raise checkpoints.CheckpointError(f"could not load checkpoint {ckpt_dir / tag}: {exc}") from None

    def release(self) -> None:
        self.trainer.close()  # final comm-ledger write; a no-op without --comm-profile
        self.trainer = None
        gc.collect()


def _comm_section(profile) -> Optional[dict]:
    """The ``comm_profile`` section :func:`pma_dist.torch_parallel.setup` takes, from the parsed profile."""
    return None if profile is None else dict(dataclasses.asdict(profile), enabled=True)


def build_torch_backend(cfg, model) -> TorchBackend:
    """Wrap ``model`` with FSDP2 or DDP and build the optimizer named by ``cfg`` (process group must exist)."""
    from pma_dist.torch_parallel import setup

    kwargs = dict(cfg.optimizer_params)
    kwargs["betas"] = tuple(kwargs["betas"])
    trainer = setup(model, backend=cfg.settings.backend, optimizer=cfg.optimizer, optimizer_kwargs=kwargs,
                    period=cfg.period, max_grad_norm=cfg.gradient_clipping,
                    comm_profile=_comm_section(cfg.comm_profile))
    return TorchBackend(trainer)
