"""AdaPM under FSDP2 (``fully_shard``) on 2 ranks: optimizer-state bytes per rank and loss, next to
FSDP2 AdamW, on the pre-training task of ``benchmarks/adapm.py`` (same model, batches, schedule,
clipping; each rank takes half of every global batch).

    torchrun --nproc_per_node=2 benchmarks/adapm_fsdp.py --out benchmarks/results/adapm_fsdp
    torchrun --nproc_per_node=2 benchmarks/adapm_fsdp.py --out /tmp/adapm_fsdp --steps 20   # smoke run

Rank 0 writes ``OUT/summary.json`` and ``OUT/summary.md`` (the rows for ``docs/BENCHMARKS.md``).
Memory is measured on the state tensors each rank holds (their local shards; the replicated low-rank
factors counted in full on every rank, and listed apart); DDP AdaPM's is the unsharded optimizer's.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import platform
import time
from pathlib import Path

import torch
import torch.distributed as dist

HERE = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("adapm_benchmark", HERE / "adapm.py")
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)  # also puts the repository on sys.path

from pma_dist.distributed import init_distributed, shutdown  # noqa: E402


def local_bytes(t) -> int:
    t = t.to_local() if hasattr(t, "to_local") else t
    return t.numel() * t.element_size()


def shard(model):
    from torch.distributed.fsdp import fully_shard
    for block in model.transformer.h:
        fully_shard(block)
    return fully_shard(model)


def run(task, kind: str, lr: float, rank: int, world: int) -> dict:
    model = shard(task.model())
    model.train()
    opt = bench.make_optimizer(kind, model, lr, task.num_heads)
    per_rank = task.batch_size // world
    losses, started = [], time.perf_counter()
    for step in range(task.steps):
        for group in opt.param_groups:
            group["lr"] = bench.lr_at(step, task.steps, lr)
        opt.zero_grad(set_to_none=True)
        tokens = task.batch(step)["tokens"][rank * per_rank:(rank + 1) * per_rank]
        loss = task.loss(model, {"tokens": tokens})
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), bench.GRAD_CLIP)
        opt.step()
        mean = loss.detach().clone()
        dist.all_reduce(mean)
        losses.append(mean.item() / world)  # the global batch's loss
        if not math.isfinite(losses[-1]):
            break
    seconds = time.perf_counter() - started
    model.eval()
    eval_loss = task.eval_loss(model) if math.isfinite(losses[-1]) else float("nan")
    state = sum(local_bytes(t) for s in opt.state.values() for k, t in s.items() if k != "step")
    replicated = sum(r["replicated_bytes"] for r in opt.memory_report()) if kind != "adamw" else 0
    mine = dict(state_bytes=state, replicated_bytes=replicated)
    everyone = [None] * world
    dist.all_gather_object(everyone, mine)
    tail = losses[-max(1, task.steps // 10):]
    return dict(optimizer=kind, lr=lr, steps=task.steps, eval_loss=eval_loss, final_train_loss=sum(tail) / len(tail),
                seconds=seconds, per_rank=everyone, ddp_state_bytes=unsharded_state_bytes(task, kind, lr))


def unsharded_state_bytes(task, kind: str, lr: float) -> int:
    """The same optimizer on the whole model (what DDP holds on every rank), from its plan / shapes."""
    model = task.model()
    if kind == "adamw":
        return sum(2 * p.numel() * 4 for p in model.parameters())
    report = bench.make_optimizer(kind, model, lr, task.num_heads).memory_report()
    return sum(r["momentum_bytes"] + r["second_moment_bytes"] for r in report)


def table(rows, command: str, world: int) -> str:
    lines = [f"Command: `{command}` ({world} ranks, gloo, CPU)", "",
             "| optimizer | lr | eval loss | final train loss | state bytes per rank (rank 0 / rank 1) | "
             "of which replicated | DDP (unsharded) state bytes per rank | s/run |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        per = " / ".join(f"{x['state_bytes']:,}" for x in r["per_rank"])
        rep = " / ".join(f"{x['replicated_bytes']:,}" for x in r["per_rank"])
        lines.append(f"| fsdp2 {r['optimizer']} | {r['lr']:g} | {r['eval_loss']:.4f} | {r['final_train_loss']:.4f} | "
                     f"{per} | {rep} | {r['ddp_state_bytes']:,} | {r['seconds']:.0f} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--runs", default="adamw:0.002,adapm:0.003,adapm_mini:0.003",
                        help="optimizer:lr pairs (default: each one's best lr of benchmarks/adapm.py's sweep)")
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error(f"--steps must be >= 1, got {args.steps}")
    try:
        runs = [(k, float(lr)) for k, lr in (item.split(":") for item in args.runs.split(","))]
    except ValueError:
        parser.error(f"--runs={args.runs!r}: expected optimizer:lr pairs such as adapm:0.003")
    bad = sorted({k for k, _ in runs} - {"adamw", "adapm", "adapm_mini"})
    if bad:
        parser.error(f"--runs={args.runs!r}: unknown optimizer(s) {bad}")
    torch.set_num_threads(1)
    info = init_distributed()
    rank, world = info.rank, info.world_size
    if bench.Pretrain.batch_size % world:
        raise SystemExit(f"the global batch of {bench.Pretrain.batch_size} does not split over {world} ranks")
    task = bench.Pretrain(args.steps, quick=False)
    rows = []
    for kind, lr in runs:
        rows.append(run(task, kind, lr, rank, world))
        if rank == 0:
            r = rows[-1]
            print(f"[fsdp2] {kind} lr={lr:g}: eval {r['eval_loss']:.4f} state/rank "
                  f"{[x['state_bytes'] for x in r['per_rank']]} ({r['seconds']:.0f}s)", flush=True)
    if rank == 0:
        command = f"torchrun --nproc_per_node={world} benchmarks/adapm_fsdp.py --out {args.out} --steps {args.steps}"
        text = table(rows, command, world)
        print(text)
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "summary.md").write_text(text)
        (args.out / "summary.json").write_text(json.dumps(
            {"command": command, "machine": platform.platform(), "processor": platform.processor(),
             "torch": torch.__version__, "runs": rows}, indent=1))
    shutdown(0)


if __name__ == "__main__":
    main()
