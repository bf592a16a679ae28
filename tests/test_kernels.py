"""The fused CPU kernels (``pma_dist/kernels``) compute what the plain foreach path computes.

Reference: ``pma_dist.functional``'s foreach path (itself tested equal to the per-tensor path in
``tests/test_optim.py``). One known difference is allowed and pinned down: torch's CPU ``sqrt`` is
not correctly rounded (about 0.7% of elements are one ulp off, depending on size), while the kernel
uses the IEEE square root. With ``torch._foreach_sqrt`` replaced by a correctly rounded one, the two
paths must agree bit for bit; with torch's own sqrt, moments stay bit-exact and parameters stay within a
bound derived from the operation sequence (see GAMMA below). Both hold at every SIMD level the kernel is
built for; the levels narrower than this CPU's are forced in a child run.
"""
from __future__ import annotations

import copy
import itertools
import json
import os
import subprocess
import sys
import warnings

import pytest
import torch

from pma_dist import AdamWPMA, LionPMA
import pma_dist.kernels as kernel_pkg
from pma_dist.kernels import build as kernel_build
from pma_dist.kernels import cpu as kernel_cpu
from tests.launching import REPO, load_script

# Odd sizes (partial vectors), a tensor spanning several parallel chunks (> 32768 elements) and a 1-element one.
SHAPES = [(70001,), (37, 5), (16,), (3, 129), (1,)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def correctly_rounded_foreach_sqrt(tensors):
    return [t.double().sqrt().to(t.dtype) for t in tensors]


def make_params(dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen).to(dtype).requires_grad_() for s in SHAPES]


def set_grads(params, step, seed=100):
    gen = torch.Generator().manual_seed(seed + step)
    for p in params:
        # Mix of magnitudes so some elements have tiny second moments (eps matters) and some large.
        scale = torch.exp(torch.randn(p.shape, generator=gen) * 2)
        p.grad = (torch.randn(p.shape, generator=gen) * scale).to(p.dtype)


def two_groups(params, optimizer_cls):
    """Several groups with different hyper-parameters, so group-level scalars are not mixed up."""
    if optimizer_cls is AdamWPMA:
        return [dict(params=params[:2]), dict(params=params[2:], lr=3e-3, betas=(0.8, 0.99), eps=1e-6,
                                               weight_decay=0.0)]
    return [dict(params=params[:2]), dict(params=params[2:], lr=3e-4, betas=(0.95, 0.98), weight_decay=0.0)]


def run(optimizer_cls, dtype, steps, path, **kwargs):
    params = make_params(dtype)
    opt = optimizer_cls(two_groups(params, optimizer_cls), **kwargs, **path)
    for t in range(1, steps + 1):
        set_grads(params, t)
        opt.step()
    return params, opt


def assert_same_state(opt_a, params_a, opt_b, params_b):
    for pa, pb in zip(params_a, params_b):
        assert torch.equal(pa, pb), f"parameter of shape {tuple(pa.shape)} differs"
        sa, sb = opt_a.state[pa], opt_b.state[pb]
        assert sa.keys() == sb.keys()
        for key in sa:
            assert sa[key].dtype == sb[key].dtype, key
            assert torch.equal(sa[key], sb[key]), f"state {key!r} of shape {tuple(pa.shape)} differs"
    assert [g["step"] for g in opt_a.param_groups] == [g["step"] for g in opt_b.param_groups]


