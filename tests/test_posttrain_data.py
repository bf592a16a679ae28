"""Data loading, validation, the held-out split, tokenisation policies, batch order; checkpoint guards."""
import json

import pytest
import torch

from recipes.posttrain import checkpoints, data, fallback
from recipes.posttrain.data import IGNORE_INDEX, DataError


def _write(path, lines):
    path.write_text("".join(line + "\n" for line in lines))
    return path


def _sft(i, **extra):
    return json.dumps(dict({"instruction": f"do {i}", "input": "", "output": f"done {i}"}, **extra))


@pytest.fixture(scope="module")
def tokenizer():
    return fallback.char_tokenizer()


# ------------------------------------------------------------------ bad files
def test_empty_file_is_an_error_naming_it(tmp_path):
    path = _write(tmp_path / "empty.jsonl", [])
    with pytest.raises(DataError, match=r"empty\.jsonl.*no records"):
        data.load_records(str(path), "sft")


def test_missing_field_names_file_line_and_field(tmp_path):
    path = _write(tmp_path / "bad.jsonl", [_sft(0), json.dumps({"instruction": "x", "input": ""})])
    with pytest.raises(DataError, match=r"bad\.jsonl line 2: missing field 'output'"):
        data.load_records(str(path), "sft")


def test_dpo_missing_rejected(tmp_path):
    path = _write(tmp_path / "pairs.jsonl", [json.dumps({"prompt": "p", "chosen": "a"})])
    with pytest.raises(DataError, match=r"pairs\.jsonl line 1: missing field 'rejected'"):
        data.load_records(str(path), "dpo")


def test_invalid_json_line(tmp_path):
    path = _write(tmp_path / "broken.jsonl", [_sft(0), '{"instruction": "x", '])
    with pytest.raises(DataError, match=r"broken\.jsonl line 2: not valid JSON"):
        data.load_records(str(path), "sft")


def test_non_string_field_and_empty_output(tmp_path):
    with pytest.raises(DataError, match=r"line 1: field 'output' must be a string, got int"):
        data.load_records(str(_write(tmp_path / "a.jsonl", [json.dumps({"instruction": "x", "output": 3})])), "sft")
    with pytest.raises(DataError, match=r"line 1: field 'output' is empty"):
        data.load_records(str(_write(tmp_path / "b.jsonl", [json.dumps({"instruction": "x", "output": " "})])), "sft")


def test_missing_file_and_unknown_hub_name(tmp_path):
    with pytest.raises(DataError, match="data file not found"):
        data.load_records(str(tmp_path / "nope.jsonl"), "sft")
    with pytest.raises(DataError, match="could not load hub dataset 'no-such-org-xyz/no-such-set'"):
        data.load_records("no-such-org-xyz/no-such-set", "sft")


# ------------------------------------------------------------------ split and tokenising
def test_holdout_split_is_deterministic_and_disjoint():
    records = [{"i": i} for i in range(100)]
    train, evals = data.holdout_split(records, 10)
    train2, evals2 = data.holdout_split(records, 10)
    assert evals == evals2 and train == train2
    assert len(evals) == 10 and len(train) == 90
    assert {r["i"] for r in train}.isdisjoint({r["i"] for r in evals})
    with pytest.raises(DataError, match="cannot hold out 100 eval records from only 100"):
        data.holdout_split(records, 100)


def test_select_split_leaves_the_eval_split_as_it_was():
    records = [{"i": i} for i in range(100)]
    _, evals = data.holdout_split(records, 10)
    train, evals2, select = data.holdout_splits(records, 10, 15)
    assert evals2 == evals and len(select) == 15 and len(train) == 75
    ids = [{r["i"] for r in part} for part in (train, evals2, select)]
    assert ids[0] | ids[1] | ids[2] == set(range(100)) and not (ids[0] & ids[2]) and not (ids[1] & ids[2])
    with pytest.raises(DataError, match="cannot hold out 10 eval \\+ 90 select records from only 100"):
        data.holdout_splits(records, 10, 90)


def test_sft_labels_mask_the_prompt(tokenizer):
    tok = data.Tokeniser(tokenizer, max_length=200)
    out = tok.sft([{"instruction": "rev", "input": "ab", "output": "ba"}], "mem")
    ex = out.examples[0]
    response = [i for i, l in zip(ex["input_ids"], ex["labels"]) if l != IGNORE_INDEX]
    assert tokenizer.decode(response[:-1]) == "ba" and response[-1] == tokenizer.eos_token_id
    assert ex["input_ids"][0] == tokenizer.bos_token_id
    assert tokenizer.decode(ex["input_ids"][1:len(ex["input_ids"]) - 3]) == data.sft_prompt(
        {"instruction": "rev", "input": "ab"})


