"""2 ranks: the model loaded for ZeRO-3 is partitioned from the start and equals the checkpoint; jobs unchanged.

argv: OUT SHARED. Writes OUT/rank<r>.json (tests/test_scale_loading.py reads them).
"""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import deepspeed  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from pma_dist import distributed  # noqa: E402
from recipes.posttrain import config, trainer  # noqa: E402

distributed.pop_local_rank_arg()
out, shared = Path(sys.argv[1]), Path(sys.argv[2])
deepspeed.init_distributed()
rank = dist.get_rank()
model_dir = shared / "models" / "stories260K"
checkpoint = load_file(str(model_dir / "model.safetensors"))
common = ["--model", str(model_dir), "--train-data", str(shared / "sft" / "alpaca_mix_train.jsonl"),
          "--micro-batch-size", "2", "--max-length", "64", "--eval-size", "8", "--eval-batch-size", "8",
          "--eval-every", "0", "--micro-steps", "4", "--no-progress", "--optimizer", "adamw_pma", "--period", "2"]
bf16_json = out / "bf16.json"
if rank == 0:
    bf16_json.write_text(json.dumps({"bf16": {"enabled": True}, "zero_optimization": {"stage": 3}}))
dist.barrier()
report = {}


def loaded(name, argv):
    cfg = config.resolve(common + argv)
    model, _ = trainer.load_model_and_tokenizer(cfg)
    from transformers.integrations import is_deepspeed_zero3_enabled

    facts = {"zero3_after_load": bool(is_deepspeed_zero3_enabled()), "params": {}}
    for pname, p in model.named_parameters():
        key = pname if pname in checkpoint else None
        entry = {"dtype": str(p.dtype), "partitioned": hasattr(p, "ds_id"), "local_numel": p.numel(),
                 "full_numel": int(getattr(p, "ds_numel", p.numel())),
                 "shard_numel": int(p.ds_tensor.numel()) if hasattr(p, "ds_tensor") else None}
        with deepspeed.zero.GatheredParameters([p] if hasattr(p, "ds_id") else []):
            if key is not None:
                entry["equals_checkpoint"] = bool(torch.equal(p.detach().cpu(), checkpoint[key].to(p.dtype)))
        facts["params"][pname] = entry
    report[name] = facts


loaded("zero3_fp32", ["--zero-stage", "3"])
loaded("zero3_bf16", ["--deepspeed", str(bf16_json)])
loaded("zero0_fp32", ["--zero-stage", "0"])


def losses(name, argv):
    summary = trainer.run(config.resolve(common + argv + ["--output-dir", str(out / name)]))
    lines = [json.loads(x) for x in (out / name / "metrics.jsonl").read_text().splitlines()] if rank == 0 else []
    report[name] = {"eval_loss": summary["eval_loss"], "train": [x["train_loss"] for x in lines if x["kind"] == "train"],
                    "peak_memory_bytes": summary["peak_memory_bytes"], "peak_memory_kind": summary["peak_memory_kind"]}


losses("job_zero3", ["--zero-stage", "3"])
real_zero3_enabled = trainer.zero3_enabled
trainer.zero3_enabled = lambda cfg: False  # the previous loading: the full model on every rank, then partitioned
losses("job_zero3_full_load", ["--zero-stage", "3"])
trainer.zero3_enabled = real_zero3_enabled
(out / f"rank{rank}.json").write_text(json.dumps(report))

from pma_dist import distributed  # noqa: E402

distributed.shutdown(0)  # in a fixed order: gloo can abort when its group is torn down at interpreter exit
