#!/usr/bin/env python
"""PMA vs gradient accumulation on real post-training data: time (and samples) to the GA run's loss.

    python benchmarks/post_training.py                 # run what is missing, then write the report
    python benchmarks/post_training.py --report-only   # only aggregate finished runs
    python benchmarks/post_training.py --model runs/base_3m --out runs/bench_base_3m --name base_3m \
        --grid sft_alpaca adamw 3e-4 1e-3 3e-3 ...      # another base model, its own lr grids
    python benchmarks/post_training.py --name base_3m --page-only   # re-write the page from the results

The report of a result set ``--name`` (default ``stories260k``) goes to
``benchmarks/results/post_training/NAME/`` (``results.json`` and the plots) and to the ``NAME``
section of ``docs/bench/post_training.md`` (every table, every run); ``docs/BENCHMARKS.md`` quotes
the headline rows.

Tasks: SFT on alpaca_mix and on gsm8k, DPO on HH-RLHF pairs (all from ``../shared/data``), of
stories260K by default or of any local HF model given by ``--model`` (e.g. the ~3M-parameter base
that ``launch/pretrain_base.py`` pretrains on ``../shared/data/text``). Methods: AdamW-PMA
(reference and paper variants) and Lion-PMA stepping every micro-batch, AdamW-K and Lion-K
accumulating K micro-batches; K in --periods; same micro-batch, data order and seed for all.
2 ranks, DeepSpeed ZeRO-0, CPU.

Protocol (best vs best): stage A sweeps the learning rate on the first seed; stage B runs the
other seeds at each (method, K)'s best lr (lowest final eval loss). gsm8k reuses alpaca's best lrs.
For each K and optimizer family the target is the GA run's final eval loss (per seed); we report
GA wall-clock / PMA wall-clock to reach it (and the same ratio in samples, which does not depend
on the hardware), final eval losses and DPO accuracy. One run = one JSON summary + metrics JSONL
under --out; finished runs are skipped, so the benchmark can be run in pieces.

All runs of one invocation share one ``deepspeed`` launch (the worker calls the trainer in a loop),
so start-up costs are paid once.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from statistics import mean

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.pages import PAGES, RESULTS, link, write_section  # noqa: E402
from pma_dist.methods import get_method  # noqa: E402
from recipes.posttrain.metrics import read_metrics, time_to_target  # noqa: E402

# the methods compared here, by their pma_dist.methods names (train.py --optimizer)
METHODS = ("adamw_pma_reference", "adamw_pma", "lion_pma", "adamw_ga", "lion_ga")
SHARED = REPO.parent / "shared" / "data"
TASKS = {  # name -> (train.py --task, data file, micro-batch, lr grids per family)
    "sft_alpaca": ("sft", SHARED / "sft" / "alpaca_mix_train.jsonl", 4,
                   {"adamw": [1e-3, 3e-3, 1e-2, 3e-2], "lion": [1e-4, 3e-4, 1e-3, 3e-3, 1e-2]}),
    "dpo_hh": ("dpo", SHARED / "dpo" / "hh_rlhf_harmless_base_test_pairs.jsonl", 2,
               {"adamw": [3e-5, 1e-4, 3e-4, 1e-3], "lion": [3e-6, 1e-5, 3e-5, 1e-4]}),
    "sft_gsm8k": ("sft", SHARED / "sft" / "gsm8k_train.jsonl", 4, None),  # None: alpaca's best lrs
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(REPO / "runs" / "bench_post_training"),
                   help="the runs (one folder each); finished runs are skipped")
    p.add_argument("--name", default="stories260k",
                   help="the result set: its section of --page and its folder under benchmarks/results/post_training")
    p.add_argument("--results", default=None,
                   help="where results.json and the plots go (default benchmarks/results/post_training/NAME)")
    p.add_argument("--page", default=str(PAGES / "post_training.md"), help="the detail page the tables go to")
    p.add_argument("--model", default=str(SHARED / "models" / "stories260K"),
                   help="HF model dir every run starts from (keep one --out per model)")
    p.add_argument("--grid", nargs="+", action="append", default=[], metavar="TASK FAMILY LR",
                   help="replace a task's lr grid for a family (adamw|lion), e.g. --grid dpo_hh adamw 3e-5 1e-4 3e-4; "
                        "repeatable")
    p.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--periods", nargs="+", type=int, default=[8, 4])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    p.add_argument("--micro-steps", type=int, default=128)
    p.add_argument("--eval-every", type=int, default=16)
    p.add_argument("--eval-size", type=int, default=64)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--variance-every", type=int, default=None,
                   help="micro-steps per measured update (default K); --periods 1 runs of the GA methods with "
                        "--variance-every K are the paper's every-micro-batch EMA baseline in the K plots")
    p.add_argument("--report-only", action="store_true", help="only aggregate the finished runs under --out")
    p.add_argument("--page-only", action="store_true",
                   help="only re-write the NAME section of --page from the committed results.json (no runs needed)")
    p.add_argument("--step-cost", action="store_true",
                   help="only measure seconds per micro-step of each method, interleaved (see docs)")
    p.add_argument("--step-cost-rounds", type=int, default=3)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.grids = parse_grids(p, args.grid)
    if not args.name or not all(c.isalnum() or c in "_-" for c in args.name):
        p.error(f"--name {args.name!r}: use letters, digits, '_' and '-' (it names a folder and a page section)")
    args.results = Path(args.results) if args.results else RESULTS / "post_training" / args.name
    return args


def parse_grids(parser, specs) -> dict:
    """task -> family -> lrs: the built-in grids with ``--grid`` overrides applied."""
    grids = {task: (dict(spec[3]) if spec[3] is not None else None) for task, spec in TASKS.items()}
    for spec in specs:
        if len(spec) < 3:
            parser.error(f"--grid {' '.join(spec)}: expected TASK FAMILY LR [LR ...]")
        task, family, *lrs = spec
        if grids.get(task) is None:
            parser.error(f"--grid task {task!r} has no grid of its own (one of "
                         f"{[t for t, g in grids.items() if g is not None]})")
        if family not in ("adamw", "lion"):
            parser.error(f"--grid family {family!r}: expected adamw or lion")
        try:
            values = [float(v) for v in lrs]
        except ValueError:
            parser.error(f"--grid {task} {family}: learning rates must be numbers, got {lrs}")
        if any(not v > 0 for v in values):
            parser.error(f"--grid {task} {family}: learning rates must be > 0, got {lrs}")
        grids[task][family] = values
    return grids


# ------------------------------------------------------------------------------ runs
def run_id(task, method, period, lr, seed) -> str:
    return f"{task}__{method}__K{period}__lr{lr:g}__s{seed}"


def summary(out: Path, rid: str):
    path = out / rid / "summary.json"
    return json.loads(path.read_text()) if path.exists() else None


def train_argv(args, out: Path, task, method, period, lr, seed):
    kind, data_file, micro_batch, _ = TASKS[task]
    return ["--task", kind, "--model", args.model, "--train-data", str(data_file), "--optimizer", method,
            "--period", str(period), "--lr", repr(lr), "--seed", str(seed),
            "--micro-batch-size", str(micro_batch), "--micro-steps", str(args.micro_steps),
            "--eval-every", str(args.eval_every), "--eval-size", str(args.eval_size),
            "--max-length", str(args.max_length), "--log-update-variance", "--variance-window", "4",
            *(["--variance-every", str(args.variance_every)] if args.variance_every else []),
            # a run without summary.json crashed earlier: it restarts (its files are set aside, not deleted)
            "--output-dir", str(out / run_id(task, method, period, lr, seed)), "--overwrite", "--no-progress"]


def lr_grid(args, task, method):
    grid = args.grids[task]
    return grid[get_method(method).family] if grid is not None else None


def best_lr(out: Path, task, method, period, seed, grid):
    finished = [(s["eval_loss"], lr) for lr in grid
                if (s := summary(out, run_id(task, method, period, lr, seed))) is not None]
    return min(finished)[1] if finished else None


def plan_stage_a(args, out, task):
    if args.grids[task] is None:
        return []
    return [(task, m, k, lr, args.seeds[0]) for k in args.periods for m in args.methods
            for lr in lr_grid(args, task, m)]


def plan_stage_b(args, out, task):
    """Other seeds at the best lr; gsm8k takes alpaca's best lrs for every seed."""
    source = task if args.grids[task] is not None else "sft_alpaca"
    grid_of = lambda m: lr_grid(args, source, m)  # noqa: E731
    seeds = args.seeds[1:] if source == task else args.seeds
    runs = []
    for k in args.periods:
        for m in args.methods:
            lr = best_lr(out, source, m, k, args.seeds[0], grid_of(m))
            if lr is not None:
                runs += [(task, m, k, lr, s) for s in seeds]
    return runs


