"""One post-training job (ZeRO-3, stories260K, comm ledger in OUT/comm); records where each rank ran.
argv: OUT SHARED.

Launched by tests/test_scale_multinode.py as 2 "nodes" x 1 rank (two torchrun agents, c10d rendezvous,
on this one host) and as 1 node x 2 ranks, to compare.
"""
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch.distributed as dist  # noqa: E402

from recipes.posttrain import config, trainer  # noqa: E402

out, shared = Path(sys.argv[1]), Path(sys.argv[2])
argv = ["--task", "sft", "--model", str(shared / "models" / "stories260K"),
        "--train-data", str(shared / "sft" / "alpaca_mix_train.jsonl"), "--micro-batch-size", "2", "--max-length", "64",
        "--eval-size", "8", "--eval-batch-size", "8", "--eval-every", "0", "--micro-steps", "4", "--no-progress",
        "--optimizer", "adamw_pma", "--period", "2", "--zero-stage", "3", "--output-dir", str(out / "job"),
        "--comm-profile", str(out / "comm")]
summary = trainer.run(config.resolve(argv))
placement = {k: os.environ.get(k) for k in ("RANK", "GROUP_RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "WORLD_SIZE")}
(out / f"rank{dist.get_rank()}.json").write_text(json.dumps({"placement": placement, "summary": summary}))

from pma_dist import distributed  # noqa: E402

distributed.shutdown(0)  # in a fixed order: gloo can abort when its group is torn down at interpreter exit
