"""One torchrun launch, several launch/train.py jobs on --backend fsdp / ddp (tests/test_train_torch_backends.py).

Jobs on the built-in fallback model, in order: SFT with AdamW-PMA on FSDP2 (checkpoints, update
variance, an eval set that does not split evenly over the ranks); the same job on DDP; SFT with the
AdamW GA baseline on DDP; the FSDP2 PMA job stopped at 4 micro-steps then resumed, once by FSDP2
and once by DDP (DCP checkpoints are layout-free); DPO with Lion-PMA on FSDP2. Rank 0 writes results.json with the summaries.
"""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch.distributed as dist  # noqa: E402

from pma_dist import distributed  # noqa: E402
from recipes.posttrain import config, trainer  # noqa: E402

out = Path(sys.argv[1])
common = ["--model", "builtin-fallback", "--micro-batch-size", "4", "--max-length", "64", "--eval-size", "17",
          "--eval-batch-size", "4", "--eval-every", "4", "--no-progress", "--period", "2", "--lr", "3e-3"]
pma = common + ["--optimizer", "adamw_pma", "--save-every", "4"]
results = {}


def job(name, argv):
    results[name] = trainer.run(config.resolve(argv + ["--output-dir", str(out / name)]))


job("fsdp_pma", pma + ["--backend", "fsdp", "--micro-steps", "8", "--log-update-variance", "--variance-window", "2",
                       "--save-model", str(out / "saved_fsdp")])
job("ddp_pma", pma + ["--backend", "ddp", "--micro-steps", "8", "--save-model", str(out / "saved_ddp")])
job("ddp_ga", common + ["--backend", "ddp", "--optimizer", "adamw_ga", "--micro-steps", "8"])
job("fsdp_resumed", pma + ["--backend", "fsdp", "--micro-steps", "4"])
job("fsdp_resumed", pma + ["--backend", "fsdp", "--micro-steps", "8", "--resume", "--trust-checkpoint"])
job("ddp_from_fsdp", pma + ["--backend", "fsdp", "--micro-steps", "4"])
job("ddp_from_fsdp", pma + ["--backend", "ddp", "--micro-steps", "8", "--resume", "--trust-checkpoint"])
job("fsdp_dpo", common + ["--backend", "fsdp", "--task", "dpo", "--optimizer", "lion_pma", "--lr", "3e-4",
                          "--micro-steps", "4"])

if dist.get_rank() == 0:
    (out / "results.json").write_text(json.dumps(results, indent=1))
distributed.shutdown(0)
