"""Bounded ZeRO-3 transients: the DeepSpeed settings the job fills in when a ZeRO-3 config leaves them out.

DeepSpeed's defaults are sized for throughput on big GPUs: a 5e8-element gradient reduce bucket,
up to 1e9 gathered parameters kept live (and reused up to 1e9 elements later), 1e9-element optimizer
sub-groups. On a model smaller than those (everything up to 1B), they mean the whole model gathered
in forward, every gradient held full-size until one reduce, and a full fp32 copy of the gradient
partition in the step: measured on the 95M Llama, 2 ranks, ~8 bytes/parameter of peak above the
settings below (benchmarks/memory.py). The values below bound each transient to ~1e7-3e7 elements
(40-120 MB in fp32); a config that sets any of them keeps its own value.
"""
from __future__ import annotations

import copy

ZERO3_BOUNDS = {
    "reduce_bucket_size": 10_000_000,
    "stage3_prefetch_bucket_size": 10_000_000,
    "stage3_max_live_parameters": 30_000_000,
    "stage3_max_reuse_distance": 30_000_000,
    "sub_group_size": 10_000_000,
}


def with_zero3_bounds(ds_config: dict) -> dict:
    """``ds_config`` with :data:`ZERO3_BOUNDS` filled in where it is ZeRO-3 and does not set them."""
    zero = ds_config.get("zero_optimization") or {}
    if int(zero.get("stage", 0)) != 3:
        return ds_config
    out = copy.deepcopy(ds_config)
    for key, value in ZERO3_BOUNDS.items():
        out["zero_optimization"].setdefault(key, value)
    return out
