"""Worker for tests/test_fsdp.py and tests/test_ddp.py: every multi-rank check of one backend in one launch.

    torchrun --nproc_per_node=2 tests/workers/fsdp_ddp_checks.py --backend fsdp --out DIR

Writes DIR/results_rank{R}.json; the tests assert on it. Checks:
* parity: the backend's run of each optimizer equals a single-process run on the global batch;
* shards (fsdp): every optimizer state tensor of a rank is that rank's shard of the parameter;
* resume: DCP save mid-period -> load into a differently initialised model -> the next steps are bit-identical;
* errors: a checkpoint of another period, and saving mid-accumulation, are refused with clear messages;
* comm: PMA (with gradient clipping) and GA runs under the communication ledger write
  DIR/comm_{pma,ga}/comm_rank{R}.json for the tests to hold against the analytical model; the ledger's
  DDP comm hook must not change the result (the run is also compared with one process).
"""
from __future__ import annotations

import argparse
import json
import os
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from pma_dist.methods import METHODS
from pma_dist.torch_parallel import init_process_group, setup

IN_DIM, WIDTHS = 8, (6, 5, 7, 4)  # odd widths: FSDP2 pads uneven dim-0 shards
MICRO_BATCH = 3  # rows per rank per micro-step
PERIOD = 3
STEPS = 4 * PERIOD  # micro-steps: four periods

PARITY_CASES = {
    # name: (optimizer, optimizer kwargs, max_grad_norm)
    "adamw_pma_reference": ("adamw_pma_reference", dict(lr=2e-2, betas=(0.9, 0.95), eps=1e-3, weight_decay=0.1),
                            0.0),
    "adamw_pma_paper_clipped": ("adamw_pma", dict(lr=2e-2, betas=(0.9, 0.95), eps=1e-3, weight_decay=0.1), 0.5),
    "lion_pma": ("lion_pma", dict(lr=1e-2, betas=(0.9, 0.99), weight_decay=0.1), 0.0),
    # the fused CPU kernel on FSDP2 shards: the optimizer hands it the DTensors' local tensors
    "adamw_pma_fused": ("adamw_pma", dict(lr=2e-2, betas=(0.9, 0.95), eps=1e-3, weight_decay=0.1, fused=True), 0.0),
    "adamw_ga": ("adamw_ga", dict(lr=2e-2, betas=(0.9, 0.95), eps=1e-3, weight_decay=0.1), 0.0),
    "lion_ga": ("lion_ga", dict(lr=1e-2, betas=(0.9, 0.99), weight_decay=0.1), 0.0),
    # the no-accumulation baselines: an optimizer step on every micro-batch
    "adamw": ("adamw", dict(lr=2e-2, betas=(0.9, 0.95), eps=1e-3, weight_decay=0.1), 0.0),
    "lion": ("lion", dict(lr=1e-2, betas=(0.9, 0.99), weight_decay=0.1), 0.0),
}


def period_of(optimizer: str) -> int:
    """K of the run: the no-accumulation methods take only 1."""
    return 1 if METHODS[optimizer].accumulation == "plain" else PERIOD


def deep_linear_net(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    dims = (IN_DIM,) + WIDTHS
    return nn.Sequential(*[nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:])])


def global_batch(step: int, world: int):
    """The micro-step's batch of all ranks; rank r uses rows [r*MICRO_BATCH, (r+1)*MICRO_BATCH)."""
    gen = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(world * MICRO_BATCH, IN_DIM, generator=gen)
    target = torch.randn(world * MICRO_BATCH, WIDTHS[-1], generator=gen)
    return x, target


def local_loss_fn(step: int, rank: int, world: int):
    x, target = global_batch(step, world)
    rows = slice(rank * MICRO_BATCH, (rank + 1) * MICRO_BATCH)
    return lambda model: nn.functional.mse_loss(model(x[rows]), target[rows])


def full_params(model: nn.Module):
    return [p.full_tensor() if hasattr(p, "full_tensor") else p.detach().clone() for p in model.parameters()]


def single_process_run(optimizer: str, kwargs: dict, max_grad_norm: float, world: int):
    """The same optimizer, no parallelism: each micro-step sees the global batch; GA accumulates loss/K."""
    model = deep_linear_net(seed=0)
    opt = METHODS[optimizer].build(model.parameters(), period_of(optimizer), **kwargs)
    accumulation = METHODS[optimizer].schedule(period_of(optimizer)).accumulation
    trajectory, largest_norm = [], 0.0
    for step in range(STEPS):
        x, target = global_batch(step, world)
        (nn.functional.mse_loss(model(x), target) / accumulation).backward()
        if (step + 1) % accumulation == 0:
            if max_grad_norm > 0:
                norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
                largest_norm = max(largest_norm, norm.item())
            opt.step()
            opt.zero_grad(set_to_none=True)
        trajectory.append([p.detach().clone() for p in model.parameters()])
    return trajectory, largest_norm


