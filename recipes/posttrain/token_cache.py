"""Tokenise once per run: rank 0 tokenises and writes a cache file next to the run; the other ranks read it.

The file is ``<output-dir>/tokenized_data.pt``: the train and eval :class:`~recipes.posttrain.data.TokenisedSet`
(token ids as flat int32 tensors with per-example lengths, the truncated / skipped counts, the
degenerate-pair lines, the source names), saved with ``torch.save`` and read back with
``torch.load(weights_only=True)``, so reading it never runs code. It carries the :func:`fingerprint` of
everything that changes its content and a sha256 of that content: a file with another fingerprint is
rebuilt (and overwritten), a truncated or altered one is detected by the digest and rebuilt, never
used. It is written to a temporary name and renamed, so a run killed mid-write leaves no partial file.

Who tokenises (:func:`load_once`): global rank 0 reads a valid cache or tokenises and writes one; its
result or its data error reaches every rank (the error is raised on every rank with rank 0's message,
line numbers and all, before any training). The other ranks then read the file. Nodes need not share
a disk: a rank that finds no valid file makes its node's local rank 0 tokenise and write it there
(every other rank of that node waits and reads it), so a run tokenises once per distinct file system.
"""
from __future__ import annotations

import hashlib
import json
import os
import socket
import time
from pathlib import Path
from typing import Callable, Dict, Optional, Tuple

import torch

from . import agree, data, fallback

FILE = "tokenized_data.pt"
FORMAT = 1
CONTENT_HASH_LIMIT = 64 << 20  # tokenizer files are far smaller (a 150k-piece tokenizer.json is ~10 MB)
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack", ".onnx")

agree.known_error(data.DataError)

Sets = Dict[str, data.TokenisedSet]  # {"train": ..., "eval": ...[, "select": ...]}


