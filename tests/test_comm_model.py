"""The analytical communication model on its own: PMA/GA ratios, DeepSpeed's padding rules, errors.

The measured == model tests, which run DeepSpeed under the ledger, are in test_comm_ledger.py.
"""
import copy
import sys

import pytest

from pma_dist.comm import model
from pma_dist.comm.model import Message, Setup

NUMELS = (35, 7, 21, 3, 3)  # the tiny MLP of tests/workers/comm_matrix.py: 69 parameters


def setup(**kw):
    base = dict(zero_stage=2, world_size=2, period=4, pma=True, dtype="float32", param_numels=NUMELS)
    base.update(kw)
    return Setup(**base)


def period_bytes(s, op, phase=None):
    return sum(m.bytes for i in range(s.period) for m in model.micro_step_messages(s, i)
               if m.op == op and (phase is None or m.phase == phase))


def test_zero2_k4_all_gather_ratio_is_exactly_4():
    ratios = model.pma_vs_ga(setup(zero_stage=2, period=4))
    assert ratios["all_gather"]["bytes_ratio"] == 4.0
    assert (ratios["all_gather"]["pma_count"], ratios["all_gather"]["ga_count"]) == (4, 1)


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
@pytest.mark.parametrize("k", [1, 2, 4, 8])
def test_gradient_traffic_pma_vs_ga_per_stage(stage, k):
    """ZeRO-0/1: PMA reduces gradients K times per period, GA once; ZeRO-2/3 reduce every micro-step anyway."""
    pma, ga = setup(zero_stage=stage, period=k), setup(zero_stage=stage, period=k, pma=False)
    op = "reduce_scatter" if stage == 3 else "all_reduce"
    grads = 69 * 4 if stage < 3 else (36 + 8 + 22 + 4 + 4) * 4
    assert period_bytes(pma, op, "backward") == k * grads
    assert period_bytes(ga, op, "backward") == (k if stage >= 2 else 1) * grads


def test_zero3_pma_adds_only_the_norm_and_persistent_gathers():
    pma, ga = setup(zero_stage=3, param_persistence_threshold=0), setup(zero_stage=3, pma=False,
                                                                        param_persistence_threshold=0)
    assert period_bytes(pma, "all_gather") == period_bytes(ga, "all_gather") == 4 * 74 * 4
    assert period_bytes(pma, "all_reduce") - period_bytes(ga, "all_reduce") == 3 * 8  # fp64 norm, K-1 extra


@pytest.mark.parametrize("world,padded", [(1, 70), (2, 72), (3, 72), (4, 72), (5, 70), (8, 80)])
def test_zero12_all_gather_pads_the_flat_group_to_2n(world, padded):
    msgs = model.micro_step_messages(setup(zero_stage=1, world_size=world), 0)
    gathers = [m.bytes for m in msgs if m.op == "all_gather"]
    assert gathers == ([padded * 4] if world > 1 else [])  # one process: nothing to gather


def test_zero12_one_all_gather_per_param_group_and_bf16_scalars():
    s = setup(zero_stage=1, dtype="bfloat16", group_numels=(42, 27), world_size=3)
    msgs = model.micro_step_messages(s, 0)
    assert [m for m in msgs if m.phase == "step"] == [
        Message("step", "all_reduce", 1), Message("step", "all_reduce", 4),  # overflow flag, fp32 norm
        Message("step", "all_gather", 42 * 2), Message("step", "all_gather", 30 * 2)]
    assert not any(m.bytes == 1 for m in model.micro_step_messages(replace_check(s), 0))


def replace_check(s):
    from dataclasses import replace
    return replace(s, check_grad_overflow=False)


def test_zero3_pads_each_tensor_to_n_and_gathers_persistent_ones_after_the_step():
    s = setup(zero_stage=3, world_size=3, param_persistence_threshold=10)
    assert model.zero3_persistent(s) == [False, True, False, True, True]
    msgs = model.micro_step_messages(s, 0)
    assert Message("forward", "all_gather", (36 + 21) * 4) in msgs
    assert [m.bytes for m in msgs if m.phase == "step" and m.op == "all_gather"] == [9 * 4, 3 * 4, 3 * 4]
    assert [m for m in msgs if m.op == "reduce_scatter"] == [Message("backward", "reduce_scatter", 72 * 4)]


def test_buckets_split_in_backward_order():
    assert model._buckets([35, 7, 21, 3, 3], 30) == [27, 7, 35]
    s = setup(zero_stage=2, reduce_bucket_size=30)
    assert [m.bytes for m in model.micro_step_messages(s, 0) if m.phase == "backward"] == [108, 28, 140]


