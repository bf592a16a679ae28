#!/usr/bin/env python
"""PMA vs gradient accumulation vs no accumulation on real post-training data, best against best.

    python benchmarks/post_training.py --regime paper --family adamw --periods 4 8 16   # run what is missing
    python benchmarks/post_training.py --report-only    # tables and plots from the committed curves (a clone can)

Every run is ``launch/train.py``'s job (DeepSpeed ZeRO-0, 2 CPU ranks; all runs of one invocation in
one ``deepspeed`` launch). What is compared, for one task, regime, lr schedule and K:

* the PMA optimizer stepping every micro-batch (``adamw_pma``, the paper variant; ``lion_pma``), with
  and without the paper's periodic lr decay (arm ``adamw_pma-periodic``);
* gradient accumulation over the same K micro-batches (``adamw_ga``, ``lion_ga``);
* the plain optimizer stepping every micro-batch with no accumulation (``adamw``, ``lion``: K = 1,
  run once per regime and schedule and compared at every K).

Regimes: ``today`` (4 sequences of 128 tokens per rank per micro-step) and ``paper`` (1 sequence of
256 tokens per rank: the memory-limited setting the paper targets). Schedules: ``constant`` and
``warmup_cosine`` (10 % linear warm-up then cosine to 0, by samples, the same for every method;
``recipes/posttrain/lr_schedule.py``).

Protocol. Each run holds out two disjoint splits of its training file: ``select`` (chooses the lr)
and ``eval`` (everything reported). Stage A sweeps the lr grid at seed 0; each arm's lr is the one
with the lowest final *select* loss; stage B runs the other seeds at that lr. For each K the target is
a loss on GA's final *eval* losses (below); every arm's cost to the target is its own first
linearly-interpolated crossing of it on its eval curve, in samples (GA included: a noisy GA curve
may cross before its end). The target is the highest of GA's final eval losses over its seeds, the
loss every GA seed has reached (a mean would be missed by some of GA's own seeds). Ratios are GA's samples over the arm's; an arm that never reaches the
target is "not reached". One machine-independent quantity (samples) is the headline; wall-clock is
recorded per run but only quoted from interleaved step-cost runs on a quiet machine.

Results: ``benchmarks/results/post_training/NAME/`` holds ``runs.json`` (one summary per run, with its CPU) and
``curves.csv`` (every run's eval curve), which are committed, so ``--report-only``
re-makes ``results.json``, the plots, the NAME section of ``docs/bench/post_training.md`` and the headline
table of ``docs/BENCHMARKS.md`` (over every result set) from a clone. A run already in the committed
``runs.json`` is not run again. ``--step-cost`` times each task of ``--tasks`` on its own micro-steps.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from statistics import mean, pstdev

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.pages import PAGES, RESULTS, link, write_section  # noqa: E402
from pma_dist.methods import get_method  # noqa: E402
from recipes.posttrain.metrics import read_metrics, time_to_target  # noqa: E402

SHARED = REPO.parent / "shared" / "data"


@dataclass(frozen=True)
class Regime:
    micro_batch: dict  # task kind -> sequences per rank per micro-step
    max_length: int
    micro_steps: int
    eval_every: int
    variance_every: int  # micro-steps per measured update, the same for every arm and K of the regime


REGIMES = {
    "today": Regime({"sft": 4, "dpo": 2}, max_length=128, micro_steps=128, eval_every=16, variance_every=8),
    "paper": Regime({"sft": 1, "dpo": 1}, max_length=256, micro_steps=256, eval_every=32, variance_every=16),
}
SCHEDULES = ("constant", "warmup_cosine")


@dataclass(frozen=True)
class Task:
    kind: str  # train.py --task
    data: Path
    base: str  # "shared": stories260K; "sft_base": the SFT model this benchmark trains first
    eval_size: int = 64  # held-out records of each split (eval and select)
    eval_every: int = 0  # micro-steps between evaluations; 0: the regime's
    micro_steps: int = 0  # 0: the regime's


TASKS = {
    "sft_alpaca": Task("sft", SHARED / "sft" / "alpaca_mix_train.jsonl", "shared"),
    # DPO from an SFT'd base on GPT-4-vs-other preference pairs: from the raw base the DPO signal was at noise level
    # 256 pairs per split: preference accuracy on 64 would move by 0.016 per pair (95 % band about +-0.12)
    # and half the regime's run: a DPO micro-step costs ~10x an SFT one here, and accuracy has moved by micro-step 64
    "dpo_gpt4": Task("dpo", SHARED / "dpo" / "alpaca_eval_gpt4_pairs.jsonl", "sft_base", eval_size=256, eval_every=32,
                     micro_steps=128),
}
# the SFT base of the DPO tasks: plain AdamW on alpaca_mix, long enough to follow the instruction template
SFT_BASE = dict(method="adamw", lr=3e-3, micro_steps=256, micro_batch=4, max_length=256)

# arm -> (method, lr_decay); the no-accumulation arms run at K = 1
ARMS = {
    "adamw_pma": ("adamw_pma", "none"), "adamw_pma-periodic": ("adamw_pma", "periodic"),
    "adamw_ga": ("adamw_ga", None), "adamw": ("adamw", None),
    "lion_pma": ("lion_pma", "none"), "lion_ga": ("lion_ga", None), "lion": ("lion", None),
}
# The starting lr grids, (task kind, regime, family, steps every micro-batch?) -> lrs, centred where the
# optimum was expected (an arm stepping on every micro-batch of one sequence wants a lower rate than GA's
# K-times larger batch). Stage A extends a grid by one half-decade while its best lr is at an edge.
GRIDS = {
    ("sft", "paper", "adamw", True): [3e-4, 1e-3, 3e-3], ("sft", "paper", "adamw", False): [1e-3, 3e-3, 1e-2],
    ("sft", "today", "adamw", True): [1e-3, 3e-3, 1e-2], ("sft", "today", "adamw", False): [1e-3, 3e-3, 1e-2],
    ("sft", "paper", "lion", True): [3e-5, 1e-4, 3e-4], ("sft", "paper", "lion", False): [1e-4, 3e-4, 1e-3],
    ("sft", "today", "lion", True): [1e-4, 3e-4, 1e-3], ("sft", "today", "lion", False): [1e-4, 3e-4, 1e-3],
    ("dpo", "paper", "adamw", True): [3e-5, 1e-4, 3e-4], ("dpo", "paper", "adamw", False): [1e-4, 3e-4, 1e-3],
    ("dpo", "today", "adamw", True): [3e-5, 1e-4, 3e-4], ("dpo", "today", "adamw", False): [1e-4, 3e-4, 1e-3],
    ("dpo", "paper", "lion", True): [3e-6, 1e-5, 3e-5], ("dpo", "paper", "lion", False): [1e-5, 3e-5, 1e-4],
    ("dpo", "today", "lion", True): [3e-6, 1e-5, 3e-5], ("dpo", "today", "lion", False): [1e-5, 3e-5, 1e-4],
}
MAX_EXTENSIONS = 2  # half-decades added beyond the starting grid, per side


def half_decade(lr: float, direction: int) -> float:
    """The next value of the 1, 3, 10, 30, ... ladder above (+1) or below (-1) ``lr``."""
    import math

    exponent = math.floor(math.log10(lr) + 1e-9)
    mantissa = lr / 10 ** exponent
    rungs = [1.0, 3.0, 10.0]
    i = min(range(3), key=lambda j: abs(rungs[j] - mantissa))
    if direction > 0:
        return float(f"{(rungs[i + 1] if i < 2 else 30.0) * 10 ** exponent:.3g}")
    return float(f"{(rungs[i - 1] if i > 0 else 0.3) * 10 ** exponent:.3g}")


def family(arm: str) -> str:
    return get_method(ARMS[arm][0]).family


def is_plain(arm: str) -> bool:
    return get_method(ARMS[arm][0]).accumulation == "plain"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(REPO / "runs" / "bench_post_training"),
                   help="the runs (one folder each); finished runs are skipped")
    p.add_argument("--name", default="stories260k", help="the result set: its folder and its section of --page")
    p.add_argument("--results", default=None, help="default benchmarks/results/post_training/NAME")
    p.add_argument("--page", default=str(PAGES / "post_training.md"))
    p.add_argument("--model", default=str(SHARED / "models" / "stories260K"), help="the shared base model")
    p.add_argument("--tasks", nargs="+", default=["sft_alpaca"], choices=list(TASKS))
    p.add_argument("--regime", default="paper", choices=list(REGIMES))
    p.add_argument("--schedule", default="constant", choices=SCHEDULES)
    p.add_argument("--family", nargs="+", default=["adamw"], choices=["adamw", "lion"])
    p.add_argument("--arms", nargs="+", default=None, choices=list(ARMS), help="default: every arm of --family")
    p.add_argument("--periods", nargs="+", type=int, default=[8])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--grid", nargs="+", default=None, metavar="LR", type=float,
                   help="one lr grid for every arm of this invocation (default: GRIDS by task and family)")
    p.add_argument("--eval-size", type=int, default=None, help="records per held-out split (default: the task's)")
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--report-only", action="store_true", help="only re-make the report from the committed results")
    p.add_argument("--step-cost", action="store_true",
                   help="only measure seconds per micro-step of each arm at each K, interleaved rounds")
    p.add_argument("--step-cost-rounds", type=int, default=3)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if not args.name or not all(c.isalnum() or c in "_-" for c in args.name):
        p.error(f"--name {args.name!r}: use letters, digits, '_' and '-' (it names a folder and a page section)")
    if args.arms is None:
        args.arms = [a for a in ARMS if family(a) in args.family]
    if any(k < 2 for k in args.periods):
        p.error(f"--periods {args.periods}: K must be >= 2 (the no-accumulation arms are K = 1 already)")
    if args.grid is not None and any(not lr > 0 for lr in args.grid):
        p.error(f"--grid {args.grid}: learning rates must be > 0")
    args.results = Path(args.results) if args.results else RESULTS / "post_training" / args.name
    args.committed = committed_runs(args.results) if not args.report_only else {}
    return args


# ------------------------------------------------------------------------------ runs
def run_id(task, regime, schedule, arm, period, lr, seed) -> str:
    return f"{task}__{regime}__{schedule}__{arm}__K{period}__lr{lr:g}__s{seed}"


def parse_run_id(rid: str) -> dict:
    task, regime, schedule, arm, k, lr, seed = rid.split("__")
    return dict(task=task, regime=regime, schedule=schedule, arm=arm, K=int(k[1:]), lr=float(lr[2:]),
                seed=int(seed[1:]))


def summary(out: Path, rid: str, committed: dict | None = None):
    """A finished run's summary: from its folder under --out, else from the committed runs.json, so a run made
    in an earlier session or on another machine is reused, not run again (None: not run yet)."""
    path = out / rid / "summary.json"
    if path.exists():
        return json.loads(path.read_text())
    return (committed or {}).get(rid)


def lr_grid(args, task, arm):
    if args.grid is not None:
        return args.grid
    return GRIDS[(TASKS[task].kind, args.regime, family(arm), get_method(ARMS[arm][0]).accumulation != "ga")]


def extended_grid(out: Path, args, task, arm, period):
    """The starting grid plus every half-decade run beyond it so far, and the next lr to try (None when the
    best finished lr is inside the grid, or the extensions are used up)."""
    grid = sorted(lr_grid(args, task, arm))
    for direction in (-1, 1):
        for _ in range(MAX_EXTENSIONS):
            edge = grid[0] if direction < 0 else grid[-1]
            beyond = half_decade(edge, direction)
            if summary(out, run_id(task, args.regime, args.schedule, arm, period, beyond, args.seeds[0]),
                       args.committed) is None:
                break
            grid = sorted(grid + [beyond])
    best = best_lr(out, args, task, arm, period, grid)
    if best is None or args.grid is not None or len(grid) < 2:
        return grid, None
    start = lr_grid(args, task, arm)
    for direction, edge in ((-1, grid[0]), (1, grid[-1])):
        if best == edge and _extensions(grid, start, direction) < MAX_EXTENSIONS:
            return grid, half_decade(best, direction)
    return grid, None


def _extensions(grid, start, direction):
    return sum(1 for lr in grid if (lr < min(start) if direction < 0 else lr > max(start)))


def arm_periods(args, arm):
    return [1] if is_plain(arm) else args.periods


def sft_base_dir(args) -> Path:
    return Path(args.out) / "sft_base" / "model"


def sft_base_argv(args):
    base = SFT_BASE
    return ["--task", "sft", "--model", args.model, "--train-data", str(TASKS["sft_alpaca"].data),
            "--optimizer", base["method"], "--lr", repr(base["lr"]), "--seed", "0",
            "--micro-batch-size", str(base["micro_batch"]), "--micro-steps", str(base["micro_steps"]),
            "--max-length", str(base["max_length"]), "--eval-every", "128", "--eval-size", "64",
            "--output-dir", str(Path(args.out) / "sft_base"), "--overwrite", "--no-progress",
            "--save-model", str(sft_base_dir(args))]


def train_argv(args, task, arm, period, lr, seed, out=None):
    spec, regime = TASKS[task], REGIMES[args.regime]
    method, lr_decay = ARMS[arm]
    model = args.model if spec.base == "shared" else str(sft_base_dir(args))
    out = Path(out or Path(args.out) / run_id(task, args.regime, args.schedule, arm, period, lr, seed))
    return ["--task", spec.kind, "--model", model, "--train-data", str(spec.data), "--optimizer", method,
            *(["--period", str(period)] if not is_plain(arm) else []),
            *(["--lr-decay", lr_decay] if lr_decay else []),
            "--lr", repr(lr), "--lr-schedule", args.schedule, "--seed", str(seed),
            "--micro-batch-size", str(regime.micro_batch[spec.kind]), "--micro-steps", str(spec.micro_steps or regime.micro_steps),
            "--eval-every", str(spec.eval_every or regime.eval_every), "--eval-size", str(args.eval_size or spec.eval_size),
            "--select-size", str(args.eval_size or spec.eval_size), "--max-length", str(regime.max_length),
            "--log-update-variance", "--variance-window", "4", "--variance-every", str(regime.variance_every),
            # a run without summary.json crashed earlier: it restarts (its files are set aside, not deleted)
            "--output-dir", str(out), "--overwrite", "--no-progress"]


def best_lr(out: Path, args, task, arm, period, grid):
    """The lr of the lowest final select loss at the first seed (None until one run of the grid finished)."""
    finished = [(s["select_loss"], lr) for lr in grid
                if (s := summary(out, run_id(task, args.regime, args.schedule, arm, period, lr, args.seeds[0]), args.committed))]
    return min(finished)[1] if finished else None


def plan_stage_a(args, out, task):
    return [(task, arm, k, lr, args.seeds[0]) for arm in args.arms for k in arm_periods(args, arm)
            for lr in lr_grid(args, task, arm)]


def plan_extensions(args, out, task):
    """One more lr for every (arm, K) whose best lr so far sits at an edge of its grid."""
    runs = []
    for arm in args.arms:
        for k in arm_periods(args, arm):
            _, beyond = extended_grid(out, args, task, arm, k)
            if beyond is not None:
                runs.append((task, arm, k, beyond, args.seeds[0]))
    return runs


def plan_stage_b(args, out, task):
    runs = []
    for arm in args.arms:
        for k in arm_periods(args, arm):
            lr = best_lr(out, args, task, arm, k, extended_grid(out, args, task, arm, k)[0])
            if lr is not None:
                runs += [(task, arm, k, lr, s) for s in args.seeds[1:]]
    return runs


def step_cost_runs(args):
    """(task, arm, K, round): short runs cycling through the arms, so machine load hits all of them alike."""
    return [(task, arm, k, r) for r in range(args.step_cost_rounds) for task in args.tasks for k in args.periods
            for arm in args.arms if not (is_plain(arm) and k != args.periods[0])]


def step_cost_dir(args, task, arm, period, round_) -> Path:
    k = 1 if is_plain(arm) else period
    return Path(args.out) / "step_cost" / f"{task}__{args.regime}__{arm}__K{k}__r{round_}"


def step_cost_argv(args, task, arm, period, round_):
    argv = train_argv(args, task, arm, 1 if is_plain(arm) else period, lr_grid(args, task, arm)[0], 0,
                      out=step_cost_dir(args, task, arm, period, round_))
    for flag, value in (("--micro-steps", str(4 * max(args.periods))), ("--eval-every", "0"), ("--eval-size", "8"),
                        ("--select-size", "0")):
        argv[argv.index(flag) + 1] = value
    i = argv.index("--log-update-variance")
    return argv[:i] + argv[i + 5:]  # no variance probe: it is not part of a step's cost


def worker(args) -> None:
    import torch.distributed as dist

    from pma_dist import distributed
    from recipes.posttrain import config, trainer

    out = Path(args.out)
    if any(TASKS[t].base == "sft_base" for t in args.tasks) and not (sft_base_dir(args) / "config.json").exists():
        trainer.run(config.resolve(sft_base_argv(args)))
    if args.step_cost:
        for task, arm, period, round_ in step_cost_runs(args):
            if not (step_cost_dir(args, task, arm, period, round_) / "summary.json").exists():
                trainer.run(config.resolve(step_cost_argv(args, task, arm, period, round_)))
        distributed.shutdown(0)
    for task in args.tasks:
        for stage in (plan_stage_a, *[plan_extensions] * (2 * MAX_EXTENSIONS), plan_stage_b):
            dist.barrier() if dist.is_initialized() else None  # every rank sees the same finished runs
            for task_, arm, period, lr, seed in stage(args, out, task):
                rid = run_id(task_, args.regime, args.schedule, arm, period, lr, seed)
                if summary(out, rid, args.committed) is not None:
                    continue
                result = trainer.run(config.resolve(train_argv(args, task_, arm, period, lr, seed)))
                if dist.get_rank() == 0:
                    print(f"[bench] {rid}: eval_loss={result['eval_loss']:.4f} select_loss={result['select_loss']:.4f} "
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


# ------------------------------------------------------------------------------ committed results
SUMMARY_KEYS = ("task", "optimizer", "period", "lr", "lr_schedule", "lr_decay", "seed", "micro_steps",
                "micro_batch_size", "world_size", "samples", "optimizer_steps", "wall_clock", "eval_loss",
                "select_loss", "eval_accuracy", "select_accuracy", "eval_reward_accuracy", "train_records")
CURVE_COLUMNS = ("run", "kind", "micro_step", "samples", "wall_clock", "eval_loss", "select_loss", "eval_accuracy",
                 "update_variance", "update_sq_norm", "update_mean_sq_norm", "update_noise_to_signal")


def collect(args) -> None:
    """Fold every finished run under --out into the committed runs.json and curves.csv (runs already there
    and not under --out are kept, so the benchmark can be run in pieces and on several machines)."""
    out = Path(args.out)
    runs, curves = load_committed(args.results)
    machine = cpu_name()
    for path in sorted(out.glob("*/summary.json")):
        rid = path.parent.name
        if rid.count("__") != 6:
            continue
        s = json.loads(path.read_text())
        runs[rid] = {k: s.get(k) for k in SUMMARY_KEYS}
        runs[rid]["machine"] = machine
        rows = read_metrics(path.parent / "metrics.jsonl")
        curves[rid] = [{c: r.get(c) for c in CURVE_COLUMNS[1:]} for r in rows
                       if r.get("kind") in ("eval", "update_variance")]
    for path in (out / "step_cost").glob("*/summary.json"):
        s = json.loads(path.read_text())
        runs["step_cost__" + path.parent.name] = {k: s.get(k) for k in SUMMARY_KEYS} | {"machine": machine}
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "runs.json").write_text(json.dumps(dict(sorted(runs.items())), indent=0))
    with open(args.results / "curves.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CURVE_COLUMNS)
        writer.writeheader()
        for rid in sorted(curves):
            for row in curves[rid]:
                writer.writerow({"run": rid, **{k: _compact(v) for k, v in row.items()}})


def cpu_name() -> str:
    """The CPU the runs under --out were made on (samples do not depend on it, seconds and the last bits do)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return " ".join(line.split(":", 1)[1].split())
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine() or "unknown"


