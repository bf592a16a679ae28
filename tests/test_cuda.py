"""GPU checks: ``pytest -m cuda`` on a machine with a CUDA GPU (``benchmarks/gpu_check.py`` runs them).

Every test here is marked ``cuda``; ``tests/conftest.py`` skips them with the reason where
``torch.cuda.is_available()`` is False. They assert numbers, as the CPU tests do:

* every optimizer path (foreach, per-tensor, compiled) on CUDA against the float64 CPU reference of
  ``tests/test_optim.py``; the compiled step against the CUDA foreach path, step by step, within the bound
  derived in ``tests/test_compiled_step.py``; one compile across steps, phases and variants; no host
  synchronisation inside a step;
* DeepSpeed ZeRO-0/1/2/3 with bf16 on one GPU (NCCL, world size 1) with the JSON-registered optimizers,
  FSDP2 on one GPU, the communication ledger on NCCL: one launch of ``tests/workers/gpu_suite.py``;
* ``launch/train.py`` on CUDA.

The worker is device-agnostic; ``test_gpu_suite_worker_runs_on_cpu`` (slow, no GPU needed) runs part of
it on CPU/gloo so that it cannot rot where no GPU is.
"""
from __future__ import annotations

import json

import pytest
import torch

from pma_dist import AdamWPMA, LionPMA
from recipes.posttrain.metrics import read_metrics
from tests import test_compiled_step as cs
from tests import test_optim as ref
from tests.launching import REPO, run_ranks

CUDA_ENV = {"DS_ACCELERATOR": "cuda"}
U = 2.0 ** -24

# --- optimizer paths ------------------------------------------------------------------------------------
REF_STEPS = 13  # as tests/test_optim.py: several periods of every group's K, ending mid-period
# fp32 against float64. One step of an fp32 path differs from the exact step by less than the two-sided
# per-step bound of tests/test_compiled_step.py (4u|p| + 33u|q|, q the step; it also covers Triton's
# approximate division and square root and the rounding of the float64 inputs to fp32), so by at most
# 37u (|p| + |q|) with u = 2**-24; errors carried in from earlier steps pass through non-expansive updates
# (decays <= 1, a normalised Adam step, Lion's exact sign), so 13 steps stay within 13 * 37u of |p| (rtol)
# plus 13 * 37u of the largest step, |q| <= 3 lr with lr <= 3e-2 in GROUP_SETTINGS (atol; by Cauchy-Schwarz
# over the averaging weights |m_hat|/sqrt(v_hat) <= (1-b1)/sqrt(1-b2) / sqrt(1-b1^2/b2) = 2.35 for (0.9, 0.99)).
REF_RTOL = REF_STEPS * 37 * U
REF_ATOL = REF_RTOL * 3 * 3e-2
PATHS = {"foreach": dict(), "per-tensor": dict(foreach=False), "compiled": dict(fused=True)}


def _cuda_groups(init):
    return [[p.to("cuda", torch.float32).requires_grad_() for p in ps] for ps in init]


@pytest.mark.cuda
@pytest.mark.parametrize("path", sorted(PATHS))
@pytest.mark.parametrize("kind", ["reference", "paper", "lion"])
def test_optimizer_paths_on_cuda_match_cpu_float64_reference(kind, path):
    init = ref.random_groups(torch.float64, seed=7)
    grads = ref.gradient_stream(init, REF_STEPS, seed=7)
    ours = _cuda_groups(init)
    theirs = [[p.clone() for p in ps] for ps in init]
    if kind == "lion":
        opt = LionPMA([dict(params=ps, **cfg) for ps, cfg in zip(ours, ref.GROUP_SETTINGS)], betas=(0.9, 0.99),
                      **PATHS[path])
        refs = [ref.ReferenceLionPMA(ps, cfg["lr"], (0.9, 0.99), cfg["weight_decay"], cfg["period"])
                for ps, cfg in zip(theirs, ref.GROUP_SETTINGS)]
    else:
        opt = AdamWPMA([dict(params=ps, **cfg) for ps, cfg in zip(ours, ref.GROUP_SETTINGS)], betas=(0.9, 0.99),
                       eps=1e-3, variant=kind, **PATHS[path])
        refs = [ref.ReferenceAdamWPMA(ps, cfg["lr"], (0.9, 0.99), 1e-3, cfg["weight_decay"], cfg["period"], kind)
                for ps, cfg in zip(theirs, ref.GROUP_SETTINGS)]
    for step_grads in grads:
        for ps, rs, gs in zip(ours, theirs, step_grads):
            for p, r, g in zip(ps, rs, gs):
                p.grad, r.grad = g.to("cuda", torch.float32), g.clone()
        opt.step()
        for r in refs:
            r.step()
        for ps, rs in zip(ours, theirs):
            for p, r in zip(ps, rs):
                assert p.device.type == "cuda"
                torch.testing.assert_close(p.detach().cpu().double(), r, rtol=REF_RTOL, atol=REF_ATOL)
    for group, r in zip(opt.param_groups, refs):
        assert group["step"] == REF_STEPS
        for p, m in zip(group["params"], r.m):
            assert opt.state[p]["exp_avg"].device.type == "cuda"
            torch.testing.assert_close(opt.state[p]["exp_avg"].cpu().double(), m, rtol=REF_RTOL, atol=REF_ATOL)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("kind", ["paper", "reference", "lion"])
