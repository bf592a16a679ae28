#!/usr/bin/env python
"""Validate a GPU machine for pma-dist in one command (under 8 minutes on one H100/H200-class GPU).

    python benchmarks/gpu_check.py --out DIR

Sections, in this order (each written to DIR/gpu_check.json and DIR/gpu_check.md as soon as it ends, so
an interrupted run keeps what it measured; the measurements first, the tests with the time that is left):

1. ``step``: one optimizer step, timed with CUDA events after warm-up (median over two PMA periods):
   AdamW-PMA through the compiled step (``fused=True``) and the foreach path, against
   ``torch.optim.AdamW(fused=True)``, at 100M and 1B parameters (tensors of 2**25 elements), fp32 and
   bf16 parameters. Achieved bandwidth = the fewest bytes the step must move (``STEP_BYTES_PER_PARAM``
   of ``pma_dist/kernels/compiled.py``; torch's AdamW: 7 reads/writes of the parameter dtype) / time,
   against the device's peak: its datasheet value (table below, by device name) and a measured
   device-to-device copy (bytes read + written), both reported.
2. ``deepspeed``: a single-GPU DeepSpeed engine (bf16, ZeRO-2 and ZeRO-3) on a random-init model of
   Qwen2-0.5B's shape (a transformers config built here; no hub), GA (torch's AdamW, K accumulation
   steps) vs AdamW-PMA (foreach, and ``fused=True``: the compiled step): seconds per micro-step (median
   over periods, after one warm-up period) and peak device memory.
3. ``tests``: ``pytest -m cuda tests/test_cuda.py`` (the GPU tests), its summary line and counts; it gets
   what is left of ``--budget-s`` (at least a minute).

Without CUDA it runs the same sequence at toy size on CPU (numbers are not GPU measurements: its first
output line says so) and exits 0. Everything is local: no internet, no hub. See docs/gpu.md.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from pma_dist import AdamWPMA  # noqa: E402
from pma_dist import functional as F  # noqa: E402
from pma_dist.kernels import compiled  # noqa: E402
from pma_dist.schedule import PMAPhase  # noqa: E402

#: datasheet memory bandwidth, GB/s, by a substring of torch.cuda.get_device_name() (first match wins)
PEAK_GBPS = [
    ("H200", 4800), ("H100 NVL", 3900), ("H100 PCIe", 2000), ("H100", 3350), ("GH200", 4000),
    ("A100-SXM4-80GB", 2039), ("A100 80GB PCIe", 1935), ("A100", 1555), ("A40", 696), ("L40S", 864),
    ("L40", 864), ("A10", 600), ("L4", 300), ("V100", 900),
]
TENSOR_NUMEL = 2 ** 25  # one tensor of the step benchmark: 33.5M elements
SIZES = {"100M": 3, "1B": 30}  # tensors per size: 100.7M and 1.007B parameters
TOY_SIZES = {"toy": 4}  # on CPU: 4 tensors of 2**16 elements
TOY_TENSOR_NUMEL = 2 ** 16
PERIOD = 8  # K of the step benchmark and of the DeepSpeed engines on CUDA
TOY_PERIOD = 4  # K of the DeepSpeed engines of a CPU toy run (keeps it near a minute)
GOALS = {"step_vs_torch_fused": 1.05, "bandwidth_fraction": 0.80, "zero3_pma_vs_ga": 1.05}

QWEN2_0_5B = dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                  num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768,
                  rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=True)  # its published config.json
QWEN2_TOY = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                 rope_theta=10000.0, rms_norm_eps=1e-6, tie_word_embeddings=True)


# ---------------------------------------------------------------------------------------------- timing
class DeviceTimer:
    """Seconds of device work between start() and stop(): CUDA events on CUDA, a host clock after a
    synchronisation elsewhere (both sides synchronise, so queued work is never missed)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def start(self):
        if self.cuda:
            self._begin = torch.cuda.Event(enable_timing=True)
            self._end = torch.cuda.Event(enable_timing=True)
            self._begin.record()
        else:
            self._t0 = time.perf_counter()

    def stop(self) -> float:
        if self.cuda:
            self._end.record()
            self._end.synchronize()
            return self._begin.elapsed_time(self._end) / 1e3
        return time.perf_counter() - self._t0


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_info(device: torch.device) -> dict:
    if device.type != "cuda":
        import platform
        return {"type": "cpu", "name": platform.processor() or platform.machine(), "peak_gbps": None,
                "peak_source": "none: CPU toy run"}
    name = torch.cuda.get_device_name(device)
    props = torch.cuda.get_device_properties(device)
    peak = next((gbps for key, gbps in PEAK_GBPS if key in name), None)
    return {"type": "cuda", "name": name, "memory_gib": round(props.total_memory / 2 ** 30, 1),
            "multiprocessors": props.multi_processor_count, "capability": f"{props.major}.{props.minor}",
            "peak_gbps": peak, "peak_source": "datasheet table in benchmarks/gpu_check.py" if peak else
            f"no datasheet entry for {name!r}: measured copy bandwidth only",
            "torch": torch.__version__, "cuda": torch.version.cuda}


