"""One 2-rank launch that exercises the DeepSpeed integration case by case and writes JSON results.

Every case builds a fresh engine from a shipped ``ds_configs/*.json`` (registered only through the
config's ``optimizer.type`` unless the case says "client"), trains a deep linear net on a fixed
global batch split across the ranks, and records numbers that ``tests/test_deepspeed.py`` asserts
on: the relative error of the parameter update against a single-process run of the same
optimizer on the whole global batch, the optimizer's step counters, state sizes, error messages.
A failing case records its traceback instead of stopping the others.

Usage: ``torchrun --nproc_per_node=2 ds_suite.py --out results.json --ckpt DIR [--cases a,b]``
       ``ds_suite.py --universal DIR --out results.json`` (resume a universal checkpoint, any world size)
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import logging
import math
import traceback
import warnings
from pathlib import Path

import torch
import torch.distributed as dist

import pma_dist
from pma_dist import AdamWPMA, LionPMA, PMAOptimizer
from pma_dist.distributed import pop_local_rank_arg, run_rank, shutdown

import deepspeed  # noqa: E402  (after pma_dist, as a user would)
from deepspeed.utils import logger as ds_logger  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "ds_configs"

PERIOD = 4
PERIODS = 3
STEPS = PERIOD * PERIODS
MICRO = 2  # rows per rank per micro-step
DIM, DEPTH = 16, 4
SAVE_AT = 5  # mid-period: tau = 1
SUB_GROUP = 300  # ZeRO-3 sub_group_size in elements: the 1024 weights of a rank's half become 2 sub-groups
HYPER = {
    "AdamWPMA": {"lr": 1e-2, "betas": [0.9, 0.95], "eps": 1e-3, "weight_decay": 0.01, "period": PERIOD},
    "LionPMA": {"lr": 1e-3, "betas": [0.95, 0.98], "weight_decay": 0.01, "period": PERIOD},
}
CLASSES = {"AdamWPMA": AdamWPMA, "LionPMA": LionPMA}
NO_DECAY_GROUP = {"weight_decay": 0.0}


# ---------------------------------------------------------------------------------------------- problem
def make_model() -> torch.nn.Module:
    """A deep linear net: well conditioned (orthogonal layers), every weight gets a real gradient."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(DIM, DIM) for _ in range(DEPTH)])
    with torch.no_grad():
        for layer in model:
            torch.nn.init.orthogonal_(layer.weight)
            layer.bias.normal_(0.0, 0.1)
    return model


def param_groups(model):
    """Two groups (weights with decay, biases without) so ZeRO-1/2 step once per group."""
    weights = [p for n, p in model.named_parameters() if n.endswith("weight")]
    biases = [p for n, p in model.named_parameters() if n.endswith("bias")]
    return [{"params": weights}, dict(NO_DECAY_GROUP, params=biases)]


def global_batch(step: int, world: int):
    g = torch.Generator().manual_seed(1000 + step)
    target = torch.Generator().manual_seed(7)
    w_true = torch.randn(DIM, DIM, generator=target) / math.sqrt(DIM)
    x = torch.randn(world * MICRO, DIM, generator=g)
    y = x @ w_true + 0.1 * torch.randn(world * MICRO, DIM, generator=g)
    return x, y


def local_batch(step: int, rank: int, world: int):
    x, y = global_batch(step, world)
    return x[rank * MICRO:(rank + 1) * MICRO], y[rank * MICRO:(rank + 1) * MICRO]


def reference_updates(name: str, params: dict, world: int, steps: int = STEPS):
    """The same optimizer in one process on the whole global batch (no DeepSpeed)."""
    model = make_model()
    start = [p.detach().clone() for p in model.parameters()]
    optimizer = CLASSES[name](param_groups(model), **dict(params, betas=tuple(params["betas"])))
    for step in range(steps):
        x, y = global_batch(step, world)
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return [p.detach() - s for p, s in zip(model.parameters(), start)], optimizer