def test_compiled_step_matches_cuda_foreach_step_by_step(kind, dtype):
    cs.lockstep(kind, dtype, device="cuda")


@pytest.mark.cuda
def test_compiled_step_compiles_once_on_cuda():
    assert cs.graphs_compiled_over_two_periods("cuda") == 2


@pytest.mark.cuda
@pytest.mark.parametrize("path", sorted(PATHS))
@pytest.mark.parametrize("cls", [AdamWPMA, LionPMA])
def test_step_does_not_synchronise_with_the_host(cls, path):
    """A steady-state step only queues work: torch's sync debug mode turns any synchronising call into an error."""
    params = [torch.randn(s, device="cuda", requires_grad=True) for s in cs.SHAPES]
    opt = cls(params, period=3, **PATHS[path])
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()  # first step: state creation, clock reconciliation, compilation
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(4):  # small and large steps
            opt.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    assert all(torch.isfinite(p).all() for p in params)


@pytest.mark.cuda
def test_step_after_load_state_dict_does_not_synchronise():
    """torch's load_state_dict may move the per-tensor step counters of fused=True groups onto the GPU (its
    rule for fused optimizers); the step that follows must still only queue work."""
    params = [torch.randn(s, device="cuda", requires_grad=True) for s in cs.SHAPES]
    opt = AdamWPMA(params, period=3, fused=True)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    opt.load_state_dict(opt.state_dict())
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        opt.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert [float(opt.state[p]["step"]) for p in params] == [2.0] * len(params)


# --- one GPU under DeepSpeed, FSDP2 and the ledger ----------------------------------------------------------
@pytest.fixture(scope="module")
def gpu_suite(tmp_path_factory):
    pytest.importorskip("deepspeed", reason="the GPU suite builds DeepSpeed engines (see docs/gpu.md to carry it)")
    out = tmp_path_factory.mktemp("gpu_suite") / "results.json"
    run_ranks("gpu_suite.py", ["--out", out], nproc=1, env=CUDA_ENV, timeout=900)
    return json.loads(out.read_text())


def section(results, name):
    value = results[name]
    assert "error" not in value, value.get("error")
    return value


def case(results, sec, name):
    value = section(results, sec)[name]
    assert "error" not in value, value["error"]
    return value


def assert_bf16_engine_runs_and_one_step_is_within_bound(result):
    """As tests/test_deepspeed.py's bf16 tests: one step within the derived bound of the same bf16 arithmetic
    in one process on the same device (ds_suite.bf16_one_step_interval; with one rank both sides compute the
    gradient with the same kernel, so its bound only adds margin; the fp32 slack covers the compiled step),
    and 12 steps that run: finite, the loss falls, one PMA step per micro-batch."""
    one = result["one_step"]
    assert "error" not in one and one["rows_match"] and one["outside"] == 0, one
    assert one["widened"] < one["numel"] / 10, one
    assert result["finite"] and result["loss_end"] < result["loss_start"], result
    assert result["group_steps"] == [result["steps"]] * 2  # one PMA step per micro-batch, both groups


def assert_bf16_engine_on_gpu(result):
    assert_bf16_engine_runs_and_one_step_is_within_bound(result)
    assert (result["model_device"], result["model_dtype"], result["state_devices"]) == ("cuda", "bfloat16", ["cuda"])


@pytest.mark.cuda
@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_deepspeed_zero_stage_bf16_on_one_gpu(gpu_suite, stage):
    assert (gpu_suite["accelerator"], gpu_suite["backend"], gpu_suite["world"]) == ("cuda", "nccl", 1)
    for opt_name in ("AdamWPMA", "LionPMA"):
        result = case(gpu_suite, "deepspeed", f"zero{stage}_{opt_name.lower()}")
        assert_bf16_engine_on_gpu(result)
        assert result["compiled_calls"] == 0  # fused=None on CUDA: the foreach path


