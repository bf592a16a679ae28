"""Peak memory of each rank, as ``summary.json`` records it.

On an accelerator the number is the device allocator's high-water mark (``max_memory_allocated``:
tensors only, not the allocator's cache or the CUDA context); on CPU it is the process's peak
resident set (``ru_maxrss``), which also holds the interpreter, the imported libraries and every
transient the run ever had. The two are not comparable with each other; each is comparable across
runs of its own kind.
"""
from __future__ import annotations

import resource
import sys

import torch
import torch.distributed as dist


def peak_bytes(device: torch.device) -> int:
    """This process's peak: device max allocated for an accelerator, else the peak RSS."""
    if device.type != "cpu":
        from deepspeed.accelerator import get_accelerator

        return int(get_accelerator().max_memory_allocated(device))
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(maxrss if sys.platform == "darwin" else maxrss * 1024)  # Linux reports KiB, macOS bytes


def peak_per_rank(device: torch.device) -> dict:
    """``{"peak_memory_kind": ..., "peak_memory_bytes": [rank 0, rank 1, ...]}``, gathered on every rank."""
    mine = peak_bytes(device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        table = torch.zeros(dist.get_world_size(), dtype=torch.int64, device=device)
        table[dist.get_rank()] = mine
        # plain torch.distributed, so the gather is not billed to the training's comm ledger
        dist.all_reduce(table)
        per_rank = [int(x) for x in table.cpu()]
    else:
        per_rank = [mine]
    kind = "max_rss" if device.type == "cpu" else f"{device.type}_max_allocated"
    return {"peak_memory_kind": kind, "peak_memory_bytes": per_rank}


#: host allocations at least this large get their own mapping, returned to the OS when freed
#: (glibc's own initial threshold, held fixed)
HOST_MMAP_THRESHOLD = 1 << 17
_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number


def bound_host_allocator() -> bool:
    """Make freed large host tensors go back to the OS (glibc only; True when applied).

    glibc raises its mmap threshold each time a mapped block is freed (up to 32 MiB), so afterwards
    layer-sized tensors come from the heap, and a heap freed in the middle stays resident: measured
    on the 95M model under ZeRO-3, the peak RSS then grew by ~2 bytes/parameter per micro-step. A
    fixed threshold keeps every tensor of 128 KiB or more in its own mapping, so the resident set tracks
    the tensors alive (at the cost of a page fault per fresh page). 128 KiB rather than 1 MiB: with
    1 MiB the activations of the 25M Llama's DPO micro-batch (256 tokens x 512 fp32: 512 KiB) came from the
    heap, whose freed chunks stayed resident: 287 MiB of free heap after 4 micro-steps under ZeRO-3,
    growing every step, against 32 MiB, flat, at 128 KiB (``benchmarks/memory_probe.py``, glibc's
    ``mallinfo2``). Small objects (tokenised data, Python) are unaffected.
    """
    if not sys.platform.startswith("linux"):
        return False
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, HOST_MMAP_THRESHOLD))
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