# ---------------------------------------------------------------------------------------------- engines
def load_config(name: str, **overrides) -> dict:
    cfg = json.loads((CONFIGS / name).read_text())
    cfg["train_micro_batch_size_per_gpu"] = MICRO
    cfg["gradient_clipping"] = 0.0  # DeepSpeed's default 1.0 would clip, the reference does not
    cfg["steps_per_print"] = 10**6
    opt = cfg.get("optimizer")
    if opt is not None and opt["type"] in HYPER:
        shipped_period = opt["params"].get("period")
        opt["params"] = dict(opt["params"], **HYPER[opt["type"]])
        if shipped_period == 1:  # a GA baseline: keep the plain optimizer
            opt["params"]["period"] = 1
    for key, value in overrides.items():
        cfg[key] = value
    zero = cfg.get("zero_optimization", {})
    if zero.get("stage") == 3:
        # partition every parameter (the shipped 1e5 threshold would keep these small ones whole) and
        # split each param group into several sub-groups, which ZeRO-3 steps one by one
        cfg["zero_optimization"] = dict(zero, stage3_param_persistence_threshold=0, sub_group_size=SUB_GROUP)
    return cfg


def build(cfg: dict, client=None, initialize=None):
    """``client``: None (optimizer from the config), a factory tagged ``as_instance`` (we pass the
    optimizer it makes, as users who build their own do) or a callable DeepSpeed calls itself.
    ``initialize``: ``deepspeed.initialize`` (default) or ``pma_dist.initialize``."""
    model = make_model()
    optimizer = client
    if getattr(client, "as_instance", False):
        optimizer = client(param_groups(model))
    initialize = initialize or deepspeed.initialize
    engine, *_ = initialize(model=model, model_parameters=param_groups(model), config=cfg, optimizer=optimizer)
    return engine


def train(engine, steps, rank, world, first=0, poison_step=None):
    dtype = next(engine.module.parameters()).dtype
    for step in range(first, first + steps):
        x, y = local_batch(step, rank, world)
        loss = torch.nn.functional.mse_loss(engine(x.to(engine.device, dtype)).float(), y.to(engine.device))
        if step == poison_step:
            loss = loss * float("inf")
        engine.backward(loss)
        engine.step()


def full_params(engine):
    params = list(engine.module.parameters())
    stage3 = engine.zero_optimization_stage() == 3
    with deepspeed.zero.GatheredParameters(params, enabled=stage3):
        return [p.detach().float().clone() for p in params]


def initial_params():
    return [p.detach().clone() for p in make_model().parameters()]


def rel_error(updates, reference) -> float:
    a = torch.cat([u.flatten().double() for u in updates])
    b = torch.cat([r.flatten().double() for r in reference])
    return float((a - b).norm() / b.norm())


def optimizer_facts(engine) -> dict:
    basic = engine.basic_optimizer
    numel = sum(state["exp_avg"].numel() for state in basic.state.values() if "exp_avg" in state)
    counts = [None] * dist.get_world_size()
    dist.all_gather_object(counts, numel)
    return {
        "group_steps": [group.get("step") for group in basic.param_groups],
        "tensor_steps": sorted({float(s["step"]) for s in basic.state.values() if "step" in s}),
        "state_numel_per_rank": counts,
        "model_numel": sum(p.numel() for p in make_model().parameters()),
        "wrapper": type(engine.optimizer).__name__,
        "basic": type(basic).__name__,
    }


