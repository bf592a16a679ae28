"""One 2-rank launch, several post-training jobs (tests/test_train_deepspeed.py reads the results).

Jobs, in order: SFT with AdamW-PMA (checkpoints every 8, update variance); SFT with AdamW-K GA;
the same PMA job stopped at 8 micro-steps then resumed from its checkpoint by a fresh engine; DPO
with Lion-PMA; the built-in fallback (random tiny Llama, synthetic task); and a job on a bad data file, which must fail with a DataError on every rank.
"""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch.distributed as dist  # noqa: E402

from pma_dist import distributed  # noqa: E402
from recipes.posttrain import config, data, trainer  # noqa: E402

distributed.pop_local_rank_arg()  # the deepspeed launcher adds --local_rank=N
out = Path(sys.argv[1])
shared = Path(sys.argv[2])
model = str(shared / "models" / "stories260K")
common = ["--model", model, "--micro-batch-size", "2", "--max-length", "128", "--eval-size", "16",
          "--eval-batch-size", "8", "--eval-every", "8", "--no-progress"]
sft = common + ["--task", "sft", "--train-data", str(shared / "sft" / "alpaca_mix_train.jsonl"), "--period", "4"]

results = {}


def job(name, argv):
    results[name] = trainer.run(config.resolve(argv + ["--output-dir", str(out / name)]))


job("pma", sft + ["--optimizer", "adamw_pma", "--lr", "3e-3", "--micro-steps", "16", "--save-every", "8",
                  "--log-update-variance", "--variance-window", "2"])
job("ga", sft + ["--optimizer", "adamw_ga", "--lr", "3e-3", "--micro-steps", "16",
                 "--log-update-variance", "--variance-every", "8", "--variance-window", "2"])
resume = sft + ["--optimizer", "adamw_pma", "--lr", "3e-3", "--save-every", "8"]
job("resumed", resume + ["--micro-steps", "8"])
job("resumed", resume + ["--micro-steps", "16", "--resume"])
job("dpo", common + ["--task", "dpo", "--train-data", str(shared / "dpo" / "hh_rlhf_harmless_base_test_pairs.jsonl"),
                     "--optimizer", "lion_pma", "--lr", "3e-4", "--period", "4", "--beta", "0.1",
                     "--micro-steps", "16"])

# the lr schedule by samples, the select split and --save-model (ZeRO-0 and ZeRO-3)
scheduled = sft + ["--lr", "3e-3", "--micro-steps", "16", "--lr-schedule", "warmup_cosine", "--warmup-fraction",
                   "0.25", "--log-every", "1", "--select-size", "16"]
job("scheduled_ga", scheduled + ["--optimizer", "adamw_ga", "--save-model", str(out / "saved_ga")])
job("scheduled_pma", scheduled + ["--optimizer", "adamw_pma", "--lr-decay", "periodic", "--zero-stage", "3",
                                  "--save-model", str(out / "saved_zero3")])

job("fallback", ["--model", "builtin-fallback", "--micro-batch-size", "4", "--max-length", "64", "--eval-size", "16",
                 "--eval-every", "0", "--no-progress", "--period", "2", "--lr", "3e-3", "--micro-steps", "8"])

bad = out / "bad.jsonl"
if dist.get_rank() == 0:
    bad.write_text(json.dumps({"instruction": "a", "output": "b"}) + "\n" + json.dumps({"instruction": "c"}) + "\n")
dist.barrier()
try:
    job("bad", sft[:-4] + ["--train-data", str(bad), "--eval-data", str(bad), "--micro-steps", "4"])
    results["bad_error"] = None
except data.DataError as exc:
    results["bad_error"] = str(exc)

if dist.get_rank() == 0:
    (out / "results.json").write_text(json.dumps(results, indent=1))
distributed.shutdown(0)