# ------------------------------------------------------------------------------ the key
def _file_facts(source: Optional[str]):
    """A data source as the cache sees it: a local file by resolved path, size and mtime; else its name."""
    if source is None:
        return None
    path = Path(source)
    if path.is_file():
        stat = path.stat()
        return {"path": str(path.resolve()), "bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    return {"name": source}  # the built-in fallback or a hub dataset name


def _tokenizer_facts(model: str, tokenizer) -> dict:
    """The tokenizer: its class, size and special ids, and the content of the model directory's non-weight
    files (tokenizer.json / tokenizer.model / configs: small, and what the tokenizer was built from)."""
    facts = {"class": type(tokenizer).__name__, "size": len(tokenizer), "bos": tokenizer.bos_token_id,
             "eos": tokenizer.eos_token_id}
    path = Path(model)
    if path.is_dir():
        facts["files"] = {f.name: _content_or_stat(f) for f in sorted(path.iterdir())
                          if f.is_file() and f.suffix not in WEIGHT_SUFFIXES}
    return facts


def _content_or_stat(path: Path):
    stat = path.stat()
    if stat.st_size > CONTENT_HASH_LIMIT:  # not a tokenizer file: its size and time say enough
        return [stat.st_size, stat.st_mtime_ns]
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _code_facts() -> dict:
    """The tokenising code itself (the prompt template, the length policy, the fallback task)."""
    return {Path(m.__file__).name: hashlib.sha256(Path(m.__file__).read_bytes()).hexdigest() for m in (data, fallback)}


def fingerprint(cfg, tokenizer) -> str:
    """Everything the tokenised sets depend on; any change rebuilds the cache."""
    args = cfg.settings
    facts = {"format": FORMAT, "model": cfg.model, "fallback": cfg.fallback,
             "tokenizer": _tokenizer_facts(cfg.model, tokenizer), "code": _code_facts(),
             "train_data": _file_facts(cfg.train_data), "eval_data": _file_facts(cfg.eval_data),
             "task": args.task, "eval_size": args.eval_size, "select_size": args.select_size, "max_train_records": args.max_train_records,
             "max_length": args.max_length, "overlong": args.overlong,
             "max_degenerate_pairs": args.max_degenerate_pairs}
    return hashlib.sha256(json.dumps(facts, sort_keys=True, default=str).encode()).hexdigest()


# ------------------------------------------------------------------------------ the file
def _columns(task: str):
    """The id lists of one example, as (column name, getter) pairs."""
    if task == "sft":
        return [(name, (lambda e, n=name: e[n])) for name in ("input_ids", "labels")]
    return [(f"{side}.{name}", (lambda e, s=side, n=name: e[s][n]))
            for side in ("chosen", "rejected") for name in ("input_ids", "labels")]


def _pack(tset: data.TokenisedSet) -> dict:
    columns = {}
    for name, get in _columns(tset.task):
        rows = [get(e) for e in tset.examples]
        columns[name] = {"lengths": torch.tensor([len(r) for r in rows], dtype=torch.int64),
                         "values": torch.tensor([v for r in rows for v in r], dtype=torch.int32)}
    meta = {"task": tset.task, "total": tset.total, "truncated": tset.truncated, "skipped": tset.skipped,
            "source": tset.source, "degenerate": list(tset.degenerate), "examples": len(tset.examples)}
    return {"meta": meta, "columns": columns}


def _unpack(packed: dict) -> data.TokenisedSet:
    meta = packed["meta"]
    split = {}
    for name, _ in _columns(meta["task"]):
        lengths = packed["columns"][name]["lengths"].tolist()
        values = packed["columns"][name]["values"].tolist()
        if len(lengths) != meta["examples"] or sum(lengths) != len(values):
            raise ValueError(f"column {name} holds {len(lengths)} rows / {len(values)} ids, "
                             f"expected {meta['examples']} rows / {sum(lengths)} ids")
        rows, start = [], 0
        for n in lengths:
            rows.append(values[start:start + n])
            start += n
        split[name] = rows
    if meta["task"] == "sft":
        examples = [{"input_ids": i, "labels": l} for i, l in zip(split["input_ids"], split["labels"])]
    else:
        examples = [{side: {"input_ids": split[f"{side}.input_ids"][k], "labels": split[f"{side}.labels"][k]}
                     for side in ("chosen", "rejected")} for k in range(meta["examples"])]
    return data.TokenisedSet(meta["task"], examples, meta["total"], truncated=meta["truncated"],
                             skipped=meta["skipped"], source=meta["source"], degenerate=list(meta["degenerate"]))


def _digest(key: str, packed: Dict[str, dict]) -> str:
    h = hashlib.sha256(key.encode())
    for split in sorted(packed):
        h.update(json.dumps(packed[split]["meta"], sort_keys=True).encode())
        for name in sorted(packed[split]["columns"]):
            for part in ("lengths", "values"):
                h.update(packed[split]["columns"][name][part].numpy().tobytes())
    return h.hexdigest()


def save(path: Path, key: str, sets: Sets) -> None:
    """Write the sets atomically (a temporary name, then a rename) with their key and content digest."""
    packed = {split: _pack(tset) for split, tset in sets.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{socket.gethostname()}-{os.getpid()}")
    torch.save({"format": FORMAT, "key": key, "digest": _digest(key, packed), "sets": packed}, tmp)
    os.replace(tmp, path)


def load(path: Path, key: str) -> Tuple[Optional[Sets], str]:
    """(sets, "") from a valid cache for ``key``; else (None, why it cannot be used)."""
    if not path.exists():
        return None, f"no tokenised cache at {path}"
    try:
        saved = torch.load(path, weights_only=True)
        if saved.get("key") != key:
            return None, f"the tokenised cache {path} was written for other data or settings"
        if _digest(key, saved["sets"]) != saved["digest"]:
            return None, f"the tokenised cache {path} is corrupted (its content digest differs)"
        return {split: _unpack(packed) for split, packed in saved["sets"].items()}, ""
    except Exception as exc:  # truncated zip, unexpected layout, a foreign file: all mean "rebuild"
        return None, f"the tokenised cache {path} is unreadable ({type(exc).__name__}: {exc})"


# ------------------------------------------------------------------------------ who tokenises
def _build_and_save(build: Callable[[], Sets], path: Path, key: str, say: Callable[[str], None]) -> Sets:
    began = time.perf_counter()
    sets = build()
    save(path, key, sets)
    rank, _ = agree.rank_and_world()
    say(f"rank {rank} tokenised in {time.perf_counter() - began:.1f} s; cache written to {path}")
    return sets


def load_once(build: Callable[[], Sets], path: Path, key: str, local_rank: int,
              say: Callable[[str], None] = print) -> Sets:
    """The tokenised sets on every rank, built (``build()``) by one rank per file system (see the module doc).

    Collective: every rank calls it. A :class:`~recipes.posttrain.data.DataError` of the building rank
    is raised on every rank with the same message."""
    rank, world = agree.rank_and_world()

    def on_rank0() -> bool:  # True: rank 0 tokenised (and wrote the file); False: it read a valid cache
        found, why = load(path, key)
        if found is not None:
            say(f"read the tokenised data from {path}")
            mine["sets"] = found
            return False
        say(f"{why}; tokenising")
        mine["sets"] = _build_and_save(build, path, key, say)
        return True

    mine: dict = {}
    agree.from_rank0(on_rank0)
    if world == 1:
        return mine["sets"]
    if rank != 0:
        mine["sets"], _ = load(path, key)
    missing = agree.gather(mine["sets"] is None)  # a rank whose disk is not rank 0's
    fail = None
    if missing[rank] and local_rank == 0:
        try:
            mine["sets"] = _build_and_save(build, path, key, lambda m: print(m, flush=True))
        except Exception as exc:
            fail = agree.failure(exc)
    agree.raise_first(agree.gather(fail))
    if mine["sets"] is None:  # after this node's local rank 0 wrote the file
        mine["sets"], why = load(path, key)
        if mine["sets"] is None:
            fail = ("RuntimeError", f"rank {rank} could not read the tokenised data its node's local rank 0 wrote: "
                                    f"{why}")
    agree.raise_first(agree.gather(fail))
    return mine["sets"]
