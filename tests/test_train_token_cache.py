"""Tokenise once per run: the cache file's round trip, key and integrity; one tokenising rank of two."""
import json

import pytest

from recipes.posttrain import config, data, fallback, token_cache, trainer
from tests.launching import SHARED_DATA, run_ranks


@pytest.fixture(scope="module")
def tokenizer():
    return fallback.char_tokenizer()


def _sets(task, tokenizer, max_length=64):
    records = fallback.synthetic_records(task, 64, seed=3)
    tok = data.Tokeniser(tokenizer, max_length, "truncate", max_degenerate=1.0)
    encode = tok.sft if task == "sft" else tok.dpo
    return {"train": encode(records[:48], "train.jsonl"), "eval": encode(records[48:], "eval")}


def _cfg(tmp_path, *extra):
    return config.resolve(["--model", "builtin-fallback", "--max-length", "64", "--output-dir", str(tmp_path)]
                          + list(extra))


@pytest.mark.parametrize("task", ["sft", "dpo"])
def test_round_trip_keeps_ids_counts_and_lines(tmp_path, tokenizer, task):
    sets = _sets(task, tokenizer, max_length=24)  # short: some records are truncated
    sets["train"].degenerate.append("train.jsonl line 7")  # carried through like any found pair
    path = tmp_path / token_cache.FILE
    token_cache.save(path, "k", sets)
    loaded, why = token_cache.load(path, "k")
    assert why == ""
    assert sets["train"].truncated > 0
    for split in ("train", "eval"):
        assert loaded[split] == sets[split]  # dataclass equality: examples, total, counts, source, degenerate
    assert [p.name for p in tmp_path.iterdir()] == [token_cache.FILE]  # the temporary file was renamed