STEP_COST_METHODS = ("adamw_pma_reference", "adamw_ga", "lion_pma", "lion_ga")
# Both AdamW-PMA variants run the same kernel at the same cost: the paper variant is not timed apart.
STEP_COST_STAND_IN = {"adamw_pma": "adamw_pma_reference"}


def step_cost_runs(args):
    """Short SFT runs cycling through the methods, so machine load hits all of them alike."""
    return [(m, k, r) for r in range(args.step_cost_rounds) for k in args.periods for m in STEP_COST_METHODS]


def step_cost_argv(args, out: Path, method, period, round_):
    argv = train_argv(args, out, "sft_alpaca", method, period, lr_grid(args, "sft_alpaca", method)[0], 0)
    argv[argv.index("--micro-steps") + 1] = str(4 * period)
    argv[argv.index("--eval-size") + 1] = "8"
    argv[argv.index("--eval-every") + 1] = "0"
    argv[argv.index("--output-dir") + 1] = str(out / "step_cost" / f"{method}__K{period}__r{round_}")
    return [a for a in argv if a not in ("--log-update-variance",)]


def worker(args) -> None:
    import torch.distributed as dist

    from pma_dist import distributed
    from recipes.posttrain import config, trainer

    out = Path(args.out)
    if args.step_cost:
        for method, period, round_ in step_cost_runs(args):
            if not (out / "step_cost" / f"{method}__K{period}__r{round_}" / "summary.json").exists():
                trainer.run(config.resolve(step_cost_argv(args, out, method, period, round_)))
        distributed.shutdown(0)
    for task in args.tasks:
        for stage in (plan_stage_a, plan_stage_b):
            dist.barrier() if dist.is_initialized() else None  # every rank sees the same finished runs
            for task_, method, period, lr, seed in stage(args, out, task):
                if summary(out, run_id(task_, method, period, lr, seed)) is not None:
                    continue
                cfg = config.resolve(train_argv(args, out, task_, method, period, lr, seed))
                result = trainer.run(cfg)
                if dist.get_rank() == 0:
                    print(f"[bench] {run_id(task_, method, period, lr, seed)}: eval_loss={result['eval_loss']:.4f} "
                          f"wall={result['wall_clock']:.1f}s", flush=True)
    distributed.shutdown(0)