# ---------------------------------------------------------------------------------------------- cases
def parity_case(config_name, opt_name, rank, world, client=None, unwrap_step=False, initialize=None, **overrides):
    cfg = load_config(config_name, **overrides)
    if client is not None:
        cfg.pop("optimizer", None)
    engine = build(cfg, client, initialize)
    if unwrap_step:  # control: without one_logical_step each ZeRO-3 sub-group would advance the clock
        vars(engine.optimizer).pop("step")
    train(engine, STEPS, rank, world)
    updates = [p - s for p, s in zip(full_params(engine), initial_params())]
    reference, ref_opt = reference_updates(opt_name, HYPER[opt_name], world)
    result = optimizer_facts(engine)
    result["rel_err"] = rel_error(updates, reference)
    result["reference_group_steps"] = [g["step"] for g in ref_opt.param_groups]
    if engine.zero_optimization_stage() == 3:
        result["sub_groups"] = len(engine.optimizer.fp16_groups)
        local = sum(p.ds_tensor.numel() for p in engine.module.parameters())  # this rank's parameter shards
        result["param_numel_per_rank"] = [None] * world
        dist.all_gather_object(result["param_numel_per_rank"], local)
    engine.destroy()
    return result


def setup_facts(engine) -> dict:
    """Right after initialize: DeepSpeed's setup step (if any) must have left the PMA state untouched."""
    basic = engine.basic_optimizer
    return {
        "group_steps_after_init": [g["step"] for g in basic.param_groups],
        "moments_zero_after_init": all(float(t.abs().sum()) == 0.0 for s in basic.state.values()
                                       for k, t in s.items() if k.startswith("exp_avg")),
        "masters_equal_model_after_init": _masters_match_model(engine),
    }


def setup_control_case(config_name):
    """Control: with setup_steps() disabled, DeepSpeed's setup step shows (clock + weight decay)."""
    original = PMAOptimizer.setup_steps
    PMAOptimizer.setup_steps = lambda self: contextlib.nullcontext()
    try:
        engine = build(load_config(config_name))
    finally:
        PMAOptimizer.setup_steps = original
    result = setup_facts(engine)
    engine.destroy()
    return result


def bf16_case(config_name, opt_name, rank, world, **overrides):
    cfg = load_config(config_name, **overrides)
    engine = build(cfg)
    setup = setup_facts(engine)
    train(engine, STEPS, rank, world)
    updates = [p - s for p, s in zip(full_params(engine), initial_params())]
    reference, _ = reference_updates(opt_name, HYPER[opt_name], world)
    result = optimizer_facts(engine)
    result.update(setup)
    result["rel_err"] = rel_error(updates, reference)  # reported, not asserted: see test_deepspeed.py
    result["finite"] = all(bool(torch.isfinite(u).all()) for u in updates)
    result["loss_start"] = training_loss(initial_params(), world)
    result["loss_end"] = training_loss([p.cpu() for p in full_params(engine)], world)
    engine.destroy()
    return result


def training_loss(params, world) -> float:
    """The fp32 model with ``params``: its mean loss over the run's global batches."""
    model = make_model()
    with torch.no_grad():
        for p, value in zip(model.parameters(), params):
            p.copy_(value)
        losses = [torch.nn.functional.mse_loss(model(x), y) for x, y in (global_batch(s, world) for s in range(STEPS))]
    return float(torch.stack(losses).mean())


# bf16 unit roundoff: 8 significant bits, round to nearest, |rn(x) - x| <= U_BF16 |x|.
U_BF16 = 2.0 ** -8
# Two fp32 evaluations of one optimizer step (foreach here; the engine's may be the fused CPU kernel or the
# compiled GPU step) differ by at most 4u|p| + 33u|q| (u = 2**-24, q the step; the first step from zero
# state has no cancellation in the momentum): the per-step bound derived in tests/test_compiled_step.py.
FP32_STEP_SLACK_P, FP32_STEP_SLACK_Q = 4 * 2.0 ** -24, 33 * 2.0 ** -24


