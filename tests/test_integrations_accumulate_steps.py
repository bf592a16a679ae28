"""``accumulate_steps=``, the authors' keyword, as a deprecated alias of ``period`` in AdamWPMA and LionPMA."""
from __future__ import annotations

import warnings

import pytest
import torch

from pma_dist import AdamWPMA, LionPMA


def trained(cls, steps=6, **kwargs):
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(5, 3))
    x = torch.randn(steps, 3)
    optimizer = cls([w], lr=1e-2, **kwargs)
    for t in range(steps):
        optimizer.zero_grad()
        (w @ x[t]).square().sum().backward()
        optimizer.step()
    return w.detach(), optimizer


@pytest.mark.parametrize("cls", [AdamWPMA, LionPMA])
def test_accumulate_steps_is_period_with_a_deprecation_warning(cls):
    with pytest.warns(DeprecationWarning, match=rf"{cls.__name__}\(accumulate_steps=...\) is a deprecated alias of period"):
        alias, optimizer = trained(cls, accumulate_steps=3)
    assert optimizer.param_groups[0]["period"] == 3
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)  # the new keyword does not warn
        named, _ = trained(cls, period=3)
        default, default_optimizer = trained(cls)
    assert torch.equal(alias, named)  # the same run, bit for bit
    assert default_optimizer.param_groups[0]["period"] == 8 and not torch.equal(default, named)


@pytest.mark.parametrize("cls", [AdamWPMA, LionPMA])
def test_period_and_accumulate_steps_together_are_refused(cls):
    with pytest.raises(ValueError, match=r"pass period or accumulate_steps, not both \(got period=4, accumulate_steps=4\)"):
        cls([torch.nn.Parameter(torch.zeros(2))], period=4, accumulate_steps=4)


def test_accumulate_steps_is_validated_like_period():
    with pytest.warns(DeprecationWarning), pytest.raises(ValueError, match="Invalid period: 0"):
        AdamWPMA([torch.nn.Parameter(torch.zeros(2))], accumulate_steps=0)


def test_deepspeed_json_accepts_the_authors_keyword():
    from pma_dist.deepspeed_integration import build_optimizer
    with pytest.warns(DeprecationWarning):
        optimizer = build_optimizer("AdamWPMA", {"lr": 1e-3, "accumulate_steps": 4}, [torch.nn.Parameter(torch.zeros(2))])
    assert optimizer.param_groups[0]["period"] == 4