def _compact(value):
    # repr round-trips a float exactly: the report reads the same numbers the run wrote (a GA run's final
    # loss must cross its own target, not miss it by a rounding)
    return repr(value) if isinstance(value, float) else value


def committed_runs(results: Path) -> dict:
    return json.loads((results / "runs.json").read_text()) if (results / "runs.json").exists() else {}


def load_committed(results: Path):
    runs = committed_runs(results)
    curves: dict = {}
    if (results / "curves.csv").exists():
        with open(results / "curves.csv", newline="") as f:
            for row in csv.DictReader(f):
                rid = row.pop("run")
                curves.setdefault(rid, []).append(
                    {k: (v if k == "kind" else (float(v) if v not in ("", None) else None)) for k, v in row.items()})
    return runs, curves


# ------------------------------------------------------------------------------ analysis
def samples_to_target(curve, target):
    """Samples at the eval curve's first interpolated crossing of ``target``; None if never reached."""
    hit = time_to_target([r for r in curve if r["kind"] == "eval"], target)
    return hit[1] if hit is not None else None


def settings_of(runs: dict):
    """(task, regime, schedule, K) for every K a GA arm was run at."""
    found = set()
    for rid in runs:
        if rid.startswith("step_cost__"):
            continue
        r = parse_run_id(rid)
        if not is_plain(r["arm"]):
            found.add((r["task"], r["regime"], r["schedule"], r["K"]))
    return sorted(found)