def copy_bandwidth_gbps(device: torch.device, numel: int, repeats: int = 20) -> float:
    """Device-to-device copy of ``numel`` fp32 elements, counting bytes read plus written; median."""
    src = torch.randn(numel, device=device)
    dst = torch.empty_like(src)
    timer, times = DeviceTimer(device), []
    for i in range(repeats + 3):
        synchronize(device)
        timer.start()
        dst.copy_(src)
        seconds = timer.stop()
        if i >= 3:
            times.append(seconds)
    del src, dst
    return 2 * numel * 4 / statistics.median(times) / 1e9


# ---------------------------------------------------------------------------------------------- 1. tests
def run_tests(timeout: float) -> dict:
    cmd = [sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-rs", "-p", "no:cacheprovider", "tests/test_cuda.py"]
    began = time.perf_counter()
    # its own session, so a timeout also ends the launchers and ranks the tests started (they hold the GPU)
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=timeout)
        code = proc.returncode
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        code = None
    summary = next((line.strip("= ") for line in reversed(output.splitlines()) if re.search(r"\d+ (passed|skipped|failed)", line)),
                   "timed out" if code is None else "no summary line")
    counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected)", summary)}
    return {"command": " ".join(cmd[1:]), "returncode": code, "summary": summary, "counts": counts,
            "seconds": round(time.perf_counter() - began, 1), "output_tail": output[-4000:]}


# ---------------------------------------------------------------------------------------------- 2. step
def _bytes_per_param(impl: str, dtype: torch.dtype) -> int:
    if impl == "torch_adamw_fused":
        return 7 * torch.finfo(dtype).bits // 8  # read p, g, m, v; write p, m, v; state in the parameter dtype
    path = "compiled" if impl == "pma_compiled" else "foreach"
    return compiled.STEP_BYTES_PER_PARAM[("adamw", path, dtype)]


def _step_fn(impl: str, params, device: torch.device):
    hyper = dict(lr=1e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.01)
    if impl == "torch_adamw_fused":
        return torch.optim.AdamW(params, fused=True, **hyper).step
    if impl == "pma_foreach":
        return AdamWPMA(params, period=PERIOD, variant="paper", foreach=True, **hyper).step
    if device.type != "cpu":
        return AdamWPMA(params, period=PERIOD, variant="paper", fused=True, **hyper).step
    # on CPU fused=True is the C++ kernel; the compiled step is timed through its function entry point
    m = [torch.zeros_like(p, dtype=torch.float32) for p in params]
    v = [torch.zeros_like(p, dtype=torch.float32) for p in params]
    clock = {"t": 0}

    def step():
        clock["t"] += 1
        compiled.adamw_pma_compiled(params, [p.grad for p in params], m, v,
                                    phase=PMAPhase(clock["t"], PERIOD), lr=1e-4, beta1=0.9, beta2=0.95,
                                    eps=1e-8, weight_decay=0.01, variant="paper")
    return step