def check_parity(backend: str, rank: int, world: int):
    """Per parity case: worst difference from one process; plus (fsdp) the shard report of one run."""
    results, shards = {}, None
    for name, (optimizer, kwargs, clip) in PARITY_CASES.items():
        reference, largest_norm = single_process_run(optimizer, kwargs, clip, world)
        trainer = setup(deep_linear_net(seed=0), backend, optimizer, kwargs, period_of(optimizer), max_grad_norm=clip)
        worst_abs, worst_rel, stepped = 0.0, 0.0, 0
        for step in range(STEPS):
            stepped += trainer.micro_step(local_loss_fn(step, rank, world)).optimizer_stepped
            for mine, ref in zip(full_params(trainer.model), reference[step]):
                diff = (mine - ref).abs().max().item()
                worst_abs = max(worst_abs, diff)
                worst_rel = max(worst_rel, diff / ref.abs().max().item())
        moved = max((a - b).abs().max().item() for a, b in zip(reference[-1], deep_linear_net(0).parameters()))
        results[name] = dict(max_abs_diff=worst_abs, max_rel_diff=worst_rel, optimizer_steps=stepped,
                             moved=moved, clip=clip, largest_grad_norm=largest_norm, group_step=trainer.optimizer.param_groups[0].get("step"))
        if backend == "fsdp" and name == "adamw_pma_reference":
            shards = shard_report(trainer)
    return results, shards


def shard_report(trainer) -> list:
    """Per parameter: local/full sizes of the parameter and of each optimizer state tensor."""
    from torch.distributed.tensor import DTensor

    report = []
    for name, p in trainer.model.named_parameters():
        state = trainer.optimizer.state[p]
        entry = dict(name=name, full_numel=p.numel(), param_is_dtensor=isinstance(p, DTensor),
                     local_numel=p.to_local().numel(), local_shape=list(p.to_local().shape), moments={})
        for key in ("exp_avg", "exp_avg_sq"):
            moment = state[key]
            entry["moments"][key] = dict(is_dtensor=isinstance(moment, DTensor),
                                         same_placements=isinstance(moment, DTensor)
                                         and moment.placements == p.placements,
                                         local_shape=list(moment.to_local().shape),
                                         global_shape=list(moment.shape))
        entry["step"] = float(state["step"])
        report.append(entry)
    return report


def local_params(model: nn.Module):
    return [(p.to_local() if hasattr(p, "to_local") else p).detach().clone() for p in model.parameters()]


def warmup_factor(step: int) -> float:
    return min(1.0, (step + 1) / (2 * PERIOD))


def warmup(optimizer):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_factor)


def check_resume(backend: str, rank: int, world: int, out: Path) -> dict:
    optimizer, kwargs, _ = PARITY_CASES["adamw_pma_reference"]
    save_at = PERIOD + 1  # mid-period: tau = 1 of the second period
    ckpt = out / f"{backend}_resume_ckpt"

    straight = setup(deep_linear_net(seed=0), backend, optimizer, kwargs, PERIOD, lr_scheduler=warmup)
    after_save = []
    for step in range(STEPS):
        straight.micro_step(local_loss_fn(step, rank, world))
        if step + 1 == save_at:
            straight.save(ckpt)
        elif step + 1 > save_at:
            after_save.append(local_params(straight.model))

    # other weights, and a scheduler at step 0: only a working load reproduces the saved run
    resumed = setup(deep_linear_net(seed=123), backend, optimizer, kwargs, PERIOD, lr_scheduler=warmup)
    different_before_load = any(not torch.equal(a, b) for a, b in
                                zip(local_params(resumed.model), after_save[0]))
    resumed.load(ckpt)
    loaded = dict(micro_steps=resumed.micro_steps, group_step=resumed.optimizer.param_groups[0]["step"],
                  tensor_steps=sorted({float(s["step"]) for s in resumed.optimizer.state.values()}),
                  scheduler_epoch=resumed.lr_scheduler.last_epoch,
                  lr_matches=resumed.optimizer.param_groups[0]["lr"] == kwargs["lr"] * warmup_factor(save_at))
    bit_identical, max_diff = True, 0.0
    for step in range(save_at, STEPS):
        resumed.micro_step(local_loss_fn(step, rank, world))
        for a, b in zip(local_params(resumed.model), after_save[step - save_at]):
            bit_identical &= torch.equal(a, b)
            max_diff = max(max_diff, (a - b).abs().max().item())
    return dict(save_at=save_at, loaded=loaded, bit_identical=bit_identical, max_abs_diff=max_diff,
                different_before_load=different_before_load, steps_after_load=STEPS - save_at)