def launch(args) -> None:
    with socket.socket() as s:  # a free port: other jobs may hold the default 29500
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [str(Path(sys.executable).parent / "deepspeed"), f"--num_gpus={args.nproc}", f"--master_port={port}",
           __file__, "--worker", *sys.argv[1:]]
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", HF_HUB_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    print("launching:", " ".join(cmd), flush=True)
    subprocess.run(cmd, env=env, check=True, cwd=REPO)


# ------------------------------------------------------------------------------ report
def curve(out: Path, rid: str):
    return read_metrics(out / rid / "metrics.jsonl", "eval")


def report(args) -> dict:
    out = Path(args.out)
    runs = {}
    for path in sorted(out.glob("*/summary.json")):
        runs[path.parent.name] = json.loads(path.read_text())
    if not runs:  # a report of nothing would overwrite the committed results
        raise SystemExit(f"no finished runs under {out}: nothing to report ({args.results / 'results.json'} is left as "
                         f"it is; --page-only re-writes the page from it)")
    comparisons = []
    for task in args.tasks:
        source = task if args.grids[task] is not None else "sft_alpaca"
        for k in args.periods:
            best = {}
            for m in args.methods:
                grid = lr_grid(args, source, m)
                best[m] = best_lr(out, source, m, k, args.seeds[0], grid)
            for m in METHODS:
                if not get_method(m).is_pma or m not in args.methods:
                    continue
                ga = f"{get_method(m).family}_ga"
                if best.get(m) is None or best.get(ga) is None:
                    continue
                per_seed = []
                for seed in args.seeds:
                    g, p = run_id(task, ga, k, best[ga], seed), run_id(task, m, k, best[m], seed)
                    if g not in runs or p not in runs:
                        continue
                    target = runs[g]["eval_loss"]
                    hit = time_to_target(curve(out, p), target)
                    entry = {"seed": seed, "target": target, "ga_wall": runs[g]["wall_clock"],
                             "ga_samples": runs[g]["samples"], "pma_final": runs[p]["eval_loss"],
                             "pma_wall_total": runs[p]["wall_clock"]}
                    if task.startswith("dpo"):
                        entry.update(ga_acc=runs[g].get("eval_accuracy"), pma_acc=runs[p].get("eval_accuracy"),
                                     ga_reward_acc=runs[g].get("eval_reward_accuracy"),
                                     pma_reward_acc=runs[p].get("eval_reward_accuracy"))
                    if hit is not None:
                        entry.update(pma_wall=hit[0], pma_samples=hit[1], time_ratio=runs[g]["wall_clock"] / hit[0]
                                     if hit[0] > 0 else float("inf"), sample_ratio=runs[g]["samples"] / hit[1]
                                     if hit[1] > 0 else float("inf"))
                    per_seed.append(entry)
                if per_seed:
                    comparisons.append({"task": task, "K": k, "pma": m, "ga": ga, "pma_lr": best[m],
                                        "ga_lr": best[ga], "seeds": per_seed})
    costs = step_costs(out)
    for c in comparisons:
        timed_as = STEP_COST_STAND_IN.get(c["pma"], c["pma"])
        ga_cost, pma_cost = costs.get((c["ga"], c["K"])), costs.get((timed_as, c["K"]))
        if ga_cost and pma_cost:
            c["cost_per_micro_step"] = {"ga": ga_cost, "pma": pma_cost}
            for e in c["seeds"]:
                if "sample_ratio" in e:
                    e["cost_adjusted_ratio"] = e["sample_ratio"] * ga_cost / pma_cost
    result = {"settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()
                           if k not in ("worker", "local_rank", "grid", "page_only")},
              "step_cost": {f"{m}__K{k}": v for (m, k), v in costs.items()},
              "comparisons": comparisons, "runs": runs}
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "results.json").write_text(json.dumps(result, indent=1))
    plots(args, out, result)
    write_page(args, result)
    print(markdown(result))
    return result