def time_step(impl: str, n_tensors: int, numel: int, dtype: torch.dtype, device: torch.device,
              warmup: int, timed: int) -> dict:
    gen = torch.Generator(device=device).manual_seed(0)
    params = [torch.randn(numel, device=device, generator=gen).to(dtype).requires_grad_() for _ in range(n_tensors)]
    for p in params:
        p.grad = torch.randn(numel, device=device, generator=gen).to(dtype)
    step = _step_fn(impl, params, device)
    timer = DeviceTimer(device)
    synchronize(device)
    began = time.perf_counter()
    step()  # first step: state creation, and for the compiled step its compilation
    synchronize(device)
    first = time.perf_counter() - began
    for _ in range(warmup - 1):
        step()
    times = []
    for _ in range(timed):  # whole periods: PMA's small and large steps in their real mix
        synchronize(device)
        timer.start()
        step()
        times.append(timer.stop())
    n_params = n_tensors * numel
    seconds = statistics.median(times)
    bytes_per_param = _bytes_per_param(impl, dtype)
    result = {"impl": impl, "dtype": str(dtype).replace("torch.", ""), "params": n_params, "tensors": n_tensors,
              "median_ms": seconds * 1e3, "min_ms": min(times) * 1e3, "first_step_s": first,
              "bytes_per_param": bytes_per_param, "achieved_gbps": n_params * bytes_per_param / seconds / 1e9}
    del params, step
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def run_step(device: torch.device, sizes: dict, numel: int, warmup: int, timed: int, info: dict) -> dict:
    rows = []
    for size, n_tensors in sizes.items():
        for dtype in (torch.float32, torch.bfloat16):
            for impl in ("pma_compiled", "pma_foreach", "torch_adamw_fused"):
                row = dict(size=size, **time_step(impl, n_tensors, numel, dtype, device, warmup, timed))
                for key, peak in (("datasheet", info.get("peak_gbps")), ("copy", info.get("copy_gbps"))):
                    row[f"fraction_of_{key}_peak"] = row["achieved_gbps"] / peak if peak else None
                rows.append(row)
                print(f"  step {size} {row['dtype']} {impl}: {row['median_ms']:.3f} ms, "
                      f"{row['achieved_gbps']:.0f} GB/s", flush=True)
    return {"rows": rows, "warmup_steps": warmup, "timed_steps": timed, "period": PERIOD,
            "timer": "CUDA events" if device.type == "cuda" else "host clock after synchronize"}


# ---------------------------------------------------------------------------------------------- 3. deepspeed
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _init_single_process(device: torch.device):
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if device.type == "cuda" else "cpu")
    for key, value in (("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", str(_free_port())), ("RANK", "0"),
                       ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_WORLD_SIZE", "1")):
        os.environ.setdefault(key, value)
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    if accelerator.device_name() != device.type:
        raise RuntimeError(f"DeepSpeed's accelerator is {accelerator.device_name()!r} but this run is on {device.type!r} "
                           f"(DS_ACCELERATOR={os.environ.get('DS_ACCELERATOR')!r})")
    deepspeed.init_distributed(dist_backend=accelerator.communication_backend_name())
    return deepspeed, accelerator


def _engine_config(stage: int, mode: str, micro_batch: int, period: int) -> dict:
    hyper = dict(lr=1e-5, betas=[0.9, 0.95], eps=1e-8, weight_decay=0.0)
    zero = {"stage": stage, "overlap_comm": False, "contiguous_gradients": True,
            "reduce_bucket_size": 5e8, "allgather_bucket_size": 5e8}
    if stage == 3:
        zero.update(sub_group_size=1e9, stage3_prefetch_bucket_size=5e8, stage3_param_persistence_threshold=1e5)
    if mode == "ga":  # torch's AdamW (DeepSpeed's FusedAdam would need its CUDA op built first)
        optimizer, gas = {"type": "AdamW", "params": dict(hyper, torch_adam=True)}, period
    else:
        optimizer = {"type": "AdamWPMA", "params": dict(hyper, period=period, variant="paper",
                                                          fused=mode == "pma_fused")}
        gas = 1
    return {"train_micro_batch_size_per_gpu": micro_batch, "gradient_accumulation_steps": gas,
            "gradient_clipping": 1.0, "steps_per_print": 10 ** 9, "bf16": {"enabled": True},
            "optimizer": optimizer, "zero_optimization": zero}


def run_deepspeed(device: torch.device, shape: dict, micro_batch: int, seq: int, period: int, periods: int) -> dict:
    """``pma_fused`` is AdamWPMA(fused=True): the compiled step on GPU tensors, the C++ kernel on CPU."""
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    deepspeed, accelerator = _init_single_process(device)
    logging.getLogger("DeepSpeed").setLevel(logging.ERROR)
    import pma_dist  # noqa: F401  (registers AdamWPMA as a DeepSpeed optimizer type)
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(**shape)
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, config.vocab_size, (micro_batch, seq), generator=gen) for _ in range(period)]
    rows = []
    for stage in (2, 3):
        for mode in ("ga", "pma_foreach", "pma_fused"):
            torch.manual_seed(0)
            model = Qwen2ForCausalLM(config)
            n_params = sum(p.numel() for p in model.parameters())
            gc.collect()
            accelerator.empty_cache()
            accelerator.reset_peak_memory_stats()
            engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(),
                                              config=_engine_config(stage, mode, micro_batch, period))
            per_micro_step, losses = [], []
            for period in range(periods + 1):  # the first period warms up (and compiles)
                synchronize(device)
                began = time.perf_counter()
                for ids in batches:
                    ids = ids.to(engine.device)
                    loss = engine(input_ids=ids, labels=ids).loss
                    engine.backward(loss)
                    engine.step()
                    losses.append(loss.detach())
                synchronize(device)
                if period:
                    per_micro_step.append((time.perf_counter() - began) / period)
            row = {"zero_stage": stage, "mode": mode, "params": n_params, "micro_batch": micro_batch, "seq": seq,
                   "period": period, "periods_timed": periods, "s_per_micro_step": statistics.median(per_micro_step),
                   "s_per_micro_step_all": per_micro_step,
                   "peak_memory_gib": accelerator.max_memory_allocated() / 2 ** 30,
                   "first_loss": float(losses[0]), "last_loss": float(losses[-1]),
                   "finite": bool(torch.isfinite(torch.stack(losses)).all())}
            rows.append(row)
            print(f"  ZeRO-{stage} {mode}: {row['s_per_micro_step'] * 1e3:.1f} ms/micro-step, "
                  f"peak {row['peak_memory_gib']:.2f} GiB", flush=True)
            engine.destroy()
            del engine, model
    for row in rows:
        ga = next(r for r in rows if r["zero_stage"] == row["zero_stage"] and r["mode"] == "ga")
        row["vs_ga"] = row["s_per_micro_step"] / ga["s_per_micro_step"]
    return {"model": "Qwen2ForCausalLM, random init, config " + json.dumps(shape), "rows": rows,
            "timer": "host clock per period after synchronize", "memory": "accelerator.max_memory_allocated()"}


