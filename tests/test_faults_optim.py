"""The optimizers under mistakes and faults: foreign state refused at load time, a non-finite step skipped
without moving the phase, and what happens to tensors without a gradient."""
import copy
import warnings

import pytest
import torch

from pma_dist import functional as F
from pma_dist.optim import AdamWPMA, LionPMA
from pma_dist.schedule import PMAPhase


def _stepped(cls, steps=2, **kw):
    p = torch.nn.Parameter(torch.arange(4.0))
    opt = cls([p], **kw)
    for i in range(steps):
        p.grad = torch.full_like(p, 0.1 * (i + 1))
        opt.step()
    return opt


def _fresh(cls, **kw):
    return cls([torch.nn.Parameter(torch.zeros(4))], **kw)


@pytest.mark.parametrize("source, target, message", [
    (lambda: _stepped(AdamWPMA), LionPMA, "LionPMA.load_state_dict: saved param group 0 is not LionPMA's (has eps, variant)"),
    (lambda: _stepped(LionPMA), AdamWPMA, "AdamWPMA.load_state_dict: saved param group 0 is not AdamWPMA's (missing eps, variant)"),
    (lambda: _stepped(torch.optim.AdamW), AdamWPMA, "AdamWPMA's (missing period, variant)"),
    (lambda: _stepped(torch.optim.AdamW), LionPMA, "LionPMA's (missing period; has eps)"),
    (lambda: _fresh(AdamWPMA), LionPMA, "has eps, variant"),  # refused even before any step made state
])
def test_state_of_another_optimizer_is_refused_at_load_time(source, target, message):
    state = source().state_dict()
    opt = _fresh(target)
    before = copy.deepcopy(opt.state_dict())
    with pytest.raises(ValueError) as info:
        opt.load_state_dict(state)
    assert message in str(info.value)
    assert opt.state_dict() == before  # nothing half-loaded


def test_state_missing_a_moment_is_refused_naming_it():
    state = _stepped(AdamWPMA).state_dict()
    del state["state"][0]["exp_avg_sq"]
    with pytest.raises(ValueError, match=r"saved state of parameter 0 holds moments \['exp_avg'\], AdamWPMA keeps "
                                         r"\['exp_avg', 'exp_avg_sq'\]"):
        _fresh(AdamWPMA).load_state_dict(state)


def test_a_loaded_period_or_variant_that_differs_is_reported():
    state = _stepped(AdamWPMA, period=8, variant="reference").state_dict()
    opt = _fresh(AdamWPMA, period=4)
    with pytest.warns(RuntimeWarning, match=r"param group 0 takes period 4 -> 8, variant 'paper' -> 'reference'"):
        opt.load_state_dict(state)
    assert opt.param_groups[0]["period"] == 8
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same settings: silent
        _fresh(AdamWPMA, period=8, variant="reference").load_state_dict(state)


@pytest.mark.parametrize("cls", [AdamWPMA, LionPMA])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_non_finite_step_is_skipped_without_moving_the_phase(cls, bad):
    grads = [torch.randn(5, generator=torch.Generator().manual_seed(i)) for i in range(7)]
    poisoned = [g.clone() for g in grads]
    poisoned[2][3] = bad  # one element of the third micro-batch's gradient
    guarded = torch.nn.Parameter(torch.ones(5))
    reference = torch.nn.Parameter(torch.ones(5))
    opt = cls([guarded], lr=1e-2, period=4)
    opt.skip_nonfinite = True
    ref = cls([reference], lr=1e-2, period=4)
    for i, g in enumerate(poisoned):
        guarded.grad = g
        opt.step()
        if i != 2:  # the reference never sees the bad micro-batch
            reference.grad = grads[i]
            ref.step()
    assert opt.nonfinite_steps_skipped == 1 and ref.nonfinite_steps_skipped == 0
    assert opt.param_groups[0]["step"] == ref.param_groups[0]["step"] == 6  # the phase did not advance
    assert torch.equal(guarded, reference)  # bit for bit: the skipped step changed nothing
    for name in cls.moment_names:
        assert torch.equal(opt.state[guarded][name], ref.state[reference][name])


