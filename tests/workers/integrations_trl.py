"""TRL's SFTTrainer with AdamW-PMA (``optimizer_cls_and_kwargs``) on N CPU ranks (DDP, gloo), checked on
rank 0 against a one-process plain loop over every rank's batches.

Each rank records the batches its trainer computed the loss on. The Trainer's loss on a rank is its
summed token loss divided by the token count of all ranks (``num_items_in_batch``, then times the world
size, which DDP's gradient mean undoes), so the reference loss of a step is the summed token loss of
all ranks' batches over their total token count. Rank 0 writes JSON facts.

Usage: ``torchrun --nproc_per_node=2 integrations_trl.py --model DIR --sft FILE --out results.json --tmp DIR``
"""
from __future__ import annotations

import argparse
import copy
import json
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from pma_dist import AdamWPMA
from pma_dist.distributed import pop_local_rank_arg, run_rank, shutdown
from pma_dist.integrations.hf import PMACallback, find_pma_optimizer, optimizer_cls_and_kwargs

LR, EPS, PERIOD, STEPS, MICRO, CLIP = 1e-3, 1e-3, 4, 8, 2, 1.0


def summed_token_loss(model, batch):
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    labels = batch["labels"][:, 1:]
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), labels.reshape(-1), ignore_index=-100,
                           reduction="sum"), int((labels != -100).sum())


def main():
    pop_local_rank_arg()
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--sft", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--tmp", required=True)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")

    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    with open(args.sft, encoding="utf-8") as f:
        rows = [json.loads(line) for line, _ in zip(f, range(48))]
    data = Dataset.from_list([{"prompt": f"{r['instruction']}\n{r['input']}\n", "completion": r["output"]} for r in rows])
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    initial = copy.deepcopy(model)
    config = SFTConfig(output_dir=str(Path(args.tmp) / "out"), per_device_train_batch_size=MICRO, max_steps=STEPS,
                       learning_rate=LR, weight_decay=0.0, max_grad_norm=CLIP, lr_scheduler_type="constant",
                       logging_steps=1, save_strategy="no", report_to=[], seed=0, disable_tqdm=True, use_cpu=True,
                       bf16=False, ddp_backend="gloo", dataloader_num_workers=0, max_length=64)
    trainer = SFTTrainer(model=model, args=config, train_dataset=data, processing_class=tokenizer,
                         callbacks=[PMACallback()],
                         optimizer_cls_and_kwargs=optimizer_cls_and_kwargs("adamw_pma", lr=LR, eps=EPS, period=PERIOD))
    batches = []
    compute_loss = trainer.compute_loss

    def recording(model, inputs, *a, **kw):
        batches.append({k: v.detach().clone() for k, v in inputs.items() if torch.is_tensor(v)})
        return compute_loss(model, inputs, *a, **kw)

    trainer.compute_loss = recording
    trainer.train()

    world, rank = dist.get_world_size(), dist.get_rank()
    everyone = [None] * world
    dist.all_gather_object(everyone, batches)
    pma = find_pma_optimizer(trainer.optimizer)
    facts = {"world": world, "global_step": trainer.state.global_step, "batches": [len(b) for b in everyone],
             "group_steps": [g["step"] for g in pma.param_groups], "period": [g["period"] for g in pma.param_groups],
             "ranks_saw_other_rows": all(
                 everyone[0][s]["input_ids"].shape != everyone[1][s]["input_ids"].shape
                 or not torch.equal(everyone[0][s]["input_ids"], everyone[1][s]["input_ids"]) for s in range(STEPS))}

    def reference(period):
        net = copy.deepcopy(initial)
        optimizer = AdamWPMA(net.parameters(), lr=LR, eps=EPS, weight_decay=0.0, period=period)
        for step in range(STEPS):
            losses, counts = zip(*(summed_token_loss(net, everyone[r][step]) for r in range(world)))
            (sum(losses) / sum(counts)).backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), CLIP)
            optimizer.step()
            optimizer.zero_grad()
        return dict(net.named_parameters())

    if rank == 0:
        trained = dict(trainer.model.named_parameters())

        def max_diff(other):
            return max(float((p.detach() - other[n].detach()).abs().max()) for n, p in trained.items())
        facts.update(max_diff=max_diff(reference(PERIOD)), control_diff=max_diff(reference(2 * PERIOD)),
                     moved=max_diff(dict(initial.named_parameters())))
        Path(args.out).write_text(json.dumps(facts, indent=1))
    shutdown(0)


if __name__ == "__main__":
    run_rank(main)