def write_page(args, result) -> None:
    """The NAME section of the detail page: every table of ``markdown`` and the plots of the result set."""
    page = Path(args.page)
    source = args.results / "results.json"
    images = [f"![{path.stem}]({link(page, path)})" for path in sorted(args.results.glob("*.png"))]
    caption = ("Plots (seed 0, best lr per method; a loss plot shows eval loss against training wall-clock on the "
               "left and against samples on the right):")
    body = "\n".join([f"Generated by `python benchmarks/post_training.py --name {args.name} --page-only` from "
                      f"[`{source.name}`]({link(page, source)}); do not edit by hand.", "",
                      markdown(result), *([caption, "", *images] if images else [])])
    write_section(page, f"post_training {args.name}", body, "Post-training benchmark: every table and every run")


def step_costs(out: Path) -> dict:
    """(method, K) -> median training seconds per micro-step over the interleaved step-cost rounds."""
    from statistics import median

    seconds = {}
    for path in (out / "step_cost").glob("*/summary.json"):
        method, period, _ = path.parent.name.split("__")
        r = json.loads(path.read_text())
        seconds.setdefault((method, int(period[1:])), []).append(r["wall_clock"] / r["micro_steps"])
    return {key: median(values) for key, values in seconds.items()}


def _fmt_ratio(entries, key):
    values = [e[key] for e in entries if key in e]
    missed = sum(key not in e for e in entries)
    if not values:
        return f"not reached ({missed}/{len(entries)})"
    text = f"{mean(values):.2f}" + (f" [{min(values):.2f}-{max(values):.2f}]" if len(values) > 1 else "")
    return text + (f", missed {missed}/{len(entries)}" if missed else "")


