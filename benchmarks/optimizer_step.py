"""Optimizer-step time of AdamW-PMA and Lion-PMA against the AdamW/Lion steps people already use.

For each model size (transformer-shaped fp32 tensors) and each thread count, every candidate steps
the SAME parameters, gradients and moment buffers (their state dicts are pre-filled with shared
tensors, so 25 optimizers cost one set of buffers), in an interleaved, shuffled order, and the table
reports medians and the ratio to the fastest ``torch.optim.AdamW`` variant measured in the same run
("ratio": of the medians; "paired": median over rounds of the same-round ratio; "min ratio": of the
fastest rounds, the best estimate of the unloaded machine when other jobs share the CPU).
Step time does not depend on the values, so sharing buffers changes nothing but memory.

Bytes moved: an AdamW-type step reads param, grad, exp_avg, exp_avg_sq and writes param, exp_avg,
exp_avg_sq (28 B per fp32 parameter); a Lion-type step reads param, grad, exp_avg and writes param,
exp_avg (20 B). Each candidate's GB/s is compared with a "stream" candidate timed in the same rounds:
a C++ loop with exactly the memory traffic of an AdamW step and next to no arithmetic (p += g, m += g,
v += g on scratch buffers): the machine's practical limit for this access pattern, under the same load.

    python benchmarks/optimizer_step.py                          # 1M,10M,100M params; 1 and all threads
    python benchmarks/optimizer_step.py --sizes 10M --threads 1 --repeats 5 --quick
    python benchmarks/optimizer_step.py --match "fused|DeepSpeed" --repeats 15   # the goal candidates only
    python benchmarks/optimizer_step.py --sizes 16.8M --threads 1,2 --match "default|DeepSpeed" --repeats 21
        # default-constructed AdamWPMA / LionPMA vs torch.optim.AdamW(fused=True) (issue 12's goal)

Writes the table to stdout and everything to ``--out`` (JSON);
``--report-only --out X.json`` turns a JSON into its section of ``docs/bench/optimizer_step.md``.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import random
import shlex
import re
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.pages import add_report_options, link, read_result, repo_path, write_section  # noqa: E402
from pma_dist import AdamWPMA, LionPMA  # noqa: E402
from pma_dist.kernels import load_cpu_kernels  # noqa: E402

PERIOD = 8
ADAMW_BYTES_PER_PARAM = 28
LION_BYTES_PER_PARAM = 20
STREAM = "stream: AdamW's traffic, no math"
SMALL_STEP, LARGE_STEP = 1, PERIOD  # t=1 is a small step of the period, t=K the large one


# --------------------------------------------------------------------------------------- model


def transformer_shapes(n_params: int) -> List[tuple]:
    """Llama-style tensors (attention d x d, SwiGLU d x 8d/3, norms d) plus an embedding filling up to n."""
    hidden = 128 if n_params < 4_000_000 else 512 if n_params < 40_000_000 else 1024
    ffn = (8 * hidden // 3 + 63) // 64 * 64
    layer = [(hidden, hidden)] * 4 + [(ffn, hidden), (ffn, hidden), (hidden, ffn), (hidden,), (hidden,)]
    per_layer = sum(torch.Size(s).numel() for s in layer)
    layers = max(1, n_params // per_layer - 1)
    vocab = max(1, (n_params - layers * per_layer) // hidden)
    return [(vocab, hidden)] + layer * layers + [(hidden,)]


def parse_size(text: str) -> int:
    text = text.strip().upper()
    scale = {"K": 10**3, "M": 10**6, "G": 10**9}.get(text[-1:], 1)
    number = text[:-1] if text[-1:] in "KMG" else text
    try:
        value = int(float(number) * scale)
    except ValueError:
        raise SystemExit(f"--sizes: cannot read {text!r} as a parameter count (e.g. 1M, 10M, 2.5M, 100000)")
    if value < 1000:
        raise SystemExit(f"--sizes: {text!r} is too small to be a model; use at least 1K parameters")
    return value


# --------------------------------------------------------------------------------------- candidates


@dataclass
class Candidate:
    name: str
    family: str  # "adamw" or "lion": which bytes-per-parameter applies
    step: Callable[[], None]
    kind: str  # "baseline" or "pma"


class Buffers:
    """One set of parameters, gradients and moments, shared by every candidate."""

    def __init__(self, shapes: List[tuple], seed: int = 0):
        gen = torch.Generator().manual_seed(seed)
        self.params = [torch.nn.Parameter(torch.randn(s, generator=gen) * 0.02) for s in shapes]
        for p in self.params:
            p.grad = torch.randn(p.shape, generator=gen) * 1e-3
        self.exp_avgs = [torch.randn(s, generator=gen) * 1e-3 for s in shapes]
        self.exp_avg_sqs = [torch.rand(s, generator=gen) * 1e-6 for s in shapes]
        self.numel = sum(p.numel() for p in self.params)
        self.shapes = shapes

    def adopt(self, optimizer, step_value, lion: bool = False) -> None:
        """Point the optimizer's state at the shared buffers (each keeps its own step counter)."""
        for p, m, v in zip(self.params, self.exp_avgs, self.exp_avg_sqs):
            state = {"step": step_value(), "exp_avg": m}
            if not lion:
                state["exp_avg_sq"] = v
            optimizer.state[p] = state


