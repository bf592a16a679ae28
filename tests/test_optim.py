"""AdamW-PMA and Lion-PMA against the spec's test vectors and an independent reference.

The reference below is written straight from the equations of ``../shared/spec/pma_spec.md`` (and
``docs/math.md``): it shares no code with ``pma_dist`` — not the schedule, not the update functions.
"""
import copy
import math

import pytest
import torch

from pma_dist import AdamWPMA, LionPMA

# ------------------------------------------------------------------ spec test vectors (float64)
SPEC_GRADS = [1, -2, 0.5, 3, 1, -0.25, 2, 0, -1.5, 1]
SPEC_THETA = {
    "reference": [
        [0.985097788594, -0.506241957657], [0.982743657077, -0.499985835076], [0.980506854689, -0.487395342502],
        [0.966622461676, -0.492804798308], [0.952381859791, -0.498619393076], [0.908046026792, -0.528445213700],
        [0.892160265484, -0.536037389085], [0.878319276062, -0.541632675624], [0.856278122919, -0.549474309322],
        [0.844491028227, -0.553145288668]],
    "paper": [
        [0.953401668839, -0.537938077412], [0.962804321472, -0.519925170681], [0.963504233767, -0.504397963425],
        [0.937091854846, -0.522335405115], [0.908909649849, -0.542091602968], [0.866284147783, -0.570207092613],
        [0.831614219143, -0.596583435293], [0.802588716680, -0.617363234836], [0.770282611752, -0.635469820329],
        [0.745752484288, -0.651883832402]],
    "lion": [
        [0.956666666667, -0.528333333333], [0.980433333333, -0.489716666667], [0.870629000000, -0.584819500000],
        [0.828589376667, -0.612304638333], [0.786970149567, -0.639514925283], [0.679100448071, -0.733119776030],
        [0.638976110257, -0.759121911604], [0.599253015821, -0.784864025821], [0.493260485663, -0.877015385563],
        [0.454994547473, -0.901578565040]],
}
SPEC_FINAL_STATE = {
    "reference": {"exp_avg": [0.07115, 0.1423], "exp_avg_sq": [0.104829282407, 0.419317129630]},
    "paper": {"exp_avg": [0.19955, 0.3991], "exp_avg_sq": [0.516171875, 2.0646875]},
    "lion": {"exp_avg": [0.109159375, 0.21831875]},
}
SPEC_K1_THETA10 = {"reference": [0.625220219438, -0.731352894203], "paper": [0.597240853801, -0.759332259815]}


def spec_optimizer(kind, param, period=3, foreach=None):
    if kind == "lion":
        return LionPMA([param], lr=0.1, betas=(0.9, 0.95), weight_decay=0.1, period=period, foreach=foreach)
    return AdamWPMA([param], lr=0.1, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, period=period,
                    variant=kind, foreach=foreach)


def run_spec(kind, period=3, foreach=None):
    theta = torch.tensor([1.0, -0.5], dtype=torch.float64, requires_grad=True)
    opt = spec_optimizer(kind, theta, period, foreach)
    trajectory = []
    for g in SPEC_GRADS:
        theta.grad = torch.tensor([g, 2 * g], dtype=torch.float64)
        opt.step()
        trajectory.append(theta.detach().clone())
    return torch.stack(trajectory), opt.state[theta]


@pytest.mark.parametrize("foreach", [True, False], ids=["foreach", "per-tensor"])
@pytest.mark.parametrize("kind", ["reference", "paper", "lion"])
def test_spec_vectors(kind, foreach):
    trajectory, state = run_spec(kind, foreach=foreach)
    expected = torch.tensor(SPEC_THETA[kind], dtype=torch.float64)
    # the spec prints 12 decimals: agreement to 1e-10 is agreement with every printed digit that matters
    assert torch.allclose(trajectory, expected, rtol=0, atol=1e-10), (trajectory - expected).abs().max()
    for name, value in SPEC_FINAL_STATE[kind].items():
        assert torch.allclose(state[name], torch.tensor(value, dtype=torch.float64), rtol=0, atol=1e-10)
    assert int(state["step"]) == len(SPEC_GRADS)


@pytest.mark.parametrize("variant", ["reference", "paper"])
def test_spec_vectors_period_one(variant):
    trajectory, _ = run_spec(variant, period=1)
    expected = torch.tensor(SPEC_K1_THETA10[variant], dtype=torch.float64)
    assert torch.allclose(trajectory[-1], expected, rtol=0, atol=1e-10)