def bf16_one_step_interval(opt_name: str, world: int, device="cpu"):
    """The bf16 weights one step of a ``world``-rank bf16 engine may end at, from the same bf16 arithmetic
    in one process (bf16 model, fp32 masters equal to its weights, the optimizer on the masters, the
    result rounded to bf16), plus the facts the bound rests on.

    Derivation. A rank computes its weight gradient as one fp32-accumulated GEMM over its rows, rounded to
    bf16: rn(g_r), g_r the exact gradient of its local mean loss; the engine averages the ranks' bf16
    gradients (a bf16 or fp32 sum, one more rounding; the division by ``world`` is exact). One process
    computes rn(g) for the global mean loss, g = mean_r g_r. Provided the rows' forward and backward values
    are the same in both (checked here: ``rows_match``), the two gradients differ by at most
    U(sum_r |g_r|)/world (each rank's rounding) + U|g| (the sum's) + U|g| (the one process's), times
    (1 + 2U) for second-order terms: B below. The first PMA step from zero state is monotone in each
    gradient element (AdamW-PMA: c1 g / (c2 |g| + eps); Lion-PMA: sign(g)) and its weight decay does not
    depend on g, so the engine's fp32 master lies between the one-process steps taken with g - B and g + B
    (plus the fp32 slack above), and bf16 rounding, being monotone, keeps it between their roundings."""
    model = make_model().to(device, torch.bfloat16)
    x, y = global_batch(0, world)
    x, y = x.to(device), y.to(device)

    def forward_backward(rows):
        model.zero_grad(set_to_none=True)
        inputs = x[rows].to(torch.bfloat16).requires_grad_()
        out = model(inputs)
        torch.nn.functional.mse_loss(out.float(), y[rows]).backward()
        return out.detach(), inputs.grad.detach(), [p.grad.detach().double() for p in model.parameters()]

    out, input_grad, grad = forward_backward(slice(None))
    ranks = [forward_backward(slice(r * MICRO, (r + 1) * MICRO)) for r in range(world)]
    # a local mean over 1/world of the rows: its input gradients are world x the global ones (exact, 2**k)
    rows_match = (torch.equal(out, torch.cat([o for o, _, _ in ranks]))
                  and torch.equal(input_grad * world, torch.cat([d for _, d, _ in ranks])))
    bound = [(1 + 2 * U_BF16) * (U_BF16 * sum(r[2][i].abs() for r in ranks) / world + 2 * U_BF16 * g.abs())
             for i, g in enumerate(grad)]

    def stepped(sign):
        masters = make_model().to(device)
        with torch.no_grad():
            for m, p in zip(masters.parameters(), model.parameters()):
                m.copy_(p.float())
        start = [m.detach().clone() for m in masters.parameters()]
        optimizer = CLASSES[opt_name](param_groups(masters),
                                      **dict(HYPER[opt_name], betas=tuple(HYPER[opt_name]["betas"])))
        for m, g, b in zip(masters.parameters(), grad, bound):
            m.grad = (g + sign * b).float()
        optimizer.step()
        return [(m.detach(), m.detach() - s) for m, s in zip(masters.parameters(), start)]

    low, high = [], []
    for (a, da), (b, db) in zip(stepped(+1), stepped(-1)):  # a larger gradient moves the weight down
        slack = FP32_STEP_SLACK_P * a.abs() + FP32_STEP_SLACK_Q * da.abs().maximum(db.abs())
        low.append((torch.minimum(a, b) - slack).to(torch.bfloat16).float().cpu())
        high.append((torch.maximum(a, b) + slack).to(torch.bfloat16).float().cpu())
    nominal = [g.float() for g in grad]
    facts = {"rows_match": rows_match,
             "grad_bound_over_grad": float(sum(b.sum() for b in bound) / sum(g.abs().sum() for g in nominal))}
    return low, high, facts


def bf16_one_step_check(weights, low, high) -> dict:
    """Where the engine's bf16 weights fall against the interval of ``bf16_one_step_interval``."""
    outside = sum(int(((w < lo) | (w > hi)).sum()) for w, lo, hi in zip(weights, low, high))
    return {"outside": outside,
            "widened": sum(int((lo < hi).sum()) for lo, hi in zip(low, high)),  # elements where B lets them differ
            "numel": sum(w.numel() for w in weights)}


