"""FSDP2 loading without a full model on any rank: parameters on the meta device, sharded, then filled.

:func:`meta_model` builds the architecture with every parameter on the meta device (no memory; buffers
such as rotary frequencies are real, computed as usual); ``fully_shard`` then shards the meta
parameters; :func:`fill_from_checkpoint` allocates each rank's shards and copies them from the
checkpoint's safetensors files one tensor at a time, each rank slicing its own shard, so the most a
rank holds beyond its shards is the largest single tensor of the checkpoint.
"""
from __future__ import annotations

from pathlib import Path

import torch

from .config import ConfigError


def meta_model(model_dir: str, dtype: torch.dtype, trust_remote_code: bool):
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    model.tie_weights()  # from_pretrained ties tied embeddings after loading; on the meta device it must be asked
    return model


def is_meta(model: torch.nn.Module) -> bool:
    return any(p.is_meta for p in model.parameters())


def checkpoint_files(model_dir: str):
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise ConfigError(f"--backend fsdp loads shards from safetensors files, and {model_dir} has none "
                          f"(convert the checkpoint with save_pretrained(..., safe_serialization=True))")
    return files


@torch.no_grad()
def fill_from_checkpoint(module: torch.nn.Module, model_dir: str, device) -> int:
    """Allocate ``module``'s (sharded) meta parameters on ``device`` and copy them from ``model_dir``.

    Returns the number of tensors copied. Every parameter must be in the checkpoint (tied ones appear
    once in ``named_parameters``); a missing one raises :class:`ConfigError` naming it.
    """
    from safetensors import safe_open
    from torch.distributed.tensor import DTensor, distribute_tensor

    buffers = {name: b.detach().clone() for name, b in module.named_buffers()}
    module.to_empty(device=device)
    for name, b in module.named_buffers():  # to_empty replaced the real buffers too: put them back
        b.copy_(buffers[name])
    where = {}
    handles = [safe_open(str(f), "pt", device="cpu") for f in checkpoint_files(model_dir)]
    for handle in handles:
        for key in handle.keys():
            where[key] = handle
    copied = 0
    for name, param in module.named_parameters():
        handle = where.get(name)
        if handle is None:
            raise ConfigError(f"checkpoint {model_dir} has no tensor {name!r} for the model's parameter")
        full = handle.get_tensor(name).to(param.dtype)
        if isinstance(param, DTensor):
            # src_data_rank=None: every rank slices its own shard of the tensor it read (no scatter)
            shard = distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None)
            param.to_local().copy_(shard.to_local())
        else:
            param.copy_(full)
        copied += 1
        del full
    return copied
