"""``pma-dist bandwidth``: an nccl-tests style collective micro-benchmark that writes a calibration file.

Each rank runs every op over message sizes doubling from ``min_bytes`` to ``max_bytes`` (sizes in the
nccl-tests convention: all-reduce buffer, all-gather output, reduce-scatter input), with warm-up and
timed iterations between barriers. For each size it reports the slowest rank's mean time (a collective
is finished when its last rank is), the algorithm bandwidth ``algbw = bytes / time`` and the bus
bandwidth ``busbw = algbw * bus_factor`` (:func:`pma_dist.comm.topology.bus_factor`), and rank 0 writes
them as JSON that ``--topology FILE`` reads (:func:`pma_dist.comm.topology.load_topology`).

Run it on the machine you will train on, with the launcher you will use::

    torchrun --nproc_per_node=8 -m pma_dist.comm.cli bandwidth --output bw.json
    pma-dist bandwidth --nproc 2 --output bw.json     # starts torchrun itself on this host
"""
from __future__ import annotations

import json
import os
import platform
import socket
import time
from typing import Dict, List, Optional, Sequence

from .topology import CALIBRATION_KIND, DEFAULT_TOPOLOGY, GB, PRESETS, bus_factor, canonical_op

DEFAULT_OPS = ("all_reduce", "all_gather", "reduce_scatter", "broadcast")
DTYPES = ("float32", "bfloat16", "float16")


def parse_size(text) -> int:
    """``"64K"``, ``"8M"``, ``"1G"`` or a plain byte count (binary units, as nccl-tests' -b/-e)."""
    if isinstance(text, int) and not isinstance(text, bool):
        value = text
    else:
        s = str(text).strip().upper().removesuffix("B")
        scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(s[-1:], 1)
        digits = s[:-1] if scale > 1 else s
        try:
            value = int(float(digits) * scale)
        except ValueError:
            raise ValueError(f"invalid message size {text!r} (expected bytes like 1024, 64K, 8M, 1G)") from None
    if value < 1:
        raise ValueError(f"invalid message size {text!r} (must be at least 1 byte)")
    return value


def message_sizes(min_bytes: int, max_bytes: int, factor: int = 2) -> List[int]:
    if min_bytes > max_bytes:
        raise ValueError(f"min size {min_bytes} B is larger than max size {max_bytes} B")
    if factor < 2:
        raise ValueError(f"size step factor must be >= 2, got {factor}")
    sizes, size = [], min_bytes
    while size <= max_bytes:
        sizes.append(size)
        size *= factor
    return sizes


def validate_options(ops: Sequence[str], dtype: str, iters: int, warmup: int) -> List[str]:
    names = []
    for op in ops:
        name = canonical_op(op)  # raises with the bad name
        if name not in DEFAULT_OPS:
            raise ValueError(f"pma-dist bandwidth measures {', '.join(DEFAULT_OPS)}; got {op!r}")
        names.append(name)
    if dtype not in DTYPES:
        raise ValueError(f"invalid dtype {dtype!r}; expected one of {', '.join(DTYPES)}")
    if iters < 1:
        raise ValueError(f"--iters must be >= 1, got {iters}")
    if warmup < 0:
        raise ValueError(f"--warmup must be >= 0, got {warmup}")
    return names