def bf16_one_step_case(config_name, opt_name, rank, world, extra_params=None, **overrides):
    cfg = load_config(config_name, **overrides)
    cfg["optimizer"]["params"].update(extra_params or {})
    engine = build(cfg)
    train(engine, 1, rank, world)
    weights = [w.cpu() for w in full_params(engine)]
    result = {"wrapper": type(engine.optimizer).__name__,
              "group_steps": [g["step"] for g in engine.basic_optimizer.param_groups]}
    device = engine.device
    engine.destroy()
    low, high, facts = bf16_one_step_interval(opt_name, world, device)
    result.update(facts)
    result.update(bf16_one_step_check(weights, low, high))
    return result


def _masters_match_model(engine) -> bool:
    """Each fp32 master (or this rank's flat slice of its group) still equals the bf16 model weights:
    DeepSpeed's setup step applied no update (not even weight decay)."""
    if engine.zero_optimization_stage() == 3:
        return True  # parameters are partitioned; covered by the moments/steps checks
    rank = dist.get_rank()
    for group, model_group in zip(engine.basic_optimizer.param_groups, param_groups(engine.module)):
        master = torch.cat([m.detach().float().flatten() for m in group["params"]])
        model = torch.cat([p.detach().float().flatten() for p in model_group["params"]])
        if master.numel() != model.numel():  # ZeRO-1/2 and BF16_Optimizer: one flat slice per rank
            start = rank * master.numel()
            model = torch.nn.functional.pad(model, (0, max(0, start + master.numel() - model.numel())))
            model = model[start:start + master.numel()]
        if not torch.equal(master, model):
            return False
    return True


@contextlib.contextmanager
def fp16_claimed(report_unsupported_first: bool = False):
    """DeepSpeed's CPU accelerator reports fp16 only where oneDNN has native fp16 (AVX512-FP16, e.g. Intel
    Sapphire Rapids; not AMD EPYC) and the engine then refuses fp16 configs; torch computes fp16 on any
    CPU, and the loss scaler's overflow path under test does not depend on it. So where the report says
    no, it is overridden for this case (``report_unsupported_first`` fakes that report, to run the
    override here too). Yields whether the override was needed."""
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    had_own = "is_fp16_supported" in vars(accelerator)
    original = accelerator.is_fp16_supported
    if report_unsupported_first:
        accelerator.is_fp16_supported = lambda: False
    overridden = not accelerator.is_fp16_supported()
    if overridden:
        accelerator.is_fp16_supported = lambda: True
    try:
        yield overridden
    finally:
        if had_own:
            accelerator.is_fp16_supported = original
        else:
            vars(accelerator).pop("is_fp16_supported", None)


def overflow_case(config_name, rank, world, report_unsupported_first=False, **overrides):
    """fp16: an inf loss overflows, DeepSpeed skips the step, the PMA clock must not advance."""
    cfg = load_config(config_name, **overrides)
    cfg.pop("bf16", None)
    cfg["fp16"] = {"enabled": True, "initial_scale_power": 8, "loss_scale_window": 1000, "hysteresis": 1}
    with fp16_claimed(report_unsupported_first) as overridden:
        engine = build(cfg)
        train(engine, 3, rank, world)
        before = [g["step"] for g in engine.basic_optimizer.param_groups]
        train(engine, 1, rank, world, first=3, poison_step=3)
        after_poison = [g["step"] for g in engine.basic_optimizer.param_groups]
        train(engine, 2, rank, world, first=4)
        result = optimizer_facts(engine)
        result.update(steps_before=before, steps_after_overflow=after_poison, skipped_steps=engine.skipped_steps,
                      global_steps=engine.global_steps, fp16_report_overridden=overridden)
        engine.destroy()
    return result


