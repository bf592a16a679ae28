"""Worker for tests/test_fsdp_llama.py: the real stories260K Llama (tied embeddings) under FSDP2 and DDP.

    torchrun --nproc_per_node=2 tests/workers/fsdp_llama.py --model DIR --out DIR

For each backend: AdamW-PMA micro-steps with clipping under the communication ledger, a DCP save
mid-period, a load into a perturbed copy, and the same micro-steps again. Writes results_rank{R}.json.
"""
from __future__ import annotations

import argparse
import json
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM

from pma_dist.distributed import shutdown
from pma_dist.torch_parallel import init_process_group, setup

PERIOD, STEPS, SAVE_AT = 4, 6, 3  # save after micro-step 3: mid-period (tau = 3), resume crosses a large step
SEQ, MICRO_BATCH, VOCAB = 32, 2, 512
OPTIMIZER_KWARGS = dict(lr=1e-3, betas=(0.9, 0.95), weight_decay=0.01)


def load_model(path: Path, perturb: bool = False):
    model = AutoModelForCausalLM.from_pretrained(str(path), torch_dtype=torch.float32)
    if perturb:  # so that only a working load can reproduce the saved run
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.01)
    return model


def batch(step: int, rank: int):
    gen = torch.Generator().manual_seed(7919 * step + rank)
    return torch.randint(0, VOCAB, (MICRO_BATCH, SEQ), generator=gen)


def lm_loss(ids):
    return lambda model: model(input_ids=ids, labels=ids).loss


def local_params(model):
    return [(p.to_local() if hasattr(p, "to_local") else p).detach().clone() for p in model.parameters()]


def run_backend(backend: str, model_dir: Path, out: Path, rank: int) -> dict:
    ckpt, comm_dir = out / f"{backend}_ckpt", out / f"{backend}_comm"
    trainer = setup(load_model(model_dir), backend, "adamw_pma", OPTIMIZER_KWARGS, PERIOD, max_grad_norm=1.0,
                    comm_profile={"enabled": True, "output_dir": str(comm_dir), "report": False})
    losses, params_after = [], []
    for step in range(STEPS):
        losses.append(trainer.micro_step(lm_loss(batch(step, rank))).loss.item())
        if step + 1 == SAVE_AT:
            trainer.save(ckpt)
        if step + 1 > SAVE_AT:
            params_after.append(local_params(trainer.model))
    trainer.close()
    units = [u["name"] for u in trainer.comm_ledger.meta.get("fsdp_units", [])]

    resumed = setup(load_model(model_dir, perturb=True), backend, "adamw_pma", OPTIMIZER_KWARGS, PERIOD,
                    max_grad_norm=1.0)
    resumed.load(ckpt)
    resumed_losses, identical = [], True
    for step in range(SAVE_AT, STEPS):
        resumed_losses.append(resumed.micro_step(lm_loss(batch(step, rank))).loss.item())
        identical &= all(torch.equal(a, b) for a, b in zip(local_params(resumed.model), params_after[step - SAVE_AT]))
    return dict(losses=losses, resumed_losses=resumed_losses, params_bit_identical=identical,
                group_step=resumed.optimizer.param_groups[0]["step"], fsdp_units=units,
                ledger_file=str(comm_dir / f"comm_rank{rank}.json"),
                tied=trainer.module.get_output_embeddings().weight is trainer.module.get_input_embeddings().weight)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True, type=Path)
    parser.add_argument("--out", required=True, type=Path)
    args = parser.parse_args()
    init_process_group()
    rank = dist.get_rank()
    results = {}
    try:
        for backend in ("fsdp", "ddp"):
            results[backend] = run_backend(backend, args.model, args.out, rank)
    except Exception:
        results["crash"] = traceback.format_exc()
        print(results["crash"], flush=True)
    (args.out / f"results_rank{rank}.json").write_text(json.dumps(results, indent=1))
    shutdown(0)


if __name__ == "__main__":
    main()
