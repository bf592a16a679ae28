"""The Hugging Face Trainer with ``deepspeed=<PMA config>`` (what ``--deepspeed cfg.json`` sets) on N ranks.

Trains the real stories260K Llama for a few steps on tiny-shakespeare with the shipped
``ds_configs/hf_zero2_adamw_pma_auto.json`` ("auto" values filled by the Trainer), then checks that
``gradient_accumulation_steps=2`` (filled into the "auto" GA) is refused with the PMA message. Rank 0
writes JSON facts for ``tests/test_deepspeed_hf.py``.

Usage: ``torchrun --nproc_per_node=2 ds_hf_trainer.py --model DIR --text FILE --out results.json --tmp DIR``
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import warnings
from pathlib import Path

import torch

import pma_dist  # noqa: F401  (registers AdamWPMA / LionPMA for DeepSpeed configs)
from pma_dist.distributed import configure_accelerate_for_deepspeed, pop_local_rank_arg, run_rank, shutdown

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "ds_configs" / "hf_zero2_adamw_pma_auto.json"
SEQ_LEN = 64
MAX_STEPS = 4


class TokenChunks(torch.utils.data.Dataset):
    def __init__(self, ids, n):
        self.ids, self.n = ids, n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        chunk = self.ids[i * SEQ_LEN:(i + 1) * SEQ_LEN]
        return {"input_ids": chunk, "labels": chunk.clone(), "attention_mask": torch.ones_like(chunk)}


def trainer_for(model_dir, dataset, out_dir, **overrides):
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    settings = dict(output_dir=str(out_dir), per_device_train_batch_size=2, gradient_accumulation_steps=1,
                    max_steps=MAX_STEPS, learning_rate=1e-3, weight_decay=0.0, max_grad_norm=1.0,
                    lr_scheduler_type="constant", logging_steps=1, save_strategy="no", report_to=[],
                    deepspeed=str(CONFIG), dataloader_num_workers=0, seed=0, disable_tqdm=True,
                    accelerator_config={"use_configured_state": True})
    settings.update(overrides)
    return Trainer(model=model, args=TrainingArguments(**settings), train_dataset=dataset)


def main():
    pop_local_rank_arg()
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--text", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--tmp", required=True)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    logging.getLogger("DeepSpeed").setLevel(logging.ERROR)

    configure_accelerate_for_deepspeed()  # CPU: accelerate would count one process (see its docstring)
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    text = Path(args.text).read_text(encoding="utf-8")[:20000]
    ids = torch.tensor(tokenizer(text)["input_ids"], dtype=torch.long)
    dataset = TokenChunks(ids, n=32)

    results = {}
    # a real run: a few steps, PMA clock == optimizer steps, losses finite.
    trainer = trainer_for(args.model, dataset, Path(args.tmp) / "run")
    before = [p.detach().clone() for p in trainer.model.parameters()]
    output = trainer.train()
    engine = trainer.model_wrapped
    basic = engine.basic_optimizer
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    with torch.no_grad():
        moved = sum(float((p.detach() - b).abs().sum()) for p, b in zip(engine.module.parameters(), before))
    results["train"] = {
        "optimizer": type(basic).__name__,
        "group_steps": [g["step"] for g in basic.param_groups],
        "period": [g["period"] for g in basic.param_groups],
        "lr": [g["lr"] for g in basic.param_groups],
        "betas": [list(g["betas"]) for g in basic.param_groups],
        "gradient_accumulation_steps": engine.gradient_accumulation_steps(),
        "train_batch_size": engine.train_batch_size(),
        "gradient_clipping": engine.gradient_clipping(),
        "zero_stage": engine.zero_optimization_stage(),
        "global_step": trainer.state.global_step,
        "losses": losses,
        "all_finite": all(math.isfinite(x) for x in losses),
        "train_loss": output.training_loss,
        "param_change_l1": moved,
        "world": engine.world_size,
    }
    # then gradient accumulation with PMA: refused when DeepSpeed is initialised, before any step
    from accelerate.state import AcceleratorState
    AcceleratorState._reset_state()  # accelerate allows one DeepSpeed Accelerator per process state
    try:
        trainer_for(args.model, dataset, Path(args.tmp) / "ga", gradient_accumulation_steps=2).train()
        results["ga2"] = {"raised": None}
    except Exception as error:
        results["ga2"] = {"raised": type(error).__name__, "message": str(error)}
    if engine.global_rank == 0:
        Path(args.out).write_text(json.dumps(results, indent=1))
    shutdown(0)


if __name__ == "__main__":
    run_rank(main)