# ---------------------------------------------------------------------------------------------- report
def goals(results: dict) -> dict:
    """The issue's goals, evaluated only on a CUDA run (otherwise: not measured)."""
    out = {name: "not measured" for name in GOALS}
    if results["mode"] != "cuda":
        return out
    rows = results.get("step", {}).get("rows", [])
    pick = {(r["size"], r["dtype"], r["impl"]): r for r in rows}
    ours, torch_fused = pick.get(("1B", "float32", "pma_compiled")), pick.get(("1B", "float32", "torch_adamw_fused"))
    if ours and torch_fused:
        ratio = ours["median_ms"] / torch_fused["median_ms"]
        out["step_vs_torch_fused"] = f"{ratio:.2f}x ({'met' if ratio <= GOALS['step_vs_torch_fused'] else 'missed'})"
    if ours and ours.get("fraction_of_datasheet_peak"):
        f = ours["fraction_of_datasheet_peak"]
        out["bandwidth_fraction"] = f"{100 * f:.0f}% of datasheet ({'met' if f >= GOALS['bandwidth_fraction'] else 'missed'})"
    ds_rows = results.get("deepspeed", {}).get("rows", [])
    z3 = [r for r in ds_rows if r["zero_stage"] == 3 and r["mode"] != "ga"]
    if z3:
        best = min(z3, key=lambda r: r["vs_ga"])
        out["zero3_pma_vs_ga"] = (f"{best['vs_ga']:.2f}x ({best['mode']}; "
                                  f"{'met' if best['vs_ga'] <= GOALS['zero3_pma_vs_ga'] else 'missed'})")
    return out