def chosen(runs: dict, task, regime, schedule, arm, k):
    """(best lr by final select loss at the lowest seed, that lr's runs by seed, the whole sweep at that seed)."""
    sweep = {}
    for rid, s in runs.items():
        if rid.startswith("step_cost__"):
            continue
        r = parse_run_id(rid)
        if (r["task"], r["regime"], r["schedule"], r["arm"], r["K"]) == (task, regime, schedule, arm, k):
            sweep.setdefault(r["lr"], {})[r["seed"]] = rid
    if not sweep:
        return None, {}, {}
    first = min(min(seeds) for seeds in sweep.values())
    at_first = {lr: seeds[first] for lr, seeds in sweep.items() if first in seeds}
    lr = min(at_first, key=lambda lr: runs[at_first[lr]]["select_loss"])
    return lr, sweep[lr], at_first


def analyse(runs: dict, curves: dict) -> list:
    rows = []
    per_micro_step = step_costs(runs)
    for task, regime, schedule, k in settings_of(runs):
        fam_arms = {}
        for arm in ARMS:
            kk = 1 if is_plain(arm) else k
            lr, seeds, sweep = chosen(runs, task, regime, schedule, arm, kk)
            if lr is not None:
                fam_arms.setdefault(family(arm), {})[arm] = (lr, seeds, sweep)
        for fam, arms in fam_arms.items():
            ga = arms.get(f"{fam}_ga")
            if ga is None:
                continue
            # the loss every GA seed has reached by its end: a mean would be missed by half of GA's own seeds
            target = max(runs[rid]["eval_loss"] for rid in ga[1].values())
            ga_cost = [samples_to_target(curves.get(rid, []), target) for rid in ga[1].values()]
            ga_mean = mean(c for c in ga_cost if c is not None) if any(c is not None for c in ga_cost) else None
            for arm, (lr, seeds, sweep) in arms.items():
                finals = [runs[rid]["eval_loss"] for rid in seeds.values()]
                costs = [samples_to_target(curves.get(rid, []), target) for rid in seeds.values()]
                reached = [c for c in costs if c is not None]
                entry = dict(task=task, regime=regime, schedule=schedule, K=k, family=fam, arm=arm, lr=lr,
                             seeds=sorted(seeds), target=target, final=finals, samples_to_target=costs,
                             lr_at_edge=lr in (min(sweep), max(sweep)) and len(sweep) > 1,
                             sweep={f"{x:g}": runs[rid]["select_loss"] for x, rid in sorted(sweep.items())},
                             total_samples=runs[next(iter(seeds.values()))]["samples"])
                if task.startswith("dpo"):
                    # DPO's preference accuracy: the implicit reward of chosen above rejected's (a longer chosen
                    # answer has the lower log-probability, so the raw log-prob comparison is not the measure)
                    entry["accuracy"] = [runs[rid].get("eval_reward_accuracy") for rid in seeds.values()]
                entry["noise_to_signal"] = [_last_noise(curves.get(rid, [])) for rid in seeds.values()]
                entry["update_variance"] = [_last_variance(curves.get(rid, [])) for rid in seeds.values()]
                if ga_mean and reached:
                    entry["ratio_vs_ga"] = ga_mean / mean(reached)
                    # samples are free of the machine; a micro-step's cost is not: PMA and the plain arm step
                    # (and all-reduce) on every micro-batch, GA once per K
                    own = per_micro_step.get((task, regime, arm, 1 if is_plain(arm) else k))
                    ga_cost_s = per_micro_step.get((task, regime, f"{fam}_ga", k))
                    if own and ga_cost_s:
                        entry["cost_adjusted_vs_ga"] = entry["ratio_vs_ga"] * ga_cost_s / own
                rows.append(entry)
    return rows


