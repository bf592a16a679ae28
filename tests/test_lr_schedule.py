"""recipes/posttrain/lr_schedule.py against values worked out by hand, and the update-variance statistics."""
import math

import pytest
import torch

from recipes.posttrain import lr_schedule
from recipes.posttrain.metrics import UpdateVariance


def test_warmup_cosine_points_worked_out_by_hand():
    total, warmup = 20, 4
    f = [lr_schedule.lr_factor("warmup_cosine", m, total, warmup) for m in range(total)]
    assert f[:4] == [0.25, 0.5, 0.75, 1.0][:3] + [1.0]  # (m + 1) / 4 for m < 4, then the cosine starts at 1
    assert f[4] == 1.0
    assert f[12] == pytest.approx(0.5)  # halfway through the 16 decay steps: cos(pi / 2) = 0
    assert f[19] == pytest.approx((1 + math.cos(math.pi * 15 / 16)) / 2)
    assert all(a >= b for a, b in zip(f[4:], f[5:]))
    assert [lr_schedule.lr_factor("constant", m, total, warmup) for m in range(3)] == [1.0, 1.0, 1.0]
    assert lr_schedule.warmup_steps(256, 0.1) == 26 and lr_schedule.warmup_steps(256, 0.0) == 0
    assert lr_schedule.lr_factor("warmup_cosine", 0, 10, 0) == 1.0  # no warm-up: the decay from the first step
    with pytest.raises(ValueError, match="unknown lr schedule 'linear'"):
        lr_schedule.lr_factor("linear", 0, 10, 1)


def test_apply_sets_every_param_group():
    opt = torch.optim.SGD([{"params": [torch.nn.Parameter(torch.zeros(1))]},
                           {"params": [torch.nn.Parameter(torch.zeros(1))], "lr": 5.0}], lr=1.0)
    assert lr_schedule.apply(opt, 2.0, "warmup_cosine", 1, 10, 4) == 1.0
    assert [g["lr"] for g in opt.param_groups] == [1.0, 1.0]


def test_update_noise_to_signal_is_scale_free_and_matches_a_hand_computation():
    deltas = [torch.tensor([1.0, 2.0]), torch.tensor([3.0, 2.0]), torch.tensor([2.0, 5.0])]
    probe = UpdateVariance(every=1, window=3)
    weight = torch.zeros(2)
    probe.observe(weight.clone())
    for d in deltas[:-1]:
        weight += d
        assert probe.observe(weight.clone()) is None
    weight += deltas[-1]
    stats = probe.observe(weight.clone())
    # per element: mean (2, 3); unbiased variances 1 and 3; ||mean||^2 = 13
    assert stats["update_variance"] == pytest.approx(2.0)
    assert stats["update_mean_sq_norm"] == pytest.approx(13.0)
    assert stats["update_noise_to_signal"] == pytest.approx(4.0 / 13.0)
    assert stats["update_sq_norm"] == pytest.approx((5 + 13 + 29) / 3)
    scaled = UpdateVariance(every=1, window=3)
    w = torch.zeros(2)
    scaled.observe(w.clone())
    for d in deltas:
        w += 10 * d
        out = scaled.observe(w.clone())
    assert out["update_noise_to_signal"] == pytest.approx(stats["update_noise_to_signal"])
    assert out["update_variance"] == pytest.approx(100 * stats["update_variance"])