# ------------------------------------------------------------------ independent reference
class ReferenceAdamWPMA:
    """Straight from the equations; one clock for all tensors; python floats for all scalars."""

    def __init__(self, params, lr, betas, eps, weight_decay, period, variant):
        self.params, self.lr, self.betas, self.eps = params, lr, betas, eps
        self.wd, self.K, self.variant, self.t = weight_decay, period, variant, 0
        self.m = [torch.zeros_like(p) for p in params]
        self.v = [torch.zeros_like(p) for p in params]

    @torch.no_grad()
    def step(self):
        self.t += 1
        t, K, (b1, b2) = self.t, self.K, self.betas
        tau = t % K
        L = t // K + 1 if self.variant == "reference" else math.ceil(t / K)
        bc1, bc2 = 1 - b1**L, 1 - b2**L
        for p, m, v in zip(self.params, self.m, self.v):
            if p.grad is None:
                continue
            g = p.grad
            if tau == 0:
                m.copy_(b1 * m + (1 - b1) / K * g)
                v.copy_(b2 * v + (1 - b2) / K * g * g)
                lr = self.lr
                p.copy_(p * (1 - lr * self.wd))
                p.copy_(p - lr * (m / bc1) / (torch.sqrt(v / bc2) + self.eps))
                if self.variant == "paper":
                    m.copy_(K * m)
                    v.copy_(K * v)
            else:
                m.copy_(tau / (tau + 1) * m + (1 - b1) / (tau + 1) * g)
                v.copy_(tau / (tau + 1) * v + (1 - b2) / (tau + 1) * g * g)
                lr = self.lr / math.sqrt(K)
                p.copy_(p * (1 - lr * self.wd))
                if self.variant == "reference":
                    p.copy_(p - lr * (m / bc1) / ((torch.sqrt(v) + self.eps) / bc2))
                else:
                    p.copy_(p - lr * (m / bc1) / (torch.sqrt(v / bc2) + self.eps))


class ReferenceLionPMA:
    def __init__(self, params, lr, betas, weight_decay, period):
        self.params, self.lr, self.betas, self.wd, self.K, self.t = params, lr, betas, weight_decay, period, 0
        self.m = [torch.zeros_like(p) for p in params]

    @torch.no_grad()
    def step(self):
        self.t += 1
        tau, K, (b1, b2) = self.t % self.K, self.K, self.betas
        for p, m in zip(self.params, self.m):
            if p.grad is None:
                continue
            g = p.grad
            p.copy_(p * (1 - self.lr * self.wd))
            if tau == 0:
                c = b1 * m + (1 - b1) / K * g
                p.copy_(p - self.lr * torch.sign(c))
                m.copy_(K * (b2 * m + (1 - b2) / K * g))
            else:
                c = tau / (tau + 1) * m + (1 - b1) / (tau + 1) * g
                p.copy_(p - self.lr / K * torch.sign(c))
                m.copy_(tau / (tau + 1) * m + (1 - b2) / (tau + 1) * g)


GROUP_SETTINGS = [  # per-group overrides: lr, weight decay, period and (AdamW) variant all vary
    dict(lr=3e-2, weight_decay=0.05, period=4),
    dict(lr=1e-2, weight_decay=0.0, period=3),
    dict(lr=2e-2, weight_decay=0.1, period=1),
]