def clipping_warning_case(config_name):
    """A PMA config that leaves gradient_clipping to DeepSpeed's default (1.0) gets a warning on rank 0."""
    cfg = load_config(config_name)
    del cfg["gradient_clipping"]
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    integration_logger = logging.getLogger("pma_dist.deepspeed_integration")
    integration_logger.addHandler(handler)
    try:
        engine = build(cfg)
    finally:
        integration_logger.removeHandler(handler)
    result = {"clipping": engine.gradient_clipping(), "warnings": [r.getMessage() for r in records]}
    engine.destroy()
    return result


def error_case(cfg, rank, world, client=None):
    try:
        engine = build(cfg, client)
    except Exception as error:  # the message is the result
        return {"raised": type(error).__name__, "message": str(error)}
    result = {"raised": None, "ga": engine.gradient_accumulation_steps()}
    engine.destroy()
    return result


def resume_case(config_name, opt_name, rank, world, ckpt_dir: Path, **overrides):
    """Save at micro-step SAVE_AT, load into a fresh engine, finish: must equal the uninterrupted run."""
    cfg = load_config(config_name, **overrides)
    straight = build(cfg)
    train(straight, STEPS, rank, world)
    uninterrupted = full_params(straight)
    straight.destroy()

    first = build(cfg)
    train(first, SAVE_AT, rank, world)
    first.save_checkpoint(str(ckpt_dir), tag=f"global_step{SAVE_AT}")
    first.destroy()

    second = build(cfg)
    second.load_checkpoint(str(ckpt_dir), tag=f"global_step{SAVE_AT}")
    steps_after_load = [g["step"] for g in second.basic_optimizer.param_groups]
    train(second, STEPS - SAVE_AT, rank, world, first=SAVE_AT)
    resumed = full_params(second)
    result = optimizer_facts(second)
    second.destroy()
    result.update(
        steps_after_load=steps_after_load,
        bit_identical=all(torch.equal(a, b) for a, b in zip(resumed, uninterrupted)),
        max_abs_diff=max(float((a - b).abs().max()) for a, b in zip(resumed, uninterrupted)),
        checkpoint=str(ckpt_dir / f"global_step{SAVE_AT}"),
    )
    return result


def universal_resume(folder: Path, rank, world, config_name="zero2_adamw_pma_fp32.json", opt_name="AdamWPMA"):
    """Load a universal checkpoint (saved at SAVE_AT on another world size) and finish the run."""
    cfg = load_config(config_name, checkpoint={"load_universal": True})
    engine = build(cfg)
    engine.load_checkpoint(str(folder.parent), tag=folder.name, load_optimizer_states=True,
                           load_lr_scheduler_states=False)
    steps_after_load = [g["step"] for g in engine.basic_optimizer.param_groups]
    # The data order is defined on the original 2-rank layout: row blocks of the global batch.
    orig_world = 2
    dtype = next(engine.module.parameters()).dtype
    for step in range(SAVE_AT, STEPS):
        x, y = global_batch(step, orig_world)
        rows = x.shape[0] // world
        xs, ys = x[rank * rows:(rank + 1) * rows], y[rank * rows:(rank + 1) * rows]
        loss = torch.nn.functional.mse_loss(engine(xs.to(dtype)).float(), ys)
        engine.backward(loss)
        engine.step()
    updates = [p - s for p, s in zip(full_params(engine), initial_params())]
    reference, ref_opt = reference_updates(opt_name, HYPER[opt_name], orig_world)
    result = optimizer_facts(engine)
    result.update(steps_after_load=steps_after_load, rel_err=rel_error(updates, reference),
                  reference_group_steps=[g["step"] for g in ref_opt.param_groups], world=world)
    engine.destroy()
    return result


