"""The paper's periodic learning-rate decay (``lr_decay="periodic"``) against an independent reference.

§1 and §3.2.2 of the paper: small step tau of a period uses a further 1/(tau+1) of its learning rate,
which resets at every period boundary; large steps are unchanged. The references below are written from
that sentence and docs/math.md's equations, in float64 with python-float scalars.
"""
from __future__ import annotations

import math

import pytest
import torch

from pma_dist import AdamWPMA, LionPMA
from pma_dist.schedule import PMAPhase

K, STEPS = 4, 13  # three periods and a small step of the fourth


def adamw_pma_paper_reference(p, grads, lr, betas, eps, wd):
    b1, b2 = betas
    m, v = torch.zeros_like(p), torch.zeros_like(p)
    for t, g in enumerate(grads, start=1):
        tau, exponent = t % K, math.ceil(t / K)
        bc1, bc2 = 1 - b1**exponent, 1 - b2**exponent
        if tau == 0:
            m, v, step_lr = b1 * m + (1 - b1) / K * g, b2 * v + (1 - b2) / K * g * g, lr
        else:
            m = tau / (tau + 1) * m + (1 - b1) / (tau + 1) * g
            v = tau / (tau + 1) * v + (1 - b2) / (tau + 1) * g * g
            step_lr = lr / math.sqrt(K) / (tau + 1)  # the periodic decay
        p = p * (1 - step_lr * wd)
        p = p - step_lr * (m / bc1) / (torch.sqrt(v / bc2) + eps)
        if tau == 0:
            m, v = K * m, K * v
    return p


def lion_pma_reference(p, grads, lr, betas, wd):
    b1, b2 = betas
    m = torch.zeros_like(p)
    for t, g in enumerate(grads, start=1):
        tau = t % K
        p = p * (1 - lr * wd)
        if tau == 0:
            p = p - lr * torch.sign(b1 * m + (1 - b1) / K * g)
            m = K * (b2 * m + (1 - b2) / K * g)
        else:
            p = p - lr / K / (tau + 1) * torch.sign(tau / (tau + 1) * m + (1 - b1) / (tau + 1) * g)
            m = tau / (tau + 1) * m + (1 - b2) / (tau + 1) * g
    return p


def gradients(shape, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=gen, dtype=torch.float64) for _ in range(STEPS)]


def run(optimizer_cls, path, dtype=torch.float64, **hyper):
    start = torch.randn(3, 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    p = torch.nn.Parameter(start.to(dtype, copy=True))
    opt = optimizer_cls([p], period=K, lr_decay="periodic", **path, **hyper)
    for g in gradients((3, 5)):
        p.grad = g.to(dtype)
        opt.step()
    return start, p.detach()


PATHS = [dict(foreach=False), dict(foreach=True)]


@pytest.mark.parametrize("path", PATHS, ids=["per_tensor", "foreach"])
def test_adamw_pma_periodic_decay_matches_the_reference(path):
    hyper = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    start, got = run(AdamWPMA, path, variant="paper", **hyper)
    want = adamw_pma_paper_reference(start, gradients((3, 5)), hyper["lr"], hyper["betas"], hyper["eps"],
                                     hyper["weight_decay"])
    # float64, the same operations up to association: each of the 13 steps may round its few
    # operations differently (~1e-16 relative each) on values of order 1, far below 1e-13
    torch.testing.assert_close(got, want, rtol=0, atol=1e-13)
    # the decay really changes the trajectory (else this test could not fail for a missing decay)
    without = AdamWPMA([torch.nn.Parameter(start.clone())], period=K, variant="paper", **path, **hyper)
    p = without.param_groups[0]["params"][0]
    for g in gradients((3, 5)):
        p.grad = g
        without.step()
    assert (got - p.detach()).abs().max() > 1e-3


@pytest.mark.parametrize("path", PATHS, ids=["per_tensor", "foreach"])
def test_lion_pma_periodic_decay_matches_the_reference(path):
    hyper = dict(lr=1e-2, betas=(0.9, 0.99), weight_decay=0.1)
    start, got = run(LionPMA, path, **hyper)
    want = lion_pma_reference(start, gradients((3, 5)), hyper["lr"], hyper["betas"], hyper["weight_decay"])
    torch.testing.assert_close(got, want, rtol=0, atol=1e-13)


def test_fused_kernel_takes_the_decay_too():
    # fp32 on the fused CPU kernel vs the foreach path: the same coefficients reach both. The paths may
    # differ only in the rounding of sqrt (docs/performance.md): per step at most a few ulps of an update
    # of size <= lr = 1e-2, plus one ulp of |p| < 4 (2.4e-7) where the final add rounds differently;
    # 13 steps stay below 1e-6, while a lost decay moves p by more than 1e-3 (the test above)
    hyper = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-3, weight_decay=0.1, variant="paper")
    _, fused = run(AdamWPMA, dict(fused=True), dtype=torch.float32, **hyper)
    _, foreach = run(AdamWPMA, dict(foreach=True), dtype=torch.float32, **hyper)
    torch.testing.assert_close(fused, foreach, rtol=1e-6, atol=1e-6)


def test_decay_changes_only_small_steps_and_resets_each_period():
    none = [PMAPhase(step=t, period=K).lr_factor(0.5) for t in range(1, 9)]
    periodic = [PMAPhase(step=t, period=K, lr_decay="periodic").lr_factor(0.5) for t in range(1, 9)]
    assert periodic == [none[i] / (t % K + 1) if t % K else 1.0 for i, t in enumerate(range(1, 9))]
    assert periodic[3] == periodic[7] == 1.0 and periodic[0] == periodic[4] == 0.5 / 2


def test_decay_off_by_default_and_bad_values_named():
    assert AdamWPMA([torch.nn.Parameter(torch.zeros(1))]).defaults["lr_decay"] == "none"
    assert LionPMA([torch.nn.Parameter(torch.zeros(1))]).defaults["lr_decay"] == "none"
    with pytest.raises(ValueError, match="Invalid lr_decay: 'linear'"):
        AdamWPMA([torch.nn.Parameter(torch.zeros(1))], lr_decay="linear")
    with pytest.raises(ValueError, match="unknown PMA lr_decay 'cosine'"):
        PMAPhase(step=1, period=2, lr_decay="cosine")


def test_a_state_dict_from_before_lr_decay_loads_with_none():
    p = torch.nn.Parameter(torch.ones(3))
    old = AdamWPMA([p], period=K)
    p.grad = torch.ones(3)
    old.step()
    saved = old.state_dict()
    for group in saved["param_groups"]:
        del group["lr_decay"]  # what a checkpoint written before the option holds
    new = AdamWPMA([p], period=K, lr_decay="periodic")
    new.load_state_dict(saved)
    assert new.param_groups[0]["lr_decay"] == "none"
    p.grad = torch.ones(3)
    new.step()  # and it steps
