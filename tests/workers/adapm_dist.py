"""Worker for tests/test_adapm_distributed.py: every multi-rank AdaPM check in one launch.

    torchrun --nproc_per_node=2 tests/workers/adapm_dist.py OUT.json

Rank 0 writes OUT.json. Checks:
* ddp / zero0: AdaPM under DDP, and built by DeepSpeed from ``{"type": "AdaPM"}`` with ZeRO stage 0,
  equals a single-process AdaPM run on the global batch (float64, every block policy present);
* zero1/zero2/zero3: DeepSpeed ZeRO stages that flatten parameters are refused at initialize;
* replicated_dtensor: DTensor parameters in another layout than FSDP2's row shards are refused at
  construction (FSDP2 itself: tests/workers/adapm_fsdp.py).
"""
from __future__ import annotations

import json
import sys
import traceback

import torch
import torch.distributed as dist
from torch import nn

import pma_dist
from pma_dist.adapm import AdaPM
from pma_dist.distributed import init_distributed, shutdown

WIDTH, MICRO_BATCH, STEPS = 8, 4, 6
OPT = dict(lr=2e-2, betas=[0.9, 0.95], eps=1e-3, weight_decay=0.1, rank_ratio=0.25, update_interval=3,
           inner_steps=2)


class TinyBlock(nn.Module):
    """Names the policy rules know: q/k low-rank, v full, o_proj none, MLP low-rank, norm full."""

    def __init__(self):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(WIDTH, WIDTH, bias=False) for _ in range(4))
        self.mlp = nn.Module()
        self.mlp.fc1 = nn.Linear(WIDTH, 2 * WIDTH)
        self.mlp.fc2 = nn.Linear(2 * WIDTH, WIDTH)

    def forward(self, x):
        h = self.o_proj(self.q_proj(x) + self.k_proj(x) + self.v_proj(x))
        return self.mlp.fc2(self.mlp.fc1(h))


def model(dtype):
    torch.manual_seed(0)
    return TinyBlock().to(dtype)


def batch(step, world, dtype):
    gen = torch.Generator().manual_seed(100 + step)
    return (torch.randn(world * MICRO_BATCH, WIDTH, generator=gen, dtype=dtype),
            torch.randn(world * MICRO_BATCH, WIDTH, generator=gen, dtype=dtype))


def local(tensors, rank):
    return [t[rank * MICRO_BATCH:(rank + 1) * MICRO_BATCH] for t in tensors]


def reference(world, dtype):
    net = model(dtype)
    opt = AdaPM(net.named_parameters(), **OPT)
    for step in range(STEPS):
        x, y = batch(step, world, dtype)
        opt.zero_grad()
        nn.functional.mse_loss(net(x), y).backward()
        opt.step()
    return {n: p.detach() for n, p in net.named_parameters()}


def max_abs(ref):
    return max(p.abs().max().item() for p in ref.values())


def max_diff(named, ref):
    return max((p.detach() - ref[n]).abs().max().item() for n, p in named)


def run_ddp(rank, world, ref):
    net = model(torch.float64)
    ddp = nn.parallel.DistributedDataParallel(net)
    opt = AdaPM(net.named_parameters(), **OPT)
    for step in range(STEPS):
        x, y = local(batch(step, world, torch.float64), rank)
        opt.zero_grad()
        nn.functional.mse_loss(ddp(x), y).backward()
        opt.step()
    return {"max_diff": max_diff(net.named_parameters(), ref)}


def ds_config(stage, dtype_section=None):
    cfg = {"train_micro_batch_size_per_gpu": MICRO_BATCH, "gradient_accumulation_steps": 1,
           "gradient_clipping": 0.0, "steps_per_print": 10 ** 6,
           "optimizer": {"type": "AdaPM", "params": OPT}, "zero_optimization": {"stage": stage}}
    cfg.update(dtype_section or {})
    return cfg