ADAMW_CASES = [
    dict(variant=variant, period=period, lr=1e-2, weight_decay=0.1)
    for variant, period in itertools.product(["reference", "paper"], [1, 3, 4])
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", ADAMW_CASES, ids=lambda c: f"{c['variant']}-K{c['period']}")
def test_adamw_fused_is_bit_exact_with_correctly_rounded_sqrt(monkeypatch, case, dtype):
    monkeypatch.setattr(torch, "_foreach_sqrt", correctly_rounded_foreach_sqrt)
    steps = 2 * case["period"] + 2  # small and large steps, and the step after a large one
    ref_params, ref = run(AdamWPMA, dtype, steps, dict(foreach=True), **case)
    fast_params, fast = run(AdamWPMA, dtype, steps, dict(fused=True), **case)
    assert_same_state(ref, ref_params, fast, fast_params)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("period", [1, 3, 4])
def test_lion_fused_is_bit_exact(period, dtype):
    steps = 2 * period + 2
    ref_params, ref = run(LionPMA, dtype, steps, dict(foreach=True), period=period, lr=1e-2, weight_decay=0.1)
    fast_params, fast = run(LionPMA, dtype, steps, dict(fused=True), period=period, lr=1e-2, weight_decay=0.1)
    assert_same_state(ref, ref_params, fast, fast_params)


def ulp(t):
    """Spacing of float32 above |t|, as float64 (the rounding of a result r is at most ulp(r) / 2)."""
    t = t.detach().abs()
    return (torch.nextafter(t, torch.full_like(t, float("inf"))) - t).double()


# Accuracy contract of the fused AdamW-PMA kernel against the foreach path with torch's own sqrt.
# Derivation, from the operation sequence of functional.adamw_pma_foreach and adamw_span in pma_cpu.cpp
# (the bit-exact test above shows every other operation is the same on both paths):
#   both paths compute the same moments and the same P = fl(param_scale * p) and A = fl(step_coef * m);
#   they differ in s = sqrt(v): the kernel's is correctly rounded, torch's is within one ulp of that
#   (checked on the very values it saw, below), so s_foreach / s_fused = 1 + d, |d| <= 2^-23;
#   denom = fl(fl(s / divisor) + eps) or fl(fl(s + eps) / divisor): two roundings per path, each a
#   factor (1 + e), |e| <= u = 2^-24 (adding eps >= 0 cannot grow the relative difference of s);
#   the update q = fl(A / denom): one more rounding per path.
#   So q_foreach / q_fused = (1 + d) * prod_3 (1 + e_i) / prod_3 (1 + e'_i), and in either direction
#   |q_foreach - q_fused| <= GAMMA * |q|, GAMMA = (1 + u)^3 / ((1 - 2u)(1 - u)^3) - 1 ~ 4 * 2^-23.
#   The parameter is p = fl(P + q), each path rounding by at most half an ulp of its own result:
#   |p_fused - p_foreach| <= GAMMA * |q_foreach| + ulp(p_foreach) / 2 + ulp(p_fused) / 2,
#   with |q_foreach| <= |p_foreach - P| + ulp(p_foreach) / 2 (the observable update plus its rounding).
# Near cancellation (|q| >> |p|) this is several ulps of p, which is why "p within one ulp" is unsound.
# Subnormal results round by an absolute 2^-150 instead of relatively: SUBNORMAL_SLACK covers 8 of them.
# The bound is evaluated in float64 (relative error ~2^-52, far below the second-order terms in GAMMA).
U = 2.0 ** -24
GAMMA = (1 + U) ** 3 / ((1 - 2 * U) * (1 - U) ** 3) - 1
SUBNORMAL_SLACK = 8 * 2.0 ** -150


def recording_torch_sqrt(monkeypatch):
    """torch._foreach_sqrt unchanged, but every (input, output) pair it produced is kept."""
    seen, real = [], torch._foreach_sqrt

    def sqrt(tensors):
        out = real(tensors)
        seen.extend((t.clone(), o.clone()) for t, o in zip(tensors, out))
        return out

    monkeypatch.setattr(torch, "_foreach_sqrt", sqrt)
    return seen


@pytest.mark.parametrize("variant", ["reference", "paper"])
def test_adamw_fused_update_within_derived_bound_of_torch_sqrt_path(monkeypatch, variant):
    """One step from identical state: moments bit-exact, parameters within the derived bound above."""
    from pma_dist.coefficients import AdamWStepCoefficients
    from pma_dist.schedule import PMAPhase

    period = 3
    ref_params, ref = run(AdamWPMA, torch.float32, period, dict(foreach=True), variant=variant, period=period)
    fast_params = [p.detach().clone().requires_grad_() for p in ref_params]
    fast = AdamWPMA(two_groups(fast_params, AdamWPMA), variant=variant, period=period, fused=True)
    state = copy.deepcopy(ref.state_dict())  # state_dict() aliases the live moments
    for group in state["param_groups"]:
        group.update(foreach=None, fused=True)
    fast.load_state_dict(state)
    assert all(g["fused"] for g in fast.param_groups)
    sqrt_calls = recording_torch_sqrt(monkeypatch)
    for step in (period + 1, period + 2, 2 * period):  # small steps and a large one, one step at a time
        set_grads(ref_params, step)
        scaled = []  # P = fl(param_scale * p), computed like both paths do
        for group in ref.param_groups:
            beta1, beta2 = group["betas"]
            c = AdamWStepCoefficients.for_step(PMAPhase(step=step, period=period), lr=group["lr"], beta1=beta1,
                                               beta2=beta2, eps=group["eps"], weight_decay=group["weight_decay"],
                                               variant=variant)
            scaled += [p.detach().clone().mul_(c.param_scale) for p in group["params"]]
        for pf, pr in zip(fast_params, ref_params):
            pf.grad = pr.grad.clone()
            pf.data.copy_(pr.data)
            for key, value in ref.state[pr].items():
                fast.state[pf][key].copy_(value)
        sqrt_calls.clear()
        ref.step()
        fast.step()
        # The one assumption of the bound: torch's sqrt, on the values it saw, within 1 ulp of correctly rounded.
        assert len(sqrt_calls) == len(ref_params)
        for v, s in sqrt_calls:
            exact = v.double().sqrt().float()
            assert ((s.double() - exact.double()).abs() <= ulp(exact)).all(), "torch sqrt more than 1 ulp off"
        for pf, pr, P in zip(fast_params, ref_params, scaled):
            for key in ("exp_avg", "exp_avg_sq"):
                assert torch.equal(fast.state[pf][key], ref.state[pr][key]), key
            update = (pr.detach().double() - P.double()).abs() + ulp(pr) / 2
            bound = GAMMA * update + ulp(pr) / 2 + ulp(pf) / 2 + SUBNORMAL_SLACK
            diff = (pf.detach().double() - pr.detach().double()).abs()
            assert (diff <= bound).all(), f"step {step}: {(diff > bound).sum()} elements outside the derived bound"


def test_kernel_is_built_for_torchs_cpu_capability():
    module = kernel_build.load_cpu_kernels()
    level = torch.backends.cpu.get_cpu_capability()
    assert module.__name__ == f"pma_dist_cpu_kernels_{kernel_build.capability().lower()}"
    if level in kernel_build.CAPABILITIES:
        assert kernel_build.capability() == level
    expected = os.environ.get("PMA_DIST_EXPECT_CAPABILITY")  # set by the test below for its child run
    if expected:
        assert kernel_build.capability() == expected


# The tests that pin down what the kernel computes; a child pytest reruns them at each narrower level.
CONTRACT_TESTS = ("test_adamw_fused_is_bit_exact_with_correctly_rounded_sqrt or test_lion_fused_is_bit_exact "
                  "or test_adamw_fused_update_within_derived_bound or test_kernel_is_built_for_torchs_cpu_capability "
                  "or test_result_does_not_depend_on_thread_count")


@pytest.mark.slow
@pytest.mark.parametrize("level", [c for c in kernel_build.CAPABILITIES])
def test_contract_holds_at_every_cpu_capability_this_machine_runs(level):
    """torch's ATEN_CPU_CAPABILITY forces torch and the kernel (its own build) onto a narrower SIMD level,
    so a CPU that only has AVX2 (or neither) runs code that was tested here."""
    here = kernel_build.capability()
    if level == here:
        pytest.skip(f"{level} is this process's level: the tests above ran on it")
    if kernel_build.CAPABILITIES.index(level) > kernel_build.CAPABILITIES.index(here):
        pytest.skip(f"this CPU runs torch at {here}, narrower than {level}")
    env = dict(os.environ, ATEN_CPU_CAPABILITY=level.lower(), PMA_DIST_EXPECT_CAPABILITY=level)
    proc = subprocess.run([sys.executable, "-m", "pytest", __file__, "-q", "-p", "no:cacheprovider",
                           "-k", CONTRACT_TESTS], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=900)
    summary = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else proc.stderr[-2000:]
    assert proc.returncode == 0, f"at {level}: {summary}\n{proc.stdout[-6000:]}"
    expected = (len(ADAMW_CASES) * len(DTYPES) + 3 * len(DTYPES) + 2 + 1 + 1)
    assert f"{expected} passed" in summary, summary


def test_result_does_not_depend_on_thread_count(monkeypatch):
    results = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            results.append(run(AdamWPMA, torch.float32, 5, dict(fused=True), period=4))
    finally:
        torch.set_num_threads(threads)
    (params_a, opt_a), (params_b, opt_b) = results
    assert_same_state(opt_a, params_a, opt_b, params_b)


@pytest.mark.parametrize("optimizer_cls", [AdamWPMA, LionPMA])
def test_state_dict_round_trip_mid_period_is_bit_exact(optimizer_cls):
    period, split, total = 4, 6, 10
    straight_params, straight = run(optimizer_cls, torch.float32, total, dict(fused=True), period=period)

    params, first = run(optimizer_cls, torch.float32, split, dict(fused=True), period=period)
    saved_params = [p.detach().clone() for p in params]
    saved_state = copy.deepcopy(first.state_dict())
    resumed_params = [p.clone().requires_grad_() for p in saved_params]
    resumed = optimizer_cls(two_groups(resumed_params, optimizer_cls), period=period, fused=True)
    resumed.load_state_dict(saved_state)
    for t in range(split + 1, total + 1):
        set_grads(resumed_params, t)
        resumed.step()
    assert_same_state(straight, straight_params, resumed, resumed_params)
    assert all(g["fused"] is True for g in resumed.state_dict()["param_groups"])


def test_fused_state_loads_into_the_foreach_path(fused_by_default):
    params, fused = run(AdamWPMA, torch.float32, 5, dict(fused=True), period=4)
    other = AdamWPMA(two_groups([p.detach().clone().requires_grad_() for p in params], AdamWPMA), period=4)
    state = copy.deepcopy(fused.state_dict())
    for group in state["param_groups"]:
        group["fused"] = False  # the saved path choice travels with the groups; override it to switch
    other.load_state_dict(state)
    assert [g["step"] for g in other.param_groups] == [5, 5]
    assert all(g["fused"] is False for g in other.param_groups)
    for p in other.param_groups[0]["params"]:
        p.grad = torch.ones_like(p)
    fused_by_default.clear()
    other.step()
    assert fused_by_default == [] and other.param_groups[0]["step"] == 6


# ---------------------------------------------------------------------------------------- errors


def test_fused_and_foreach_together_is_an_error():
    with pytest.raises(ValueError, match=r"fused=True and foreach=True"):
        AdamWPMA(make_params(torch.float32), fused=True, foreach=True)
    with pytest.raises(ValueError, match=r"fused=True and foreach=False"):
        LionPMA(make_params(torch.float32), fused=True, foreach=False)


def test_fused_must_be_a_bool():
    with pytest.raises(TypeError, match=r"Invalid fused: 'yes'"):
        AdamWPMA(make_params(torch.float32), fused="yes")


def test_fused_rejects_float64_parameters_by_name():
    params = [torch.randn(4, dtype=torch.float64, requires_grad=True)]
    opt = AdamWPMA(params, fused=True)
    params[0].grad = torch.ones_like(params[0])
    with pytest.raises(ValueError, match=r"AdamWPMA\(fused=True\) cannot update parameter group 0: .*torch.float64"):
        opt.step()
    assert torch.equal(opt.state[params[0]]["exp_avg"], torch.zeros(4, dtype=torch.float64))


def test_fused_rejects_non_contiguous_parameters():
    base = torch.randn(6, 4)
    param = base.t().detach().requires_grad_()
    opt = LionPMA([param], fused=True)
    param.grad = torch.ones_like(param)
    with pytest.raises(ValueError, match=r"tensor 0 of list 0 \(shape \[4, 6\]\) is not contiguous"):
        opt.step()


def test_missing_compiler_is_a_clear_error_at_construction(monkeypatch):
    monkeypatch.setattr(kernel_build, "_module", None)
    monkeypatch.setattr(kernel_build, "_error", None)
    monkeypatch.setenv("CXX", "no-such-compiler-pma")
    with pytest.raises(RuntimeError, match=r"AdamWPMA\(fused=True\): .*'no-such-compiler-pma'.*not on PATH"):
        AdamWPMA(make_params(torch.float32), fused=True)
    # The default path needs no compiler (it warns and runs foreach; see test_fused_by_default_warns_once...).
    params = make_params(torch.float32)
    opt = AdamWPMA(params, foreach=True)
    set_grads(params, 1)
    opt.step()
    assert opt.param_groups[0]["step"] == 1


def test_kernel_builds_with_the_interpreters_own_ninja(monkeypatch, tmp_path):
    """A venv's ninja is used whether or not the venv is activated (two ninjas rebuild in turn)."""
    (tmp_path / "ninja").write_text("")
    monkeypatch.setattr(kernel_build.sys, "executable", str(tmp_path / "python"))
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    with kernel_build._interpreter_tools_first():
        assert os.environ["PATH"] == f"{tmp_path}{os.pathsep}/usr/bin:/bin"
    assert os.environ["PATH"] == "/usr/bin:/bin"
    (tmp_path / "ninja").unlink()  # no ninja beside the interpreter: PATH is left alone
    with kernel_build._interpreter_tools_first():
        assert os.environ["PATH"] == "/usr/bin:/bin"


def test_kernel_checks_its_inputs():
    kernels = kernel_build.load_cpu_kernels()
    p = [torch.zeros(8)]
    with pytest.raises(RuntimeError, match=r"tensor 0 of list 2 is Double, expected Float"):
        kernels.lion_pma_step(p, [torch.zeros(8)], [torch.zeros(8, dtype=torch.float64)], 1, 0.5, 0.5, -1e-3,
                              0.5, 0.5, 1.0)
    with pytest.raises(RuntimeError, match=r"tensor 0 of list 1 has 7 elements, its parameter has 8"):
        kernels.lion_pma_step(p, [torch.zeros(7)], [torch.zeros(8)], 1, 0.5, 0.5, -1e-3, 0.5, 0.5, 1.0)


# ---------------------------------------------------------------------------------------- benchmarks


def load_benchmark(name):
    return load_script(f"benchmarks/{name}.py")


def test_benchmark_model_shapes_hit_the_requested_sizes():
    bench = load_benchmark("optimizer_step")
    for n in (10**6, 10**7, 10**8):
        total = sum(torch.Size(s).numel() for s in bench.transformer_shapes(n))
        assert abs(total - n) / n < 0.01, (n, total)


def test_optimizer_step_benchmark_runs_and_reports_ratios(tmp_path):
    bench = load_benchmark("optimizer_step")
    out = tmp_path / "bench.json"
    result = bench.main(["--sizes", "20K", "--threads", "1", "--repeats", "1", "--warmup", "0", "--quick",
                         "--no-deepspeed", "--out", str(out)])
    assert json.loads(out.read_text())["runs"][0]["params"] == result["runs"][0]["params"]
    rows = {r["name"]: r for r in result["runs"][0]["rows"]}
    assert rows[result["runs"][0]["best_torch_adamw"]]["ratio_to_best_torch_adamw"] == 1.0
    for name in ("AdamWPMA fused reference small", "AdamWPMA fused paper large", "LionPMA fused large",
                 "AdamWPMA default small", "LionPMA default large",
                 "AdamWPMA foreach reference small", "Lion (plain foreach)", "torch AdamW fused"):
        assert rows[name]["median_ms"] > 0
    assert rows[bench.STREAM]["fraction_of_stream_bandwidth"] == 1.0
    assert rows["LionPMA fused small"]["gb_per_s"] * rows["LionPMA fused small"]["median_ms"] == pytest.approx(
        result["runs"][0]["params"] * 20 / 1e6)


@pytest.mark.parametrize("script, argv, message", [
    ("optimizer_step", ["--sizes", "ten"], "--sizes: cannot read 'TEN'"),
    ("optimizer_step", ["--sizes", "12"], "too small"),
    ("optimizer_step", ["--threads", "0"], "thread counts must be >= 1"),
    ("optimizer_step", ["--repeats", "0"], "--repeats must be >= 1"),
    ("e2e_step", ["--stages", "4"], r"ZeRO stage(s) [4] not benchmarked"),
    ("e2e_step", ["--period", "0"], "--period must be >= 1, got 0"),
    ("e2e_step", ["--modes", "ga,nope"], "--modes: 'ga,nope' must name distinct modes"),
    ("e2e_step", ["--modes", "ga", "--baseline", "pma-default"], "--baseline: 'pma-default' is not one of --modes"),
])
def test_benchmark_flags_are_checked(script, argv, message):
    with pytest.raises(SystemExit) as stop:
        load_benchmark(script).main(argv)
    assert message in str(stop.value)


# ---------------------------------------------------------------------------------------- fused=None


@pytest.fixture
def fused_by_default(monkeypatch):
    """Records the bucket sizes the fused AdamW kernel is called with."""
    calls = []
    real = kernel_cpu.adamw_pma_fused
    monkeypatch.setattr(kernel_pkg, "adamw_pma_fused", lambda *a, **k: (calls.append(len(a[0])), real(*a, **k)))
    return calls


def test_the_default_path_is_the_fused_kernel():
    import pma_dist.optim as optim

    assert optim.FUSED_BY_DEFAULT is True
    params = make_params(torch.float32)
    opt = LionPMA(two_groups(params, LionPMA), period=3)
    ref_params = [p.detach().clone().requires_grad_() for p in params]
    ref = LionPMA(two_groups(ref_params, LionPMA), period=3, fused=True)
    for t in range(1, 5):
        set_grads(params, t)
        set_grads(ref_params, t)
        opt.step()
        ref.step()
    assert_same_state(opt, params, ref, ref_params)
    assert all(g["fused"] is None for g in opt.param_groups)  # the choice stays "default" in checkpoints


def test_shipped_offload_configs_rely_on_the_default_path():
    from pathlib import Path

    configs = sorted(Path(REPO, "ds_configs").glob("*offload*.json"))
    assert configs
    for path in configs:
        params = json.loads(path.read_text())["optimizer"]["params"]
        assert "fused" not in params and "foreach" not in params, path.name  # either key would leave the default


def test_fused_by_default_takes_supported_cpu_buckets_only(fused_by_default):
    params = make_params(torch.float32) + [torch.randn(9, dtype=torch.float64, requires_grad=True)]
    opt = AdamWPMA(params, period=3)
    ref_params = [p.detach().clone().requires_grad_() for p in params]
    ref = AdamWPMA(ref_params, period=3, fused=False)
    for t in range(1, 5):
        set_grads(params, t)
        for p, r in zip(params, ref_params):
            r.grad = p.grad.clone()
        opt.step()
        ref.step()
    assert fused_by_default == [len(SHAPES)] * 4  # the float32 bucket, every step; float64 went to foreach
    assert torch.equal(params[-1], ref_params[-1])
    for p, r in zip(params, ref_params):
        assert torch.equal(opt.state[p]["exp_avg"], ref.state[r]["exp_avg"])


def test_fused_by_default_respects_an_explicit_foreach(fused_by_default):
    params = make_params(torch.float32)
    opt = AdamWPMA(params, period=3, foreach=True)
    set_grads(params, 1)
    opt.step()
    assert fused_by_default == []


def test_fused_by_default_warns_once_and_falls_back_without_a_compiler(fused_by_default, monkeypatch):
    import pma_dist.optim as optim

    monkeypatch.setattr(kernel_build, "_module", None)
    monkeypatch.setattr(kernel_build, "_error", None)
    monkeypatch.setattr(optim, "_warned_fused_unavailable", False)
    monkeypatch.setenv("CXX", "no-such-compiler-pma")
    params = make_params(torch.float32)
    opt = AdamWPMA(params, period=3)
    with pytest.warns(RuntimeWarning, match=r"using the foreach path .*'no-such-compiler-pma'"):
        set_grads(params, 1)
        opt.step()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        set_grads(params, 2)
        opt.step()
    assert fused_by_default == [] and opt.param_groups[0]["step"] == 2


# ---------------------------------------------------------------------------------------- ZeRO-Offload


@pytest.fixture(scope="module")
def offload_results(tmp_path_factory):
    from tests.launching import run_ranks

    out = tmp_path_factory.mktemp("offload") / "results.json"
    run_ranks("kernels_offload.py", [out], nproc=2, launcher="torchrun", timeout=400)
    return json.loads(out.read_text())


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_zero_offload_runs_the_fused_kernel_on_cpu_partitions(offload_results, stage):
    for optimizer in ("AdamWPMA", "LionPMA"):
        case = offload_results[f"zero{stage}_{optimizer}"]
        assert "error" not in case, case.get("error")
        assert case["fused_calls"] == 8, case  # one per step: the offloaded fp32 partition is one bucket
        assert case["fused_devices"] == ["cpu"] and case["fused_dtypes"] == ["torch.float32"]


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_zero_offload_fused_equals_foreach(offload_results, stage):
    lion = offload_results[f"zero{stage}_LionPMA"]
    assert lion["bit_identical"], lion
    adamw = offload_results[f"zero{stage}_AdamWPMA"]
    assert adamw["max_rel_diff_of_update"] < 1e-5, adamw  # one-ulp sqrt differences, 8 steps