@torch.no_grad()
def plain_lion_step(params, grads, exp_avgs, lr=1e-4, beta1=0.9, beta2=0.99, weight_decay=0.0):
    """Lion (Chen et al. 2023) written with torch's foreach ops: the baseline a user would have."""
    torch._foreach_mul_(params, 1 - lr * weight_decay)
    update = torch._foreach_mul(exp_avgs, beta1)
    torch._foreach_add_(update, grads, alpha=1 - beta1)
    torch._foreach_sign_(update)
    torch._foreach_add_(params, update, alpha=-lr)
    torch._foreach_mul_(exp_avgs, beta2)
    torch._foreach_add_(exp_avgs, grads, alpha=1 - beta2)


def pma_stepper(optimizer, step: int) -> Callable[[], None]:
    def run():
        for group in optimizer.param_groups:
            group["step"] = step - 1  # the next step() is step `step` of the period: small or large
        optimizer.step()
    return run


def build_candidates(buffers: Buffers, quick: bool, with_deepspeed: bool) -> List[Candidate]:
    params = buffers.params
    tensor_step = lambda: torch.tensor(1.0)  # noqa: E731
    candidates: List[Candidate] = []

    torch_paths = [("for-loop", dict(foreach=False)), ("foreach", dict(foreach=True)), ("fused", dict(fused=True))]
    for label, kwargs in torch_paths:
        if quick and label == "for-loop":
            continue
        opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=1e-2, **kwargs)
        buffers.adopt(opt, tensor_step)
        candidates.append(Candidate(f"torch AdamW {label}", "adamw", opt.step, "baseline"))

    # The roofline, timed in the same rounds as everyone else: the memory traffic of an AdamW step
    # (read p, g, m, v; write p, m, v) with next to no arithmetic, on scratch buffers of the same
    # shapes, with the fused kernels' chunking and threads. Several streams, like the optimizers: a
    # single-buffer copy or add_ reaches less bandwidth per core and would understate the limit.
    scratch = [[torch.zeros(s) for s in buffers.shapes] for _ in range(4)]
    stream = load_cpu_kernels().stream_like_adamw
    candidates.append(Candidate(STREAM, "adamw", lambda: stream(*scratch), "roofline"))

    grads = [p.grad for p in params]
    candidates.append(Candidate("Lion (plain foreach)", "lion",
                                lambda: plain_lion_step(params, grads, buffers.exp_avgs), "baseline"))

    if with_deepspeed:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        opt = DeepSpeedCPUAdam(params, lr=1e-3, weight_decay=1e-2, adamw_mode=True)
        buffers.adopt(opt, lambda: 0)
        candidates.append(Candidate("DeepSpeedCPUAdam", "adamw", opt.step, "baseline"))

    # What a user gets from AdamWPMA(params, lr, period=K) / LionPMA(...): no path, no variant chosen.
    opt = AdamWPMA(params, lr=1e-3, weight_decay=1e-2, period=PERIOD)
    buffers.adopt(opt, tensor_step)
    for step_name, t in (("small", SMALL_STEP), ("large", LARGE_STEP)):
        candidates.append(Candidate(f"AdamWPMA default {step_name}", "adamw", pma_stepper(opt, t), "pma"))
    opt = LionPMA(params, lr=1e-4, period=PERIOD)
    buffers.adopt(opt, tensor_step, lion=True)
    for step_name, t in (("small", SMALL_STEP), ("large", LARGE_STEP)):
        candidates.append(Candidate(f"LionPMA default {step_name}", "lion", pma_stepper(opt, t), "pma"))

    pma_paths = [("per-tensor", dict(foreach=False)), ("foreach", dict(foreach=True)), ("fused", dict(fused=True))]
    for label, kwargs in pma_paths:
        if quick and label == "per-tensor":
            continue
        for variant in ("reference", "paper"):
            opt = AdamWPMA(params, lr=1e-3, weight_decay=1e-2, period=PERIOD, variant=variant, **kwargs)
            buffers.adopt(opt, tensor_step)
            for step_name, t in (("small", SMALL_STEP), ("large", LARGE_STEP)):
                candidates.append(Candidate(f"AdamWPMA {label} {variant} {step_name}", "adamw",
                                            pma_stepper(opt, t), "pma"))
        opt = LionPMA(params, lr=1e-4, period=PERIOD, **kwargs)
        buffers.adopt(opt, tensor_step, lion=True)
        for step_name, t in (("small", SMALL_STEP), ("large", LARGE_STEP)):
            candidates.append(Candidate(f"LionPMA {label} {step_name}", "lion", pma_stepper(opt, t), "pma"))
    return candidates