def test_zero0_norm_only_with_clipping():
    assert not [m for m in model.micro_step_messages(setup(zero_stage=0), 0) if m.phase == "step"]
    assert [m for m in model.micro_step_messages(setup(zero_stage=0, gradient_clipping=1.0), 0)
            if m.phase == "step"] == [Message("step", "all_reduce", 4)]
    assert not [m for m in model.micro_step_messages(setup(zero_stage=0, gradient_clipping=1.0, dtype="bfloat16"), 0)
                if m.phase == "step"]


def test_ga_sends_step_traffic_only_at_the_boundary():
    s = setup(zero_stage=1, pma=False, period=3)
    assert [bool(model.micro_step_messages(s, i)) for i in range(6)] == [False, False, True] * 2


def test_predict_from_meta_and_projection_records_agree_with_period_totals():
    meta = {"backend": "deepspeed", "zero_stage": 2, "world_size": 2, "period": 4, "pma": True,
            "dtype": "float32", "param_numels": list(NUMELS), "optimizer": "AdamWPMA", "rank": 0}
    assert model.predict_from_meta(meta) == {"all_reduce": {"count": 8, "bytes": 4 * (276 + 4)},
                                            "all_gather": {"count": 4, "bytes": 4 * 288}}
    records = model.projected_period_records(2, 8, 4, "bfloat16", 7_000_000_000, True)
    assert {r["micro_step"] for r in records} == {0, 1, 2, 3}
    assert [r["pma_kind"] for r in records if r["op"] == "all_gather"] == ["small"] * 3 + ["large"]
    s = Setup.for_param_count(7_000_000_000, zero_stage=2, world_size=8, period=4, pma=True, dtype="bfloat16")
    assert sum(r["bytes"] for r in records if r["op"] == "all_gather") == model.period_totals(s)["all_gather"][1]
    assert s.param_count == 7_000_000_000


def test_compare_finds_a_single_byte_of_difference():
    s = setup(zero_stage=2, period=2)
    records = [{"micro_step": i, "pma_kind": "small", "phase": phase, "op": op, "count": c, "bytes": b}
               for i in range(4) for (phase, op), (c, b) in model.micro_step_totals(s, i).items()]
    ledger = {"meta": {"backend": "deepspeed", "zero_stage": 2, "world_size": 2, "period": 2, "pma": True,
                       "dtype": "float32", "param_numels": list(NUMELS), "micro_steps": 4},
              "records": records}
    assert model.compare(ledger) == []
    broken = copy.deepcopy(ledger)
    broken["records"][-1]["bytes"] += 1
    assert len(model.compare(broken)) == 1 and "micro-step 3" in model.compare(broken)[0]
    stray = copy.deepcopy(ledger)
    stray["records"].append(dict(records[0], micro_step=-1))
    assert "outside micro-steps" in model.compare(stray)[-1]


def test_other_backends_can_register_a_rule():
    def ddp(s, boundary):
        return [Message("backward", "all_reduce", s.param_count * s.grad_bytes)]
    model.register_backend("test_ddp", ddp)
    s = setup(backend="test_ddp", zero_stage=0)
    assert model.period_totals(s) == {"all_reduce": (4, 4 * 276)}
    with pytest.raises(ValueError, match="no communication model for backend 'nope'"):
        model.period_totals(setup(backend="nope"))


@pytest.mark.parametrize("kw,match", [
    (dict(dtype="float8"), "unknown dtype 'float8'"),
    (dict(zero_stage=4), "unknown ZeRO stage 4"),
    (dict(world_size=0), "world_size must be a positive int, got 0"),
    (dict(period=True), "period must be a positive int, got True"),
    (dict(param_numels=()), "param_numels must be positive"),
    (dict(param_numels=(3, 0)), r"param_numels must be positive tensor sizes, got \(3, 0\)"),
])
def test_bad_setups_are_rejected_with_the_value(kw, match):
    with pytest.raises(ValueError, match=match):
        setup(**kw)


def test_defaults_match_deepspeed_0_19_8():
    """The model's defaults are DeepSpeed's: a change of DeepSpeed version shows up here first."""
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig
    from deepspeed.runtime.engine import MEMORY_OPT_ALLREDUCE_SIZE
    z = DeepSpeedZeroConfig()
    s = setup()
    assert (s.reduce_bucket_size, s.param_persistence_threshold, s.prefetch_bucket_size,
            s.max_live_parameters, s.compute_grad_norm) == (
        z.reduce_bucket_size, z.param_persistence_threshold, z.prefetch_bucket_size,
        z.max_live_parameters, z.compute_grad_norm)
    assert s.model_persistence_threshold == z.model_persistence_threshold == sys.maxsize
    assert model.MEMORY_OPT_ALLREDUCE_SIZE == MEMORY_OPT_ALLREDUCE_SIZE
