"""The compiled step (``pma_dist/kernels/compiled.py``) computes what the foreach path computes, and
compiles once per bucket layout, not once per step, phase or variant.

Run here on CPU tensors (inductor's C++ backend); ``tests/test_cuda.py`` runs the same checks on a GPU.
Shapes are tiny and few so that each graph compiles in seconds; every test reuses the same layout, so a
session compiles each (function, dtype) once.

The comparison is in lockstep: before every step both paths start from the foreach path's state, so the
difference of one step is bounded on its own (:func:`adamw_step_bound`, :func:`lion_step_bound`) instead
of accumulating over the run; the float64 reference of ``tests/test_optim.py`` checks whole runs.
"""
from __future__ import annotations

import pytest
import torch

from pma_dist import AdamWPMA, LionPMA, functional as F
from pma_dist.coefficients import AdamWStepCoefficients, LionStepCoefficients
from pma_dist.kernels import compiled
from pma_dist.optim import PMAOptimizer
from pma_dist.schedule import PMAPhase

SHAPES = [(33,), (5, 7), (1,)]  # odd sizes: vector tails; a 1-element tensor
PERIOD = 3
STEPS = 7  # two periods and a bit: large steps at t = 3 and 6, small steps on both sides of them
ADAMW = dict(lr=1e-2, beta1=0.9, beta2=0.99, eps=1e-6, weight_decay=0.1)
LION = dict(lr=1e-3, beta1=0.9, beta2=0.99, weight_decay=0.1)

# --- the per-step bound ------------------------------------------------------------------------------------
# u: unit roundoff of the fp32 arithmetic both paths use (2**-24). Two evaluations of the same exact
# operation, each correctly rounded, differ by at most 2u relative; inductor may also contract a multiply
# and an add into one FMA, which only removes a rounding, so 2u per operation still holds. Division and
# square root get 5u: Triton (the GPU side of inductor) may use the approximate fp32 forms (within 2 ulp =
# 4u) against the foreach path's correctly rounded ones (u). First-order bounds (O(u^2) dropped), in terms
# of S, the sum of the absolute values of the terms each result is built from (no cancellation hides in S):
#   m' = m*d1 + c1*g            3 ops        |dm'| <= 6u * M,  M = |m*d1| + |c1*g|
#   v' = v*d2 + c2*g*g          4 ops        |dv'| <= 8u * V,  V = v' (all terms >= 0)
#   D  = (sqrt(v') + e1)/div + e2            relative: 8u/2 (from v') + 5u + 2u + 5u + 2u = 18u
#   q  = c8*m'/D                             |dq| <= |c8|/D * (6u*M + (2u + 5u + 18u)*|m'|) <= 31u*|c8|*M/D
#   p' = p*c4 + q               2 ops        |dp'| <= 2u*|p*c4| + 2u*(|p*c4| + |q|) + |dq|
#                                                  <= 4u*|p*c4| + 33u*|c8|*M/D
#   stored m, v: m'*r, v'*r     1 op more    |dm| <= 8u*M*r,   |dv| <= 10u*V*r
# A bf16 parameter is rounded from fp32 once more; the two roundings of values within |dp'| of each other
# land at most one bf16 spacing apart, so bf16 parameters get |dp'| + spacing(p').
U = 2.0 ** -24


def _bf16_spacing(x: torch.Tensor) -> torch.Tensor:
    """Distance between adjacent bf16 values at |x| (8 significant bits)."""
    exponent = torch.floor(torch.log2(x.abs().clamp_min(torch.finfo(torch.bfloat16).tiny)))
    return torch.pow(2.0, exponent - 7)


def adamw_step_bound(p, g, m, v, c: AdamWStepCoefficients):
    """Per-element bounds (float64) on |compiled - foreach| for p', m, v after one step from (p, g, m, v)."""
    p, g, m, v = (t.double() for t in (p, g, m, v))
    big_m = (m * c.decay1).abs() + (c.grad_coef1 * g).abs()
    m_new = m * c.decay1 + c.grad_coef1 * g
    v_new = v * c.decay2 + c.grad_coef2 * g * g
    e1, e2 = (c.eps, 0.0) if c.eps_before_divide else (0.0, c.eps)
    denom = (v_new.sqrt() + e1) / c.divisor + e2
    p_new = p * c.param_scale + c.step_coef * m_new / denom
    bound_p = 4 * U * (p * c.param_scale).abs() + 33 * U * abs(c.step_coef) * big_m / denom
    return p_new, bound_p, 8 * U * big_m * c.rescale, 10 * U * v_new * c.rescale