def _last_noise(curve):
    values = [r["update_noise_to_signal"] for r in curve if r["kind"] == "update_variance"
              and r.get("update_noise_to_signal") is not None]
    return mean(values) if values else None


def _last_variance(curve):
    values = [r["update_variance"] for r in curve if r["kind"] == "update_variance"]
    return mean(values) if values else None


def step_costs(runs: dict) -> dict:
    """(task, regime, arm, K) -> median training seconds per micro-step over the interleaved rounds."""
    from statistics import median

    seconds = {}
    for rid, s in runs.items():
        if rid.startswith("step_cost__"):
            task, regime, arm, k, _ = rid.removeprefix("step_cost__").split("__")
            seconds.setdefault((task, regime, arm, int(k[1:])), []).append(s["wall_clock"] / s["micro_steps"])
    return {key: median(v) for key, v in seconds.items()}


def _spread(values, fmt="{:.3f}"):
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    text = fmt.format(mean(values))
    return text + (f" ± {fmt.format(pstdev(values))}" if len(values) > 1 else "")


def _cost(entry):
    costs = entry["samples_to_target"]
    reached = [c for c in costs if c is not None]
    missed = len(costs) - len(reached)
    if not reached:
        return f"not reached (0/{len(costs)})"
    text = f"{mean(reached):.0f}" + (f" [{min(reached):.0f}-{max(reached):.0f}]" if len(reached) > 1 else "")
    return text + (f", missed {missed}/{len(costs)}" if missed else "")


