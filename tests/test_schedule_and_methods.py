"""pma_dist.schedule.MicroStepSchedule and the method table pma_dist.methods, against hand-written tables."""
from __future__ import annotations

import pytest
import torch

from pma_dist import AdaPM, AdamWPMA, LionPMA
from pma_dist.methods import METHODS, get_method, method_names, schedule_of_optimizer
from pma_dist.schedule import MicroStepSchedule, PMAPhase


def test_pma_schedule_steps_every_micro_step_and_is_large_every_kth():
    s = MicroStepSchedule.pma(4)
    assert [s.steps_optimizer(i) for i in range(8)] == [True] * 8
    assert [s.kind(i) for i in range(8)] == ["small"] * 3 + ["large"] + ["small"] * 3 + ["large"]
    assert [s.phase(i).step for i in range(8)] == [1, 2, 3, 4, 5, 6, 7, 8]  # the optimizer counts from 1
    assert [s.cycle_of(i) for i in range(8)] == [0, 0, 0, 0, 1, 1, 1, 1]
    assert s.kinds_per_cycle == {"small": 3, "large": 1} and s.cycle == 4 and s.is_pma


def test_ga_schedule_steps_every_kth_micro_step():
    s = MicroStepSchedule.gradient_accumulation(3)
    assert [s.steps_optimizer(i) for i in range(6)] == [False, False, True, False, False, True]
    assert [s.kind(i) for i in range(6)] == ["accumulate", "accumulate", "boundary"] * 2
    assert [s.is_large(i) for i in range(6)] == [False] * 6
    assert s.phase(5) == PMAPhase(step=2, period=1)
    with pytest.raises(ValueError, match="micro-step 0 accumulates"):
        s.phase(0)
    assert [s.is_step_boundary(n) for n in range(7)] == [True, False, False, True, False, False, True]
    assert s.kinds_per_cycle == {"accumulate": 2, "boundary": 1} and not s.is_pma


def test_no_accumulation_schedule():
    s = MicroStepSchedule()
    assert [s.kind(i) for i in range(3)] == ["boundary"] * 3
    assert s.kinds_per_cycle == {"boundary": 1} and s.cycle == 1


def test_large_step_follows_the_optimizer_clock_when_given():
    # a skipped fp16 step leaves the optimizer one step behind the micro-step count
    s = MicroStepSchedule.pma(4)
    assert s.kind(3) == "large" and s.kind(3, optimizer_step=3) == "small" and s.kind(4, optimizer_step=4) == "large"


@pytest.mark.parametrize("kwargs, words", [
    (dict(accumulation=0), ["accumulation", "0"]),
    (dict(period=2.0), ["period", "2.0"]),
    (dict(accumulation=True), ["accumulation", "True"]),
    (dict(accumulation=2, period=4), ["stretch the period to 8"]),
])
def test_schedule_rejects_bad_values(kwargs, words):
    with pytest.raises(ValueError) as info:
        MicroStepSchedule(**kwargs)
    assert all(w in str(info.value) for w in words), str(info.value)


def test_schedule_from_a_ledger_files_pair():
    assert MicroStepSchedule.from_cycle(8, pma=True) == MicroStepSchedule(1, 8)
    assert MicroStepSchedule.from_cycle(8, pma=False) == MicroStepSchedule(8, 1)
    assert MicroStepSchedule.from_cycle(1, pma=False) == MicroStepSchedule()


EXPECTED = {  # name: (optimizer class, period it gets at K=4, variant, DeepSpeed type, DeepSpeed GA steps, schedule)
    "adamw_pma": (AdamWPMA, 4, "paper", "AdamWPMA", 1, (1, 4)),
    "adamw_pma_reference": (AdamWPMA, 4, "reference", "AdamWPMA", 1, (1, 4)),
    "lion_pma": (LionPMA, 4, None, "LionPMA", 1, (1, 4)),
    "adapm": (AdaPM, 4, "paper", "AdaPM", 1, (1, 4)),
    "adamw_ga": (torch.optim.AdamW, None, None, "AdamW", 4, (4, 1)),
    "lion_ga": (LionPMA, 1, None, "LionPMA", 4, (4, 1)),
    "adamw": (torch.optim.AdamW, None, None, "AdamW", 1, (1, 1)),
    "lion": (LionPMA, 1, None, "LionPMA", 1, (1, 1)),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_method_table(name):
    cls, period, variant, ds_type, ds_ga, (accumulation, pma_period) = EXPECTED[name]
    method = get_method(name)
    opt = method.build([torch.nn.Parameter(torch.zeros(2))], 4, lr=1e-3)
    assert type(opt) is cls
    assert opt.param_groups[0].get("period") == period and opt.param_groups[0].get("variant") == variant
    block = method.deepspeed_config(4, {"lr": 1e-3})
    assert block["optimizer"]["type"] == ds_type and block["gradient_accumulation_steps"] == ds_ga
    assert block["optimizer"]["params"].get("period") == period
    assert method.schedule(4) == MicroStepSchedule(accumulation, pma_period)
    # what the DeepSpeed comm attachment derives from the built optimizer and the engine's GA steps
    assert schedule_of_optimizer(opt, ds_ga) == method.schedule(4)


def test_method_names_are_one_table():
    assert set(METHODS) == set(EXPECTED)
    assert method_names("pma") == ("adamw_pma", "adamw_pma_reference", "lion_pma", "adapm")
    assert len({m.display for m in METHODS.values()}) == len(METHODS)
    with pytest.raises(ValueError, match="unknown training method 'adamw_k'.*adamw_pma.*lion"):
        get_method("adamw_k")
    with pytest.raises(ValueError, match="not period=2"):
        get_method("adamw_pma").build([torch.nn.Parameter(torch.zeros(1))], 4, period=2)
