"""2 ranks: the data is tokenised by one rank and read by the other, identical to each rank tokenising itself.

argv: OUT SHARED (SHARED may not exist: then the built-in fallback task and tokenizer are used).
Writes OUT/rank<r>.json (tests/test_train_token_cache.py reads them): per case, how often this rank
called the tokeniser, a digest of the sets it got, whether they equal today's per-rank path
(``trainer._load_datasets``), and the error messages of the bad-data cases.
"""
import hashlib
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch.distributed as dist  # noqa: E402

from pma_dist import distributed  # noqa: E402
from recipes.posttrain import config, data, fallback, token_cache, trainer  # noqa: E402

out, shared = Path(sys.argv[1]), Path(sys.argv[2])
distributed.init_distributed()
rank = dist.get_rank()
calls = {"n": 0}
for method in ("sft", "dpo"):
    original = getattr(data.Tokeniser, method)

    def counted(self, records, source="", _original=original):
        calls["n"] += 1
        return _original(self, records, source)

    setattr(data.Tokeniser, method, counted)

real = (shared / "models" / "stories260K").is_dir()
if real:
    model = ["--model", str(shared / "models" / "stories260K")]
    files = {"sft": str(shared / "sft" / "alpaca_mix_train.jsonl"),
             "dpo": str(shared / "dpo" / "hh_rlhf_harmless_base_test_pairs.jsonl")}
else:
    model, files = ["--model", "builtin-fallback"], {"sft": "builtin-fallback", "dpo": "builtin-fallback"}
tokenizer = None
report = {"real": real, "cases": {}, "errors": {}}


def facts(sets: trainer.Datasets) -> dict:
    summary = {split: {"examples": s.examples, "total": s.total, "truncated": s.truncated, "skipped": s.skipped,
                       "source": s.source, "degenerate": s.degenerate}
               for split, s in (("train", sets.train), ("eval", sets.eval))}
    text = json.dumps(summary, sort_keys=True)
    return {"digest": hashlib.sha256(text.encode()).hexdigest(), "train_examples": len(sets.train.examples),
            "truncated": sets.train.truncated, "skipped": sets.train.skipped}


def resolve(task, *extra, data_file=None):
    argv = model + ["--task", task, "--train-data", data_file or files[task], "--max-length", "64",
                    "--eval-size", "16", "--max-train-records", "400", "--output-dir", str(out / task),
                    "--no-progress"] + list(extra)
    return config.resolve(argv)


def case(name, cfg, compare=True):
    global tokenizer
    if tokenizer is None:
        tokenizer = fallback.char_tokenizer() if not real else trainer.load_model_and_tokenizer(cfg)[1]
    trainer._DATASETS.clear()  # a fresh process's view: only the file can be reused
    before = calls["n"]
    sets = trainer.load_datasets(cfg, tokenizer)
    entry = dict(facts(sets), tokenised=calls["n"] - before)
    if compare:  # today's path: this rank tokenises by itself
        today = trainer._load_datasets(cfg, tokenizer)
        entry["same_as_per_rank"] = facts(today)["digest"] == entry["digest"]
    report["cases"][name] = entry


for task in ("sft", "dpo"):
    case(f"{task}_first", resolve(task))
    case(f"{task}_again", resolve(task))
case("sft_longer", resolve("sft", "--max-length", "96"))
case("sft_back", resolve("sft"))  # the file now holds max-length 96: rebuilt again

cache = out / "sft" / token_cache.FILE
if rank == 0:
    raw = bytearray(cache.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    cache.write_bytes(bytes(raw))
dist.barrier()
case("sft_corrupted", resolve("sft"))
if rank == 0:
    cache.write_bytes(cache.read_bytes()[:1000])
dist.barrier()
case("sft_truncated", resolve("sft"))

# nodes that share no disk: each rank has its own directory and is its node's local rank 0
cfg = resolve("sft")
trainer._DATASETS.clear()
before = calls["n"]
own = token_cache.load_once(lambda: trainer._load_datasets(cfg, tokenizer).splits(), out / f"disk{rank}" / "tok.pt",
                            token_cache.fingerprint(cfg, tokenizer), local_rank=0, say=lambda m: None)
report["cases"]["own_disks"] = dict(facts(trainer.Datasets(**own)), tokenised=calls["n"] - before)

# bad data: the same line-numbered error on both ranks, none waiting for the other
bad = out / "bad.jsonl"
if rank == 0:
    rows = [{"instruction": "a", "output": "b"}] * 20 + [{"instruction": "c"}]
    bad.write_text("".join(json.dumps(r) + "\n" for r in rows))
dist.barrier()
for name, cfg in (("missing_field", resolve("sft", data_file=str(bad))),
                  ("overlong", resolve("sft", "--overlong", "error", "--max-length", "8"))):
    trainer._DATASETS.clear()
    try:
        trainer.load_datasets(cfg, tokenizer)
        report["errors"][name] = None
    except data.DataError as exc:
        report["errors"][name] = str(exc)
    try:  # today's message, this rank tokenising by itself
        trainer._load_datasets(cfg, tokenizer)
        report["errors"][name + "_per_rank"] = None
    except data.DataError as exc:
        report["errors"][name + "_per_rank"] = str(exc)

(out / f"rank{rank}.json").write_text(json.dumps(report, indent=1))
distributed.shutdown(0)
