#!/usr/bin/env python
"""Pretrain a small Llama base (~3M parameters by default) on ../shared/data/text for the post-training benchmark.

    deepspeed --num_gpus 2 launch/pretrain_base.py --output-dir runs/base_3m

Writes a Hugging Face model directory (``--model`` for launch/train.py, ``--base`` for
benchmarks/post_training.py). Also runs under torchrun / mpirun. See docs/training.md.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing


def main(argv=None) -> int:
    from pma_dist import distributed
    from recipes.posttrain import pretrain
    from recipes.posttrain.config import ConfigError

    distributed.setup_env_from_mpi()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        pretrain.run(argv)
    except (ConfigError, FloatingPointError) as exc:
        print(f"pretrain_base.py: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    code = main()
    from pma_dist import distributed

    distributed.shutdown(code)
