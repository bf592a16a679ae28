"""A short DeepSpeed job for the launch tests: any launcher, PMA from the JSON config, clean exit.

Prints one ``LAUNCH-OK {...}`` JSON line per rank, which ``tests/test_deepspeed_launch.py`` parses.
"""
from __future__ import annotations

import json
import logging
import os
import sys
import warnings
from pathlib import Path

from pma_dist.distributed import pop_local_rank_arg, run_rank, setup_env_from_mpi, shutdown

REPO = Path(__file__).resolve().parents[2]
STEPS = 2


def shm_segment():
    name = (f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
            f"{os.environ.get('MASTER_PORT', '')}_{os.environ.get('RANK', '')}")
    return name if Path("/dev/shm", name).exists() else None


def main() -> None:
    local_rank_arg = pop_local_rank_arg()  # appended by the deepspeed launcher
    mpi = setup_env_from_mpi()  # mpirun: export RANK/WORLD_SIZE/MASTER_* before DeepSpeed looks

    import torch
    import pma_dist  # noqa: F401  (registers the PMA optimizers for DeepSpeed configs)
    import deepspeed
    from deepspeed.utils import logger as ds_logger

    ds_logger.setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning)
    cfg = json.loads((REPO / "ds_configs" / "zero2_adamw_pma_fp32.json").read_text())
    cfg.update(train_micro_batch_size_per_gpu=2, gradient_clipping=0.0)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    engine, *_ = deepspeed.initialize(model=model, config=cfg)
    for step in range(STEPS):
        x = torch.randn(2, 8, generator=torch.Generator().manual_seed(step * 100 + engine.global_rank))
        loss = engine(x).pow(2).mean()
        engine.backward(loss)
        engine.step()
    facts = {
        "rank": engine.global_rank,
        "world": engine.world_size,
        "env_local_rank": int(os.environ["LOCAL_RANK"]),
        "local_rank_arg": local_rank_arg,
        "mpi": mpi is not None,
        "optimizer": type(engine.basic_optimizer).__name__,
        "group_steps": [g["step"] for g in engine.basic_optimizer.param_groups],
        # DeepSpeed's CPU shared-memory all-reduce segment of this rank, if it made one (shutdown unlinks it)
        "shm_segment": shm_segment(),
    }
    # one write per line: with PYTHONUNBUFFERED, print() writes text and newline separately and the two
    # ranks' lines can interleave on the shared pipe
    sys.stdout.write("LAUNCH-OK " + json.dumps(facts) + "\n")
    sys.stdout.flush()
    engine.destroy()
    shutdown(0)


if __name__ == "__main__":
    run_rank(main)
