"""How large AdamW-PMA's small steps are, relative to the large step, at each position tau of the period.

Zero-mean Gaussian gradients (pure noise, the regime where averaging matters most), one 200k-element
tensor, weight decay 0, eps 1e-12; the mean |delta theta| of each tau over periods 11-20, divided by the
large step's. Compares the measured decay with 1/sqrt(tau+1) (what a uniform mean of tau+1 noise
gradients gives) and with the 1/(tau+1) learning-rate decay that the paper's section 3.2.2 describes.

    python benchmarks/small_step_size.py [--period 8] [--out benchmarks/results/small_step_size.json]
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pma_dist import AdamWPMA  # noqa: E402


def relative_step_sizes(variant: str, period: int, periods: int = 20, numel: int = 200_000) -> list:
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.zeros(numel))
    opt = AdamWPMA([p], lr=1e-3, weight_decay=0.0, period=period, variant=variant, eps=1e-12)
    sizes = [[] for _ in range(period)]
    for t in range(1, periods * period + 1):
        before = p.detach().clone()
        p.grad = torch.randn_like(p)
        opt.step()
        if t > periods // 2 * period:  # leave the bias-correction transient out
            sizes[t % period].append((p.detach() - before).abs().mean().item())
    large = sum(sizes[0]) / len(sizes[0])
    return [sum(s) / len(s) / large for s in sizes[1:]]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--period", type=int, default=8)
    parser.add_argument("--out", default="benchmarks/results/small_step_size.json")
    args = parser.parse_args(argv)
    if args.period < 2:
        parser.error(f"--period must be >= 2 (a period needs small steps), got {args.period}")
    rows = {variant: relative_step_sizes(variant, args.period) for variant in ("paper", "reference")}
    taus = range(1, args.period)
    print(f"small-step |delta theta| / large-step |delta theta|, K = {args.period}, zero-mean gradients\n")
    print("| tau | " + " | ".join(str(t) for t in taus) + " |")
    print("|---|" + "---|" * len(taus))
    for variant, values in rows.items():
        print(f"| {variant} | " + " | ".join(f"{v:.3f}" for v in values) + " |")
    print("| 1/sqrt(tau+1) | " + " | ".join(f"{1 / math.sqrt(t + 1):.3f}" for t in taus) + " |")
    print("| 1/(tau+1) (paper 3.2.2) | " + " | ".join(f"{1 / (t + 1):.3f}" for t in taus) + " |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"period": args.period, "relative_small_step": rows,
                                          "command": " ".join(["python", "benchmarks/small_step_size.py"] +
                                                              list(argv or sys.argv[1:]))}, indent=1) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