def check_errors(backend: str, rank: int, world: int, out: Path) -> dict:
    optimizer, kwargs, _ = PARITY_CASES["adamw_pma_reference"]
    errors = {}
    other_period = setup(deep_linear_net(seed=0), backend, optimizer, kwargs, PERIOD + 1)
    errors["load_other_period"] = _message(lambda: other_period.load(out / f"{backend}_resume_ckpt"))
    errors["load_missing"] = _message(lambda: other_period.load(out / "no_such_checkpoint"))
    ga = setup(deep_linear_net(seed=0), backend, "adamw_ga", dict(lr=1e-2), PERIOD)
    ga.micro_step(local_loss_fn(0, rank, world))
    errors["save_mid_accumulation"] = _message(lambda: ga.save(out / f"{backend}_never_written"))
    errors["mid_accumulation_dir_exists"] = (out / f"{backend}_never_written").exists()
    return errors


COMM_CASES = {
    # name: (parity case whose single-process reference the run must still match, max_grad_norm)
    "pma": ("adamw_pma_paper_clipped", 0.5),
    "ga": ("adamw_ga", 0.0),
    # every other method of the table, unclipped
    "lion_pma": ("lion_pma", 0.0),
    "lion_ga": ("lion_ga", 0.0),
    "adamw": ("adamw", 0.0),
    "lion": ("lion", 0.0),
}
COMM_STEPS = 2 * PERIOD


def check_comm(backend: str, rank: int, world: int, out: Path) -> dict:
    results = {}
    for name, (case, clip) in COMM_CASES.items():
        optimizer, kwargs, _ = PARITY_CASES[case]
        reference, _ = single_process_run(optimizer, kwargs, clip, world)
        # the PMA run also writes rank 0's run report (report.json), as train.py's runs do
        profile = {"enabled": True, "output_dir": str(out / f"comm_{name}"), "report": name == "pma"}
        trainer = setup(deep_linear_net(seed=0), backend, optimizer, kwargs, period_of(optimizer),
                        max_grad_norm=clip, comm_profile=profile)
        for step in range(COMM_STEPS):
            trainer.micro_step(local_loss_fn(step, rank, world))
        trainer.close()
        diff = max((a - b).abs().max().item() for a, b in zip(full_params(trainer.model), reference[COMM_STEPS - 1]))
        results[name] = dict(max_abs_diff=diff, ledger_file=str(Path(profile["output_dir"]) / f"comm_rank{rank}.json"))
    return results


def check_comm_fsdp_variants(rank: int, world: int, out: Path) -> dict:
    """FSDP2 with bf16 all-gathers, fp32 reduce-scatters and no reshard after forward, under the ledger."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    output_dir = out / "comm_pma_bf16_no_reshard"
    trainer = setup(deep_linear_net(seed=0), "fsdp", "adamw_pma", dict(lr=1e-2), PERIOD,
                    fsdp_kwargs=dict(mp_policy=policy, reshard_after_forward=False),
                    comm_profile={"enabled": True, "output_dir": str(output_dir), "report": False})
    for step in range(COMM_STEPS):
        trainer.micro_step(local_loss_fn(step, rank, world))
    trainer.close()
    return {"pma_bf16_no_reshard": dict(ledger_file=str(output_dir / f"comm_rank{rank}.json"))}


def _message(action) -> str:
    try:
        action()
    except Exception as exc:  # the test asserts on the type and message
        return f"{type(exc).__name__}: {exc}"
    return "no error"


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--backend", required=True)
    parser.add_argument("--out", required=True, type=Path)
    args = parser.parse_args()
    init_process_group()
    rank, world = dist.get_rank(), dist.get_world_size()
    results = {"world_size": world}
    try:
        results["parity"], results["shards"] = check_parity(args.backend, rank, world)
        results["resume"] = check_resume(args.backend, rank, world, args.out)
        results["errors"] = check_errors(args.backend, rank, world, args.out)
        results["comm"] = check_comm(args.backend, rank, world, args.out)
        if args.backend == "fsdp":
            results["comm"].update(check_comm_fsdp_variants(rank, world, args.out))
    except Exception:
        results["crash"] = traceback.format_exc()
        print(results["crash"], flush=True)
    (args.out / f"results_rank{rank}.json").write_text(json.dumps(results, indent=1))
    dist.barrier()
    dist.destroy_process_group()
    os._exit(0)


if __name__ == "__main__":
    main()