def lion_step_bound(p, g, m, c: LionStepCoefficients):
    """Bounds (float64) on |compiled - foreach| after one Lion-PMA step; where the sign's argument is within
    its own rounding of zero (6u of its terms) the two paths may take opposite signs: 2|step_alpha| more."""
    p, g, m = (t.double() for t in (p, g, m))
    arg = m * c.decay1 + c.grad_coef1 * g
    tie = arg.abs() <= 6 * U * ((m * c.decay1).abs() + (c.grad_coef1 * g).abs())
    p_new = p * c.param_scale + c.step_alpha * torch.sign(arg)
    bound_p = 4 * U * (p * c.param_scale).abs() + 2 * U * abs(c.step_alpha) + tie * 2 * abs(c.step_alpha)
    big_m = (m * c.decay2).abs() + (c.grad_coef2 * g).abs()
    return p_new, bound_p, 8 * U * big_m * c.rescale


def assert_within(name, ours, theirs, bound, exact_p_new=None):
    diff = (ours.double() - theirs.double()).abs()
    if ours.dtype == torch.bfloat16:
        bound = bound + _bf16_spacing(exact_p_new)
    worst = (diff - bound).max().item()
    assert worst <= 0, (f"{name}: compiled and foreach differ by {diff.max().item():.3g} (bound exceeded by "
                        f"{worst:.3g} at element {int((diff - bound).argmax())})")


# --- helpers -----------------------------------------------------------------------------------------------
def make_tensors(dtype, device="cpu", seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen).to(device=device, dtype=dtype) for s in SHAPES]


def gradients(params, step, seed=100):
    gen = torch.Generator().manual_seed(seed + step)
    out = []
    for p in params:
        scale = torch.exp(torch.randn(p.shape, generator=gen) * 2)  # some tiny second moments: eps matters
        out.append((torch.randn(p.shape, generator=gen) * scale).to(device=p.device, dtype=p.dtype))
    return out


def zeros_state(params):
    return [torch.zeros_like(p, dtype=F.state_dtype(p)) for p in params]


def run_adamw(path, params, grads, m, v, step, variant):
    fn = compiled.adamw_pma_compiled if path == "compiled" else F.adamw_pma_foreach
    fn(params, grads, m, v, phase=PMAPhase(step=step, period=PERIOD), variant=variant, **ADAMW)


def run_lion(path, params, grads, m, step):
    fn = compiled.lion_pma_compiled if path == "compiled" else F.lion_pma_foreach
    fn(params, grads, m, phase=PMAPhase(step=step, period=PERIOD), **LION)


def lockstep(kind, dtype, device="cpu"):
    """Both paths from the same state at every step; assert each step's difference is within its bound."""
    ref_p = make_tensors(dtype, device)
    ref_m, ref_v = zeros_state(ref_p), zeros_state(ref_p)
    for t in range(1, STEPS + 1):
        grads = gradients(ref_p, t)
        ours_p, ours_m, ours_v = ([x.clone() for x in xs] for xs in (ref_p, ref_m, ref_v))
        phase = PMAPhase(step=t, period=PERIOD)
        if kind == "lion":
            c = LionStepCoefficients.for_step(phase, **LION)
            bounds = [lion_step_bound(p, g, m, c) for p, g, m in zip(ref_p, grads, ref_m)]
            run_lion("foreach", ref_p, grads, ref_m, t)
            run_lion("compiled", ours_p, grads, ours_m, t)
            for i, (exact_p, bp, bm) in enumerate(bounds):
                assert_within(f"step {t} param {i}", ours_p[i], ref_p[i], bp, exact_p)
                assert_within(f"step {t} exp_avg {i}", ours_m[i], ref_m[i], bm)
        else:
            c = AdamWStepCoefficients.for_step(phase, variant=kind, **ADAMW)
            bounds = [adamw_step_bound(p, g, m, v, c) for p, g, m, v in zip(ref_p, grads, ref_m, ref_v)]
            run_adamw("foreach", ref_p, grads, ref_m, ref_v, t, kind)
            run_adamw("compiled", ours_p, grads, ours_m, ours_v, t, kind)
            for i, (exact_p, bp, bm, bv) in enumerate(bounds):
                assert_within(f"step {t} param {i}", ours_p[i], ref_p[i], bp, exact_p)
                assert_within(f"step {t} exp_avg {i}", ours_m[i], ref_m[i], bm)
                assert_within(f"step {t} exp_avg_sq {i}", ours_v[i], ref_v[i], bv)
        assert all(torch.isfinite(x).all() for x in ours_p)


