"""Records for SFT and DPO: load (local JSONL or a hub dataset), validate, split, tokenise, batch.

Every problem with a data file is reported before training starts: a file that is empty, not
JSON, or misses a field raises :class:`DataError` naming the file, the line and the field; records
longer than ``max_length`` tokens are truncated, skipped or rejected by policy, and the counts are
reported (see :class:`TokenisedSet`), never silently dropped.

The data order is a pure function of ``(seed, micro_step)``: micro-step ``m`` of every optimizer
reads the same records on the same ranks, so PMA and gradient-accumulation runs see identical data
and a resumed run continues exactly where the checkpoint left off without saving sampler state.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Sequence

import numpy as np
import torch

SFT_FIELDS = ("instruction", "output")  # "input" is optional (Alpaca convention)
DPO_FIELDS = ("prompt", "chosen", "rejected")
TASK_FIELDS = {"sft": SFT_FIELDS, "dpo": DPO_FIELDS}
OVERLONG_POLICIES = ("truncate", "skip", "error")
IGNORE_INDEX = -100
#: the held-out split uses its own fixed seed so that changing ``--seed`` never moves records
#: between train and eval
HOLDOUT_SEED = 20240601


class DataError(ValueError):
    """A data file or record that cannot be used; the message names the file, line and field."""


# ---------------------------------------------------------------------------------------- loading
def looks_local(source: str) -> bool:
    """A path (exists, has a JSON suffix, or is explicitly relative/absolute); else a hub name like org/name."""
    return (Path(source).exists() or source.endswith((".jsonl", ".json"))
            or source.startswith(("/", "./", "../", "~")))


def load_records(source: str, task: str, *, split: str = "train") -> List[dict]:
    """Records of ``task`` from a local ``.jsonl``/``.json`` file or a Hugging Face hub dataset name."""
    if task not in TASK_FIELDS:
        raise DataError(f"unknown task {task!r}; expected 'sft' or 'dpo'")
    if looks_local(source):
        records = _read_local(Path(source))
        where = str(source)
    else:
        records = _read_hub(source, split)
        where = f"hub dataset {source!r} (split {split!r})"
    if not records:
        raise DataError(f"{where} holds no records (empty file?); a {task} data file needs at least one")
    for index, record in enumerate(records):
        if not isinstance(record, dict):
            raise DataError(f"{where} record {index + 1}: expected a JSON object, got {type(record).__name__}")
        place = f"{where} line {record['_line']}" if "_line" in record else f"{where} record {index + 1}"
        validate_record(record, task, where=place)
    return records


def _read_local(path: Path) -> List[dict]:
    if not path.exists():
        raise DataError(f"data file not found: {path}")
    if path.is_dir():
        raise DataError(f"data path {path} is a directory; expected a .jsonl or .json file")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        column = exc.start - (raw.rfind(b"\n", 0, exc.start) + 1) + 1
        raise DataError(f"{path} line {line}: not UTF-8 (byte 0x{raw[exc.start]:02x} at column {column}); "
                        f"re-encode the file as UTF-8, e.g. iconv -f latin1 -t utf-8") from None
    if path.suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}: not valid JSON ({exc})") from None
        if not isinstance(data, list):
            raise DataError(f"{path}: a .json data file must hold a list of records, got {type(data).__name__}")
        return data
    records = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path} line {number}: not valid JSON ({exc.msg} at column {exc.colno})") from None
        if not isinstance(record, dict):
            raise DataError(f"{path} line {number}: expected a JSON object, got {type(record).__name__}")
        record["_line"] = number
        records.append(record)
    return records


def _read_hub(name: str, split: str) -> List[dict]:
    import datasets

    try:
        dataset = datasets.load_dataset(name, split=split)
    except Exception as exc:  # offline, unknown name, no such split: all end the run here
        raise DataError(f"could not load hub dataset {name!r} split {split!r}: {type(exc).__name__}: {exc}") from None
    return [dict(r) for r in dataset]


def validate_record(record: dict, task: str, *, where: str) -> None:
    for name in TASK_FIELDS[task]:
        if name not in record:
            raise DataError(f"{where}: missing field {name!r} (a {task} record needs {', '.join(TASK_FIELDS[task])})")
        if not isinstance(record[name], str):
            raise DataError(f"{where}: field {name!r} must be a string, got {type(record[name]).__name__}")
    if task == "sft":
        if not isinstance(record.get("input", ""), str):
            raise DataError(f"{where}: field 'input' must be a string, got {type(record['input']).__name__}")
        if not record["output"].strip():
            raise DataError(f"{where}: field 'output' is empty (nothing to train on)")
    else:
        if not record["chosen"].strip() or not record["rejected"].strip():
            raise DataError(f"{where}: 'chosen' and 'rejected' must both be non-empty")


def holdout_split(records: Sequence[dict], eval_size: int) -> tuple:
    """Deterministic (train, eval) split: a fixed-seed permutation, the first ``eval_size`` are eval."""
    train, evals, _ = holdout_splits(records, eval_size, 0)
    return train, evals


def holdout_splits(records: Sequence[dict], eval_size: int, select_size: int) -> tuple:
    """(train, eval, select): the permutation's first ``eval_size`` records are eval, the next ``select_size``
    the select split. The eval split does not depend on ``select_size``; train loses the select records."""
    if eval_size < 1:
        raise DataError(f"eval size must be >= 1 to hold out records, got {eval_size}")
    if select_size < 0:
        raise DataError(f"select size must be >= 0, got {select_size}")
    if eval_size + select_size >= len(records):
        held = f"{eval_size} eval" + (f" + {select_size} select" if select_size else "")
        raise DataError(f"cannot hold out {held} records from only {len(records)}; pass --eval-data or a smaller "
                        f"--eval-size" + (" / --select-size" if select_size else ""))
    order = np.random.RandomState(HOLDOUT_SEED).permutation(len(records)).tolist()
    held, chosen = set(order[:eval_size]), set(order[eval_size:eval_size + select_size])
    train = [r for i, r in enumerate(records) if i not in held and i not in chosen]
    return train, [records[i] for i in sorted(held)], [records[i] for i in sorted(chosen)]


# ---------------------------------------------------------------------------------------- tokenising
SFT_TEMPLATE = "### Instruction:\n{instruction}\n\n{input_block}### Response:\n"


def sft_prompt(record: dict) -> str:
    extra = record.get("input", "") or ""
    input_block = f"### Input:\n{extra}\n\n" if extra.strip() else ""
    return SFT_TEMPLATE.format(instruction=record["instruction"], input_block=input_block)


@dataclass
class TokenisedSet:
    """Token ids ready to batch, with the report of what the length policy did."""

    task: str
    examples: List[dict]
    total: int
    truncated: int = 0  # records (a DPO pair counts once, whichever of its sides was cut)
    skipped: int = 0
    source: str = ""
    degenerate: List[str] = field(default_factory=list)  # DPO: where chosen == rejected after tokenising

    def report(self) -> str:
        text = (f"{self.source}: {len(self.examples)} of {self.total} {self.task} records used "
                f"({self.truncated} truncated, {self.skipped} skipped as longer than max length")
        if self.task == "dpo":
            text += (f", {len(self.degenerate)} degenerate pairs with chosen == rejected, which train at loss "
                     f"ln 2 with zero gradient")
        return text + ")"


class Tokeniser:
    """Turns records into ids; the prompt is tokenised apart from the response so the loss mask is exact."""

    def __init__(self, tokenizer, max_length: int, overlong: str = "truncate", max_degenerate: float = 0.05):
        self.max_degenerate = max_degenerate  # DPO: the largest fraction of chosen == rejected pairs accepted
        if overlong not in OVERLONG_POLICIES:
            raise DataError(f"unknown overlong policy {overlong!r}; expected one of {OVERLONG_POLICIES}")
        if max_length < 8:
            raise DataError(f"max length {max_length} is too small (need >= 8 tokens)")
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.overlong = overlong
        self.bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
        if tokenizer.eos_token_id is None:
            raise DataError("the tokenizer has no eos token; SFT/DPO responses must end with one")
        self.eos = tokenizer.eos_token_id

    def _fit(self, prompt: List[int], response: List[int], where: str):
        """(bos + prompt, response) within max_length, or None to skip; raises under 'error'.

        Truncation keeps the response's beginning (at least half the budget when it is that long)
        and the prompt's end (the turns nearest the response), as TRL's ``keep_end`` does.
        """
        budget = self.max_length - len(self.bos)
        if len(prompt) + len(response) <= budget:
            return self.bos + prompt, response, False
        if self.overlong == "error":
            raise DataError(f"{where}: {len(self.bos) + len(prompt) + len(response)} tokens, longer than max "
                            f"length {self.max_length} (use --overlong truncate|skip or a larger --max-length)")
        if self.overlong == "skip":
            return None
        keep_response = min(len(response), max(budget - len(prompt), budget // 2))
        keep_prompt = budget - keep_response
        return self.bos + prompt[max(0, len(prompt) - keep_prompt):], response[:keep_response], True

    def _ids_many(self, texts: List[str]) -> List[List[int]]:
        # one batched call: the fast tokenizers encode lists in parallel Rust, far quicker than a loop
        return self.tokenizer(list(texts), add_special_tokens=False, verbose=False)["input_ids"] if texts else []

    def sft(self, records: Sequence[dict], source: str = "") -> TokenisedSet:
        out = TokenisedSet("sft", [], len(records), source=source)
        prompts = self._ids_many([sft_prompt(r) for r in records])
        responses = self._ids_many([r["output"] for r in records])
        for index, record in enumerate(records):
            where = f"{source} line {record.get('_line', index + 1)}"
            fitted = self._fit(prompts[index], responses[index] + [self.eos], where)
            if fitted is None:
                out.skipped += 1
                continue
            prompt, response, cut = fitted
            out.truncated += cut
            out.examples.append({"input_ids": prompt + response,
                                 "labels": [IGNORE_INDEX] * len(prompt) + response})
        self._check_nonempty(out)
        return out

    def dpo(self, records: Sequence[dict], source: str = "") -> TokenisedSet:
        out = TokenisedSet("dpo", [], len(records), source=source)
        prompts = self._ids_many([r["prompt"] for r in records])
        sides = {side: self._ids_many([r[side] for r in records]) for side in ("chosen", "rejected")}
        for index, record in enumerate(records):
            where = f"{source} line {record.get('_line', index + 1)}"
            prompt = prompts[index]
            pair, cut_any = {}, False
            for side in ("chosen", "rejected"):
                fitted = self._fit(prompt, sides[side][index] + [self.eos], where)
                if fitted is None:
                    break
                p, response, cut = fitted
                cut_any |= cut
                pair[side] = {"input_ids": p + response, "labels": [IGNORE_INDEX] * len(p) + response}
            if len(pair) < 2:
                out.skipped += 1
                continue
            out.truncated += cut_any
            if pair["chosen"]["input_ids"] == pair["rejected"]["input_ids"]:
                out.degenerate.append(where)
            out.examples.append(pair)
        self._check_nonempty(out)
        self._check_degenerate(out)
        return out

    def _check_degenerate(self, out: TokenisedSet) -> None:
        if len(out.degenerate) > self.max_degenerate * len(out.examples):
            shown = ", ".join(out.degenerate[:3]) + (", ..." if len(out.degenerate) > 3 else "")
            raise DataError(f"{out.source}: {len(out.degenerate)} of {len(out.examples)} DPO pairs have chosen == "
                            f"rejected (after tokenising and truncation; e.g. {shown}); they train at loss ln 2 with "
                            f"zero gradient: fix the data, or raise --max-degenerate-pairs (now {self.max_degenerate})")

    def _check_nonempty(self, out: TokenisedSet) -> None:
        if not out.examples:
            raise DataError(f"{out.source}: all {out.total} records are longer than max length {self.max_length} "
                            f"tokens and were skipped; raise --max-length or use --overlong truncate")



# ---------------------------------------------------------------------------------------- batching
def pad_batch(examples: Sequence[dict], pad_id: int) -> Dict[str, torch.Tensor]:
    """Right-pad to the longest example; padded positions are masked out of attention and loss."""
    width = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, e in enumerate(examples):
        n = len(e["input_ids"])
        ids[row, :n] = torch.tensor(e["input_ids"])
        labels[row, :n] = torch.tensor(e["labels"])
        mask[row, :n] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def collate(examples: Sequence[dict], task: str, pad_id: int) -> Dict[str, torch.Tensor]:
    if task == "sft":
        return pad_batch(examples, pad_id)
    # chosen rows first, then rejected rows: one forward pass scores both halves of every pair
    return pad_batch([e["chosen"] for e in examples] + [e["rejected"] for e in examples], pad_id)


@dataclass
class MicroBatchOrder:
    """Which examples rank ``r`` reads at micro-step ``m``: global batch ``m`` of an epoch-wise shuffle.

    A global micro-batch holds ``micro_batch_size * world_size`` examples; rank ``r`` takes the
    ``r``-th slice. Each epoch is a fresh permutation seeded by ``(seed, epoch)``; the last partial
    global batch of an epoch is dropped so every micro-step has the same size.
    """

    num_examples: int
    micro_batch_size: int
    world_size: int
    seed: int
    _cache: Dict[int, np.ndarray] = field(default_factory=dict, repr=False)

    def __post_init__(self):
        if self.steps_per_epoch < 1:
            raise DataError(f"{self.num_examples} training examples are fewer than one global micro-batch "
                            f"({self.micro_batch_size} x {self.world_size} ranks)")

    @property
    def global_batch(self) -> int:
        return self.micro_batch_size * self.world_size

    @property
    def steps_per_epoch(self) -> int:
        return self.num_examples // self.global_batch

    def indices(self, micro_step: int, rank: int) -> List[int]:
        epoch, within = divmod(micro_step, self.steps_per_epoch)
        if epoch not in self._cache:
            self._cache = {epoch: np.random.RandomState([self.seed % 2**32, epoch]).permutation(self.num_examples)}
        start = within * self.global_batch + rank * self.micro_batch_size
        return self._cache[epoch][start : start + self.micro_batch_size].tolist()


def eval_batches(examples: Sequence[dict], batch_size: int, rank: int, world_size: int):
    """This rank's share of the eval set (strided, so every example is evaluated exactly once)."""
    mine = list(examples[rank::world_size])
    for start in range(0, len(mine), batch_size):
        yield mine[start : start + batch_size]


def lockstep_eval_batches(examples: Sequence[dict], batch_size: int, rank: int, world_size: int):
    """``(batch, counts)`` for as many batches as rank 0 has (the most): FSDP2 and ZeRO-3 all-gather
    parameters in every forward, so every rank must run as many forwards; a rank's extra ones repeat
    the first example and have ``counts`` False (their results are discarded)."""
    mine = list(eval_batches(examples, batch_size, rank, world_size))
    most = len(list(eval_batches(examples, batch_size, 0, world_size)))
    for index in range(most):
        yield (mine[index], True) if index < len(mine) else (list(examples[:1]), False)