def test_overlong_policies_count_and_report(tokenizer):
    records = [{"instruction": "x", "input": "", "output": "y" * n} for n in (5, 100, 10)]
    skip = data.Tokeniser(tokenizer, max_length=60, overlong="skip").sft(records, "f.jsonl")
    assert (len(skip.examples), skip.skipped, skip.truncated) == (2, 1, 0)
    assert "2 of 3 sft records used (0 truncated, 1 skipped" in skip.report()
    cut = data.Tokeniser(tokenizer, max_length=60, overlong="truncate").sft(records, "f.jsonl")
    assert (len(cut.examples), cut.truncated) == (3, 1)
    assert max(len(e["input_ids"]) for e in cut.examples) == 60
    with pytest.raises(DataError, match=r"f\.jsonl line 2: .* longer than max length 60"):
        data.Tokeniser(tokenizer, max_length=60, overlong="error").sft(records, "f.jsonl")
    with pytest.raises(DataError, match="all 1 records are longer than max length 20"):
        data.Tokeniser(tokenizer, max_length=20, overlong="skip").sft(records[1:2], "g.jsonl")


def test_dpo_truncation_keeps_prompt_end_and_response_start(tokenizer):
    record = {"prompt": "a" * 50 + "END", "chosen": "c" * 40, "rejected": "r" * 5}
    out = data.Tokeniser(tokenizer, max_length=32, overlong="truncate").dpo([record], "p.jsonl")
    chosen = out.examples[0]["chosen"]
    assert len(chosen["input_ids"]) == 32
    text = tokenizer.decode(chosen["input_ids"][1:])
    assert text.startswith("a") and "ENDccc" in text  # the prompt's end survives, then the response start


def test_batches_follow_micro_step_not_history():
    order = data.MicroBatchOrder(num_examples=50, micro_batch_size=3, world_size=2, seed=7)
    assert order.steps_per_epoch == 8
    first = [order.indices(m, r) for m in range(8) for r in range(2)]
    flat = [i for chunk in first for i in chunk]
    assert len(set(flat)) == 48  # one epoch: no repeats
    fresh = data.MicroBatchOrder(num_examples=50, micro_batch_size=3, world_size=2, seed=7)
    assert fresh.indices(11, 1) == order.indices(11, 1)  # resume at micro-step 11 reads the same batch
    assert data.MicroBatchOrder(50, 3, 2, seed=8).indices(0, 0) != order.indices(0, 0)
    with pytest.raises(DataError, match="fewer than one global micro-batch"):
        data.MicroBatchOrder(num_examples=5, micro_batch_size=3, world_size=2, seed=0)


def test_pad_batch_masks_padding():
    batch = data.pad_batch([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [5], "labels": [5]}],
                           pad_id=2)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [5, 2, 2]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [5, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]


# ------------------------------------------------------------------ checkpoint guards
def _fake_checkpoint(tmp_path):
    tag = tmp_path / "micro00000008"
    tag.mkdir()
    torch.save({"w": torch.arange(4.0)}, tag / "mp_rank_00_model_states.pt")
    checkpoints.write_manifest(tag, {"micro_step": 8})
    checkpoints.publish(tmp_path, tag.name, keep=2, lineage="run-a")
    return tag


def test_checkpoint_verify_and_safe_load(tmp_path):
    tag = _fake_checkpoint(tmp_path)
    assert checkpoints.latest_tag(tmp_path) == tag.name
    assert checkpoints.verify(tag) == {"micro_step": 8}
    assert torch.equal(checkpoints.load_file(str(tag / "mp_rank_00_model_states.pt"))["w"], torch.arange(4.0))


def test_truncated_checkpoint_names_the_file(tmp_path):
    tag = _fake_checkpoint(tmp_path)
    target = tag / "mp_rank_00_model_states.pt"
    target.write_bytes(target.read_bytes()[:-10])
    with pytest.raises(checkpoints.CheckpointError, match=r"truncated or changed: .*mp_rank_00_model_states\.pt"):
        checkpoints.verify(tag)
    with pytest.raises(checkpoints.CheckpointError, match=r"mp_rank_00_model_states\.pt: truncated or corrupted"):
        checkpoints.load_file(str(target))


def test_corrupted_checkpoint_same_size_names_the_file(tmp_path):
    tag = _fake_checkpoint(tmp_path)
    target = tag / "mp_rank_00_model_states.pt"
    raw = bytearray(target.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    target.write_bytes(bytes(raw))
    with pytest.raises(checkpoints.CheckpointError, match=r"corrupted: .*mp_rank_00_model_states\.pt"):
        checkpoints.verify(tag)


def test_unsafe_pickle_is_refused_unless_trusted(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"obj": Exploding()}, path)
    with pytest.raises(checkpoints.CheckpointError, match=r"evil\.pt: refusing to unpickle"):
        checkpoints.load_file(str(path))
    assert isinstance(checkpoints.load_file(str(path), trust=True)["obj"], Exploding)


def test_incomplete_checkpoint_without_manifest(tmp_path):
    (tmp_path / "micro00000016").mkdir()
    with pytest.raises(checkpoints.CheckpointError, match=r"micro00000016 has no manifest\.json"):
        checkpoints.verify(tmp_path / "micro00000016")


class Exploding:
    """A class a weights-only load must not instantiate."""
