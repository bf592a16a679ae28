#!/usr/bin/env python
"""The README's main job: fine-tune a real small model three ways on 2 CPU ranks (DeepSpeed): AdamW-PMA
stepping every micro-batch, AdamW with K-step gradient accumulation, and plain AdamW stepping every
micro-batch with no accumulation; then write the loss plots and the communication report.

    python launch/quickstart.py                        # uses ../shared/data when present
    python launch/quickstart.py --model <hub name> --train-data <hub dataset>   # online
    python launch/quickstart.py --fallback             # force the built-in synthetic fallback

With neither shared data nor explicit hub names it runs the clearly labelled built-in fallback (a
tiny random Llama on a synthetic task). Outputs under --out: ``adamw_pma/``, ``adamw_ga/`` and ``adamw/``
(metrics JSONL, summary), ``loss_vs_time.png``, ``update_variance.png``, ``comm_report/`` (report.md/json/PNG,
PMA vs the GA baseline) and ``quickstart.json``. A few minutes on a 2-core machine.

Each run's cost is its own first crossing of one target, the GA run's final eval loss (GA's included),
in samples and in training seconds, as ``benchmarks/post_training.py`` measures it; the default
learning rates are that benchmark's best per method in this regime (docs/BENCHMARKS.md).
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from recipes.posttrain.config import DEFAULT_DATA, DEFAULT_MODEL, FALLBACK  # noqa: E402
from pma_dist.methods import get_method  # noqa: E402
from recipes.posttrain.run_dir import held_run  # noqa: E402

from recipes.posttrain.metrics import read_metrics, time_to_target  # noqa: E402

RUN_NAMES = ("adamw_pma", "adamw_ga", "adamw")  # run folder = the GA / no-accumulation method's name


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(REPO / "runs" / "quickstart"))
    p.add_argument("--model", default=None, help="HF model dir or hub name (default: shared stories260K)")
    p.add_argument("--train-data", default=None, help="SFT jsonl or hub dataset (default: shared alpaca_mix)")
    p.add_argument("--fallback", action="store_true", help="use the built-in synthetic fallback")
    p.add_argument("--period", type=int, default=8, help="K: PMA period = GA accumulation steps")
    p.add_argument("--lr", type=float, default=3e-3, help="AdamW-PMA's and GA's learning rate")
    p.add_argument("--lr-no-accumulation", type=float, default=1e-3,
                   help="plain AdamW's learning rate (it steps K times as often as GA)")
    # the variant that beat GA in docs/BENCHMARKS.md (the reference variant did not)
    p.add_argument("--pma-method", choices=("adamw_pma", "adamw_pma_reference"), default="adamw_pma",
                   help="the AdamW-PMA variant to run (pma_dist.methods)")
    p.add_argument("--micro-steps", type=int, default=96)
    p.add_argument("--micro-batch-size", type=int, default=4)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--timeout", type=float, default=1800, help="seconds per training launch")
    p.add_argument("--overwrite", action="store_true",
                   help="start anew where --out already holds runs (train.py moves their files to replaced-<time>/)")
    return p.parse_args(argv)


def choose_inputs(args):
    """(model, train data, label): shared data, else the user's hub names, else the fallback."""
    if args.fallback:
        return FALLBACK, None, "built-in FALLBACK (random tiny Llama, synthetic task)"
    if args.model or args.train_data:
        if not (args.model and args.train_data):
            sys.exit("quickstart: pass both --model and --train-data (or neither)")
        return args.model, args.train_data, f"{args.model} on {args.train_data}"
    if DEFAULT_MODEL.exists() and DEFAULT_DATA["sft"].exists():
        return str(DEFAULT_MODEL), str(DEFAULT_DATA["sft"]), "stories260K on alpaca_mix (../shared/data)"
    print("quickstart: ../shared/data not found and no --model/--train-data given: running the FALLBACK",
          flush=True)
    return FALLBACK, None, "built-in FALLBACK (random tiny Llama, synthetic task)"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train(args, name: str, optimizer: str, model: str, data, out: Path) -> dict:
    run_dir = out / name
    plain = get_method(optimizer).accumulation == "plain"
    lr = args.lr_no_accumulation if plain else args.lr
    cmd = [str(Path(sys.executable).parent / "deepspeed"), f"--num_gpus={args.nproc}", f"--master_port={free_port()}",
           str(REPO / "launch" / "train.py"), "--task", "sft", "--model", model, "--optimizer", optimizer,
           *([] if plain else ["--period", str(args.period)]), "--lr", repr(lr), "--micro-steps", str(args.micro_steps),
           "--micro-batch-size", str(args.micro_batch_size), "--max-length", str(args.max_length),
           "--eval-every", str(args.period * 2), "--eval-size", "64", "--log-update-variance",
           "--variance-every", str(args.period), "--variance-window", "3", "--comm-profile", str(run_dir / "comm"), "--output-dir", str(run_dir)]
    if args.overwrite:
        cmd.append("--overwrite")
    if data:
        cmd += ["--train-data", data]
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR=os.environ.get("DS_ACCELERATOR", "cpu"),
               TOKENIZERS_PARALLELISM="false", PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    print(f"\n=== {name}: {' '.join(cmd)}\n", flush=True)
    log_path = out / f"{name}.log"
    with open(log_path, "w") as log:
        proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=args.timeout)
    if proc.returncode != 0:
        tail = log_path.read_text()[-3000:]
        sys.exit(f"quickstart: {name} failed (exit {proc.returncode}); last lines of {log_path}:\n{tail}")
    return json.loads((run_dir / "summary.json").read_text())


