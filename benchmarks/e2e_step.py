"""Micro-step time of a 2-rank DeepSpeed ZeRO-2 / ZeRO-3 job: PMA (a step per micro-batch) vs GA.

Same model (a small Llama, random init, a few M params), same micro-batches, same ranks. Three
engines per ZeRO stage live in the same processes: ``ga`` (DeepSpeed's AdamW with
gradient_accumulation_steps = K), ``pma-foreach`` and ``pma-fused`` (AdamWPMA, gas = 1, period K,
``fused`` False/True). The timed unit is one period of K micro-steps (forward, backward,
``engine.step()``) after a barrier, so GA's one optimizer step per period and PMA's K steps are
both inside it; engines alternate period by period in a shuffled order so machine noise hits all
of them alike. Reported: the median over periods of the time per micro-step, its ratio to GA, and
the median of the same-round ratios ("paired").

    python benchmarks/e2e_step.py                       # ZeRO-2 and ZeRO-3, 2 ranks, fp32
    python benchmarks/e2e_step.py --stages 3 --periods 6 --hidden 256
    python benchmarks/e2e_step.py --offload --stages 2 --modes adamw-every-step,pma-default \
        --baseline adamw-every-step      # ZeRO-Offload: default AdamWPMA vs DeepSpeedCPUAdam, same config

Writes the table to stdout and the numbers to ``--out`` (JSON); ``--report-only --out X.json`` turns
a JSON into its section of ``docs/bench/optimizer_step.md``. Each rank runs one intra-op thread
(OMP_NUM_THREADS=1), as the test harness does on this 2-core machine.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from benchmarks.pages import add_report_options, link, read_result, repo_path, write_section  # noqa: E402

# ga: DeepSpeed's AdamW, gradient_accumulation_steps = K (one optimizer step per period);
# pma-foreach / pma-fused: AdamWPMA "reference", gas = 1, fused False / True;
# pma-default: AdamWPMA(lr, betas, eps, weight_decay, period) with nothing else, as the shipped configs;
# adamw-every-step: DeepSpeed's AdamW with gas = 1, the same config as pma-default but the optimizer
#   type (with offload_optimizer: DeepSpeedCPUAdam), so both step on every micro-batch.
MODES = ("ga", "pma-foreach", "pma-fused", "pma-default", "adamw-every-step")
DEFAULT_MODES = "ga,pma-foreach,pma-fused"
HYPER = dict(lr=1e-4, betas=[0.9, 0.95], eps=1e-8, weight_decay=0.01)


# ------------------------------------------------------------------------------------------ worker


def engine_config(stage: int, mode: str, period: int, micro_batch: int, offload: bool = False,
                  persistence_threshold: float = 1e4) -> dict:
    zero = {"stage": stage, "overlap_comm": False, "contiguous_gradients": True,
            "reduce_bucket_size": 5e8, "allgather_bucket_size": 5e8}
    if offload:  # ZeRO-Offload: GA's AdamW becomes DeepSpeedCPUAdam; PMA runs as a client-style CPU optimizer
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": False}
    if stage == 3:
        # Persistent (never partitioned) parameters are all-gathered after every optimizer step, so
        # with PMA after every micro-step. In a real model only norms and biases fall under
        # DeepSpeed's default 1e5 elements; in this few-M-param model the attention matrices would
        # too, so the default threshold is scaled down with the model (--persistence-threshold).
        zero.update(sub_group_size=1e9, stage3_prefetch_bucket_size=5e8,
                    stage3_param_persistence_threshold=persistence_threshold)
    if mode == "ga":
        optimizer, gas = {"type": "AdamW", "params": dict(HYPER)}, period
    elif mode == "adamw-every-step":
        optimizer, gas = {"type": "AdamW", "params": dict(HYPER)}, 1
    elif mode == "pma-default":
        optimizer, gas = {"type": "AdamWPMA", "params": dict(HYPER, period=period)}, 1
    else:
        optimizer = {"type": "AdamWPMA",
                     "params": dict(HYPER, period=period, variant="reference", fused=mode == "pma-fused")}
        gas = 1
    return {"train_micro_batch_size_per_gpu": micro_batch, "gradient_accumulation_steps": gas,
            "gradient_clipping": 0.0, "steps_per_print": 10**9, "optimizer": optimizer,
            "zero_optimization": zero}


def build_model(hidden: int, layers: int, vocab: int, seed: int):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=(8 * hidden // 3 + 63) // 64 * 64,
                         num_hidden_layers=layers, num_attention_heads=max(1, hidden // 64),
                         num_key_value_heads=max(1, hidden // 64), max_position_embeddings=512)
    return LlamaForCausalLM(config)


def worker(args) -> None:
    import logging
    import warnings

    import deepspeed
    import torch
    import torch.distributed as dist
    from deepspeed.utils import logger as ds_logger

    import pma_dist  # noqa: F401  (registers AdamWPMA as a DeepSpeed optimizer type)
    from pma_dist.distributed import pop_local_rank_arg, shutdown

    pop_local_rank_arg()
    ds_logger.setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = dist.get_rank(), dist.get_world_size()

    modes = args.modes.split(",")
    engines = {}
    for mode in modes:
        model = build_model(args.hidden, args.layers, args.vocab, seed=0)
        cfg = engine_config(args.stage, mode, args.period, args.micro_batch, args.offload,
                            args.persistence_threshold)
        engines[mode], *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=cfg)
    n_params = sum(p.numel() for p in build_model(args.hidden, args.layers, args.vocab, seed=0).parameters())

    gen = torch.Generator().manual_seed(1000 + rank)
    batches = [torch.randint(0, args.vocab, (args.micro_batch, args.seq), generator=gen) for _ in range(args.period)]

    def one_period(engine) -> float:
        """Run K micro-steps; return the seconds spent in engine.step() (optimizer, gathers, norms)."""
        in_step = 0.0
        for ids in batches:
            loss = engine(input_ids=ids, labels=ids).loss
            engine.backward(loss)
            t0 = time.perf_counter()
            engine.step()
            in_step += time.perf_counter() - t0
        return in_step

    rng = random.Random(0)
    times = {mode: [] for mode in modes}
    step_times = {mode: [] for mode in modes}
    optimizers = {mode: type(engine.optimizer).__name__ + "/" + type(engine.basic_optimizer).__name__
                  for mode, engine in engines.items()}
    for round_index in range(args.warmup + args.periods):
        order = list(modes)
        rng.shuffle(order)
        for mode in order:
            dist.barrier()
            t0 = time.perf_counter()
            in_step = one_period(engines[mode])
            dist.barrier()
            elapsed = (time.perf_counter() - t0) / args.period
            if round_index >= args.warmup:
                times[mode].append(elapsed)
                step_times[mode].append(in_step / args.period)
    if rank == 0:
        Path(args.out).write_text(json.dumps(dict(stage=args.stage, offload=args.offload, world=world, params=n_params,
                                                  persistence_threshold=args.persistence_threshold,
                                                  period=args.period, micro_batch=args.micro_batch, seq=args.seq,
                                                  optimizers=optimizers, micro_step_s=times,
                                                  engine_step_s=step_times)))
    shutdown(0)


# ------------------------------------------------------------------------------------------ launcher


def launch_stage(args, stage: int, out: Path) -> dict:
    from tests.launching import free_port, launcher_command, rank_env

    worker_args = ["--worker", "--stage", stage, "--out", out, "--period", args.period, "--periods", args.periods,
                   "--warmup", args.warmup, "--hidden", args.hidden, "--layers", args.layers, "--vocab", args.vocab,
                   "--seq", args.seq, "--micro-batch", args.micro_batch,
                   "--persistence-threshold", args.persistence_threshold,
                   "--modes", args.modes, "--baseline", args.baseline] + (["--offload"] if args.offload else [])
    port = free_port()
    cmd = launcher_command("torchrun", args.nproc, Path(__file__).resolve(), port) + [str(a) for a in worker_args]
    env = rank_env({"MASTER_PORT": str(port)})
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=args.timeout)
    if proc.returncode != 0 or not out.exists():
        raise SystemExit(f"ZeRO-{stage} run failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return json.loads(out.read_text())


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--stage", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--stages", default="2,3")
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--offload", action="store_true", help="offload the optimizer to CPU (ZeRO-Offload)")
    parser.add_argument("--period", type=int, default=8, help="K: PMA period = GA accumulation steps")
    parser.add_argument("--periods", type=int, default=5, help="timed periods per engine (median reported)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--persistence-threshold", type=float, default=1e4,
                        help="ZeRO-3 stage3_param_persistence_threshold (elements)")
    parser.add_argument("--modes", default=DEFAULT_MODES, help=f"comma-separated engines, of {', '.join(MODES)}")
    parser.add_argument("--baseline", default="ga", help="the mode every ratio is taken to (one of --modes)")
    parser.add_argument("--timeout", type=float, default=1800)
    add_report_options(parser, "benchmarks/results/e2e_step.json", "optimizer_step.md")
    args = parser.parse_args(argv)
    if args.report_only:
        return write_page(Path(args.out), Path(args.page))
    for name in ("nproc", "period", "periods", "hidden", "layers", "vocab", "seq", "micro_batch"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    modes = args.modes.split(",")
    unknown = [m for m in modes if m not in MODES]
    if unknown or len(set(modes)) != len(modes):
        raise SystemExit(f"--modes: {args.modes!r} must name distinct modes of {', '.join(MODES)}")
    if args.baseline not in modes:
        raise SystemExit(f"--baseline: {args.baseline!r} is not one of --modes {args.modes!r}")
    if args.worker:
        return worker(args)

    try:
        stages = [int(s) for s in args.stages.split(",")]
    except ValueError:
        raise SystemExit(f"--stages: expected comma-separated ZeRO stages, got {args.stages!r}")
    bad = [s for s in stages if s not in (1, 2, 3)]
    if bad:
        raise SystemExit(f"--stages: ZeRO stage(s) {bad} not benchmarked; use 1, 2 or 3")

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    result = dict(command=shlex.join(["e2e_step.py"] + (argv if argv is not None else sys.argv[1:])),
                  load_average_start=list(os.getloadavg()), stages=[])
    for stage in stages:
        run = launch_stage(args, stage, out.with_suffix(f".zero{stage}{'-offload' if args.offload else ''}.raw.json"))
        medians = {mode: statistics.median(ts) for mode, ts in run["micro_step_s"].items()}
        run["median_micro_step_ms"] = {mode: m * 1e3 for mode, m in medians.items()}
        run["median_engine_step_ms"] = {mode: statistics.median(ts) * 1e3
                                        for mode, ts in run["engine_step_s"].items()}
        base = args.baseline
        run["baseline"] = base
        run["ratio_to_baseline"] = {mode: m / medians[base] for mode, m in medians.items()}
        # Same-round ratio: the engines of one round ran back to back, under the same machine load.
        run["paired_ratio_to_baseline"] = {
            mode: statistics.median(t / b for t, b in zip(ts, run["micro_step_s"][base]))
            for mode, ts in run["micro_step_s"].items()}
        run["engine_step_ratio_to_baseline"] = {mode: m / run["median_engine_step_ms"][base]
                                                for mode, m in run["median_engine_step_ms"].items()}
        result["stages"].append(run)
        print(f"\n### ZeRO-{stage}{' + offload_optimizer' if args.offload else ''}, {run['world']} ranks, {run['params'] / 1e6:.1f}M params, K={run['period']}, "
              f"micro-batch {run['micro_batch']}x{run['seq']} tokens")
        print(f"| {'engine':<16} | {'optimizer (wrapper/basic)':<40} | {'median ms / micro-step':>22} | {'min':>7} "
              f"| {'max':>7} | {'ratio':>6} | {'paired':>6} | {'engine.step() ms':>16} | {'step ratio':>10} |")
        print(f"|{'-' * 18}|{'-' * 42}|{'-' * 23}:|{'-' * 8}:|{'-' * 8}:|{'-' * 7}:|{'-' * 7}:|{'-' * 17}:|{'-' * 11}:|")
        for mode in modes:
            ts = run["micro_step_s"][mode]
            print(f"| {mode:<16} | {run['optimizers'][mode]:<40} | {medians[mode] * 1e3:22.1f} | {min(ts) * 1e3:7.1f} "
                  f"| {max(ts) * 1e3:7.1f} | {run['ratio_to_baseline'][mode]:6.3f} "
                  f"| {run['paired_ratio_to_baseline'][mode]:6.3f} | {run['median_engine_step_ms'][mode]:16.1f} "
                  f"| {run['engine_step_ratio_to_baseline'][mode]:10.3f} |")
        print(f"(ratios to {base}; 'step ratio' compares the median time inside engine.step())")
    result["load_average_end"] = list(os.getloadavg())
    out.write_text(json.dumps(result, indent=1))
    print(f"\n# load average {result['load_average_start']} -> {result['load_average_end']}; wrote {out}; "
          f"its tables for the detail page: e2e_step.py --report-only --out {out}")
    return result


def write_page(source: Path, page: Path) -> dict:
    """The section of the detail page that shows one result JSON: command, load, a table per ZeRO stage."""
    result = read_result(source)
    load = lambda key: [round(x, 1) for x in result[key]]  # noqa: E731
    lines = [f"Command: `python benchmarks/{result['command']}` (load average {load('load_average_start')} -> "
             f"{load('load_average_end')}; JSON: [`{source.name}`]({link(page, source)}); generated by "
             f"`python benchmarks/e2e_step.py --report-only --out {repo_path(source)}`)."]
    for run in result["stages"]:
        # runs before --baseline existed compare with "ga" under the keys *_to_ga
        baseline = run.get("baseline", "ga")
        ratio = run.get("ratio_to_baseline", run.get("ratio_to_ga"))
        paired = run.get("paired_ratio_to_baseline", run.get("paired_ratio_to_ga"))
        modes = [mode for mode in MODES if mode in run["median_micro_step_ms"]]
        timed = len(run["micro_step_s"][baseline]) if "micro_step_s" in run else "?"
        lines += ["", f"**ZeRO-{run['stage']}{' + offload_optimizer' if run.get('offload') else ''}, {run['world']} "
                      f"ranks, {run['params'] / 1e6:.1f}M params, K = {run['period']}, "
                      f"micro-batch {run['micro_batch']} "
                      f"x {run['seq']} tokens per rank, {timed} timed periods per engine**", "",
                  f"| engine | median ms / micro-step | ratio to {baseline} | paired ratio | of which in engine.step() (ms) |",
                  "|---|---:|---:|---:|---:|"]
        lines += [f"| {mode} | {run['median_micro_step_ms'][mode]:.1f} | {ratio[mode]:.3f} "
                  f"| {paired[mode]:.3f} | {run['median_engine_step_ms'][mode]:.1f} |"
                  for mode in modes]
    write_section(page, f"e2e_step {source.name}", "\n".join(lines),
                  "Optimizer step: every table (`benchmarks/optimizer_step.py`, `benchmarks/e2e_step.py`)")
    return result


if __name__ == "__main__":
    main()