def run_zero0(rank, world, ref):
    import deepspeed
    net = model(torch.float32)  # DeepSpeed does not all-reduce float64 gradients
    engine, opt, _, _ = deepspeed.initialize(model=net, model_parameters=net.parameters(), config=ds_config(0))
    inner = getattr(opt, "optimizer", opt)
    policies = {r["name"]: r["policy"] for r in inner.memory_report()}
    for step in range(STEPS):
        x, y = local(batch(step, world, torch.float32), rank)
        loss = nn.functional.mse_loss(engine(x), y)
        engine.backward(loss)
        engine.step()
    return {"max_diff": max_diff(net.named_parameters(), ref), "max_abs": max_abs(ref),
            "optimizer": type(inner).__name__,
            "policies": policies}


def run_refused(rank, world, stage, dtype_section=None):
    """Initialize and take one step; report where (if anywhere) AdaPM refused."""
    import deepspeed
    net = model(torch.float32)
    where = "initialize"
    try:
        engine, _, _, _ = deepspeed.initialize(model=net, model_parameters=net.parameters(),
                                               config=ds_config(stage, dtype_section))
        try:  # what an integration calling AdaPM's engine check at set-up time reports
            engine.basic_optimizer.check_deepspeed_engine(engine)
            engine_check = None
        except ValueError as err:
            engine_check = str(err)
        where = "first step"
        x, y = local(batch(0, world, torch.float32), rank)
        x = x.to(engine.module.q_proj.weight.dtype)
        y = y.to(x.dtype)
        engine.backward(nn.functional.mse_loss(engine(x), y))
        engine.step()
    except Exception as err:  # noqa: BLE001 - the message is what the test checks
        return {"error": f"{type(err).__name__}: {err}", "where": where,
                "engine_check": engine_check if where == "first step" else None}
    return {"error": None, "where": None}


def run_replicated_dtensor():
    from deepspeed.accelerator import get_accelerator
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, distribute_tensor
    net = model(torch.float32)
    mesh = init_device_mesh(get_accelerator().device_name(), (dist.get_world_size(),))
    for name, p in list(net.named_parameters()):
        module_name, _, attr = name.rpartition(".")
        setattr(net.get_submodule(module_name), attr, nn.Parameter(distribute_tensor(p.detach(), mesh, [Replicate()])))
    try:
        AdaPM(net.named_parameters(), **OPT)
    except Exception as err:  # noqa: BLE001
        return {"error": f"{type(err).__name__}: {err}"}
    return {"error": None}


def main():
    out = sys.argv[1]
    info = init_distributed()
    rank, world = info.rank, info.world_size
    results = {"pma_dist_exports_adapm": getattr(pma_dist, "AdaPM", None) is AdaPM}
    # float64 for DDP; DeepSpeed does not all-reduce float64 gradients, so ZeRO-0 is compared in float32
    # (a low-rank refit near a singular-value tie turns fp32 rounding into a different subspace)
    ref64, ref32 = reference(world, torch.float64), reference(world, torch.float32)
    checks = [("ddp", lambda: run_ddp(rank, world, ref64)), ("zero0", lambda: run_zero0(rank, world, ref32)),
              ("zero1", lambda: run_refused(rank, world, 1)), ("zero2", lambda: run_refused(rank, world, 2)),
              ("zero3", lambda: run_refused(rank, world, 3)),
              ("bf16_zero0", lambda: run_refused(rank, world, 0, {"bf16": {"enabled": True}})),
              ("replicated_dtensor", run_replicated_dtensor)]
    for name, check in checks:
        try:
            results[name] = check()
        except Exception:  # noqa: BLE001 - report, let the test fail with the traceback
            results[name] = {"crash": traceback.format_exc()}
        dist.barrier()
    if rank == 0:
        with open(out, "w") as f:
            json.dump(results, f, indent=1)
    shutdown(0)


if __name__ == "__main__":
    main()