@pytest.mark.cuda
def test_deepspeed_fused_true_runs_the_compiled_step(gpu_suite):
    result = case(gpu_suite, "deepspeed", "zero2_adamwpma_fused")
    assert_bf16_engine_on_gpu(result)
    assert result["compiled_calls"] == 2 * result["steps"]  # ZeRO-2: one flat fp32 partition per group


@pytest.mark.cuda
@pytest.mark.parametrize("name", ["zero2_offload_adamwpma", "zero3_offload_lionpma"])
def test_deepspeed_offload_steps_on_cpu_for_a_gpu_model(gpu_suite, name):
    result = case(gpu_suite, "deepspeed", name)
    assert_bf16_engine_runs_and_one_step_is_within_bound(result)
    assert (result["model_device"], result["model_dtype"], result["state_devices"]) == ("cuda", "bfloat16", ["cpu"])


# FSDP2 on one GPU against one CPU process. Two differences, added: (1) the gradients' summation order
# (cuBLAS vs the CPU; fp32 matmuls, torch leaves TF32 off by default), bounded as in tests/test_fsdp.py's CPU
# parity, whose runs differ from one process only in the gradient reduction's order: FSDP_ABS_TOL; (2) the
# optimizer's own roundings on the GPU (FMA contraction, Triton's division), at most the per-step bound of
# tests/test_compiled_step.py: 4u|p| + 33u|q| with |p| <= 1 (default Linear init of this net) and the step
# |q| <= 3 lr (|m_hat| / sqrt(v_hat) <= (1-b1)/sqrt(1-b2) / sqrt(1-b1^2/b2) = 1.2 for betas (0.9, 0.95), by
# Cauchy-Schwarz over the averaging weights; 3 as for REF_ATOL), lr = 2e-2, summed over the run's 12 micro-steps.
FSDP_ABS_TOL = 5e-7
FSDP_GPU_ABS_TOL = FSDP_ABS_TOL + 12 * (4 * U * 1.0 + 33 * U * 3 * 2e-2)


@pytest.mark.cuda
def test_fsdp2_on_one_gpu_matches_one_process(gpu_suite):
    for name in ("adamw_pma_reference", "adamw_pma", "adamw_pma_fused"):
        r = case(gpu_suite, "fsdp", name)
        assert (r["param_device"], r["is_dtensor"]) == ("cuda", True)
        assert r["optimizer_steps"] == r["steps"]
        assert r["max_abs_diff"] <= FSDP_GPU_ABS_TOL, (name, r)
        assert r["compiled_calls"] == (r["steps"] if name.endswith("fused") else 0)


@pytest.mark.cuda
def test_comm_ledger_counts_nccl_collectives_exactly(gpu_suite):
    r = section(gpu_suite, "ledger")
    assert (r["backend"], r["tensor_device"], r["all_reduce_value"]) == ("nccl", "cuda", 1.0)
    w = r["world"]
    assert r["records"] == [["backward", "all_reduce", 1, 16], ["backward", "broadcast", 1, 56],
                            ["backward", "reduce_scatter", 1, 12 * w], ["forward", "all_gather", 1, 12 * w],
                            ["forward", "all_reduce", 2, 20 + 4]]


@pytest.mark.cuda
def test_train_script_on_cuda(tmp_path):
    pytest.importorskip("deepspeed", reason="launch/train.py's default backend is DeepSpeed (see docs/gpu.md)")
    args = ["--model", "builtin-fallback", "--optimizer", "adamw_pma", "--period", "2", "--lr", "1e-3",
            "--zero-stage", "2", "--micro-steps", "4", "--micro-batch-size", "2", "--max-length", "48",
            "--eval-size", "8", "--output-dir", tmp_path, "--no-progress"]
    run_ranks(REPO / "launch" / "train.py", args, nproc=1, env=CUDA_ENV, timeout=600)
    train = read_metrics(tmp_path / "metrics.jsonl", "train")
    assert [(r["micro_step"], r["optimizer_steps"], r["samples"]) for r in train] == [(2, 2, 4), (4, 4, 8)]
    assert all(torch.isfinite(torch.tensor(r["train_loss"])) for r in train)
    evals = read_metrics(tmp_path / "metrics.jsonl", "eval")
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"]  # it trained (on CPU: 4.55 -> 4.28 with these settings)


