"""Write every DeepSpeed config in this folder from one table (run: ``python ds_configs/generate.py``).

The JSON files are committed so users can point ``--deepspeed`` at them; ``tests/test_deepspeed_unit.py``
fails when a file drifts from what this script writes, so edit the table here, not the JSON.

Choices shared by all configs (see README.md in this folder and docs/deepspeed.md):
- PMA configs: ``gradient_accumulation_steps`` = 1 and the accumulation length is the optimizer's
  ``period`` (K); ``train_batch_size`` is left out so DeepSpeed derives it (micro batch x ranks).
- GA baselines: the same optimizer without PMA, with ``gradient_accumulation_steps`` = K.
- ``gradient_clipping`` is always explicit (DeepSpeed's default is 1.0). With PMA it clips every
  micro-batch gradient; with GA it clips the accumulated one.
- Paper hyper-parameters for post-training: lr 2e-6, SFT K = 8 (micro batch 32 in the paper; 4
  here, scale it to your memory), AdamW betas (0.9, 0.95), Lion betas (0.95, 0.98).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from pma_dist.methods import get_method  # noqa: E402
PERIOD = 8
MICRO_BATCH = 4
LR = 2e-6
CLIPPING = 1.0

# Paper hyper-parameters per optimizer family; the optimizer block and the accumulation of each method come
# from pma_dist.methods (AdamW baselines: torch.optim.AdamW through "torch_adam", no JIT build; drop it on
# GPU for DeepSpeed's FusedAdam. Lion baselines: LionPMA with period 1, Lion bit for bit on every device,
# where DeepSpeed's "Lion" is FusedLion, CUDA only).
HYPER = {
    "adamw": {"lr": LR, "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": 0.0},
    "lion": {"lr": LR, "betas": [0.95, 0.98], "weight_decay": 0.0},
}
SHIPPED_METHODS = ("adamw_pma", "lion_pma", "adamw_ga", "lion_ga")


def method_block(name: str) -> dict:
    """``optimizer`` and ``gradient_accumulation_steps`` of a shipped method at K = PERIOD."""
    method = get_method(name)
    return method.deepspeed_config(PERIOD, HYPER[method.family])


ZERO = {
    0: {"stage": 0},
    1: {"stage": 1, "reduce_bucket_size": 5e8, "allgather_bucket_size": 5e8},
    2: {"stage": 2, "overlap_comm": False, "contiguous_gradients": True, "reduce_bucket_size": 5e8,
        "allgather_bucket_size": 5e8},
    3: {"stage": 3, "overlap_comm": False, "contiguous_gradients": True, "reduce_bucket_size": 5e8,
        "sub_group_size": 1e9, "stage3_prefetch_bucket_size": 5e8, "stage3_param_persistence_threshold": 1e5,
        "stage3_gather_16bit_weights_on_model_save": True},
}

OFFLOAD = {"device": "cpu", "pin_memory": True}


def config(stage: int, optimizer: str, precision: str, offload: bool = False) -> dict:
    block = method_block(optimizer)
    zero = dict(ZERO[stage])
    if offload:
        zero["offload_optimizer"] = dict(OFFLOAD)
    cfg = {
        "train_micro_batch_size_per_gpu": MICRO_BATCH,
        "gradient_accumulation_steps": block["gradient_accumulation_steps"],
        "gradient_clipping": CLIPPING,
        "optimizer": block["optimizer"],
        "zero_optimization": zero,
        "steps_per_print": 100,
        "wall_clock_breakdown": False,
    }
    if precision == "bf16":
        cfg["bf16"] = {"enabled": True}
    return cfg


def hf_auto_config() -> dict:
    """For the Hugging Face Trainer (``--deepspeed``): "auto" values are filled from TrainingArguments."""
    return {
        "train_micro_batch_size_per_gpu": "auto",
        "train_batch_size": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "optimizer": {"type": "AdamWPMA",
                      "params": {"lr": "auto", "betas": "auto", "eps": "auto", "weight_decay": "auto",
                                 "period": PERIOD}},
        "zero_optimization": dict(ZERO[2]),
        "bf16": {"enabled": "auto"},
        "steps_per_print": 100,
    }


def all_configs() -> dict:
    """File name -> config dict, for every file this folder ships."""
    files = {}
    for stage in ZERO:
        for optimizer in SHIPPED_METHODS:
            for precision in ("fp32", "bf16"):
                files[f"zero{stage}_{optimizer}_{precision}.json"] = config(stage, optimizer, precision)
    for stage in (2, 3):
        for optimizer in ("adamw_pma", "lion_pma"):
            files[f"zero{stage}_offload_{optimizer}_bf16.json"] = config(stage, optimizer, "bf16", offload=True)
    files["hf_zero2_adamw_pma_auto.json"] = hf_auto_config()
    return files


def render(cfg: dict) -> str:
    return json.dumps(cfg, indent=2) + "\n"


def main() -> None:
    for name, cfg in all_configs().items():
        (HERE / name).write_text(render(cfg))
    print(f"wrote {len(all_configs())} configs to {HERE}")


if __name__ == "__main__":
    main()
