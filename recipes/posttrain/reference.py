"""The DPO reference: log-probabilities of the frozen initial model, computed once and cached, or a model copy.

DPO needs ``log pi_ref(y | x)`` of every chosen and rejected sequence it trains or evaluates on. The
reference is the policy before training, so those numbers are fixed before the first step:
:func:`precompute` runs the initial policy once over exactly the micro-batches the run will train on
(this rank's, for every micro-step) and the batches evaluation will score, with no gradient, and
:class:`CachedReference` looks each row up by the digest of its tokens. No second model lives on
any rank, and under ZeRO-3 / FSDP2 the pass uses the policy's own sharded parameters.

Because the batches are the ones training will see, padded the same way, each cached number is the
one a reference copy would have computed in the same micro-step (same weights, same inputs, same
kernels). The cache lives next to the run (``<output-dir>/reference_logprobs/rank<r>.pt``) and is
reused by ``--resume`` and reruns; it is recomputed when its fingerprint differs: the model (its
directory, ``config.json`` and weight files' names, sizes and modification times), the dtype, the
world size, the micro-batch and eval-batch sizes, the seed, the max length and the overlong policy.
Rows whose tokens are not in the cache (the data changed) are computed in the same pass.

:class:`ModelReference` is the previous design, a frozen full copy on every rank (``--dpo-reference
copy``): 1x the model's parameters per rank, plus one more forward per micro-step during training.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Callable, Dict, Iterable, List

import torch
import torch.distributed as dist

from . import data
from .losses import sequence_logprobs


def row_digests(batch: Dict[str, torch.Tensor]) -> List[str]:
    """One digest per row of a collated batch: its unpadded input ids and labels (right padding)."""
    ids, labels = batch["input_ids"].cpu(), batch["labels"].cpu()
    lengths = batch["attention_mask"].cpu().sum(-1).tolist()
    out = []
    for row, n in enumerate(lengths):
        h = hashlib.sha1(ids[row, :n].numpy().tobytes())
        h.update(labels[row, :n].numpy().tobytes())
        out.append(h.hexdigest())
    return out


class ModelReference:
    """A frozen full copy of the initial model (on every rank)."""

    def __init__(self, model: torch.nn.Module):
        self.model = model

    @torch.no_grad()
    def logprobs(self, batch: Dict[str, torch.Tensor]) -> torch.Tensor:
        logits = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return sequence_logprobs(logits, batch["labels"])


class CachedReference:
    """Reference log-probabilities looked up by row digest (built by :func:`precompute`)."""

    def __init__(self, table: Dict[str, float]):
        self.table = table

    def logprobs(self, batch: Dict[str, torch.Tensor]) -> torch.Tensor:
        digests = row_digests(batch)
        missing = [i for i, d in enumerate(digests) if d not in self.table]
        if missing:
            raise KeyError(f"no cached reference log-probability for rows {missing} of this batch: the batch is not "
                           f"one precompute() scored (a micro-step beyond --micro-steps, or changed data)")
        # float64 holds the scored value exactly; the objective casts it to the policy's log-prob dtype
        return torch.tensor([self.table[d] for d in digests], dtype=torch.float64, device=batch["input_ids"].device)


def fingerprint(model: str, dtype: torch.dtype, **settings) -> str:
    """What the cached numbers depend on besides the tokens; a change recomputes them all."""
    facts = {"model": model, "dtype": str(dtype), **settings}
    path = Path(model)
    if path.is_dir():
        config = path / "config.json"
        facts["config"] = hashlib.sha1(config.read_bytes()).hexdigest() if config.exists() else None
        facts["weights"] = sorted((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in path.iterdir()
                                  if f.suffix in (".safetensors", ".bin", ".pt"))
    return hashlib.sha1(json.dumps(facts, sort_keys=True, default=str).encode()).hexdigest()


def training_batches(examples, order: data.MicroBatchOrder, micro_steps: int, rank: int, pad: int) -> Iterable[dict]:
    """This rank's training micro-batches, collated as the training loop collates them."""
    for micro in range(micro_steps):
        yield data.collate([examples[i] for i in order.indices(micro, rank)], "dpo", pad)


def eval_batches(examples, batch_size: int, rank: int, world: int, pad: int) -> Iterable[dict]:
    """The batches ``trainer.evaluate`` scores on this rank (with its padding forwards, so counts match)."""
    for chunk, _ in data.lockstep_eval_batches(examples, batch_size, rank, world):
        yield data.collate(chunk, "dpo", pad)


@torch.no_grad()
def precompute(module: torch.nn.Module, batches: Callable[[], Iterable[dict]], device, cache_file: Path,
               key: str) -> CachedReference:
    """Score every row of the batches with ``module`` (the initial policy), reusing ``cache_file`` when its key matches.

    ``batches()`` yields the batches afresh on each call: they are collated twice (once for their
    digests, once to score those the cache lacks) rather than all held at once, which for a long run
    would be every micro-batch's tokens. Every rank must yield the same number of batches: a batch is
    run on all ranks when any rank lacks one of its rows, because ZeRO-3 and FSDP2 gather parameters
    collectively in forward.
    """
    table: Dict[str, float] = {}
    if cache_file.exists():
        saved = torch.load(cache_file, weights_only=True)
        if saved.get("key") == key:
            table = dict(zip(saved["digests"], saved["logprobs"].tolist()))
    digests = [row_digests(b) for b in batches()]
    needed = torch.tensor([any(d not in table for d in ds) for ds in digests], dtype=torch.int32, device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(needed)
    was_training = module.training
    module.eval()
    computed = 0
    for batch, ds, need in zip(batches(), digests, needed.tolist()):
        if not need:
            continue
        batch = {k: v.to(device) for k, v in batch.items()}
        logits = module(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        for d, value in zip(ds, sequence_logprobs(logits, batch["labels"]).double().tolist()):
            table[d] = value
        computed += 1
    module.train(was_training)
    if computed:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        names = sorted(table)
        tmp = cache_file.with_suffix(".tmp")
        torch.save({"key": key, "digests": names, "logprobs": torch.tensor([table[n] for n in names], dtype=torch.float64)}, tmp)
        tmp.replace(cache_file)
    return CachedReference(table)