def unique_graphs() -> int:
    from torch._dynamo.utils import counters
    return int(counters["stats"]["unique_graphs"])


# --- tests -------------------------------------------------------------------------------------------------
def graphs_compiled_over_two_periods(device="cpu") -> int:
    """Graphs compiled while both AdamW-PMA variants and Lion-PMA step over two periods and a bit, with
    the hyper-parameters changing too: 2 (one per function) if neither step, phase nor variant recompiles."""
    torch._dynamo.reset()  # count from a clean cache, whatever ran before
    before = unique_graphs()
    params = make_tensors(torch.float32, device)
    for variant in ("paper", "reference"):
        m, v = zeros_state(params), zeros_state(params)
        for t in range(1, 2 * PERIOD + 2):  # small, small, large, small, small, large, small
            run_adamw("compiled", params, gradients(params, t), m, v, t, variant)
    lion_m = zeros_state(params)
    for t in range(1, 2 * PERIOD + 2):
        run_lion("compiled", params, gradients(params, t), lion_m, t)
    # hyper-parameters change between calls too: still no recompile
    compiled.adamw_pma_compiled(params, gradients(params, 99), m, v, phase=PMAPhase(step=8, period=5),
                                lr=3e-4, beta1=0.8, beta2=0.9, eps=1e-3, weight_decay=0.0, variant="paper")
    return unique_graphs() - before


def test_one_compile_per_function_across_steps_phases_and_variants():
    assert graphs_compiled_over_two_periods() == 2, "expected one graph for AdamW-PMA (both variants), one for Lion-PMA"


@pytest.mark.parametrize("kind", ["paper", "reference", "lion"])
def test_compiled_matches_foreach_fp32(kind):
    lockstep(kind, torch.float32)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["paper", "lion"])
def test_compiled_matches_foreach_bf16_params_fp32_state(kind):
    lockstep(kind, torch.bfloat16)


@pytest.mark.slow
@pytest.mark.parametrize("cls", [AdamWPMA, LionPMA])
def test_optimizer_dispatches_to_compiled_step(cls, monkeypatch):
    """With the GPU branch forced on for CPU tensors, the optimizer's step equals the foreach optimizer's
    within one step's bound per step; two groups with different hyper-parameters share one graph."""
    monkeypatch.setattr(PMAOptimizer, "_use_compiled", lambda self, group, params: group["fused"] is not False)
    calls = []
    target = "adamw_pma_compiled" if cls is AdamWPMA else "lion_pma_compiled"
    real = getattr(compiled, target)
    monkeypatch.setattr(compiled, target, lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    extra = dict(eps=1e-6, variant="reference") if cls is AdamWPMA else {}

    def build(seed):
        ps = [p.requires_grad_() for p in make_tensors(torch.float32, seed=seed)]
        qs = [p.requires_grad_() for p in make_tensors(torch.float32, seed=seed + 1)]
        return ps + qs, cls([dict(params=ps), dict(params=qs, lr=2e-3, weight_decay=0.0)], lr=1e-2,
                            period=PERIOD, weight_decay=0.1, **extra)

    ours, opt_ours = build(0)
    theirs, opt_theirs = build(0)
    opt_theirs.param_groups[0]["fused"] = opt_theirs.param_groups[1]["fused"] = False
    for t in range(1, STEPS + 1):
        for p, q, g in zip(ours, theirs, gradients(ours, t)):
            p.grad, q.grad = g.clone(), g.clone()
        opt_ours.step()
        opt_theirs.step()
        for p, q in zip(ours, theirs):
            # a whole run, not lockstep: the per-step bounds add up over STEPS steps; 1e-5 relative covers
            # STEPS * 33u (about 1.4e-5 of lr) with the parameters O(1) and lr <= 1e-2
            torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-5, atol=STEPS * 33 * U)
    assert len(calls) == 2 * STEPS  # one call per group per step
    assert [g["step"] for g in opt_ours.param_groups] == [STEPS, STEPS]


