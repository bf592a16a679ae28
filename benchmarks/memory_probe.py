#!/usr/bin/env python
"""Where the peak of one ``benchmarks/memory.py`` run happens: the peak resident set of each phase, per rank.

    python benchmarks/memory_probe.py --size 25m --task dpo                 # ZeRO-3, 2 ranks
    python benchmarks/memory_probe.py --size 95m --task dpo --setup FSDP2

Runs the same ``launch/train.py`` job as ``benchmarks/memory.py`` (same flags) with the trainer's phases
wrapped: model load, tokenising, backend build, DPO reference pass, each evaluation, and each micro-step's
forward (with the loss), backward and optimizer step. Before a phase the kernel's high-water mark is
reset (``/proc/self/clear_refs`` 5, Linux), after it ``VmHWM`` is that phase's peak and ``VmRSS`` what it
left resident. Prints one table per rank (MiB) and writes ``<out>/probe_<task>_<size>_<setup>.json``.
A diagnostic (Linux only): the numbers ``benchmarks/memory.py`` reports come from ``summary.json``.
"""
from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
MiB = 2**20


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


def heap_bytes() -> dict:
    """glibc's view (``mallinfo2``): heap in use, heap free but kept resident, mmapped blocks in use."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = _MallInfo2
        info = libc.mallinfo2()
    except (OSError, AttributeError):
        return {}
    return dict(heap_used=info.uordblks, heap_free=info.fordblks, mmapped=info.hblkhd)


class Phases:
    """Per-phase peak and resident set of this process (bytes)."""

    def __init__(self):
        self.rows = []
        self.overall = 0
        self.module = None  # set once the backend exists: ZeRO-3's gathered parameters are counted
        self.coordinator = None  # ZeRO-3's parameter coordinator (its trace mode is recorded)
        self.most_gathered = 0  # the most elements gathered at once within the current phase

    def gathered(self) -> int:
        """Elements of ZeRO-3 parameters currently gathered (full) on this rank."""
        if self.module is None:
            return 0
        total = 0
        for p in self.module.parameters():
            status = getattr(p, "ds_status", None)
            if status is not None and status.name != "NOT_AVAILABLE":
                total += p.ds_numel
        return total

    @contextlib.contextmanager
    def phase(self, name: str):
        self.overall = max(self.overall, _status_kib("VmHWM") * 1024)  # peak before this phase began
        start = _status_kib("VmRSS") * 1024
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the high-water mark to the current resident set
        self.most_gathered = self.gathered()
        try:
            yield
        finally:
            peak, end = _status_kib("VmHWM") * 1024, _status_kib("VmRSS") * 1024
            self.overall = max(self.overall, peak)
            self.rows.append(dict(phase=name, start=start, peak=peak, end=end, gathered=self.gathered(),
                                  most_gathered=self.most_gathered, trace=self.trace(), **heap_bytes()))

    def trace(self) -> str:
        if self.coordinator is None:
            return ""
        return "complete" if self.coordinator.is_complete_trace() else "recording"

    def install_zero3_counter(self) -> None:
        """Count the gathered elements after every ZeRO-3 fetch (the phase's most is kept)."""
        from deepspeed.runtime.zero.partitioned_param_coordinator import PartitionedParameterCoordinator

        fetch = PartitionedParameterCoordinator.fetch_sub_module
        phases = self

        def counted(coordinator, *args, **kwargs):
            out = fetch(coordinator, *args, **kwargs)
            phases.most_gathered = max(phases.most_gathered, phases.gathered())
            return out

        PartitionedParameterCoordinator.fetch_sub_module = counted


def wrap(obj, attr: str, phases: Phases, label):
    inner = getattr(obj, attr)

    def wrapped(*args, **kwargs):
        with phases.phase(label() if callable(label) else label):
            return inner(*args, **kwargs)

    setattr(obj, attr, wrapped)


def worker(argv) -> int:
    """Inside torchrun: launch/train.py's main with the phases wrapped."""
    import torch.distributed as dist

    from recipes.posttrain import backends, trainer

    phases = Phases()
    counter = {"micro": 0, "eval": 0}
    wrap(trainer, "load_model_and_tokenizer", phases, "load model")
    wrap(trainer, "load_datasets", phases, "tokenise")
    build = trainer.build_backend

    def build_backend(cfg, model):
        with phases.phase("build backend"):
            backend = build(cfg, model)
        phases.module = backend.module
        offload = getattr(getattr(getattr(backend, "engine", None), "optimizer", None), "parameter_offload", None)
        if offload is not None:
            phases.coordinator = offload.get_param_coordinator()
            phases.install_zero3_counter()
        return backend

    trainer.build_backend = build_backend
    wrap(trainer, "dpo_reference", phases, "reference pass")

    def eval_label():
        counter["eval"] += 1
        return f"eval {counter['eval']}"

    wrap(trainer.Job, "evaluate", phases, eval_label)

    def ds_micro_step(self, loss_fn):
        m = counter["micro"]
        counter["micro"] += 1
        with phases.phase(f"micro {m} forward+loss"):
            loss = loss_fn(self.engine)
        with phases.phase(f"micro {m} backward"):
            self.engine.backward(loss)
        with phases.phase(f"micro {m} step"):
            self.engine.step()
        return loss

    backends.DeepSpeedBackend.micro_step = ds_micro_step
    from pma_dist import torch_parallel

    def torch_phase(self, name):
        return phases.phase(f"micro {self.micro_steps} {name}")

    torch_parallel.ParallelTrainer._phase = torch_phase  # the probe runs without a comm ledger

    original_finish = trainer.finish

    def finish(job, last_eval):
        rank = dist.get_rank()
        summary = original_finish(job, last_eval)
        out = Path(os.environ["PMA_PROBE_OUT"])
        out.mkdir(parents=True, exist_ok=True)
        (out / f"rank{rank}.json").write_text(json.dumps(dict(rows=phases.rows, overall=phases.overall)))
        return summary

    trainer.finish = finish
    import runpy

    train = runpy.run_path(str(REPO / "launch" / "train.py"), run_name="launch_train")
    return train["main"](argv)


def main(argv=None) -> int:
    from benchmarks.memory import DATA, RUN_FLAGS, SETUP_FLAGS, model_dir

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", choices=["260k", "25m", "95m"], required=True)
    p.add_argument("--task", choices=["sft", "dpo"], required=True)
    p.add_argument("--setup", choices=sorted(SETUP_FLAGS), default="ZeRO-3")
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--out", default=str(REPO / "runs" / "memory_probe"))
    p.add_argument("--timeout", type=float, default=900)
    p.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more launch/train.py flags")
    args = p.parse_args(argv)
    name = f"{args.task}_{args.size}_{args.setup}"
    out = Path(args.out) / name
    model = model_dir(args.size, REPO / "runs" / "models")
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", HF_HUB_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", PYTHONPATH=str(REPO), PMA_PROBE_OUT=str(out / "phases"))
    cmd = [str(Path(sys.executable).parent / "torchrun"), "--standalone", f"--nproc_per_node={args.nproc}",
           str(Path(__file__).resolve()), "--worker", "--task", args.task, "--model", str(model), "--train-data",
           str(DATA[args.task]), "--output-dir", str(out / "run"), "--overwrite", *SETUP_FLAGS[args.setup],
           *RUN_FLAGS, *args.extra]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=args.timeout)
    if proc.returncode != 0:
        raise SystemExit(f"probe failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-4000:]}")
    result = {}
    for rank in range(args.nproc):
        data = json.loads((out / "phases" / f"rank{rank}.json").read_text())
        result[f"rank{rank}"] = data
        print(f"\n{name} rank {rank}: overall peak {data['overall'] / MiB:,.0f} MiB")
        print(f"{'phase':28} {'start':>7} {'peak':>7} {'end':>7} {'peak-start':>10} {'gathered':>9} "
              f"{'heap used':>9} {'heap free':>9} {'mmapped':>8} {'most gathered':>13} trace  (end of phase; gathered in M elements)")
        for row in data["rows"]:
            print(f"{row['phase']:28} {row['start'] / MiB:>7,.0f} {row['peak'] / MiB:>7,.0f} {row['end'] / MiB:>7,.0f} "
                  f"{(row['peak'] - row['start']) / MiB:>10,.0f} {row['gathered'] / 1e6:>9.1f} "
                  f"{row.get('heap_used', 0) / MiB:>9,.0f} {row.get('heap_free', 0) / MiB:>9,.0f} "
                  f"{row.get('mmapped', 0) / MiB:>8,.0f} {row['most_gathered'] / 1e6:>13.1f} {row['trace']}")
    (Path(args.out) / f"probe_{name}.json").write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        sys.exit(worker(sys.argv[2:]))
    sys.exit(main())
