"""2 ranks, DeepSpeed ZeRO-0: the same DPO job with the cached reference and with a reference copy. argv: OUT SHARED."""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch.distributed as dist  # noqa: E402

from pma_dist import distributed  # noqa: E402
from recipes.posttrain import config, trainer  # noqa: E402

distributed.pop_local_rank_arg()
out, shared = Path(sys.argv[1]), Path(sys.argv[2])
common = ["--task", "dpo", "--model", str(shared / "models" / "stories260K"),
          "--train-data", str(shared / "dpo" / "hh_rlhf_harmless_base_test_pairs.jsonl"), "--micro-batch-size", "2",
          "--max-length", "96", "--eval-size", "12", "--eval-batch-size", "4", "--eval-every", "4", "--micro-steps", "8",
          "--no-progress", "--optimizer", "lion_pma", "--period", "4", "--lr", "1e-3"]
for mode in ("cached", "copy"):
    trainer.run(config.resolve(common + ["--dpo-reference", mode, "--output-dir", str(out / mode)]))
    dist.barrier()

from pma_dist import distributed  # noqa: E402

distributed.shutdown(0)  # in a fixed order: gloo can abort when its group is torn down at interpreter exit