# --- the worker without a GPU ---------------------------------------------------------------------------------
@pytest.mark.slow
def test_gpu_suite_worker_runs_on_cpu(tmp_path):
    """The same worker on CPU/gloo (one DeepSpeed case, FSDP2, the ledger): its code paths stay runnable here."""
    out = tmp_path / "results.json"
    run_ranks("gpu_suite.py", ["--out", out, "--ds-cases", "zero3_adamwpma"], nproc=1, timeout=600)
    results = json.loads(out.read_text())
    assert (results["accelerator"], results["backend"]) == ("cpu", "gloo")
    ds = case(results, "deepspeed", "zero3_adamwpma")
    assert_bf16_engine_runs_and_one_step_is_within_bound(ds)
    assert (ds["model_device"], ds["model_dtype"], ds["state_devices"]) == ("cpu", "bfloat16", ["cpu"])
    for name in ("adamw_pma_reference", "adamw_pma"):
        assert case(results, "fsdp", name)["max_abs_diff"] <= FSDP_ABS_TOL
    ledger = section(results, "ledger")
    assert ledger["records"] == [["backward", "all_reduce", 1, 16], ["backward", "broadcast", 1, 56],
                                 ["backward", "reduce_scatter", 1, 12], ["forward", "all_gather", 1, 12],
                                 ["forward", "all_reduce", 2, 24]]


# --- benchmarks/gpu_check.py without a GPU ----------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU toy mode only: on a GPU this is the full GPU check")
def test_gpu_check_cpu_toy_run(tmp_path):
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--out", str(tmp_path)], cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.splitlines()[0].startswith("gpu_check: no CUDA device: CPU toy run")
    r = json.loads((tmp_path / "gpu_check.json").read_text())
    assert r["mode"] == "cpu-toy" and (tmp_path / "gpu_check.md").exists()
    counts = r["tests"]["counts"]
    assert counts.get("skipped", 0) >= 8 and not counts.get("failed") and not counts.get("passed")
    rows = r["step"]["rows"]
    assert {(x["dtype"], x["impl"]) for x in rows} == {(d, i) for d in ("float32", "bfloat16")
                                                      for i in ("pma_compiled", "pma_foreach", "torch_adamw_fused")}
    assert all(x["median_ms"] > 0 and x["params"] == 4 * 2 ** 16 for x in rows)
    by = {(x["dtype"], x["impl"]): x["bytes_per_param"] for x in rows}
    assert by[("float32", "pma_compiled")] == by[("float32", "torch_adamw_fused")] == 28
    ds = r["deepspeed"]["rows"]
    assert [(x["zero_stage"], x["mode"]) for x in ds] == [(s, m) for s in (2, 3) for m in ("ga", "pma_foreach", "pma_fused")]
    assert all(x["finite"] and x["s_per_micro_step"] > 0 for x in ds)
    assert set(r["goals"].values()) == {"not measured"}


def test_gpu_check_goals_are_judged_from_a_cuda_run():
    from tests.launching import load_script

    gc = load_script("benchmarks/gpu_check.py")
    row = dict(size="1B", dtype="float32")
    results = {"mode": "cuda", "step": {"rows": [
        dict(row, impl="pma_compiled", median_ms=10.4, fraction_of_datasheet_peak=0.81),
        dict(row, impl="torch_adamw_fused", median_ms=10.0, fraction_of_datasheet_peak=0.84)]},
        "deepspeed": {"rows": [dict(zero_stage=3, mode="pma_foreach", vs_ga=1.08),
                               dict(zero_stage=3, mode="pma_fused", vs_ga=1.04)]}}
    assert gc.goals(results) == {"step_vs_torch_fused": "1.04x (met)", "bandwidth_fraction": "81% of datasheet (met)",
                                 "zero3_pma_vs_ga": "1.04x (pma_fused; met)"}
    results["step"]["rows"][0].update(median_ms=11.0, fraction_of_datasheet_peak=0.5)
    goals = gc.goals(results)
    assert goals["step_vs_torch_fused"] == "1.10x (missed)" and goals["bandwidth_fraction"] == "50% of datasheet (missed)"
    assert set(gc.goals(dict(results, mode="cpu-toy")).values()) == {"not measured"}


def test_gpu_check_tests_section_reports_a_timeout():
    from tests.launching import load_script

    result = load_script("benchmarks/gpu_check.py").run_tests(0.5)  # pytest cannot even start in 0.5 s
    assert (result["returncode"], result["summary"], result["counts"]) == (None, "timed out", {})
