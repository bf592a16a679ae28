"""pma_dist.torch_parallel.setup rejects bad arguments, naming the bad value, before touching the model."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from pma_dist.methods import METHODS
from pma_dist.torch_parallel import ParallelTrainer, setup


def tiny():
    return nn.Sequential(nn.Linear(2, 2))


@pytest.mark.parametrize("kwargs, error, words", [
    (dict(backend="zero3"), ValueError, ["'zero3'", "'fsdp'", "'ddp'"]),
    (dict(backend="fsdp", optimizer="sgd"), ValueError, ["'sgd'", "'adamw_pma'", "'lion_ga'", "'lion'"]),
    (dict(backend="ddp", optimizer="adamw", period=8), ValueError, ["'adamw'", "period=8", "'adamw_ga'"]),
    (dict(backend="ddp", period=0), ValueError, ["period", "0"]),
    (dict(backend="ddp", period=2.0), ValueError, ["period", "2.0"]),
    (dict(backend="ddp", period=True), ValueError, ["period", "True"]),
    (dict(backend="fsdp", optimizer_kwargs=dict(lr=1e-3, period=4)), ValueError, ["setup(period=...)", "period=4"]),
    (dict(backend="fsdp", optimizer_kwargs=[("lr", 1e-3)]), TypeError, ["optimizer_kwargs", "list"]),
    (dict(backend="fsdp", fsdp_kwargs="reshard"), TypeError, ["fsdp_kwargs", "'reshard'"]),
    (dict(backend="ddp", ddp_kwargs=3), TypeError, ["ddp_kwargs", "3"]),
    (dict(backend="ddp", max_grad_norm=-1.0), ValueError, ["max_grad_norm", "-1.0"]),
    (dict(backend="ddp", max_grad_norm="big"), TypeError, ["max_grad_norm", "'big'"]),
])
def test_setup_rejects_bad_arguments(kwargs, error, words):
    with pytest.raises(error) as info:
        setup(tiny(), **kwargs)
    for word in words:
        assert word in str(info.value), (word, str(info.value))


def test_setup_rejects_a_non_module():
    with pytest.raises(TypeError, match="torch.nn.Module, got function"):
        setup(lambda x: x, "ddp")


def test_setup_needs_a_process_group():
    assert not torch.distributed.is_initialized()
    with pytest.raises(RuntimeError, match="init_process_group"):
        setup(tiny(), "ddp")


def test_bad_optimizer_hyper_parameter_names_the_value():
    # the optimizers validate their own hyper-parameters; the registry passes them through unchanged
    with pytest.raises(ValueError, match="lr=-1"):
        METHODS["adamw_pma"].build(tiny().parameters(), 4, lr=-1)
    with pytest.raises(TypeError, match="warmup"):
        METHODS["lion_ga"].build(tiny().parameters(), 4, lr=1e-3, warmup=10)


def test_micro_step_rejects_a_non_scalar_loss():
    model = tiny()
    trainer = ParallelTrainer(model, "ddp", "adamw_pma", METHODS["adamw_pma"].build(model.parameters(), 2), 2)
    with pytest.raises(TypeError, match=r"scalar loss tensor, got a tensor of shape \(3, 2\)"):
        trainer.micro_step(lambda m: m(torch.ones(3, 2)))
    assert trainer.micro_steps == 0


def test_pma_steps_every_micro_batch_and_ga_every_period():
    model = tiny()
    pma = ParallelTrainer(model, "ddp", "lion_pma", METHODS["lion_pma"].build(model.parameters(), 3), 3)
    ga = ParallelTrainer(model, "ddp", "lion_ga", METHODS["lion_ga"].build(model.parameters(), 3), 3)
    plain = ParallelTrainer(model, "ddp", "lion", METHODS["lion"].build(model.parameters(), 1), 1)
    assert [pma.is_sync_step(i) for i in range(6)] == [True] * 6
    assert [ga.is_sync_step(i) for i in range(6)] == [False, False, True, False, False, True]
    assert [plain.is_sync_step(i) for i in range(6)] == [True] * 6
    assert ga.optimizer.param_groups[0]["period"] == 1  # the Lion baseline is Lion-PMA with K = 1
    assert (pma.accumulation_steps, ga.accumulation_steps, plain.accumulation_steps) == (1, 3, 1)


def test_fsdp_units_must_be_submodules_and_not_the_root():
    model = tiny()
    with pytest.raises(ValueError, match=r"fsdp_units\[0\] \(Linear .*\) is not a submodule"):
        setup(model, "fsdp", fsdp_units=[nn.Linear(2, 2)])
    with pytest.raises(ValueError, match="root model itself"):
        setup(model, "fsdp", fsdp_units=[model])


def test_default_fsdp_units_are_innermost_first():
    from pma_dist.torch_parallel import _fsdp_units

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = nn.Linear(2, 2)

    class HFStyle(nn.Module):
        _no_split_modules = ["Block", "Linear"]

        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList([Block(), Block()])
            self.head = nn.Linear(2, 2)

    model = HFStyle()
    units = _fsdp_units(model, None)
    depth = {id(m): name.count(".") for name, m in model.named_modules()}
    assert len(units) == 5  # 2 blocks, their 2 inner Linears, the head
    assert [depth[id(u)] for u in units] == sorted((depth[id(u)] for u in units), reverse=True)
    plain = tiny()
    assert _fsdp_units(plain, None) == [plain[0]]  # no _no_split_modules: children with parameters