def test_selection_rule_on_non_cpu_tensors():
    """fused=True on accelerator tensors takes the compiled step; fused=None and CPU tensors do not."""
    meta = [torch.zeros(3, device="meta")]
    cpu = [torch.zeros(3)]
    opt = AdamWPMA([dict(params=meta), dict(params=cpu, fused=False)], foreach=None)
    assert not opt._use_compiled(opt.param_groups[0], meta)  # fused=None: foreach until measured faster
    opt.param_groups[0]["fused"] = True
    assert opt._use_compiled(opt.param_groups[0], meta)
    opt.param_groups[1]["fused"] = True
    assert not opt._use_compiled(opt.param_groups[1], cpu)  # CPU tensors: the fused CPU kernel decides


def test_fused_true_on_a_device_inductor_cannot_compile_for_is_refused_up_front():
    with pytest.raises(RuntimeError, match="compiled step is unavailable.*'meta'"):
        AdamWPMA([torch.zeros(3, device="meta")], fused=True)


def test_compiled_step_names_a_bad_bucket():
    params = make_tensors(torch.float32)
    m = zeros_state(params)
    v = [x.double() for x in zeros_state(params)]
    with pytest.raises(ValueError, match="moment 0 is torch.float64"):
        compiled.adamw_pma_compiled(params, params, m, v, phase=PMAPhase(1, 2), variant="paper", **ADAMW)
    with pytest.raises(ValueError, match="gradient 1"):
        compiled.lion_pma_compiled(params, [params[0], params[0], params[2]], m, phase=PMAPhase(1, 2), **LION)
    assert "no code for 'mps'" in compiled.unavailable_reason("mps")


def test_step_bytes_of_the_one_pass_paths_are_each_input_read_and_each_output_written_once():
    def one_pass(param_bytes, reads, writes):  # moments fp32 (4 B); the parameter in its dtype
        return sum(param_bytes if t in ("p", "g") else 4 for t in reads) + \
            sum(param_bytes if t == "p" else 4 for t in writes)

    for dtype, nbytes in ((torch.float32, 4), (torch.bfloat16, 2)):
        assert compiled.STEP_BYTES_PER_PARAM[("adamw", "compiled", dtype)] == one_pass(nbytes, "pgmv", "pmv")
        assert compiled.STEP_BYTES_PER_PARAM[("lion", "compiled", dtype)] == one_pass(nbytes, "pgm", "pm")
        for kind in ("adamw", "lion"):
            assert compiled.STEP_BYTES_PER_PARAM[(kind, "foreach", dtype)] > 3 * compiled.STEP_BYTES_PER_PARAM[
                (kind, "compiled", dtype)]


def lion_first_step_compiled_vs_foreach(params, label: str):
    """One Lion-PMA step of ``params`` on the compiled path and of copies on the foreach path, within the bound."""
    before = [p.detach().clone() for p in params]
    ref = [p.clone() for p in before]
    m, ref_m = zeros_state(params), zeros_state(params)
    grads = gradients(params, 1)
    c = LionStepCoefficients.for_step(PMAPhase(step=1, period=PERIOD), **LION)
    bounds = [lion_step_bound(p, g, m0, c) for p, g, m0 in zip(before, grads, zeros_state(params))]
    run_lion("compiled", params, grads, m, 1)
    run_lion("foreach", ref, grads, ref_m, 1)
    for p, q, (exact, bound, _) in zip(params, ref, bounds):
        assert_within(label, p.detach(), q, bound, exact)
    return before


def test_entry_point_updates_leaf_parameters_outside_no_grad():
    """Called directly (not from an optimizer's no_grad step) on parameters that need grad, as a benchmark does."""
    params = [p.requires_grad_() for p in make_tensors(torch.float32)]
    before = lion_first_step_compiled_vs_foreach(params, "lion outside no_grad")
    for p, b in zip(params, before):
        assert p.requires_grad and p.grad is None
        assert not torch.equal(p.detach(), b)  # it moved


def test_layouts_past_the_recompile_limit_still_step_correctly(monkeypatch):
    """Past dynamo's recompile limit a new bucket layout runs eagerly (same operations), never an error."""
    import torch._dynamo.config as dynamo_config

    torch._dynamo.reset()
    monkeypatch.setattr(dynamo_config, "recompile_limit", 1)
    for n in (1, 2, 3):  # three list lengths: three layouts, two past the limit of one
        lion_first_step_compiled_vs_foreach(make_tensors(torch.float32)[:n], f"{n} tensors")
    torch._dynamo.reset()  # later tests compile with the default limit
