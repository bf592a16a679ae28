#!/usr/bin/env python
"""SFT / DPO post-training with AdamW-PMA, Lion-PMA or gradient-accumulation baselines.

    deepspeed --num_gpus 8 launch/train.py --deepspeed ds_configs/zero2_pma.json \
        --task sft --model <dir or hub name> --train-data <jsonl or hub name> --optimizer adamw_pma --period 8

Also runs under ``torchrun --nproc_per_node N`` and ``mpirun -np N python``; ``--backend fsdp`` or
``--backend ddp`` trains with PyTorch FSDP2 / DDP instead of DeepSpeed. See docs/training.md.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing


def main(argv=None) -> int:
    from pma_dist import distributed
    from recipes.posttrain import checkpoints, config, data, metrics

    distributed.setup_env_from_mpi()
    try:
        cfg = config.resolve(argv)
    except config.ConfigError as exc:
        print(f"train.py: error: {exc}", file=sys.stderr)
        return 2
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from recipes.posttrain import trainer

    try:
        trainer.run(cfg)
    except (config.ConfigError, data.DataError, checkpoints.CheckpointError, metrics.MetricsError,
            FloatingPointError) as exc:
        print(f"train.py: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    code = main()
    from pma_dist import distributed

    distributed.shutdown(code)