def random_groups(dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    groups = []
    for _ in GROUP_SETTINGS:
        shapes = [tuple(int(s) for s in torch.randint(1, 6, (int(torch.randint(1, 4, (1,), generator=gen)),),
                                                      generator=gen)) for _ in range(2)]
        groups.append([torch.randn(s, generator=gen, dtype=dtype) for s in shapes])
    return groups


def gradient_stream(groups, steps, seed):
    gen = torch.Generator().manual_seed(seed + 1)
    return [[[torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in ps] for ps in groups] for _ in range(steps)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("foreach", [True, False], ids=["foreach", "per-tensor"])
@pytest.mark.parametrize("kind", ["reference", "paper", "lion"])
def test_matches_independent_reference(kind, foreach, dtype):
    steps = 13  # several periods of every group's K, ending mid-period
    init = random_groups(dtype, seed=7)
    grads = gradient_stream(init, steps, seed=7)
    ours = [[p.clone().requires_grad_() for p in ps] for ps in init]
    theirs = [[p.clone() for p in ps] for ps in init]
    if kind == "lion":
        opt = LionPMA([dict(params=ps, **cfg) for ps, cfg in zip(ours, GROUP_SETTINGS)], betas=(0.9, 0.99),
                      foreach=foreach)
        refs = [ReferenceLionPMA(ps, cfg["lr"], (0.9, 0.99), cfg["weight_decay"], cfg["period"])
                for ps, cfg in zip(theirs, GROUP_SETTINGS)]
    else:
        opt = AdamWPMA([dict(params=ps, **cfg) for ps, cfg in zip(ours, GROUP_SETTINGS)], betas=(0.9, 0.99),
                       eps=1e-3, variant=kind, foreach=foreach)
        refs = [ReferenceAdamWPMA(ps, cfg["lr"], (0.9, 0.99), 1e-3, cfg["weight_decay"], cfg["period"], kind)
                for ps, cfg in zip(theirs, GROUP_SETTINGS)]
    tol = dict(rtol=1e-12, atol=1e-13) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-6)
    for step_grads in grads:
        for ps, rs, gs in zip(ours, theirs, step_grads):
            for p, r, g in zip(ps, rs, gs):
                p.grad, r.grad = g.clone(), g.clone()
        opt.step()
        for ref in refs:
            ref.step()
        for ps, rs in zip(ours, theirs):
            for p, r in zip(ps, rs):
                torch.testing.assert_close(p.detach(), r, **tol)
    for group, ref in zip(opt.param_groups, refs):
        assert group["step"] == steps
        for p, m in zip(group["params"], ref.m):
            torch.testing.assert_close(opt.state[p]["exp_avg"], m, **tol)


@pytest.mark.parametrize("kind", ["reference", "paper", "lion"])
def test_foreach_and_per_tensor_paths_agree_bit_for_bit(kind):
    init = random_groups(torch.float32, seed=3)
    grads = gradient_stream(init, 11, seed=3)
    runs = []
    for foreach in (True, False):
        params = [[p.clone().requires_grad_() for p in ps] for ps in init]
        groups = [dict(params=ps, **cfg) for ps, cfg in zip(params, GROUP_SETTINGS)]
        opt = LionPMA(groups, foreach=foreach) if kind == "lion" else AdamWPMA(groups, variant=kind, foreach=foreach)
        for step_grads in grads:
            for ps, gs in zip(params, step_grads):
                for p, g in zip(ps, gs):
                    p.grad = g.clone()
            opt.step()
        runs.append(torch.cat([p.detach().flatten() for ps in params for p in ps]))
    assert torch.equal(runs[0], runs[1])


# ------------------------------------------------------------------ K = 1
def reference_lion(params, grads, lr, betas, weight_decay):
    """Lion as published (Chen et al. 2023), in the order lion-pytorch applies it."""
    m = [torch.zeros_like(p) for p in params]
    for step_grads in grads:
        for p, mi, g in zip(params, m, step_grads):
            p.mul_(1 - lr * weight_decay)
            update = (mi * betas[0] + g * (1 - betas[0])).sign_()
            p.add_(update, alpha=-lr)
            mi.mul_(betas[1]).add_(g, alpha=1 - betas[1])


def reference_adamw(params, grads, lr, betas, eps, weight_decay, exponent_offset):
    m = [torch.zeros_like(p) for p in params]
    v = [torch.zeros_like(p) for p in params]
    for t, step_grads in enumerate(grads, start=1):
        exponent = t + exponent_offset
        for p, mi, vi, g in zip(params, m, v, step_grads):
            p.mul_(1 - lr * weight_decay)
            mi.mul_(betas[0]).add_(g, alpha=1 - betas[0])
            vi.mul_(betas[1]).addcmul_(g, g, value=1 - betas[1])
            denom = (vi / (1 - betas[1] ** exponent)).sqrt() + eps
            p.sub_(lr * (mi / (1 - betas[0] ** exponent)) / denom)


def run_k1(opt_factory, init, grads):
    params = [p.clone().requires_grad_() for p in init]
    opt = opt_factory(params)
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = g.clone()
        opt.step()
    return [p.detach() for p in params]


K1_INIT = [torch.randn(4, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64),
           torch.randn(5, generator=torch.Generator().manual_seed(1), dtype=torch.float64)]
K1_GRADS = gradient_stream([K1_INIT], 9, seed=11)
K1_GRADS = [step[0] for step in K1_GRADS]


@pytest.mark.parametrize("foreach", [True, False], ids=["foreach", "per-tensor"])
def test_period_one_lion_is_lion(foreach):
    ours = run_k1(lambda ps: LionPMA(ps, lr=0.01, betas=(0.9, 0.99), weight_decay=0.1, period=1, foreach=foreach),
                  K1_INIT, K1_GRADS)
    theirs = [p.clone() for p in K1_INIT]
    reference_lion(theirs, K1_GRADS, 0.01, (0.9, 0.99), 0.1)
    for a, b in zip(ours, theirs):
        assert torch.equal(a, b)  # same operations in the same order: bit for bit


@pytest.mark.parametrize("foreach", [True, False], ids=["foreach", "per-tensor"])
def test_period_one_paper_is_torch_adamw(foreach):
    kwargs = dict(lr=0.01, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    ours = run_k1(lambda ps: AdamWPMA(ps, period=1, variant="paper", foreach=foreach, **kwargs), K1_INIT, K1_GRADS)
    theirs = run_k1(lambda ps: torch.optim.AdamW(ps, foreach=False, **kwargs), K1_INIT, K1_GRADS)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-14, atol=1e-15)


@pytest.mark.parametrize("foreach", [True, False], ids=["foreach", "per-tensor"])
def test_period_one_reference_is_adamw_with_bias_exponent_t_plus_one(foreach):
    kwargs = dict(lr=0.01, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    ours = run_k1(lambda ps: AdamWPMA(ps, period=1, variant="reference", foreach=foreach, **kwargs),
                  K1_INIT, K1_GRADS)
    theirs = [p.clone() for p in K1_INIT]
    reference_adamw(theirs, K1_GRADS, exponent_offset=1, **kwargs)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-14)
    # ... and so differs from torch AdamW: the first step is ~0.74x as long with betas (0.9, 0.95)
    torch_adamw = run_k1(lambda ps: torch.optim.AdamW(ps, **kwargs), K1_INIT, K1_GRADS)
    assert not torch.allclose(ours[0], torch_adamw[0], rtol=1e-6)


# ------------------------------------------------------------------ clock, state dict, contexts
def make_pair(kind, period=4):
    torch.manual_seed(0)
    params = [torch.randn(3, 4, requires_grad=True), torch.randn(5, requires_grad=True)]
    groups = [dict(params=[params[0]]), dict(params=[params[1]], lr=5e-3, period=period - 1)]
    if kind == "lion":
        return params, LionPMA(groups, lr=1e-2, period=period, weight_decay=0.1)
    return params, AdamWPMA(groups, lr=1e-2, period=period, variant=kind)


def feed(params, step):
    gen = torch.Generator().manual_seed(100 + step)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen)