def test_another_key_or_a_damaged_file_is_never_used(tmp_path, tokenizer):
    path = tmp_path / token_cache.FILE
    token_cache.save(path, "k", _sets("sft", tokenizer))
    assert token_cache.load(path, "other") == (None, f"the tokenised cache {path} was written for other data or settings")
    raw = path.read_bytes()
    # a flipped byte in a token id: torch.load reads it without complaint, the content digest catches it
    packed = token_cache._pack(_sets("sft", tokenizer)["train"])
    ids = packed["columns"]["input_ids"]["values"].numpy().tobytes()
    at = raw.find(ids[:64])
    assert at > 0
    flipped = bytearray(raw)
    flipped[at + 5] ^= 0x01
    path.write_bytes(bytes(flipped))
    found, why = token_cache.load(path, "k")
    assert found is None and "corrupted" in why
    path.write_bytes(raw[: len(raw) // 2])
    found, why = token_cache.load(path, "k")
    assert found is None and "unreadable" in why
    assert token_cache.load(tmp_path / "absent.pt", "k") == (None, f"no tokenised cache at {tmp_path / 'absent.pt'}")


def test_fingerprint_changes_with_every_setting_and_the_data_file(tmp_path, tokenizer):
    records = tmp_path / "train.jsonl"
    records.write_text("".join(json.dumps({"instruction": f"i{i}", "output": f"o{i}"}) + "\n" for i in range(40)))
    base = ["--train-data", str(records)]
    key = token_cache.fingerprint(_cfg(tmp_path, *base), tokenizer)
    assert token_cache.fingerprint(_cfg(tmp_path, *base), tokenizer) == key
    for extra in (["--max-length", "96"], ["--overlong", "skip"], ["--eval-size", "8"], ["--max-train-records", "9"],
                  ["--max-degenerate-pairs", "0.5"], ["--eval-data", str(records)]):
        assert token_cache.fingerprint(_cfg(tmp_path, *base, *extra), tokenizer) != key, extra
    records.write_text(records.read_text() + json.dumps({"instruction": "x", "output": "y"}) + "\n")
    assert token_cache.fingerprint(_cfg(tmp_path, *base), tokenizer) != key


def test_one_process_tokenises_once_then_reads(tmp_path, tokenizer):
    built = []

    def build():
        built.append(1)
        return _sets("sft", tokenizer)

    path = tmp_path / token_cache.FILE
    first = token_cache.load_once(build, path, "k", local_rank=0, say=lambda m: None)
    again = token_cache.load_once(build, path, "k", local_rank=0, say=lambda m: None)
    assert len(built) == 1 and first == again


def test_the_cache_sits_in_the_run_dir(tmp_path):
    cfg = _cfg(tmp_path, "--eval-size", "16")
    trainer._DATASETS.clear()
    sets = trainer.load_datasets(cfg, fallback.char_tokenizer())
    assert (tmp_path / token_cache.FILE).is_file()
    assert token_cache.load(tmp_path / token_cache.FILE, token_cache.fingerprint(cfg, fallback.char_tokenizer()))[0] \
        == {"train": sets.train, "eval": sets.eval}
    trainer._DATASETS.clear()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("token_cache")
    run_ranks("token_cache_suite.py", [out, SHARED_DATA], nproc=2, launcher="torchrun", timeout=400)
    return [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]


@pytest.mark.slow
def test_two_ranks_get_todays_sets_with_one_tokenising(two_ranks):
    first, second = two_ranks
    for name in ("sft_first", "dpo_first", "sft_longer", "sft_back", "sft_corrupted", "sft_truncated"):
        a, b = first["cases"][name], second["cases"][name]
        assert a["digest"] == b["digest"], name
        assert a["same_as_per_rank"] and b["same_as_per_rank"], name  # token ids, counts, lines as before
        assert (a["tokenised"], b["tokenised"]) == (2, 0), name  # rank 0 only: train and eval, once each
    for name in ("sft_again", "dpo_again"):  # a second run reads the file
        assert (first["cases"][name]["tokenised"], second["cases"][name]["tokenised"]) == (0, 0)
        assert first["cases"][name]["digest"] == first["cases"][name.replace("again", "first")]["digest"]
    assert first["cases"]["sft_longer"]["digest"] != first["cases"]["sft_first"]["digest"]
    if first["real"]:  # alpaca records are long: a larger max length truncates fewer
        assert first["cases"]["sft_first"]["truncated"] > first["cases"]["sft_longer"]["truncated"]
    # disks not shared: each node's local rank 0 tokenises on its own disk
    assert [r["cases"]["own_disks"]["tokenised"] for r in two_ranks] == [2, 2]
    assert first["cases"]["own_disks"]["digest"] == second["cases"]["own_disks"]["digest"] \
        == first["cases"]["sft_first"]["digest"]


@pytest.mark.slow
def test_a_data_error_is_the_same_on_both_ranks(two_ranks):
    first, second = two_ranks
    assert first["errors"] == second["errors"]
    errors = first["errors"]
    assert errors["missing_field"] == errors["missing_field_per_rank"]
    assert "bad.jsonl line 21: missing field 'output'" in errors["missing_field"]
    assert errors["overlong"] == errors["overlong_per_rank"]
    assert "line 1:" in errors["overlong"] and "longer than max length 8" in errors["overlong"]


def test_tokenizer_files_are_keyed_by_content_weights_are_not(tmp_path, tokenizer):
    (tmp_path / "tokenizer.json").write_text('{"model": 1}')
    (tmp_path / "model.safetensors").write_bytes(b"w" * 10)
    before = token_cache._tokenizer_facts(str(tmp_path), tokenizer)
    (tmp_path / "model.safetensors").write_bytes(b"v" * 12)  # new weights: the same token ids
    assert token_cache._tokenizer_facts(str(tmp_path), tokenizer) == before
    (tmp_path / "tokenizer.json").write_text('{"model": 2}')
    assert token_cache._tokenizer_facts(str(tmp_path), tokenizer) != before