def test_without_the_guard_lion_freezes_a_nan_element():
    # documented: sign(NaN) = 0 here, so the element stops moving and its momentum becomes NaN
    p = torch.nn.Parameter(torch.ones(3))
    opt = LionPMA([p], lr=1e-1, period=2)
    p.grad = torch.tensor([1.0, float("nan"), 1.0])
    opt.step()
    assert p[1].item() == 1.0 and p[0].item() != 1.0 and torch.isnan(opt.state[p]["exp_avg"][1])


def test_first_gradient_mid_period_equals_zero_gradients_since_the_period_began():
    period, late = 4, 6  # first gradient at step 7: in-period position 3 of the second period
    a, b = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.full((3,), 2.0))
    b_ref = torch.nn.Parameter(b.detach().clone())
    opt = AdamWPMA([a, b], lr=1e-2, weight_decay=0.0, period=period)
    ref = AdamWPMA([torch.nn.Parameter(torch.ones(3)), b_ref], lr=1e-2, weight_decay=0.0, period=period)
    ref_a = ref.param_groups[0]["params"][0]
    for step in range(1, 11):
        g = torch.full((3,), 0.1 * step)
        a.grad, ref_a.grad = g, g.clone()
        b.grad = g.clone() if step > late else None
        b_ref.grad = g.clone() if step > late else (torch.zeros(3) if step > period else None)
        opt.step()
        ref.step()
    assert torch.equal(b, b_ref)
    assert torch.equal(opt.state[b]["exp_avg"], ref.state[b_ref]["exp_avg"])
    assert torch.equal(opt.state[b]["exp_avg_sq"], ref.state[b_ref]["exp_avg_sq"])


def test_a_tensor_missing_the_large_step_keeps_its_running_mean_into_the_next_period():
    period = 4
    p, other = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(2))
    opt = AdamWPMA([p, other], lr=1e-2, period=period)
    for step in range(1, period):
        p.grad, other.grad = torch.full((3,), 0.1 * step), torch.full((2,), 0.1)
        opt.step()
    before = (p.detach().clone(), opt.state[p]["exp_avg"].clone(), opt.state[p]["exp_avg_sq"].clone())
    p.grad = None  # no gradient at the large step (step 4); the group's other tensor has one
    opt.step()
    assert opt.param_groups[0]["step"] == period  # the group's clock moved on
    assert torch.equal(p, before[0]) and torch.equal(opt.state[p]["exp_avg"], before[1])
    # the next step is the first of the next period, applied to the unfolded running mean
    g = torch.full((3,), 0.5)
    p.grad = g
    opt.step()
    theta, m, v = before[0].clone(), before[1].clone(), before[2].clone()
    F.adamw_pma_tensor(theta, g, m, v, phase=PMAPhase(step=period + 1, period=period), lr=1e-2, beta1=0.9,
                       beta2=0.999, eps=1e-8, weight_decay=1e-2, variant="paper")
    assert torch.equal(p, theta) and torch.equal(opt.state[p]["exp_avg"], m)


def test_a_step_where_no_tensor_of_a_group_has_a_gradient_does_not_advance_its_clock():
    p = torch.nn.Parameter(torch.ones(3))
    opt = AdamWPMA([p], lr=1e-2, period=4)
    p.grad = torch.ones(3)
    opt.step()
    p.grad = None
    opt.step()
    assert opt.param_groups[0]["step"] == 1


@pytest.mark.slow
def test_ranks_agree_on_skipping_a_step_only_one_of_them_saw_as_non_finite():
    from tests.launching import run_ranks

    proc = run_ranks("train_nonfinite.py", nproc=2, launcher="torchrun", timeout=180)
    assert "agreed [(7, 1), (7, 1)]" in proc.stdout