def markdown(rows: list, runs: dict) -> str:
    lines = []
    for key in sorted({(r["task"], r["regime"], r["schedule"], r["K"]) for r in rows}):
        task, regime, schedule, k = key
        group = [r for r in rows if (r["task"], r["regime"], r["schedule"], r["K"]) == key]
        dpo = task.startswith("dpo")
        lines += [f"#### {task}, regime {regime}, lr {schedule}, K = {k}", "",
                  f"Target: the highest final eval loss of GA's seeds, {group[0]['target']:.4f}; {group[0]['total_samples']} samples "
                  f"per run; seeds {', '.join(map(str, group[0]['seeds']))}.", "",
                  "| arm (K) | lr (select split) | final eval loss | samples to target | GA / arm (samples) | "
                  "GA / arm (cost-adjusted) | "
                  + ("eval reward accuracy | " if dpo else "") + "update noise/signal | update variance |",
                  "|---|---|---|---|---|---|" + ("---|" if dpo else "") + "---|---|"]
        for r in sorted(group, key=lambda r: (r["family"], list(ARMS).index(r["arm"]))):
            edge = " (grid edge)" if r["lr_at_edge"] else ""
            ratio = f"{r['ratio_vs_ga']:.2f}x" if "ratio_vs_ga" in r else "-"
            adjusted = f"{r['cost_adjusted_vs_ga']:.2f}x" if "cost_adjusted_vs_ga" in r else "-"
            lines.append(f"| {r['arm']} ({1 if is_plain(r['arm']) else k}) | {r['lr']:g}{edge} | {_spread(r['final'])} "
                         f"| {_cost(r)} | {ratio} | {adjusted} | " + (f"{_spread(r['accuracy'])} | " if dpo else "")
                         + f"{_spread(r['noise_to_signal'], '{:.3g}')} | {_spread(r['update_variance'], '{:.3g}')} |")
        lines.append("")
    costs = step_costs(runs)
    if costs:
        lines += ["Seconds per micro-step (median of interleaved rounds, 2 ranks, training only):", "",
                  "| task | regime | arm | K | s / micro-step |", "|---|---|---|---|---|"]
        lines += [f"| {t} | {g} | {a} | {k} | {v:.4f} |" for (t, g, a, k), v in sorted(costs.items())]
        lines.append("")
    lines += ["Full sweep (every run: final select and eval loss, and the CPU it ran on):", "",
              "| run | select loss | eval loss | eval accuracy | samples | optimizer steps | machine |",
              "|---|---|---|---|---|---|---|"]
    for rid, r in sorted(runs.items()):
        if rid.startswith("step_cost__"):
            continue
        acc = f"{r['eval_accuracy']:.3f}" if r.get("eval_accuracy") is not None else "-"
        lines.append(f"| {rid} | {r['select_loss']:.4f} | {r['eval_loss']:.4f} | {acc} | {r['samples']} "
                     f"| {r['optimizer_steps']} | {r.get('machine') or '-'} |")
    return "\n".join(lines) + "\n"