def make_cases(rank, world, ckpt: Path):
    cases = {}
    for stage in (0, 1, 2, 3):
        for opt_name, short in (("AdamWPMA", "adamw_pma"), ("LionPMA", "lion_pma")):
            cases[f"parity_zero{stage}_{short}"] = (
                lambda s=stage, o=opt_name, sh=short: parity_case(f"zero{s}_{sh}_fp32.json", o, rank, world))

    cases["control_zero3_sub_groups_unwrapped"] = lambda: parity_case(
        "zero3_adamw_pma_fp32.json", "AdamWPMA", rank, world, unwrap_step=True)

    def client_instance(params):
        return AdamWPMA(params, **dict(HYPER["AdamWPMA"], betas=tuple(HYPER["AdamWPMA"]["betas"])))

    client_instance.as_instance = True

    def client_callable(params):
        return LionPMA(params, **dict(HYPER["LionPMA"], betas=tuple(HYPER["LionPMA"]["betas"])))

    offload_zero2 = json.loads((CONFIGS / "zero2_offload_adamw_pma_bf16.json").read_text())["zero_optimization"]
    offload_zero3 = json.loads((CONFIGS / "zero3_offload_lion_pma_bf16.json").read_text())["zero_optimization"]
    cases.update({
        "client_instance_zero2_offload": lambda: parity_case(
            "zero2_adamw_pma_fp32.json", "AdamWPMA", rank, world, client=client_instance,
            zero_optimization=offload_zero2),
        "pma_initialize_zero1": lambda: parity_case(
            "zero1_adamw_pma_fp32.json", "AdamWPMA", rank, world, initialize=pma_dist.initialize),
        "clipping_default_warns": lambda: clipping_warning_case("zero1_lion_pma_fp32.json"),
        "client_callable_zero1": lambda: parity_case(
            "zero1_lion_pma_fp32.json", "LionPMA", rank, world, client=client_callable),
        "offload_zero2_adamw_pma": lambda: parity_case(
            "zero2_adamw_pma_fp32.json", "AdamWPMA", rank, world, zero_optimization=offload_zero2),
        "offload_zero3_lion_pma": lambda: parity_case(
            "zero3_lion_pma_fp32.json", "LionPMA", rank, world, zero_optimization=offload_zero3),
        "bf16_zero0_adamw_pma": lambda: bf16_case("zero0_adamw_pma_bf16.json", "AdamWPMA", rank, world),
        "bf16_zero1_fp32acc_adamw_pma": lambda: bf16_case("zero1_adamw_pma_bf16.json", "AdamWPMA", rank, world,
                                                          data_types={"grad_accum_dtype": "fp32"}),
        "bf16_zero2_lion_pma": lambda: bf16_case("zero2_lion_pma_bf16.json", "LionPMA", rank, world),
        "bf16_zero3_adamw_pma": lambda: bf16_case("zero3_adamw_pma_bf16.json", "AdamWPMA", rank, world),
        **{f"bf16_one_step_{name}": (lambda c=config, o=opt, ov=extra: bf16_one_step_case(c, o, rank, world, **ov))
           for name, (config, opt, extra) in BF16_ONE_STEP.items()},
        "control_bf16_zero0_without_setup_steps": lambda: setup_control_case("zero0_adamw_pma_bf16.json"),
        "fp16_overflow_zero0": lambda: overflow_case("zero0_adamw_pma_fp32.json", rank, world),
        "fp16_overflow_zero2": lambda: overflow_case("zero2_adamw_pma_fp32.json", rank, world),
        "fp16_overflow_zero3": lambda: overflow_case("zero3_lion_pma_fp32.json", rank, world),
        "fp16_overflow_zero2_reported_unsupported": lambda: overflow_case("zero2_adamw_pma_fp32.json", rank, world,
                                                                          report_unsupported_first=True),
        "error_ga_explicit": lambda: error_case(load_config("zero2_adamw_pma_fp32.json",
                                                            gradient_accumulation_steps=4), rank, world),
        "error_ga_implied": lambda: error_case(
            {k: v for k, v in load_config("zero1_lion_pma_fp32.json", train_batch_size=MICRO * world * 2).items()
             if k != "gradient_accumulation_steps"}, rank, world),
        "error_ga_client": lambda: error_case(
            {k: v for k, v in load_config("zero0_adamw_pma_fp32.json", gradient_accumulation_steps=2).items()
             if k != "optimizer"}, rank, world, client=client_instance),
        "error_typo": lambda: error_case(_with_params(load_config("zero2_adamw_pma_fp32.json"), perod=4),
                                         rank, world),
        "error_bad_value": lambda: error_case(_with_params(load_config("zero0_lion_pma_fp32.json"),
                                                           period="auto"), rank, world),
        "ga_baseline_lion_period1": lambda: error_case(load_config("zero2_lion_ga_fp32.json"), rank, world),
        "case_insensitive_type": lambda: error_case(_with_type(load_config("zero1_adamw_pma_fp32.json"),
                                                               "adamwpma"), rank, world),
        "resume_zero0_adamw_pma": lambda: resume_case("zero0_adamw_pma_fp32.json", "AdamWPMA", rank, world,
                                                      ckpt / "zero0"),
        "resume_zero2_adamw_pma": lambda: resume_case("zero2_adamw_pma_fp32.json", "AdamWPMA", rank, world,
                                                      ckpt / "zero2"),
        "resume_zero3_lion_pma": lambda: resume_case("zero3_lion_pma_fp32.json", "LionPMA", rank, world,
                                                     ckpt / "zero3"),
    })
    return cases


