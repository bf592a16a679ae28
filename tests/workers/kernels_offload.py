"""2 ranks: the fused CPU kernel under DeepSpeed ZeRO-Offload equals the foreach path.

For ZeRO-2 and ZeRO-3 with ``offload_optimizer: cpu``, and for AdamWPMA and LionPMA built from the
config (``optimizer.type``), trains the same deep linear net twice, with no ``fused`` key (the
default, as in the shipped ``ds_configs/*offload*``) and with ``fused: false``, and records the largest relative parameter difference, how many times the fused kernel ran
and on which tensors (DeepSpeed's fp32 CPU partitions). ``tests/test_kernels.py`` asserts on it.

Usage: ``torchrun --nproc_per_node=2 kernels_offload.py OUT.json``
"""
from __future__ import annotations

import json
import logging
import sys
import traceback
import warnings
from pathlib import Path

import torch
import torch.distributed as dist

import pma_dist
import pma_dist.kernels as kernels
from pma_dist.distributed import pop_local_rank_arg, run_rank, shutdown

import deepspeed  # noqa: E402  (after pma_dist, as a user would)
from deepspeed.utils import logger as ds_logger  # noqa: E402

PERIOD, STEPS, DIM, DEPTH, MICRO = 4, 8, 16, 4, 2
HYPER = {
    "AdamWPMA": {"lr": 1e-2, "betas": [0.9, 0.95], "eps": 1e-3, "weight_decay": 0.01, "period": PERIOD},
    "LionPMA": {"lr": 1e-3, "betas": [0.95, 0.98], "weight_decay": 0.01, "period": PERIOD},
}
FUSED_CALLS = []


def spy(name):
    real = getattr(kernels, name)

    def wrapper(params, *args, **kwargs):
        FUSED_CALLS.append({"tensors": len(params), "devices": sorted({p.device.type for p in params}),
                            "dtypes": sorted({str(p.dtype) for p in params})})
        return real(params, *args, **kwargs)

    setattr(kernels, name, wrapper)


def make_model():
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(DIM, DIM) for _ in range(DEPTH)])
    with torch.no_grad():
        for layer in model:
            torch.nn.init.orthogonal_(layer.weight)
    return model


def train(stage: int, optimizer: str, fused, rank: int):
    params = dict(HYPER[optimizer]) if fused is None else dict(HYPER[optimizer], fused=fused)
    cfg = {"train_micro_batch_size_per_gpu": MICRO, "gradient_accumulation_steps": 1, "gradient_clipping": 0.0,
           "steps_per_print": 10**6,
           "optimizer": {"type": optimizer, "params": params},
           "zero_optimization": {"stage": stage, "offload_optimizer": {"device": "cpu", "pin_memory": False}}}
    model = make_model()
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=cfg)
    gen = torch.Generator().manual_seed(100 + rank)
    for _ in range(STEPS):
        x, y = torch.randn(MICRO, DIM, generator=gen), torch.randn(MICRO, DIM, generator=gen)
        engine.backward(torch.nn.functional.mse_loss(engine(x), y))
        engine.step()
    params = list(engine.module.parameters())
    with deepspeed.zero.GatheredParameters(params, enabled=stage == 3):
        return [p.detach().clone() for p in params]


def main():
    pop_local_rank_arg()
    out = Path(sys.argv[1])
    ds_logger.setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning)
    deepspeed.init_distributed(dist_backend="gloo")
    rank = dist.get_rank()
    spy("adamw_pma_fused")
    spy("lion_pma_fused")
    results = {"pma_dist": pma_dist.__version__}
    for stage in (2, 3):
        for optimizer in ("AdamWPMA", "LionPMA"):
            case = f"zero{stage}_{optimizer}"
            try:
                plain = train(stage, optimizer, False, rank)
                calls_before = len(FUSED_CALLS)
                fused = train(stage, optimizer, None, rank)  # the default path
                calls = FUSED_CALLS[calls_before:]
                start = [p.detach() for p in make_model().parameters()]
                diff = max(((f - p).abs().max() / (p - s).abs().max()).item()
                           for f, p, s in zip(fused, plain, start))
                results[case] = {"max_rel_diff_of_update": diff,
                                 "bit_identical": all(torch.equal(f, p) for f, p in zip(fused, plain)),
                                 "fused_calls": len(calls), "fused_devices": sorted({d for c in calls for d in c["devices"]}),
                                 "fused_dtypes": sorted({d for c in calls for d in c["dtypes"]})}
            except Exception:
                results[case] = {"error": traceback.format_exc()}
            dist.barrier()
    if rank == 0:
        out.write_text(json.dumps(results, indent=1))
    shutdown(0)


if __name__ == "__main__":
    run_rank(main)
