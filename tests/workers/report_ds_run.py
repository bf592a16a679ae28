"""Two profiled DeepSpeed runs in one launch, PMA then GA, each configured purely from the JSON config.

Usage: report_ds_run.py RUN_ROOT [--stage 2] [--period 4] [--periods 3] [--dtype fp32|bf16]

Writes RUN_ROOT/pma and RUN_ROOT/ga: every rank's comm_rank{r}.json and, from rank 0 when the engine
is destroyed, the run's own report (report.json / report.md / PNGs) -- the end-of-run path users get.
"""
import argparse
import os
import sys

import torch

import deepspeed
import pma_dist  # noqa: F401  (registers "AdamWPMA" for the JSON config and honours "comm_profile")
import torch.distributed as dist
from pma_dist.distributed import shutdown


def deep_linear(seed: int = 0) -> torch.nn.Module:
    # Sizes not divisible by 2 * world size, so ZeRO's partition padding shows in the bytes.
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 9), torch.nn.Linear(9, 5), torch.nn.Linear(5, 1, bias=False))


def config(kind: str, stage: int, period: int, dtype: str, world: int, out: str) -> dict:
    gas = 1 if kind == "pma" else period
    params = {"lr": 1e-3, "weight_decay": 0.0}
    if kind == "pma":
        params["period"] = period
    else:  # torch.optim.AdamW, as the shipped GA configs: DeepSpeed's FusedAdam would be JIT-built on CPU
        params["torch_adam"] = True  # (minutes), and the collectives counted here do not depend on it
    cfg = {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": gas,
        "train_batch_size": 2 * gas * world,
        "gradient_clipping": 0.0,
        "optimizer": {"type": "AdamWPMA" if kind == "pma" else "AdamW", "params": params},
        "zero_optimization": {"stage": stage},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "comm_profile": {"enabled": True, "output_dir": out},
    }
    if dtype == "bf16":
        cfg["bf16"] = {"enabled": True}
    return cfg


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("run_root")
    parser.add_argument("--stage", type=int, default=2)
    parser.add_argument("--period", type=int, default=4)
    parser.add_argument("--periods", type=int, default=3)
    parser.add_argument("--dtype", default="fp32")
    args = parser.parse_args()

    deepspeed.init_distributed(dist_backend="gloo")
    world = dist.get_world_size()
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    for kind in ("pma", "ga"):
        model = deep_linear()
        out = os.path.join(args.run_root, kind)
        engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(),
                                          config=config(kind, args.stage, args.period, args.dtype, world, out))
        torch.manual_seed(1 + dist.get_rank())
        for _ in range(args.period * args.periods):
            loss = engine(torch.randn(2, 6, dtype=dtype)).float().pow(2).mean()
            engine.backward(loss)
            engine.step()
        engine.destroy()  # closes the ledger: final files, then rank 0 writes the run's report
    sys.stdout.flush()
    shutdown(0)


if __name__ == "__main__":
    main()