def markdown(results: dict) -> str:
    info = results["device"]
    lines = [f"# gpu_check: {results['headline']}", "",
             f"Device: {info['name']} ({info['type']}); peak bandwidth: "
             f"{info.get('peak_gbps') or 'n/a'} GB/s ({info['peak_source']}); measured copy: "
             f"{results['device'].get('copy_gbps', float('nan')):.0f} GB/s. Elapsed {results['elapsed_s']:.0f} s.", ""]
    tests = results.get("tests")
    if tests:
        lines += ["## cuda tests", "", f"`{tests['command']}`: {tests['summary']} (exit {tests['returncode']}, "
                  f"{tests['seconds']} s)", ""]
    step = results.get("step")
    if step and "rows" in step:
        lines += ["## Optimizer step", "", f"Median of {step['timed_steps']} steps after {step['warmup_steps']} "
                  f"warm-up ({step['timer']}).", "",
                  "| size | dtype | impl | ms | B/param | GB/s | of datasheet | of copy | first step s |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in step["rows"]:
            frac = lambda v: f"{100 * v:.0f}%" if v else "n/a"  # noqa: E731
            lines.append(f"| {r['size']} | {r['dtype']} | {r['impl']} | {r['median_ms']:.3f} | {r['bytes_per_param']} | "
                         f"{r['achieved_gbps']:.0f} | {frac(r['fraction_of_datasheet_peak'])} | "
                         f"{frac(r['fraction_of_copy_peak'])} | {r['first_step_s']:.1f} |")
        lines.append("")
    ds = results.get("deepspeed")
    if ds and "rows" in ds:
        lines += ["## DeepSpeed, one device, bf16", "", ds["model"], "",
                  "| ZeRO | mode | s/micro-step | vs GA | peak GiB | loss first -> last |", "|---|---|---|---|---|---|"]
        for r in ds["rows"]:
            lines.append(f"| {r['zero_stage']} | {r['mode']} | {r['s_per_micro_step']:.4f} | {r['vs_ga']:.3f} | "
                         f"{r['peak_memory_gib']:.2f} | {r['first_loss']:.3f} -> {r['last_loss']:.3f} |")
        lines.append("")
    for name in ("step", "deepspeed"):
        if results.get(name, {}).get("error"):
            lines += [f"## {name}: error", "", "```", results[name]["error"][-2000:], "```", ""]
    lines += ["## Goals", ""] + [f"- {k}: {v}" for k, v in results["goals"].items()]
    return "\n".join(lines) + "\n"


def write(out: Path, results: dict) -> None:
    results["goals"] = goals(results)
    (out / "gpu_check.json").write_text(json.dumps(results, indent=1))
    (out / "gpu_check.md").write_text(markdown(results))


def _guarded(fn, *args):
    import traceback
    try:
        return fn(*args)
    except Exception:
        return {"error": traceback.format_exc()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--sections", default="step,deepspeed,tests", help="comma-separated subset")
    parser.add_argument("--budget-s", type=float, default=470.0,
                        help="whole-run budget; the tests section (last) gets what is left, at least 60 s")
    parser.add_argument("--periods", type=int, default=2, help="timed periods per DeepSpeed engine")
    args = parser.parse_args(argv)
    sections = args.sections.split(",")
    unknown = [s for s in sections if s not in ("tests", "step", "deepspeed")]
    if unknown:
        parser.error(f"unknown section(s) {unknown}; known: tests, step, deepspeed")
    began = time.perf_counter()
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    if not cuda:
        torch.set_num_threads(1)  # the toy run checks the sequence, not speed; spare a shared CPU machine
    headline = (f"CUDA run on {torch.cuda.get_device_name(device)}" if cuda else
                "no CUDA device: CPU toy run at toy sizes (its numbers are not GPU measurements)")
    print(f"gpu_check: {headline}", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    info = device_info(device)
    info["copy_gbps"] = copy_bandwidth_gbps(device, 2 ** 28 if cuda else 2 ** 22)
    results = {"mode": "cuda" if cuda else "cpu-toy", "headline": headline, "device": info, "elapsed_s": 0.0}
    steps = [
        ("step", lambda: run_step(device, SIZES if cuda else TOY_SIZES, TENSOR_NUMEL if cuda else TOY_TENSOR_NUMEL,
                                  3 if cuda else 2, 2 * PERIOD if cuda else PERIOD, info)),
        ("deepspeed", lambda: run_deepspeed(device, QWEN2_0_5B if cuda else QWEN2_TOY, 4 if cuda else 2,
                                            1024 if cuda else 32, PERIOD if cuda else TOY_PERIOD,
                                            args.periods if cuda else 1)),
        ("tests", lambda: run_tests(max(60.0, args.budget_s - (time.perf_counter() - began)))),
    ]
    for name, run in steps:
        if name not in sections:
            continue
        print(f"gpu_check: {name} ...", flush=True)
        results[name] = _guarded(run)
        results["elapsed_s"] = time.perf_counter() - began
        write(args.out, results)
        if "error" in results[name]:
            print(f"gpu_check: {name} failed:\n{results[name]['error'][-1500:]}", flush=True)
    print(markdown(results))
    print(f"gpu_check: wrote {args.out / 'gpu_check.json'} and {args.out / 'gpu_check.md'}")
    failed = [n for n in sections if "error" in results.get(n, {}) or
              (n == "tests" and results["tests"].get("returncode") != 0)]
    if failed:
        print(f"gpu_check: FAILED sections: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
