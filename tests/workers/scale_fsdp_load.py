"""2 ranks, FSDP2: the meta-device model filled shard by shard equals the checkpoint; a job's losses are unchanged.

argv: OUT SHARED. Writes OUT/rank<r>.json (tests/test_scale_loading.py reads them).
"""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from pma_dist.torch_parallel import init_process_group  # noqa: E402
from recipes.posttrain import config, sharded_load, trainer  # noqa: E402

out, shared = Path(sys.argv[1]), Path(sys.argv[2])
init_process_group()
rank = dist.get_rank()
model_dir = shared / "models" / "stories260K"
checkpoint = load_file(str(model_dir / "model.safetensors"))
common = ["--backend", "fsdp", "--model", str(model_dir), "--train-data", str(shared / "sft" / "alpaca_mix_train.jsonl"),
          "--micro-batch-size", "2", "--max-length", "64", "--eval-size", "8", "--eval-batch-size", "8",
          "--eval-every", "0", "--micro-steps", "4", "--no-progress", "--optimizer", "adamw_pma", "--period", "2"]
report = {}

cfg = config.resolve(common + ["--output-dir", str(out / "probe")])
model, _ = trainer.load_model_and_tokenizer(cfg)
report["meta_after_load"] = sharded_load.is_meta(model)
backend = trainer.build_backend(cfg, model)
params = {}
for name, p in backend.module.named_parameters():
    full = p.detach().full_tensor() if hasattr(p, "full_tensor") else p.detach()
    params[name] = {"equals_checkpoint": bool(torch.equal(full.cpu(), checkpoint[name])),
                    "local_numel": p.to_local().numel() if hasattr(p, "to_local") else p.numel(),
                    "full_numel": full.numel()}
report["params"] = params
buffers = {n: b for n, b in backend.module.named_buffers()}
reference_model = __import__("transformers").AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
report["buffers_equal"] = all(torch.equal(buffers[n].cpu(), b) for n, b in reference_model.named_buffers())
backend.release()


def losses(name):
    summary = trainer.run(config.resolve(common + ["--output-dir", str(out / name)]))
    lines = [json.loads(x) for x in (out / name / "metrics.jsonl").read_text().splitlines()] if rank == 0 else []
    report[name] = {"eval_loss": summary["eval_loss"], "train": [x["train_loss"] for x in lines if x["kind"] == "train"]}


losses("job_sharded_load")
sharded_load.meta_model = lambda d, dtype, trust: reference_model.__class__.from_pretrained(d, dtype=dtype)
losses("job_full_load")  # the previous loading: the full model on every rank, then fully_shard
(out / f"rank{rank}.json").write_text(json.dumps(report))

from pma_dist import distributed  # noqa: E402

distributed.shutdown(0)  # in a fixed order: gloo can abort when its group is torn down at interpreter exit
