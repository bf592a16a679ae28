#!/usr/bin/env python
"""Peak memory per rank of the post-training job, measured, against the memory model (pma_dist.memory).

    python benchmarks/memory.py                       # 2 ranks, ZeRO-3, fp32, SFT and DPO, 3 sizes
    python benchmarks/memory.py --sizes 95m --tasks sft --label before
    python benchmarks/memory.py --setup FSDP2 --tasks sft --label fsdp2

Each run is ``launch/train.py --zero-stage 3 --micro-batch-size 1 --max-length 128 --micro-steps 4`` (or
``--backend fsdp`` instead of ``--zero-stage 3`` with ``--setup FSDP2``) on
2 CPU ranks (torchrun, gloo), over stories260K (0.26M parameters, the process baseline) and the
random-init Llamas of ``benchmarks/make_scale_model.py`` (25M, 95M; built under runs/models if absent).
The measured number is the largest rank's peak RSS from the run's ``summary.json``; bytes per
parameter are taken above the stories260K run of the same task (the interpreter, torch, DeepSpeed and
the data). Memory is a valid measurement on a loaded shared machine; the wall-clock of these runs is not.
Writes a table to stdout and ``<out>/memory_<label>.json``, with pma_dist.memory's modelled peak for
each point and whether every point is within MODEL_TOLERANCE of the measurement (the model's check
lives here, not in a test). ``--rescore FILE`` recomputes those columns for earlier measurements.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SHARED = REPO.parent / "shared" / "data"
STORIES = SHARED / "models" / "stories260K"
DATA = {"sft": SHARED / "sft" / "alpaca_mix_train.jsonl", "dpo": SHARED / "dpo" / "hh_rlhf_harmless_base_test_pairs.jsonl"}
SETUP_FLAGS = {"ZeRO-3": ["--zero-stage", "3"], "FSDP2": ["--backend", "fsdp"]}
RUN_FLAGS = ["--micro-batch-size", "1", "--max-length", "128", "--micro-steps", "4",
             "--eval-size", "16", "--eval-batch-size", "16", "--no-progress", "--optimizer", "adamw_pma",
             "--period", "4"]
MiB = 2**20
MODEL_TOLERANCE = 0.15  # the acceptance band for the memory model against these measurements


def model_dir(size: str, models: Path) -> Path:
    if size == "260k":
        return STORIES
    path = models / f"llama_{size}"
    if not (path / "model.safetensors").exists():
        from benchmarks.make_scale_model import build

        build(size, path)
    return path


def parameter_count(path: Path) -> int:
    from safetensors import safe_open

    total = 0
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(str(file), "pt") as f:
            for name in f.keys():
                shape = f.get_slice(name).get_shape()
                count = 1
                for d in shape:
                    count *= d
                total += count
    return total


EVAL_SIZE, EVAL_BATCH = 16, 16  # RUN_FLAGS' --eval-size / --eval-batch-size


def fused_kernel_loads() -> bool:
    """Whether pma_dist's fused CPU step kernel loads here (then the runs' optimizer steps use it, no temporary)."""
    from pma_dist import kernels

    return kernels.unavailable_reason() is None


def modelled_parts(size: str, task: str, nproc: int, reference: str, setup: str = "ZeRO-3",
                   fused_step: bool = True) -> dict:
    """pma_dist.memory's parts for the run's setting (fp32, AdamW moments, 1 x 128 tokens per micro-step,
    each rank evaluating its share of the eval set in one batch)."""
    from pma_dist import memory

    shape = memory.SHAPES[{"260k": "stories260K", "25m": "llama_25m", "95m": "llama_95m"}[size]]
    eval_batch = min(EVAL_BATCH, -(-EVAL_SIZE // nproc))
    work = memory.Workload(task=task, micro_batch=1, seq_len=128, dpo_reference=reference, eval_batch=eval_batch)
    return memory.estimate(shape, setup, nproc, work, dtype="float32", fused_step=fused_step)


def modelled(size: str, task: str, nproc: int, reference: str, setup: str = "ZeRO-3", fused_step: bool = True) -> float:
    return modelled_parts(size, task, nproc, reference, setup, fused_step)["total"]


def run_one(model: Path, task: str, out: Path, nproc: int, timeout: float, extra, setup: str) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", HF_HUB_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", PYTHONPATH=str(REPO))
    cmd = [str(Path(sys.executable).parent / "torchrun"), "--standalone", f"--nproc_per_node={nproc}",
           str(REPO / "launch" / "train.py"), "--task", task, "--model", str(model), "--train-data",
           str(DATA[task]), "--output-dir", str(out), *SETUP_FLAGS[setup], *RUN_FLAGS, "--overwrite", *extra]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise SystemExit(f"run failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-4000:]}")
    return json.loads((out / "summary.json").read_text())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", nargs="+", default=["25m", "95m"], choices=["25m", "95m"])
    p.add_argument("--tasks", nargs="+", default=["sft", "dpo"], choices=["sft", "dpo"])
    p.add_argument("--out", default=str(REPO / "runs" / "memory"))
    p.add_argument("--label", default="current", help="name of this set of measurements (before/after)")
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--setup", choices=sorted(SETUP_FLAGS), default="ZeRO-3")
    p.add_argument("--timeout", type=float, default=900)
    p.add_argument("--rescore", metavar="JSON", help="no runs: compare the current model with the measurements "
                   "of a previous memory_<label>.json (its label, setup and flags), and rewrite it under --out")
    p.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more launch/train.py flags")
    args = p.parse_args(argv)
    out = Path(args.out)
    if args.rescore:
        saved = json.loads(Path(args.rescore).read_text())
        args.label, args.setup, args.nproc = saved["label"], saved.get("setup") or "ZeRO-3", saved["nproc"]
        args.extra = saved.get("extra", [])
        args.sizes = sorted({r["size"] for r in saved["rows"]} - {"260k"})
        rows = [{k: r[k] for k in MEASURED_KEYS} for r in saved["rows"]]
        return score(rows, args, out)
    return score(measure(args, out), args, out)


#: what a row holds from the runs themselves (the rest is computed from them and the model)
MEASURED_KEYS = ("task", "size", "model", "parameters", "peak_bytes_per_rank", "peak_bytes", "kind")


def measure(args, out: Path) -> list:
    models = REPO / "runs" / "models"
    rows = []
    for task in args.tasks:
        for size in ["260k", *args.sizes]:
            path = model_dir(size, models)
            summary = run_one(path, task, out / args.label / f"{task}_{size}", args.nproc, args.timeout, args.extra,
                              args.setup)
            peaks = summary["peak_memory_bytes"]
            rows.append(dict(task=task, size=size, model=str(path), parameters=parameter_count(path),
                             peak_bytes_per_rank=peaks, peak_bytes=max(peaks), kind=summary["peak_memory_kind"]))
            print(f"{task} {size}: peak {max(peaks) / MiB:,.0f} MiB per rank {[round(x / MiB) for x in peaks]}",
                  flush=True)
    return rows


def score(rows: list, args, out: Path) -> int:
    """Bytes/parameter above the baseline, the model's error per point; the table and the JSON."""
    reference = "copy" if "copy" in args.extra else "cached"
    fused = fused_kernel_loads()
    from pma_dist.memory import peak_phase
    for row in rows:
        base = next(r for r in rows if r["task"] == row["task"] and r["size"] == "260k")
        extra_params = row["parameters"] - base["parameters"]
        row["bytes_per_parameter"] = ((row["peak_bytes"] - base["peak_bytes"]) / extra_params
                                      if extra_params else None)
        row["measured_above_base"] = row["peak_bytes"] - base["peak_bytes"]
        parts = modelled_parts(row["size"], row["task"], args.nproc, reference, args.setup, fused)
        row["modelled_parts"] = parts
        row["modelled_peak_phase"] = peak_phase(parts)
        row["modelled_above_base"] = parts["total"] - modelled("260k", row["task"], args.nproc, reference,
                                                               args.setup, fused)
        row["model_error"] = (row["modelled_above_base"] / row["measured_above_base"] - 1
                              if extra_params else None)
    print(f"\n{'task':4} {'model':5} {'params':>12} {'peak MiB':>9} {'B/param':>8} {'above base MiB':>15} "
          f"{'modelled MiB':>13} {'model error':>11}  modelled peak phase")
    for row in rows:
        if row["bytes_per_parameter"] is None:
            print(f"{row['task']:4} {row['size']:5} {row['parameters']:>12,} {row['peak_bytes'] / MiB:>9,.0f} "
                  f"{'base':>8}")
            continue
        print(f"{row['task']:4} {row['size']:5} {row['parameters']:>12,} {row['peak_bytes'] / MiB:>9,.0f} "
              f"{row['bytes_per_parameter']:>8.1f} {row['measured_above_base'] / MiB:>15,.0f} "
              f"{row['modelled_above_base'] / MiB:>13,.0f} {100 * row['model_error']:>+10.1f}%  {row['modelled_peak_phase']}")
    by = {(r["task"], r["size"]): r for r in rows}
    for size in args.sizes:
        if ("sft", size) in by and ("dpo", size) in by:
            extra = by[("dpo", size)]["bytes_per_parameter"] - by[("sft", size)]["bytes_per_parameter"]
            print(f"DPO over SFT at {size}: {extra:+.1f} bytes/parameter")
    out.mkdir(parents=True, exist_ok=True)
    result = dict(label=args.label, setup=args.setup, nproc=args.nproc, rows=rows,
                  command=" ".join(SETUP_FLAGS[args.setup] + RUN_FLAGS + args.extra), extra=args.extra,
                  model_tolerance=MODEL_TOLERANCE, fused_step=fused,
                  model_within_tolerance=all(abs(r["model_error"]) <= MODEL_TOLERANCE for r in rows
                                             if r["model_error"] is not None))
    print(f"memory model within +-{100 * MODEL_TOLERANCE:.0f}% of every measured point: "
          f"{result['model_within_tolerance']}")
    (out / f"memory_{args.label}.json").write_text(json.dumps(result, indent=1))
    print(f"wrote {out / f'memory_{args.label}.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