@pytest.mark.parametrize("kind", ["reference", "paper", "lion"])
def test_state_dict_round_trip_mid_period_is_bit_identical(kind):
    params, opt = make_pair(kind)
    for step in range(6):  # mid-period of both groups (K = 4 and 3)
        feed(params, step)
        opt.step()
    saved_params = [p.detach().clone() for p in params]
    saved_state = copy.deepcopy(opt.state_dict())
    for step in range(6, 15):
        feed(params, step)
        opt.step()
    uninterrupted = [p.detach().clone() for p in params]

    fresh_params, fresh = make_pair(kind)
    with torch.no_grad():
        for p, s in zip(fresh_params, saved_params):
            p.copy_(s)
    fresh.load_state_dict(saved_state)
    assert [g["step"] for g in fresh.param_groups] == [6, 6]
    for step in range(6, 15):
        feed(fresh_params, step)
        fresh.step()
    for a, b in zip(fresh_params, uninterrupted):
        assert torch.equal(a.detach(), b)


@pytest.mark.parametrize("kind", ["reference", "lion"])
def test_tensor_without_gradient_stays_in_phase(kind):
    period = 3
    a = torch.ones(4, requires_grad=True)
    b = torch.ones(4, requires_grad=True)
    opt = (LionPMA([a, b], lr=0.1, period=period) if kind == "lion"
           else AdamWPMA([a, b], lr=0.1, period=period, variant=kind))
    b_ref = b.detach().clone()
    ref_opt = (ReferenceLionPMA([b_ref], 0.1, (0.9, 0.99), 0.0, period) if kind == "lion"
               else ReferenceAdamWPMA([b_ref], 0.1, (0.9, 0.999), 1e-8, 1e-2, period, kind))
    for step in range(7):
        a.grad = torch.full((4,), 0.5)
        b.grad = None if step in (1, 2, 4) else torch.full((4,), -1.0 - step)
        b_ref.grad = None if b.grad is None else b.grad.clone()
        opt.step()
        ref_opt.step()  # the reference advances its one clock whether or not b has a gradient
        torch.testing.assert_close(b.detach(), b_ref, rtol=1e-6, atol=1e-7)
    assert opt.param_groups[0]["step"] == 7
    assert int(opt.state[b]["step"]) == 7 and int(opt.state[a]["step"]) == 7