def plots(args, rows, curves) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for key in sorted({(r["task"], r["regime"], r["schedule"], r["K"]) for r in rows}):
        task, regime, schedule, k = key
        group = [r for r in rows if (r["task"], r["regime"], r["schedule"], r["K"]) == key]
        fig, ax = plt.subplots(figsize=(7, 4))
        for r in group:
            rid = run_id(task, regime, schedule, r["arm"], 1 if is_plain(r["arm"]) else k, r["lr"], r["seeds"][0])
            evals = [c for c in curves.get(rid, []) if c["kind"] == "eval"]
            ax.plot([c["samples"] for c in evals], [c["eval_loss"] for c in evals], marker="o", ms=3,
                    label=f"{r['arm']} lr={r['lr']:g}")
        ax.axhline(group[0]["target"], color="grey", lw=0.8, ls="--")
        ax.set_xlabel("training samples (all ranks)")
        ax.set_ylabel("held-out eval loss")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        ax.set_title(f"{task}, {regime}, {schedule}, K={k} (best lr, seed {group[0]['seeds'][0]})", fontsize=9)
        fig.tight_layout()
        fig.savefig(args.results / f"{task}_{regime}_{schedule}_K{k}.png", dpi=100)
        plt.close(fig)


def report(args) -> list:
    runs, curves = load_committed(args.results)
    if not runs:
        raise SystemExit(f"no runs in {args.results / 'runs.json'}: run the benchmark first")
    rows = analyse(runs, curves)
    (args.results / "results.json").write_text(json.dumps({"comparisons": rows}, indent=1))
    plots(args, rows, curves)
    page = Path(args.page)
    images = [f"![{p.stem}]({link(page, p)})" for p in sorted(args.results.glob("*.png"))]
    body = "\n".join([f"Generated by `python benchmarks/post_training.py --name {args.name} --report-only` from "
                      f"[`runs.json`]({link(page, args.results / 'runs.json')}) and "
                      f"[`curves.csv`]({link(page, args.results / 'curves.csv')}); do not edit by hand.", "",
                      markdown(rows, runs), "Eval loss against samples (seed 0, best lr per arm; dashed: the target):",
                      "", *images])
    write_section(page, f"post_training {args.name}", body, "Post-training benchmark: every table and every run")
    print(markdown(rows, {}))
    return rows


