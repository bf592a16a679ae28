"""Cached DPO reference log-probabilities (recipes/posttrain/reference.py) against a frozen model copy.

The cache is filled by the initial policy over exactly the batches the run scores, so every cached
number is the one the copy computes in the same micro-step from the same weights, inputs and kernels:
the DPO losses must be equal bit for bit (tolerance 0), and the float64 storage round-trips fp32.
The last test checks the same on a whole 2-rank job (every train and eval metric equal).
"""
import copy

import pytest
import torch

from recipes.posttrain import data, reference
from recipes.posttrain.trainer import Objective
from tests.launching import require_shared_data


@pytest.fixture(scope="module")
def setup():
    model_dir = require_shared_data("models", "stories260K")
    pairs = require_shared_data("dpo", "hh_rlhf_harmless_base_test_pairs.jsonl")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    sets = data.Tokeniser(tokenizer, 96, "truncate").dpo(data.load_records(str(pairs), "dpo")[:20])
    return model, sets.examples


def _batches(examples, steps=5):
    order = data.MicroBatchOrder(len(examples), 2, 1, seed=0)
    train = list(reference.training_batches(examples, order, steps, 0, pad=0))
    return train, train + list(reference.eval_batches(examples[:6], 4, 0, 1, pad=0))


def test_cached_dpo_losses_equal_the_copy_bit_for_bit(setup, tmp_path):
    model, examples = setup
    policy = copy.deepcopy(model)
    copied = reference.ModelReference(copy.deepcopy(model).eval().requires_grad_(False))
    train, scored = _batches(examples)
    cached = reference.precompute(policy, lambda: scored, "cpu", tmp_path / "rank0.pt", key="k")
    with torch.no_grad():  # the policy moves away from the reference, as training does
        for p in policy.parameters():
            p.add_(0.01 * torch.randn_like(p))
    with_copy, with_cache = Objective("dpo", 0.1, copied), Objective("dpo", 0.1, cached)
    for batch in train:
        logits = policy(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        a, b = with_copy._dpo(logits, batch), with_cache._dpo(logits, batch)
        assert torch.equal(a.loss, b.loss) and torch.equal(a.margin, b.margin)
        assert a.loss.abs().sum() > 0


def test_cache_is_reused_for_the_same_key_and_recomputed_for_another(setup, tmp_path):
    model, examples = setup
    _, scored = _batches(examples)
    first = reference.precompute(model, lambda: scored, "cpu", tmp_path / "rank0.pt", key="k")

    class Refuses(torch.nn.Module):
        def forward(self, **_):
            raise AssertionError("the cache should have answered")

    again = reference.precompute(Refuses(), lambda: scored, "cpu", tmp_path / "rank0.pt", key="k")
    assert again.table == first.table
    calls = []

    class Counts(torch.nn.Module):
        def forward(self, **batch):
            calls.append(1)
            return model(**batch)

    other = reference.precompute(Counts(), lambda: scored, "cpu", tmp_path / "rank0.pt", key="another model")
    assert len(calls) == len(scored) and other.table == first.table


def test_fingerprint_changes_with_the_weights_and_settings(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors").write_bytes(b"1234")
    base = reference.fingerprint(str(tmp_path), torch.float32, max_length=128)
    assert reference.fingerprint(str(tmp_path), torch.float32, max_length=256) != base
    assert reference.fingerprint(str(tmp_path), torch.bfloat16, max_length=128) != base
    (tmp_path / "model.safetensors").write_bytes(b"12345")
    assert reference.fingerprint(str(tmp_path), torch.float32, max_length=128) != base


def test_a_batch_that_was_not_scored_is_refused(setup, tmp_path):
    model, examples = setup
    _, scored = _batches(examples)
    cached = reference.precompute(model, lambda: scored[:1], "cpu", tmp_path / "rank0.pt", key="k")
    with pytest.raises(KeyError, match="no cached reference log-probability"):
        cached.logprobs(data.collate(examples[-3:], "dpo", 0))


@pytest.mark.slow
def test_a_2_rank_dpo_job_is_the_same_with_the_cached_reference_and_the_copy(tmp_path):
    from recipes.posttrain.metrics import read_metrics
    from tests.launching import run_ranks

    shared = require_shared_data("models", "stories260K").parents[1]
    require_shared_data("dpo", "hh_rlhf_harmless_base_test_pairs.jsonl")
    run_ranks("scale_dpo_reference.py", [tmp_path, shared], nproc=2, launcher="torchrun", timeout=600)
    cached, copied = (read_metrics(tmp_path / m / "metrics.jsonl") for m in ("cached", "copy"))
    drop = ("wall_clock",)
    assert [{k: v for k, v in r.items() if k not in drop} for r in cached] == \
           [{k: v for k, v in r.items() if k not in drop} for r in copied]
    assert any(r["kind"] == "eval" and r["micro_step"] == 8 for r in cached)
    assert (tmp_path / "cached" / "reference_logprobs" / "rank1.pt").exists()
    assert not (tmp_path / "copy" / "reference_logprobs").exists()
