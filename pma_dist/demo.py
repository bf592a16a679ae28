"""A one-minute, single-process look at PMA vs gradient accumulation: ``python -m pma_dist.demo``.

A small MLP regresses a fixed random teacher from noisy micro-batches. Every optimizer sees the same
micro-batches in the same order; GA runs step once per K micro-batches, PMA runs and plain AdamW step
on every one.
No data files, no network. For the real distributed job see ``launch/quickstart.py``.
"""
from __future__ import annotations

import argparse
import time

import torch

from .methods import get_method


def make_task(seed: int, dim: int = 16, noise: float = 1.0):
    gen = torch.Generator().manual_seed(seed)
    teacher = torch.nn.Sequential(torch.nn.Linear(dim, 64), torch.nn.Tanh(), torch.nn.Linear(64, 1))
    for p in teacher.parameters():
        p.data = 2 * torch.randn(p.shape, generator=gen) / p.shape[-1] ** 0.5

    def batch(step: int, size: int):
        g = torch.Generator().manual_seed(seed * 100_003 + step)
        x = torch.randn(size, dim, generator=g)
        with torch.no_grad():
            y = teacher(x) + noise * torch.randn(size, 1, generator=g)
        return x, y

    x_eval, y_eval = batch(-1, 4096)
    return batch, (x_eval, y_eval), dim


def train(method: str, lr: float, period: int, micro_steps: int, micro_batch: int, seed: int) -> list:
    """Eval MSE after every K micro-steps of ``method`` (a name of :mod:`pma_dist.methods`)."""
    batch, (x_eval, y_eval), dim = make_task(seed)
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(dim, 64), torch.nn.Tanh(), torch.nn.Linear(64, 1))
    chosen = get_method(method)
    k = 1 if chosen.accumulation == "plain" else period
    schedule = chosen.schedule(k)
    opt = chosen.build(model.parameters(), k, lr=lr, weight_decay=0.0)
    curve = []
    for i in range(micro_steps):
        x, y = batch(i + 1, micro_batch)
        loss = torch.nn.functional.mse_loss(model(x), y)
        (loss / schedule.accumulation).backward()
        if schedule.steps_optimizer(i):
            opt.step()
            opt.zero_grad()
        if (i + 1) % period == 0:  # the comparison's unit: every K micro-batches, whatever the method
            with torch.no_grad():
                curve.append(torch.nn.functional.mse_loss(model(x_eval), y_eval).item())
    return curve


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--period", type=int, default=8, help="K: micro-batches per GA step / PMA period")
    parser.add_argument("--micro-steps", type=int, default=400)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--seeds", type=int, default=2)
    args = parser.parse_args(argv)
    if args.period < 1 or args.micro_steps < args.period or args.micro_batch < 1 or args.seeds < 1:
        parser.error(f"need period >= 1, micro-steps >= period, micro-batch >= 1, seeds >= 1; got {vars(args)}")

    lrs = [1e-3, 3e-3, 1e-2]
    methods = ["adamw_ga", "adamw", "adamw_pma_reference", "adamw_pma"]
    print(f"MLP teacher regression, K={args.period}, micro-batch {args.micro_batch}, {args.micro_steps} micro-steps, "
          f"{args.seeds} seeds; eval MSE (noise floor 1.0) after the last micro-step, best lr per method\n")
    print(f"{'method':<26}{'best lr':>9}{'final eval MSE':>16}{'  (all lrs)':<10}")
    start = time.perf_counter()
    for method in methods:
        finals = {}
        for lr in lrs:
            runs = [train(method, lr, args.period, args.micro_steps, args.micro_batch, s)[-1] for s in range(args.seeds)]
            finals[lr] = sum(runs) / len(runs)
        best = min(finals, key=finals.get)
        sweep = "  ".join(f"{lr:g}:{v:.3f}" for lr, v in finals.items())
        print(f"{get_method(method).display:<26}{best:>9g}{finals[best]:>16.4f}  {sweep}")
    print(f"\n({time.perf_counter() - start:.1f} s)")


if __name__ == "__main__":
    main()
