"""2 ranks, ZeRO-2: each rank hashes its share of a checkpoint's files; a corrupted file is the same error on both.

argv: OUT. Trains the built-in fallback model 8 micro-steps with a checkpoint every 4, then verifies
the last one collectively, corrupts a file of rank 1's share and resumes. Writes OUT/rank<r>.json
(tests/test_train_checkpoint_shares.py reads them): bytes this rank hashed while saving and while
verifying, the verified state, and the resume error.
"""
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch.distributed as dist  # noqa: E402

from pma_dist import distributed  # noqa: E402
from recipes.posttrain import checkpoints, config, trainer  # noqa: E402

distributed.pop_local_rank_arg()  # the deepspeed launcher adds --local_rank=N
out = Path(sys.argv[1])
hashed = {"bytes": 0, "files": []}
original_sha256 = checkpoints._sha256


def counted_sha256(path):
    hashed["bytes"] += os.path.getsize(path)
    hashed["files"].append(Path(path).name)
    return original_sha256(path)


checkpoints._sha256 = counted_sha256
argv = ["--model", "builtin-fallback", "--micro-batch-size", "4", "--max-length", "64", "--eval-size", "16",
        "--eval-every", "0", "--no-progress", "--period", "2", "--lr", "3e-3", "--micro-steps", "8",
        "--save-every", "4", "--zero-stage", "2", "--output-dir", str(out / "run")]
trainer.run(config.resolve(argv))
rank = dist.get_rank()
report = {"save": dict(hashed)}
ckpt_dir = out / "run" / "checkpoints"
tag = ckpt_dir / "micro00000008"

hashed.update(bytes=0, files=[])
report["verified_state"] = checkpoints.verify(tag, collective=True)
report["verify"] = dict(hashed)

manifest = json.loads((tag / checkpoints.MANIFEST).read_text())
sizes = [(name, entry["bytes"]) for name, entry in manifest["files"].items()]
victim = max(checkpoints.shares(sizes, dist.get_world_size())[1], key=lambda name: manifest["files"][name]["bytes"])
report["victim"] = victim
if rank == 0:
    raw = bytearray((tag / victim).read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # same size: only the hash can tell
    (tag / victim).write_bytes(bytes(raw))
dist.barrier()
hashed.update(bytes=0, files=[])
try:
    trainer._checked_resume_point(config.resolve(argv + ["--resume"]), ckpt_dir, rank)
    report["resume_error"] = None
except checkpoints.CheckpointError as exc:
    report["resume_error"] = str(exc)
report["resume"] = dict(hashed)
(out / f"rank{rank}.json").write_text(json.dumps(report, indent=1))
distributed.shutdown(0)