HEADLINE_PAGE = REPO / "docs" / "BENCHMARKS.md"
BASES = {"stories260k": "stories260K", "base_3m": "base-3M"}  # result set -> the base model it post-trains
HEADLINE_ARMS = ("pma", "pma-periodic", "ga", "plain")


def headline_markdown(sets: dict) -> str:
    """One row per (base, task, regime, schedule, K, family) over every result set: each arm's samples ratio to GA,
    its cost-adjusted ratio where step costs were timed, and its mean final eval loss (DPO: and preference accuracy)."""
    lines = ["| base | task, regime, lr, K | optimizer | PMA | PMA, periodic decay | GA (target) | no accumulation |",
             "|---|---|---|---|---|---|---|"]
    for name, rows in sets.items():
        keys = sorted({(r["task"], r["regime"], r["schedule"], r["K"], r["family"]) for r in rows},
                      key=lambda key: (key[0].startswith("dpo"), key[1] != "paper", key[2], key[3], key[4]))
        for task, regime, schedule, k, fam in keys:
            group = {r["arm"]: r for r in rows
                     if (r["task"], r["regime"], r["schedule"], r["K"], r["family"]) == (task, regime, schedule, k, fam)}
            arms = {"pma": f"{fam}_pma", "pma-periodic": f"{fam}_pma-periodic", "ga": f"{fam}_ga", "plain": fam}
            # bold: the fastest arm among those whose every seed reached the target (a missed seed has no cost)
            best = max(((r.get("ratio_vs_ga", 0), arm) for arm, r in group.items()
                        if None not in r["samples_to_target"]), default=(0, None))[1]
            cells = []
            for column in HEADLINE_ARMS:
                r = group.get(arms[column])
                text = _headline_cell(r, task.startswith("dpo")) if r else "not run"
                cells.append(f"**{text}**" if r and r["arm"] == best and "ratio_vs_ga" in r else text)
            label = f"{task.split('_')[0].upper()}, {regime}, {schedule.replace('warmup_cosine', 'warm-up + cosine')}, K = {k}"
            lines.append(f"| {BASES.get(name, name)} | {label} | {'AdamW' if fam == 'adamw' else 'Lion'} | "
                         + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _headline_cell(r, dpo) -> str:
    costs = r["samples_to_target"]
    missed = sum(c is None for c in costs)
    if "ratio_vs_ga" not in r:
        text = f"not reached (0/{len(costs)})"
    else:
        text = f"{r['ratio_vs_ga']:.2f}x"
        if "cost_adjusted_vs_ga" in r and not r["arm"].endswith("_ga"):
            text += f" [{r['cost_adjusted_vs_ga']:.2f}x]"
        if missed:
            text += f", {missed}/{len(costs)} seeds missed"
    final = f"{mean(r['final']):.3f}"
    if dpo and r.get("accuracy") and None not in r["accuracy"]:
        final += f"; acc. {mean(r['accuracy']):.2f}"
    return f"{text} ({final})"


def write_headline(results_root: Path = RESULTS / "post_training", page: Path = HEADLINE_PAGE) -> str:
    """The summary table of every current result set (each one's results.json, as its --report-only wrote it)."""
    sets = {}
    for name in [n for n in BASES if (results_root / n / "results.json").exists()]:
        sets[name] = json.loads((results_root / name / "results.json").read_text())["comparisons"]
    table = headline_markdown(sets)
    write_section(page, "post_training headline", "Generated by `python benchmarks/post_training.py --report-only` "
                  "from every result set's `results.json`; do not edit by hand.\n\n" + table,
                  "Benchmarks")
    return table


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.worker:
        worker(args)
        return
    if not args.report_only:
        launch(args)
        collect(args)
    report(args)
    if args.results.parent == RESULTS / "post_training":  # a result set of its own (tests write elsewhere)
        write_headline()


if __name__ == "__main__":
    main()