# --------------------------------------------------------------------------------------- timing


def time_candidates(candidates: List[Candidate], repeats: int, warmup: int, seed: int) -> Dict[str, List[float]]:
    rng = random.Random(seed)
    times: Dict[str, List[float]] = {c.name: [] for c in candidates}
    for round_index in range(warmup + repeats):
        order = candidates[:]
        rng.shuffle(order)  # interleaved and shuffled: slow drifts of a shared machine hit everyone alike
        for c in order:
            t0 = time.perf_counter()
            c.step()
            elapsed = time.perf_counter() - t0
            if round_index >= warmup:
                times[c.name].append(elapsed)
    return times


def machine_info() -> dict:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = dict(cpu=model or platform.processor(), logical_cpus=os.cpu_count(), python=platform.python_version(),
                torch=torch.__version__, cpu_capability=torch.backends.cpu.get_cpu_capability())
    try:
        import deepspeed
        info["deepspeed"] = deepspeed.__version__
    except ImportError:
        pass
    return info


def load_average() -> Optional[List[float]]:
    try:
        return list(os.getloadavg())
    except OSError:
        return None


# --------------------------------------------------------------------------------------- main


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="1M,10M,100M", help="comma-separated parameter counts")
    parser.add_argument("--threads", default=f"1,{os.cpu_count()}", help="comma-separated intra-op thread counts")
    parser.add_argument("--repeats", type=int, default=7, help="timed rounds per candidate (median reported)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="skip the slow per-tensor/for-loop paths")
    parser.add_argument("--match", default=None,
                        help="only candidates whose name matches this regex (torch AdamW fused and the stream are kept)")
    parser.add_argument("--no-deepspeed", action="store_true", help="skip DeepSpeedCPUAdam")
    add_report_options(parser, "benchmarks/results/optimizer_step.json", "optimizer_step.md")
    args = parser.parse_args(argv)
    if args.report_only:
        return write_page(Path(args.out), Path(args.page))

    sizes = [parse_size(s) for s in args.sizes.split(",")]
    try:
        thread_counts = [int(t) for t in args.threads.split(",")]
    except ValueError:
        raise SystemExit(f"--threads: expected comma-separated integers, got {args.threads!r}")
    if any(t < 1 for t in thread_counts):
        raise SystemExit(f"--threads: thread counts must be >= 1, got {args.threads!r}")
    if args.match:
        try:
            re.compile(args.match)
        except re.error as exc:
            raise SystemExit(f"--match: {args.match!r} is not a regular expression ({exc})")
    if args.repeats < 1 or args.warmup < 0:
        raise SystemExit(f"--repeats must be >= 1 and --warmup >= 0 (got {args.repeats}, {args.warmup})")

    result = dict(command=shlex.join([Path(sys.argv[0]).name] + (argv if argv is not None else sys.argv[1:])),
                  machine=machine_info(), load_average_start=load_average(), period=PERIOD, runs=[])
    print(f"# {result['machine']}\n# load average at start: {result['load_average_start']}")
    for threads in thread_counts:
        torch.set_num_threads(threads)
        print(f"\n## {threads} thread(s)")
        for size in sizes:
            shapes = transformer_shapes(size)
            buffers = Buffers(shapes)
            candidates = build_candidates(buffers, args.quick, not args.no_deepspeed)
            if args.match:
                candidates = [c for c in candidates
                              if c.name in ("torch AdamW fused", STREAM) or re.search(args.match, c.name)]
            times = time_candidates(candidates, args.repeats, args.warmup, seed=size + threads)
            run = summarise(candidates, times, buffers.numel, len(shapes), threads)
            result["runs"].append(run)
            print_run(run)
            del buffers, candidates, times
            gc.collect()
    result["load_average_end"] = load_average()
    print(f"\n# load average at end: {result['load_average_end']}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"# wrote {out}; its tables for the detail page: {Path(sys.argv[0]).name} --report-only --out {out}")
    return result


def write_page(source: Path, page: Path) -> dict:
    """The section of the detail page that shows one result JSON: command, machine, load, every table."""
    result = read_result(source)
    m = result["machine"]
    load = lambda key: [round(x, 1) for x in result[key]] if result.get(key) else "?"  # noqa: E731
    lines = [f"Command: `python benchmarks/{result['command']}` (JSON: [`{source.name}`]({link(page, source)}); "
             f"generated by `python benchmarks/optimizer_step.py --report-only --out {repo_path(source)}`).", "",
             f"Machine: {m['cpu']}, {m['logical_cpus']} logical CPUs, CPU capability {m['cpu_capability']}; "
             f"Python {m['python']}, torch {m['torch']}, DeepSpeed {m.get('deepspeed', 'not installed')}; "
             f"load average {load('load_average_start')} -> {load('load_average_end')}."]
    for run in result["runs"]:
        lines += ["", run_table(run)]
    write_section(page, f"optimizer_step {source.name}", "\n".join(lines),
                  "Optimizer step: every table (`benchmarks/optimizer_step.py`, `benchmarks/e2e_step.py`)")
    return result


def run_table(run: dict) -> str:
    """One size and thread count: the ratios to the fastest torch AdamW and, where timed, to DeepSpeedCPUAdam."""
    rows = {r["name"]: r for r in run["rows"]}
    ds = rows.get("DeepSpeedCPUAdam")
    lines = [f"**{run['params'] / 1e6:.0f}M params ({run['tensors']} tensors), {run['threads']} thread(s)** — "
             f"stream {run['stream_gb_per_s']:.1f} GB/s", "",
             "| candidate | median ms | ratio | paired | min ratio | spread | GB/s | % stream |"
             + (" vs DeepSpeedCPUAdam |" if ds else ""),
             "|---|---:|---:|---:|---:|---:|---:|---:|" + ("---:|" if ds else "")]
    for r in run["rows"]:
        lines.append(f"| {r['name']} | {r['median_ms']:.2f} | {r['ratio_to_best_torch_adamw']:.2f} "
                     f"| {r['paired_ratio_to_best_torch_adamw']:.2f} | {r['min_ratio_to_best_torch_adamw']:.2f} "
                     f"| {r['spread']:.0%} | {r['gb_per_s']:.1f} | {r['fraction_of_stream_bandwidth']:.0%} |"
                     + (f" {r['median_ms'] / ds['median_ms']:.2f} |" if ds else ""))
    return "\n".join(lines)


def summarise(candidates, times, numel, n_tensors, threads) -> dict:
    medians = {c.name: statistics.median(times[c.name]) for c in candidates}
    minima = {c.name: min(times[c.name]) for c in candidates}
    adamw_baselines = [c.name for c in candidates if c.name.startswith("torch AdamW")]
    best_adamw = min(adamw_baselines, key=medians.get)
    bandwidth = numel * ADAMW_BYTES_PER_PARAM / medians[STREAM] / 1e9
    rows = []
    for c in candidates:
        moved = numel * (ADAMW_BYTES_PER_PARAM if c.family == "adamw" else LION_BYTES_PER_PARAM)
        gbps = moved / medians[c.name] / 1e9
        spread = (max(times[c.name]) - min(times[c.name])) / medians[c.name]
        # Same-round ratio: both timings of a round come from the same stretch of machine load.
        paired = statistics.median(t / b for t, b in zip(times[c.name], times[best_adamw]))
        rows.append(dict(name=c.name, kind=c.kind, family=c.family, median_ms=medians[c.name] * 1e3,
                         min_ms=minima[c.name] * 1e3, spread=spread,
                         ratio_to_best_torch_adamw=medians[c.name] / medians[best_adamw],
                         min_ratio_to_best_torch_adamw=minima[c.name] / minima[best_adamw],
                         paired_ratio_to_best_torch_adamw=paired,
                         gb_per_s=gbps, fraction_of_stream_bandwidth=gbps / bandwidth,
                         times_ms=[t * 1e3 for t in times[c.name]]))
    # "spread" = (max - min) / median over the timed rounds: the noise of this run.
    run = dict(threads=threads, params=numel, tensors=n_tensors, stream_gb_per_s=bandwidth,
               best_torch_adamw=best_adamw, rows=rows)
    if "DeepSpeedCPUAdam" in medians:
        run["ratio_fused_pma_to_deepspeed_cpu_adam"] = {
            r["name"]: r["median_ms"] / (medians["DeepSpeedCPUAdam"] * 1e3)
            for r in rows if r["name"].startswith(("AdamWPMA fused", "LionPMA fused", "AdamWPMA default",
                                                   "LionPMA default"))}
    return run


def print_run(run: dict) -> None:
    print(f"\n### {run['params'] / 1e6:.1f}M params in {run['tensors']} tensors, {run['threads']} thread(s); "
          f"ratio = median / median of {run['best_torch_adamw']}; stream bandwidth {run['stream_gb_per_s']:.1f} GB/s")
    print(f"| {'candidate':<36} | {'median ms':>9} | {'ratio':>5} | {'paired':>6} | {'min ms':>8} | {'min ratio':>9} "
          f"| {'spread':>6} | {'GB/s':>6} | {'% stream bw':>9} |")
    print(f"|{'-' * 38}|{'-' * 10}:|{'-' * 6}:|{'-' * 7}:|{'-' * 9}:|{'-' * 10}:|{'-' * 7}:|{'-' * 7}:|{'-' * 10}:|")
    for r in run["rows"]:
        print(f"| {r['name']:<36} | {r['median_ms']:9.2f} | {r['ratio_to_best_torch_adamw']:5.2f} "
              f"| {r['paired_ratio_to_best_torch_adamw']:6.2f} | {r['min_ms']:8.2f} "
              f"| {r['min_ratio_to_best_torch_adamw']:9.2f} | {r['spread']:6.0%} | {r['gb_per_s']:6.1f} "
              f"| {r['fraction_of_stream_bandwidth']:9.0%} |")


if __name__ == "__main__":
    main()