def markdown(result) -> str:
    lines = ["| task | K | PMA method (lr) | GA baseline (lr) | seeds | time ratio GA/PMA (measured) "
             "| samples ratio GA/PMA | cost-adjusted time ratio | GA final eval | PMA final eval | DPO acc GA / PMA |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for c in result["comparisons"]:
        s = c["seeds"]
        acc = "-"
        if c["task"].startswith("dpo"):
            acc = f"{mean(e['ga_acc'] for e in s):.3f} / {mean(e['pma_acc'] for e in s):.3f}"
        lines.append(f"| {c['task']} | {c['K']} | {c['pma']} ({c['pma_lr']:g}) | {c['ga']} ({c['ga_lr']:g}) | {len(s)} "
                     f"| {_fmt_ratio(s, 'time_ratio')} | {_fmt_ratio(s, 'sample_ratio')} "
                     f"| {_fmt_ratio(s, 'cost_adjusted_ratio') if 'cost_per_micro_step' in c else '-'} "
                     f"| {mean(e['target'] for e in s):.4f} | {mean(e['pma_final'] for e in s):.4f} | {acc} |")
    if result["step_cost"]:
        lines += ["", "Seconds per micro-step (median of interleaved rounds, 2 ranks, training only):", "",
                  "| method, K | s / micro-step |", "|---|---|"]
        lines += [f"| {key} | {value:.4f} |" for key, value in sorted(result["step_cost"].items())]
    lines += ["", "Full sweep (final eval loss, training wall-clock s):", "",
              "| run | eval loss | DPO acc | wall-clock s | optimizer steps |", "|---|---|---|---|---|"]
    for rid, r in sorted(result["runs"].items()):
        acc = f"{r['eval_accuracy']:.3f}" if "eval_accuracy" in r else "-"
        lines.append(f"| {rid} | {r['eval_loss']:.4f} | {acc} | {r['wall_clock']:.1f} | {r['optimizer_steps']} |")
    return "\n".join(lines) + "\n"


def plots(args, out: Path, result) -> None:
    from recipes.posttrain.plots import plot_loss_vs_time, plot_update_variance

    for task in args.tasks:
        for k in args.periods:
            chosen = {}
            for c in result["comparisons"]:
                if c["task"] == task and c["K"] == k:
                    seed = args.seeds[0]
                    chosen[f"{c['pma']} lr={c['pma_lr']:g}"] = out / run_id(task, c["pma"], k, c["pma_lr"], seed) / "metrics.jsonl"
                    chosen[f"{c['ga']} lr={c['ga_lr']:g}"] = out / run_id(task, c["ga"], k, c["ga_lr"], seed) / "metrics.jsonl"
            chosen = {label: path for label, path in chosen.items() if path.exists()}
            if chosen:
                plot_loss_vs_time(chosen, args.results / f"{task}_K{k}_loss.png",
                                  title=f"{task}, K={k}, best lr per method, seed {args.seeds[0]} (2 CPU ranks)")
                plot_update_variance(dict(chosen, **every_micro_batch_baselines(args, out, task, k)),
                                     args.results / f"{task}_K{k}_update_variance.png",
                                     title=f"{task}, K={k}: last-layer update variance per K micro-batches")


def every_micro_batch_baselines(args, out: Path, task, k) -> dict:
    """Best-lr K = 1 runs of the GA methods (plain AdamW / Lion on every micro-batch, the paper's EMA
    baseline) that were measured per K micro-steps (``--variance-every K``), for the K plot."""
    source = task if args.grids[task] is not None else "sft_alpaca"
    found = {}
    for m in ("adamw_ga", "lion_ga"):
        lr = best_lr(out, task, m, 1, args.seeds[0], lr_grid(args, source, m))
        path = out / run_id(task, m, 1, lr, args.seeds[0]) / "metrics.jsonl" if lr is not None else None
        rows = read_metrics(path, "update_variance") if path is not None and path.exists() else []
        if rows and rows[0]["window_periods"] * k == rows[0]["micro_step"]:  # measured per k micro-steps
            found[f"{m.split('_')[0]} K=1 (EMA, every micro-batch) lr={lr:g}"] = path
    return found


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.worker:
        worker(args)
        return
    if args.page_only:
        source = args.results / "results.json"
        if not source.exists():
            raise SystemExit(f"--page-only: {source} does not exist (run the benchmark or --report-only first)")
        write_page(args, json.loads(source.read_text()))
        return
    if not args.report_only:
        launch(args)
    report(args)


if __name__ == "__main__":
    main()