BF16_ONE_STEP = {  # the bf16 cases' engines, stepped once
    "zero0_adamw_pma": ("zero0_adamw_pma_bf16.json", "AdamWPMA", {}),
    "zero1_fp32acc_adamw_pma": ("zero1_adamw_pma_bf16.json", "AdamWPMA", {"data_types": {"grad_accum_dtype": "fp32"}}),
    "zero2_lion_pma": ("zero2_lion_pma_bf16.json", "LionPMA", {}),
    "zero3_adamw_pma": ("zero3_adamw_pma_bf16.json", "AdamWPMA", {}),
}


def _with_params(cfg, **params):
    cfg = copy.deepcopy(cfg)
    cfg["optimizer"]["params"].update(params)
    return cfg


def _with_type(cfg, name):
    cfg = copy.deepcopy(cfg)
    cfg["optimizer"]["type"] = name
    return cfg


def main():
    pop_local_rank_arg()
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--ckpt", default=None)
    parser.add_argument("--cases", default="")
    parser.add_argument("--universal", default=None, help="resume this universal checkpoint folder")
    args = parser.parse_args()
    ds_logger.setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning)  # torch's notes on DeepSpeed's collectives
    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = dist.get_rank(), dist.get_world_size()

    if args.universal:
        todo = {"universal_resume": lambda: universal_resume(Path(args.universal), rank, world)}
    else:
        todo = make_cases(rank, world, Path(args.ckpt))
        if args.cases:
            wanted = args.cases.split(",")
            unknown = [c for c in wanted if c not in todo]
            if unknown:
                raise SystemExit(f"unknown case(s) {unknown}; known: {sorted(todo)}")
            todo = {name: todo[name] for name in wanted}

    results = {"world": world, "pma_dist": pma_dist.__version__, "deepspeed": deepspeed.__version__}
    for name, case in todo.items():
        try:
            results[name] = case()
        except Exception:
            results[name] = {"error": traceback.format_exc()}
        dist.barrier()
        if rank == 0:
            Path(args.out).write_text(json.dumps(results, indent=1))
            print(f"case {name}: {'ERROR' if 'error' in results[name] else 'ok'}", flush=True)
    shutdown(0)


if __name__ == "__main__":
    run_rank(main)
