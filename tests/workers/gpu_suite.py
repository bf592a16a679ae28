"""One single-process launch on the accelerator that runs the GPU checks of ``tests/test_cuda.py``.

    DS_ACCELERATOR=cuda torchrun --nproc_per_node=1 tests/workers/gpu_suite.py --out results.json

Device-agnostic (DeepSpeed's accelerator picks the device and the collective backend: CUDA and NCCL
on a GPU, CPU and gloo with ``DS_ACCELERATOR=cpu``, which is how it is exercised on machines without
a GPU). Sections, each recorded in the JSON even when it fails (its traceback instead):

* ``deepspeed``: ZeRO-0/1/2/3 with bf16 and the JSON-registered ``AdamWPMA``/``LionPMA`` (and one
  ZeRO-2 run with ``"fused": true``, the compiled step; ZeRO-2/3 with the optimizer offloaded to CPU),
  one step within the derived bf16 bound of the same bf16 arithmetic in one process on the same device
  (``ds_suite.bf16_one_step_interval``), and 12 steps that run (finite, the loss falls);
* ``fsdp``: FSDP2 on one device against one plain process, step by step;
* ``ledger``: the communication ledger counting collectives of the accelerator's backend, exact bytes.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import traceback
import warnings
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the other workers' problem definitions

from pma_dist.kernels import compiled  # noqa: E402


def _accelerator():
    from deepspeed.accelerator import get_accelerator
    return get_accelerator()


def _count_calls(module, name: str, counter: dict):
    real = getattr(module, name)

    def counted(*args, **kwargs):
        counter[name] = counter.get(name, 0) + 1
        return real(*args, **kwargs)

    setattr(module, name, counted)
    return real


# ---------------------------------------------------------------------------------------------- deepspeed
DS_CASES = {  # name: (shipped config, optimizer, extra optimizer params, config overrides)
    **{f"zero{s}_{o.lower()}": (f"zero{s}_{'adamw' if o == 'AdamWPMA' else 'lion'}_pma_bf16.json", o, {},
                                {"data_types": {"grad_accum_dtype": "fp32"}} if s == 1 else {})
       for s in range(4) for o in ("AdamWPMA", "LionPMA")},
    "zero2_adamwpma_fused": ("zero2_adamw_pma_bf16.json", "AdamWPMA", {"fused": True}, {}),
    # ZeRO-Offload: the step runs on CPU partitions that DeepSpeed copies from and to the GPU (pinned buffers)
    "zero2_offload_adamwpma": ("zero2_offload_adamw_pma_bf16.json", "AdamWPMA", {}, {}),
    "zero3_offload_lionpma": ("zero3_offload_lion_pma_bf16.json", "LionPMA", {}, {}),
}


def deepspeed_case(config_name, opt_name, extra_params, overrides) -> dict:
    import ds_suite

    cfg = ds_suite.load_config(config_name, **overrides)
    cfg["optimizer"]["params"].update(extra_params)
    engine = ds_suite.build(cfg)
    device = engine.device
    dtype = next(engine.module.parameters()).dtype
    calls: dict = {}
    reals = {n: _count_calls(compiled, n, calls) for n in ("adamw_pma_compiled", "lion_pma_compiled")}
    try:
        losses = []
        for step in range(ds_suite.STEPS):
            x, y = ds_suite.local_batch(step, 0, 1)
            loss = torch.nn.functional.mse_loss(engine(x.to(device, dtype)).float(), y.to(device))
            engine.backward(loss)
            engine.step()
            losses.append(loss.detach())
    finally:
        for n, real in reals.items():
            setattr(compiled, n, real)
    final = [p.cpu() for p in ds_suite.full_params(engine)]
    updates = [p - s for p, s in zip(final, ds_suite.initial_params())]
    reference, _ = ds_suite.reference_updates(opt_name, ds_suite.HYPER[opt_name], 1)
    basic = engine.basic_optimizer
    result = {
        "rel_err": ds_suite.rel_error(updates, reference),  # to the fp32 run: reported, not asserted
        "loss_start": ds_suite.training_loss(ds_suite.initial_params(), 1),
        "loss_end": ds_suite.training_loss(final, 1),
        "finite": all(bool(torch.isfinite(u).all()) for u in updates),
        "losses": [float(v) for v in torch.stack(losses).cpu()],
        "group_steps": [g["step"] for g in basic.param_groups],
        "wrapper": type(engine.optimizer).__name__,
        "model_device": str(next(engine.module.parameters()).device.type),
        "model_dtype": str(dtype).replace("torch.", ""),
        "state_devices": sorted({t.device.type for s in basic.state.values() for k, t in s.items()
                                 if k.startswith("exp_avg")}),
        "compiled_calls": sum(calls.values()),
        "steps": ds_suite.STEPS,
    }
    engine.destroy()
    result["one_step"] = ds_suite.bf16_one_step_case(config_name, opt_name, 0, 1, extra_params, **overrides)
    return result


def deepspeed_checks(names) -> dict:
    unknown = [n for n in names if n not in DS_CASES]
    if unknown:
        raise ValueError(f"unknown DeepSpeed case(s) {unknown}; known: {sorted(DS_CASES)}")
    return {name: _guarded(deepspeed_case, *DS_CASES[name]) for name in names}


# ---------------------------------------------------------------------------------------------- fsdp
FSDP_CASES = {
    "adamw_pma_reference": ("adamw_pma_reference", dict(lr=2e-2, betas=(0.9, 0.95), eps=1e-3, weight_decay=0.1)),
    "adamw_pma": ("adamw_pma", dict(lr=2e-2, betas=(0.9, 0.95), eps=1e-3, weight_decay=0.1)),
    "adamw_pma_fused": ("adamw_pma", dict(lr=2e-2, betas=(0.9, 0.95), eps=1e-3, weight_decay=0.1, fused=True)),
}


def fsdp_case(optimizer, kwargs) -> dict:
    import fsdp_ddp_checks as f
    from pma_dist.torch_parallel import setup

    device = torch.device(_accelerator().current_device_name())
    reference, _ = f.single_process_run(optimizer, kwargs, 0.0, 1)
    trainer = setup(f.deep_linear_net(seed=0), "fsdp", optimizer, kwargs, f.PERIOD)
    calls: dict = {}
    real = _count_calls(compiled, "adamw_pma_compiled", calls)
    worst_abs, stepped = 0.0, 0
    try:
        for step in range(f.STEPS):
            x, target = f.global_batch(step, 1)
            x, target = x.to(device), target.to(device)
            stepped += trainer.micro_step(lambda m: torch.nn.functional.mse_loss(m(x), target)).optimizer_stepped
            for mine, ref in zip(f.full_params(trainer.model), reference[step]):
                worst_abs = max(worst_abs, (mine.detach().cpu() - ref).abs().max().item())
    finally:
        compiled.adamw_pma_compiled = real
    params = list(trainer.model.parameters())
    result = {"max_abs_diff": worst_abs, "optimizer_steps": stepped, "steps": f.STEPS,
              "param_device": params[0].device.type, "is_dtensor": type(params[0]).__name__ == "DTensor",
              "compiled_calls": calls.get("adamw_pma_compiled", 0)}
    trainer.close()
    return result


def fsdp_checks() -> dict:
    return {name: _guarded(fsdp_case, *spec) for name, spec in FSDP_CASES.items()}


# ---------------------------------------------------------------------------------------------- ledger
def ledger_checks(run_dir: Path) -> dict:
    from pma_dist.comm import CommLedger

    device = torch.device(_accelerator().current_device_name())
    world = dist.get_world_size()
    ledger = CommLedger(str(run_dir / "ledger"), meta={"backend": dist.get_backend()}).install()
    ones = torch.ones(5, device=device)
    full = torch.empty(3 * world, device=device)
    with ledger.in_phase("forward"):
        dist.all_reduce(ones)                                                       # 20
        dist.all_reduce(torch.ones(2, dtype=torch.bfloat16, device=device))         # 4
        dist.all_gather_into_tensor(full, torch.ones(3, device=device))             # 12 * world
    with ledger.in_phase("backward"):
        dist.reduce_scatter_tensor(torch.empty(3, device=device), torch.ones(3 * world, device=device))  # 12 * world
        dist.broadcast(torch.ones(7, dtype=torch.float64, device=device), src=0)    # 56
        dist.all_reduce(torch.ones(4, device=device), async_op=True).wait()         # 16
    records = [[r["phase"], r["op"], r["count"], r["bytes"]] for r in ledger.to_dict()["records"]]
    ledger.close()
    return {"backend": dist.get_backend(), "world": world, "records": records,
            "all_reduce_value": float(ones[0].cpu()), "tensor_device": device.type}


# ---------------------------------------------------------------------------------------------- main
def _guarded(fn, *args) -> dict:
    try:
        return fn(*args)
    except Exception:
        return {"error": traceback.format_exc()}


SECTIONS = ("deepspeed", "fsdp", "ledger")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--sections", default=",".join(SECTIONS))
    parser.add_argument("--ds-cases", default=",".join(DS_CASES), help="DeepSpeed cases to run (default: all)")
    args = parser.parse_args()
    wanted = args.sections.split(",")
    unknown = [s for s in wanted if s not in SECTIONS]
    if unknown:
        raise SystemExit(f"unknown section(s) {unknown}; known: {SECTIONS}")
    logging.getLogger("DeepSpeed").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning)

    from pma_dist.torch_parallel import init_process_group
    init_process_group()
    accelerator = _accelerator()
    results = {"accelerator": accelerator.device_name(), "backend": dist.get_backend(),
               "device": accelerator.current_device_name(), "world": dist.get_world_size()}
    run_dir = args.out.parent
    for section in wanted:
        if section == "deepspeed":
            results[section] = _guarded(deepspeed_checks, args.ds_cases.split(","))
        elif section == "fsdp":
            results[section] = _guarded(fsdp_checks)
        else:
            results[section] = _guarded(ledger_checks, run_dir)
        args.out.write_text(json.dumps(results, indent=1))
        print(f"section {section}: done", flush=True)
    from pma_dist.distributed import shutdown

    shutdown(0)


if __name__ == "__main__":
    main()
