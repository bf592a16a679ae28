"""stories260K (optionally with LoRA adapters) trained by a PMA optimizer on N ranks through a front end
users run, checked against a one-process plain loop over the same global batches.

Front ends (``--frontend``):

- ``accelerate-deepspeed``: ``Accelerator(deepspeed_plugin=DeepSpeedPlugin(hf_ds_config=...))``, ZeRO-2,
  the PMA optimizer handed over as a client optimizer built from ``optimizer_cls_and_kwargs``;
- ``accelerate-ddp``: a plain ``Accelerator()`` (accelerate's multi-process CPU/GPU data parallelism);
- ``fsdp2``: ``pma_dist.torch_parallel.setup(..., backend="fsdp")`` (``fully_shard``). accelerate 1.15
  turns its FSDP plugin on only for accelerator devices (CUDA, XPU, NPU, ...): on CPU it stays DDP,
  so FSDP2 is driven through torch's own ``fully_shard`` here.

Every rank reads micro-batch ``MICRO`` rows ``[(s * world + rank) * MICRO, ...)`` at step ``s``; all tokens
are labelled and rows have one length, so the mean of the ranks' mean losses is the global batch's mean
loss and the all-reduced gradient is the plain loop's gradient. Rank 0 writes JSON facts per method.

Usage: ``torchrun --nproc_per_node=2 integrations_accelerate.py --frontend F --methods adamw_pma,lion_pma [--lora]
--model DIR --text FILE --out results.json``
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import warnings
from pathlib import Path

import torch
import torch.distributed as dist

from pma_dist.distributed import configure_accelerate_for_deepspeed, pop_local_rank_arg, run_rank, shutdown
from pma_dist.integrations.hf import find_pma_optimizer, optimizer_cls_and_kwargs

SEQ, MICRO, STEPS, PERIOD, CLIP = 32, 2, 8, 4, 1.0
HYPER = {"adamw_pma": dict(lr=1e-3, eps=1e-3, weight_decay=0.0), "lion_pma": dict(lr=1e-4, weight_decay=0.0)}


def lm_loss(model, rows):
    return model(input_ids=rows, labels=rows).loss


def build_model(path, lora: bool):
    from transformers import AutoModelForCausalLM
    torch.manual_seed(0)  # LoRA's random A matrices: the same on every rank
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    if lora:
        from peft import LoraConfig, get_peft_model
        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                                 target_modules=["q_proj", "v_proj", "up_proj"]))
    return model


def optimizer_for(name, params, period=PERIOD):
    cls, kwargs = optimizer_cls_and_kwargs(name, period=period, **HYPER[name])
    return cls(params, **kwargs)


def plain_loop(model, rows, name, world, period):
    """One process: every step's global batch (all ranks' micro-batches), clip to CLIP, one step."""
    optimizer = optimizer_for(name, [p for p in model.parameters() if p.requires_grad], period)
    for s in range(STEPS):
        lm_loss(model, rows[s * world * MICRO:(s + 1) * world * MICRO]).backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], CLIP)
        optimizer.step()
        optimizer.zero_grad()
    return model


def full(tensor):
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def train_one(args, method, tokenizer, text) -> dict:
    """Train with ``method`` through ``args.frontend``; the facts rank 0 reports."""
    model = build_model(args.model, args.lora)
    initial = copy.deepcopy(model)
    trainable = [p for p in model.parameters() if p.requires_grad]

    if args.frontend == "fsdp2":
        from pma_dist import torch_parallel
        if not dist.is_initialized():
            torch_parallel.init_process_group()
        trainer = torch_parallel.setup(model, backend="fsdp", optimizer=method, optimizer_kwargs=HYPER[method],
                                       period=PERIOD, max_grad_norm=CLIP)
        rank, world = dist.get_rank(), dist.get_world_size()
        optimizer, wrapped = trainer.optimizer, trainer.model
    else:
        from accelerate import Accelerator
        from accelerate.state import AcceleratorState
        AcceleratorState._reset_state()  # one Accelerator per process state: a fresh one for each method
        if args.frontend == "accelerate-deepspeed":
            from accelerate.utils import DeepSpeedPlugin
            configure_accelerate_for_deepspeed()  # CPU: accelerate would count one process
            config = {"train_micro_batch_size_per_gpu": MICRO, "gradient_accumulation_steps": 1,
                      "gradient_clipping": CLIP, "zero_optimization": {"stage": 2}, "bf16": {"enabled": False},
                      "steps_per_print": 10 ** 6}
            accelerator = Accelerator(deepspeed_plugin=DeepSpeedPlugin(hf_ds_config=config))
        else:
            accelerator = Accelerator(cpu=not torch.cuda.is_available())  # cpu=True: accelerate's MULTI_CPU
        wrapped, optimizer = accelerator.prepare(model, optimizer_for(method, trainable))
        rank, world = accelerator.process_index, accelerator.num_processes

    ids = torch.tensor(tokenizer(text)["input_ids"][: STEPS * world * MICRO * SEQ]).view(-1, SEQ)
    wrapped.train()
    for s in range(STEPS):
        start = (s * world + rank) * MICRO
        rows = ids[start:start + MICRO]
        if args.frontend == "fsdp2":
            trainer.micro_step(lambda m: lm_loss(m, rows))
        else:
            loss = lm_loss(wrapped, rows)
            accelerator.backward(loss)  # DeepSpeed: backward and the engine's step
            if args.frontend == "accelerate-ddp":
                accelerator.clip_grad_norm_(wrapped.parameters(), CLIP)
            optimizer.step()
            optimizer.zero_grad()

    pma = find_pma_optimizer(optimizer)
    trained = {n: full(p.detach()) for n, p in (wrapped.module if hasattr(wrapped, "module") and
                                                 args.frontend != "fsdp2" else wrapped).named_parameters()}
    reference = dict(plain_loop(copy.deepcopy(initial), ids, method, world, PERIOD).named_parameters())
    control = dict(plain_loop(copy.deepcopy(initial), ids, method, world, 2 * PERIOD).named_parameters())
    start = dict(initial.named_parameters())

    def max_diff(other, names):
        return max(float((trained[n] - other[n].detach()).abs().max()) for n in names)

    def mismatched(other, names):
        """Fraction of trainable elements whose value differs by more than half the smallest Lion step."""
        threshold = HYPER[method]["lr"] / PERIOD / 2
        bad = sum(int(((trained[n] - other[n].detach()).abs() > threshold).sum()) for n in names)
        return bad / sum(trained[n].numel() for n in names)

    trainable_names = [n for n, p in start.items() if p.requires_grad]
    frozen_names = [n for n, p in start.items() if not p.requires_grad]
    return {
        "rank": rank,
        "world": world,
        "optimizer": type(pma).__name__,
        "group_steps": [g["step"] for g in pma.param_groups],
        "period": sorted({g["period"] for g in pma.param_groups}),
        "trainable_tensors": len(trainable_names), "frozen_tensors": len(frozen_names),
        "max_diff": max_diff(reference, trainable_names),
        "control_diff": max_diff(control, trainable_names),
        "mismatched_fraction": mismatched(reference, trainable_names),
        "control_mismatched_fraction": mismatched(control, trainable_names),
        "moved": max_diff(start, trainable_names),
        "frozen_moved": max_diff(start, frozen_names) if frozen_names else 0.0,
    }


def main():
    pop_local_rank_arg()
    parser = argparse.ArgumentParser()
    parser.add_argument("--frontend", required=True, choices=["accelerate-deepspeed", "accelerate-ddp", "fsdp2"])
    parser.add_argument("--methods", required=True, help="comma-separated, from " + ", ".join(sorted(HYPER)))
    parser.add_argument("--lora", action="store_true")
    parser.add_argument("--model", required=True)
    parser.add_argument("--text", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    methods = args.methods.split(",")
    unknown = sorted(set(methods) - set(HYPER))
    if unknown:
        parser.error(f"--methods: unknown {unknown}; expected names from {sorted(HYPER)}")
    warnings.filterwarnings("ignore")
    logging.getLogger("DeepSpeed").setLevel(logging.ERROR)

    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    text = Path(args.text).read_text(encoding="utf-8")[:20000]
    results = {method: train_one(args, method, tokenizer, text) for method in methods}
    if all(r["rank"] == 0 for r in results.values()):
        Path(args.out).write_text(json.dumps(results, indent=1))
    shutdown(0)


if __name__ == "__main__":
    run_rank(main)
