"""TRL's SFTTrainer (AdamW-PMA through ``optimizer_cls_and_kwargs``) or DPOTrainer (an AdamWPMA instance
through ``optimizers=``) on N CPU ranks (DDP, gloo), checked on rank 0 against a one-process plain loop
over every rank's batches.

Each rank records the batches its trainer computed the loss on. SFT: the Trainer's loss on a rank is
its summed token loss divided by the token count of all ranks (``num_items_in_batch``, then times the
world size, which DDP's gradient mean undoes), so the reference loss of a step is the summed token loss
of all ranks' batches over their total token count. DPO: each rank's loss is the mean over its pairs
(the same number on every rank), so the reference is the mean over all ranks' pairs, with the sigmoid
DPO loss written here. Rank 0 writes JSON facts.

Usage: ``torchrun --nproc_per_node=2 integrations_trl.py --trainer sft|dpo --model DIR --data FILE
--out results.json --tmp DIR``
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

LR, EPS, PERIOD, STEPS, MICRO, CLIP, BETA = 1e-3, 1e-3, 4, 8, 2, 1.0, 0.1


def summed_token_loss(model, batch):
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    labels = batch["labels"][:, 1:]
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), labels.reshape(-1), ignore_index=-100,
                           reduction="sum"), int((labels != -100).sum())


def dpo_pair_losses(policy, reference, batch, beta):
    """Sigmoid DPO loss of each pair of a [chosen..., rejected...] batch."""
    def sequence_logps(model):
        ids, mask = batch["input_ids"], batch["completion_mask"] * batch["attention_mask"]
        logits = model(input_ids=ids, attention_mask=batch["attention_mask"]).logits[:, :-1]
        return (torch.log_softmax(logits, dim=-1).gather(-1, ids[:, 1:, None]).squeeze(-1) * mask[:, 1:]).sum(-1)

    chosen, rejected = sequence_logps(policy).chunk(2)
    with torch.no_grad():
        ref_chosen, ref_rejected = sequence_logps(reference).chunk(2)
    return -F.logsigmoid(beta * ((chosen - ref_chosen) - (rejected - ref_rejected)))


def main():
    pop_local_rank_arg()
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--trainer", required=True, choices=["sft", "dpo"])
    parser.add_argument("--data", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--tmp", required=True)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")

    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer

    with open(args.data, encoding="utf-8") as f:
        rows = [json.loads(line) for line, _ in zip(f, range(48))]
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    initial = copy.deepcopy(model)
    settings = dict(output_dir=str(Path(args.tmp) / "out"), per_device_train_batch_size=MICRO, max_steps=STEPS,
                    learning_rate=LR, weight_decay=0.0, max_grad_norm=CLIP, lr_scheduler_type="constant",
                    logging_steps=1, save_strategy="no", report_to=[], seed=0, disable_tqdm=True, use_cpu=True,
                    bf16=False, ddp_backend="gloo", dataloader_num_workers=0, max_length=64)
    if args.trainer == "sft":
        data = Dataset.from_list([{"prompt": f"{r['instruction']}\n{r['input']}\n", "completion": r["output"]}
                                  for r in rows])
        trainer = SFTTrainer(model=model, args=SFTConfig(**settings), train_dataset=data, processing_class=tokenizer,
                             callbacks=[PMACallback()], optimizer_cls_and_kwargs=optimizer_cls_and_kwargs(
                                 "adamw_pma", lr=LR, eps=EPS, period=PERIOD))
    else:
        data = Dataset.from_list([{"prompt": r["prompt"][-200:], "chosen": r["chosen"][:200],
                                   "rejected": r["rejected"][:200]} for r in rows])
        optimizer = AdamWPMA(model.parameters(), lr=LR, eps=EPS, weight_decay=0.0, period=PERIOD)
        trainer = DPOTrainer(model=model, args=DPOConfig(**settings, beta=BETA), train_dataset=data,
                             processing_class=tokenizer, optimizers=(optimizer, None), callbacks=[PMACallback()])
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

    frozen = copy.deepcopy(initial).eval()  # DPO's reference model: the initial weights

    def reference(period):
        net = copy.deepcopy(initial)
        optimizer = AdamWPMA(net.parameters(), lr=LR, eps=EPS, weight_decay=0.0, period=period)
        for step in range(STEPS):
            if args.trainer == "sft":
                losses, counts = zip(*(summed_token_loss(net, everyone[r][step]) for r in range(world)))
                loss = sum(losses) / sum(counts)
            else:
                loss = torch.cat([dpo_pair_losses(net, frozen, everyone[r][step], BETA) for r in range(world)]).mean()
            loss.backward()
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