def main(argv=None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    held = {name: held_run(out / name) for name in RUN_NAMES}
    if any(held.values()) and not args.overwrite:  # refuse before any launch, not after the first run
        sys.exit(f"quickstart: {out} already holds runs ({', '.join(f'{n}/' for n, h in held.items() if h)}): pass "
                 f"--overwrite to start anew (their files move to replaced-<time>/) or pick another --out")
    out.mkdir(parents=True, exist_ok=True)
    model, data, label = choose_inputs(args)
    k = args.period
    runs = {"adamw_pma": train(args, "adamw_pma", args.pma_method, model, data, out),
            "adamw_ga": train(args, "adamw_ga", "adamw_ga", model, data, out),
            "adamw": train(args, "adamw", "adamw", model, data, out)}
    names = {"adamw_pma": f"{get_method(args.pma_method).display} K={k}", "adamw_ga": f"{get_method('adamw_ga').display} K={k}",
             "adamw": get_method("adamw").display}

    from pma_dist.comm.report import write_run_report
    from recipes.posttrain.plots import plot_loss_vs_time, plot_update_variance

    metrics = {names[n]: out / n / "metrics.jsonl" for n in RUN_NAMES}
    plot_loss_vs_time(metrics, out / "loss_vs_time.png", title=f"{label}: PMA vs GA vs no accumulation (K={k}, 2 CPU ranks)")
    plot_update_variance(metrics, out / "update_variance.png", title=f"{label}: last-layer update variance per {k} micro-batches")
    write_run_report(out / "adamw_pma" / "comm", baseline_dir=out / "adamw_ga" / "comm",
                     output_dir=out / "comm_report", period=k)

    target = runs["adamw_ga"]["eval_loss"]
    result = {"inputs": label, "fallback": runs["adamw_pma"]["fallback"], "period": k, "pma_method": args.pma_method,
              "target_eval_loss": target, "runs": {}}
    for n in RUN_NAMES:
        hit = time_to_target(read_metrics(out / n / "metrics.jsonl", "eval"), target)
        result["runs"][n] = {"lr": runs[n]["lr"], "final_eval_loss": runs[n]["eval_loss"],
                             "wall_clock": runs[n]["wall_clock"], "samples": runs[n]["samples"],
                             "seconds_to_target": hit[0] if hit else None, "samples_to_target": hit[1] if hit else None}
    (out / "quickstart.json").write_text(json.dumps(result, indent=1))
    print(f"\n{label}{'  [FALLBACK: synthetic, not real post-training]' if result['fallback'] else ''}")
    print(f"target: the GA run's final eval loss {target:.4f}; each run's first crossing of it (one seed, one lr each):")
    ga = result["runs"]["adamw_ga"]
    for n in RUN_NAMES:
        r = result["runs"][n]
        reached = (f"reached after {r['samples_to_target']:.0f} samples / {r['seconds_to_target']:.1f} s"
                   if r["samples_to_target"] is not None else "did not reach it")
        ratio = (f" ({ga['samples_to_target'] / r['samples_to_target']:.2f}x GA's samples)"
                 if r["samples_to_target"] and ga["samples_to_target"] else "")
        print(f"  {names[n]:<32} lr {r['lr']:g}: final {r['final_eval_loss']:.4f}, {reached}{ratio}")
    print(f"wrote {out / 'loss_vs_time.png'}, {out / 'update_variance.png'}, {out / 'comm_report' / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