def test_setup_steps_change_nothing_and_create_state():
    params, opt = make_pair("reference")
    before = [p.detach().clone() for p in params]
    for p in params:
        p.grad = torch.zeros_like(p)
    with opt.setup_steps():
        opt.step()
    assert [g["step"] for g in opt.param_groups] == [0, 0]
    for p, b in zip(params, before):
        assert torch.equal(p.detach(), b)
        assert int(opt.state[p]["step"]) == 0
        assert torch.count_nonzero(opt.state[p]["exp_avg"]) == 0


def test_one_logical_step_advances_each_group_once():
    """ZeRO-3 steps once per sub-group: two calls with disjoint tensors of one group are one step."""
    a = torch.ones(3, requires_grad=True)
    b = torch.ones(3, requires_grad=True)
    opt = AdamWPMA([a, b], lr=0.1, period=2)
    group = opt.param_groups[0]
    for _ in range(3):
        with opt.one_logical_step():
            for sub_group in ([a], [b]):
                group["params"] = sub_group
                sub_group[0].grad = torch.ones(3)
                opt.step()
        group["params"] = [a, b]
    assert group["step"] == 3
    assert int(opt.state[a]["step"]) == int(opt.state[b]["step"]) == 3
    assert torch.equal(a.detach(), b.detach())


def test_clock_reconciles_with_per_tensor_steps_written_directly():
    """A universal-checkpoint load writes per-tensor state only; the group clock must follow it."""
    params, opt = make_pair("paper")
    for step in range(5):
        feed(params, step)
        opt.step()
    state = {p: {k: v.clone() for k, v in opt.state[p].items()} for p in params}
    fresh_params, fresh = make_pair("paper")
    for p, q in zip(fresh_params, params):
        fresh.state[p] = {k: v.clone() for k, v in state[q].items()}
    feed(fresh_params, 5)
    fresh.step()
    assert [g["step"] for g in fresh.param_groups] == [6, 6]


def test_closure_and_lr_scheduler():
    w = torch.tensor([1.0, 2.0], requires_grad=True)
    opt = AdamWPMA([w], lr=0.1, period=2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5**step)

    def closure():
        opt.zero_grad()
        loss = (w**2).sum()
        loss.backward()
        return loss

    losses = []
    for _ in range(4):
        losses.append(opt.step(closure).item())
        sched.step()
    assert losses[-1] < losses[0]
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5**4)


@pytest.mark.parametrize("kind", ["reference", "paper", "lion"])
def test_bf16_parameters_keep_fp32_state_and_stay_finite(kind):
    """bf16 tensors are updated in fp32 against fp32 moments and rounded to bf16 once per step."""
    torch.manual_seed(0)
    w = torch.randn(16, 8).to(torch.bfloat16).requires_grad_()
    ref = w.detach().float().requires_grad_()  # fp32 run rounded to bf16 after every step
    make = (lambda p: LionPMA([p], lr=1e-2, period=4)) if kind == "lion" else (
        lambda p: AdamWPMA([p], lr=1e-2, period=4, variant=kind))
    opt, ref_opt = make(w), make(ref)
    start = w.detach().clone()
    for step in range(12):
        w.grad = torch.randn(16, 8, generator=torch.Generator().manual_seed(step)).to(torch.bfloat16)
        ref.grad = w.grad.float()
        opt.step()
        ref_opt.step()
        with torch.no_grad():
            ref.copy_(ref.to(torch.bfloat16).float())
    assert w.dtype == torch.bfloat16
    assert opt.state[w]["exp_avg"].dtype == torch.float32
    assert torch.isfinite(w.float()).all()
    assert torch.equal(w.detach().float(), ref.detach())
    assert torch.equal(opt.state[w]["exp_avg"], ref_opt.state[ref]["exp_avg"])
    assert (w.detach().float() - start.float()).abs().max() > 0.01  # it did train