def _runner(op: str, numel: int, world: int, dtype, device):
    """A zero-argument closure running one ``op`` whose message is ``numel`` elements in total."""
    import torch
    import torch.distributed as dist

    shard = max(numel // world, 1)
    full = shard * world  # all-gather output / reduce-scatter input must split evenly
    if op == "all_reduce":
        buffer = torch.ones(numel, dtype=dtype, device=device)
        return numel, lambda: dist.all_reduce(buffer)
    if op == "broadcast":
        buffer = torch.ones(numel, dtype=dtype, device=device)
        return numel, lambda: dist.broadcast(buffer, src=0)
    if op == "all_gather":
        out = torch.empty(full, dtype=dtype, device=device)
        piece = torch.ones(shard, dtype=dtype, device=device)
        return full, lambda: dist.all_gather_into_tensor(out, piece)
    if op == "reduce_scatter":
        big = torch.ones(full, dtype=dtype, device=device)
        out = torch.empty(shard, dtype=dtype, device=device)
        return full, lambda: dist.reduce_scatter_tensor(out, big)
    raise ValueError(f"unsupported op {op!r}")


def measure(ops: Sequence[str], sizes: Sequence[int], *, dtype: str = "float32", iters: int = 20,
            warmup: int = 5) -> Dict[str, list]:
    """Time each op and size on the initialised default process group; every rank returns the same rows."""
    import torch
    import torch.distributed as dist
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    device = torch.device(accelerator.device_name(accelerator.current_device()))
    torch_dtype = getattr(torch, dtype)
    itemsize = torch.finfo(torch_dtype).bits // 8
    world = dist.get_world_size()
    results: Dict[str, list] = {}
    for op in ops:
        rows = []
        for size in sizes:
            numel = max(size // itemsize, world)
            nelem, run = _runner(op, numel, world, torch_dtype, device)
            for _ in range(warmup):
                run()
            accelerator.synchronize()
            dist.barrier()
            start = time.perf_counter()
            for _ in range(iters):
                run()
            accelerator.synchronize()
            mean = (time.perf_counter() - start) / iters
            slowest = torch.tensor([mean], dtype=torch.float64, device=device)
            dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
            seconds = float(slowest.item())
            nbytes = nelem * itemsize
            algbw = nbytes / seconds / GB
            rows.append({"bytes": nbytes, "count": nelem, "seconds": seconds, "algbw_gbps": algbw,
                         "busbw_gbps": algbw * bus_factor(op, world)})
        results[op] = rows
    return results


def format_table(results: Dict[str, list], world: int) -> str:
    lines = [f"# pma-dist bandwidth: {world} ranks; time is the slowest rank's mean",
             f"{'op':>15} {'size (B)':>12} {'count':>11} {'time (us)':>11} {'algbw GB/s':>11} {'busbw GB/s':>11}"]
    for op, rows in results.items():
        for r in rows:
            lines.append(f"{op:>15} {r['bytes']:>12} {r['count']:>11} {r['seconds'] * 1e6:>11.1f} "
                         f"{r['algbw_gbps']:>11.3f} {r['busbw_gbps']:>11.3f}")
    return "\n".join(lines)


def calibration_document(results: Dict[str, list], *, world: int, backend: str, device: str, dtype: str,
                         iters: int, warmup: int, base_topology: str, nodes: Optional[int] = None) -> dict:
    return {
        "kind": CALIBRATION_KIND,
        "version": 1,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "host": socket.gethostname(),
        "platform": platform.platform(),
        "backend": backend,
        "device": device,
        "world_size": world,
        "nodes": nodes,
        "dtype": dtype,
        "iters": iters,
        "warmup": warmup,
        "base_topology": base_topology,
        "convention": "nccl-tests: bytes = all-reduce buffer / all-gather output / reduce-scatter input; "
                      "busbw = algbw x bus factor",
        "ops": results,
    }


def run_worker(output: str, ops: Sequence[str], sizes: Sequence[int], *, dtype: str, iters: int, warmup: int,
               base_topology: str) -> Optional[dict]:
    """Body of one launched rank: init, measure, rank 0 prints and writes ``output``, clean shutdown."""
    import torch.distributed as dist
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    backend = accelerator.communication_backend_name()
    # one device per local rank (on CUDA every rank would otherwise share device 0)
    accelerator.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
    world, rank = dist.get_world_size(), dist.get_rank()
    results = measure(ops, sizes, dtype=dtype, iters=iters, warmup=warmup)
    document = None
    if rank == 0:
        nodes = int(os.environ["GROUP_WORLD_SIZE"]) if os.environ.get("GROUP_WORLD_SIZE", "").isdigit() else None
        document = calibration_document(results, world=world, backend=dist.get_backend(),
                                        device=accelerator.device_name(), dtype=dtype, iters=iters,
                                        warmup=warmup, base_topology=base_topology, nodes=nodes)
        os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
        with open(output, "w") as f:
            json.dump(document, f, indent=1)
        print(format_table(results, world))
        print(f"calibration written to {output}  (use it with: pma-dist report RUN_DIR --topology {output})")
    dist.barrier()
    return document


def check_base_topology(name: str) -> str:
    if name not in PRESETS:
        raise ValueError(f"unknown base topology {name!r}; expected one of {', '.join(PRESETS)}")
    return name


__all__ = ["DEFAULT_OPS", "DEFAULT_TOPOLOGY", "calibration_document", "format_table", "measure",
           "message_sizes", "parse_size", "run_worker", "validate_options"]
