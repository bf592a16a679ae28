"""The base-model pretraining recipe (launch/pretrain_base.py): input checks, then a real 2-rank run.

The launched run pretrains a tiny Llama on the first 40,000 characters of each shared text file and
must lower the held-out loss; the model it writes must load with transformers and fine-tune with
launch/train.py, which is how benchmarks/post_training.py --model uses it.
"""
import json
import math

import pytest

from recipes.posttrain import pretrain
from recipes.posttrain.config import ConfigError
from tests.launching import REPO, require_shared_data, run_ranks


class CharTokenizer:
    """Stand-in tokenizer: one id per character, EOS = 2."""

    eos_token_id = 2

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [3 + (ord(c) % 100) for c in text]}


def _args(tmp_path, *extra):
    return pretrain.build_parser().parse_args(["--output-dir", str(tmp_path / "out"), *extra])


def _text(tmp_path, name, content):
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    return str(path)


@pytest.mark.parametrize("flags, message", [
    (["--hidden-size", "100", "--heads", "8"], "--hidden-size 100 is not a multiple of --heads 8"),
    (["--heads", "8", "--kv-heads", "3"], "--heads 8 is not a multiple of --kv-heads 3"),
    (["--seq-len", "0"], "--seq-len must be >= 1, got 0"),
    (["--epochs", "0"], "--epochs must be > 0, got 0.0"),
    (["--lr", "-1"], "--lr must be > 0, got -1.0"),
    (["--val-fraction", "0.7"], "--val-fraction must be in (0, 0.5), got 0.7"),
    (["--max-steps", "0"], "--max-steps must be >= 1, got 0"),
    (["--text", "/nonexistent/corpus.txt"], "--text file not found: /nonexistent/corpus.txt"),
])
def test_bad_flags_are_named(tmp_path, flags, message):
    args = _args(tmp_path, "--text", _text(tmp_path, "a.txt", "hello world\n"), *flags)
    with pytest.raises(ConfigError) as err:
        pretrain.check_args(args)
    assert message in str(err.value)


def test_documents_per_line_for_articles_and_whole_file_for_verse(tmp_path):
    articles = _text(tmp_path, "wiki.txt", "A" * 600 + "\n\n" + "B" * 700 + "\n")
    verse = _text(tmp_path, "verse.txt", "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak.\n")
    assert pretrain.documents(pretrain.Path(articles), None) == ["A" * 600, "B" * 700]
    assert pretrain.documents(pretrain.Path(verse), None) == [pretrain.Path(verse).read_text()]
    assert pretrain.documents(pretrain.Path(articles), 10) == ["A" * 10]


def test_empty_and_too_short_files_are_named(tmp_path):
    empty = _text(tmp_path, "empty.txt", "\n\n  \n")
    with pytest.raises(ConfigError, match=r"--text file .*empty.txt holds no text"):
        pretrain.documents(pretrain.Path(empty), None)
    short = _text(tmp_path, "short.txt", "x" * 300)
    args = _args(tmp_path, "--text", short, "--seq-len", "64")
    with pytest.raises(ConfigError, match=r"short.txt has 301 tokens: too few to hold out one --seq-len 64 chunk"):
        pretrain.token_streams(args, CharTokenizer())


def test_streams_hold_out_the_tail_of_every_file_and_end_documents_with_eos(tmp_path):
    a = _text(tmp_path, "a.txt", "a" * 999)   # 1000 tokens with EOS
    b = _text(tmp_path, "b.txt", "b" * 1999)  # 2000 tokens
    args = _args(tmp_path, "--text", a, b, "--seq-len", "16", "--val-fraction", "0.1")
    train, val = pretrain.token_streams(args, CharTokenizer())
    ta, tb = 3 + ord("a") % 100, 3 + ord("b") % 100
    assert len(train) == 900 + 1800 and len(val) == 100 + 200
    assert train[:899].eq(ta).all() and train[899] == ta and train[900:].eq(tb).all()
    assert val[99] == 2 and val[-1] == 2 and val[:99].eq(ta).all()  # each file's last document ends with EOS
    assert pretrain.chunks(val, 16).shape == (300 // 16, 16)


def test_ds_config_schedules_warmup_then_cosine(tmp_path):
    args = _args(tmp_path, "--lr", "2e-3", "--warmup-steps", "500", "--min-lr-ratio", "0.1")
    ds = pretrain.ds_config(args, total_steps=120)
    assert ds["scheduler"]["params"] == {"total_num_steps": 120, "warmup_num_steps": 120, "warmup_type": "linear",
                                         "warmup_min_ratio": 0.0, "cos_min_ratio": 0.1}
    assert ds["optimizer"]["params"]["lr"] == 2e-3 and ds["gradient_clipping"] == 1.0


@pytest.mark.slow
def test_two_rank_pretraining_lowers_held_out_loss_and_the_model_fine_tunes(tmp_path):
    wiki = require_shared_data("text", "wiki_demo_train.txt")
    shakespeare = require_shared_data("text", "tinyshakespeare_train.txt")
    tokenizer = require_shared_data("models", "stories260K")
    sft = require_shared_data("sft", "alpaca_mix_train.jsonl")
    base = tmp_path / "base"
    run_ranks(REPO / "launch" / "pretrain_base.py",
              ["--text", wiki, shakespeare, "--tokenizer", tokenizer, "--output-dir", base, "--hidden-size", "64",
               "--layers", "2", "--intermediate-size", "172", "--seq-len", "64", "--max-chars", "40000",
               "--epochs", "1", "--warmup-steps", "10", "--eval-every", "20", "--no-progress"],
              launcher="deepspeed", timeout=300)
    summary = json.loads((base / "pretrain_summary.json").read_text())
    log = [json.loads(line) for line in (base / "pretrain_log.jsonl").read_text().splitlines()]
    assert summary["world_size"] == 2 and summary["steps"] == log[-1]["step"]
    # 1 epoch of both files' first 40,000 characters, cut into 64-token chunks, 8 per rank per step
    assert summary["steps"] == summary["train_tokens"] // 64 // 16
    assert log[0]["val_loss"] == pytest.approx(math.log(512), abs=0.1)  # untrained: near uniform over 512 ids
    assert summary["val_loss"] < summary["val_loss_start"] - 1.0, summary

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base)
    assert sum(p.numel() for p in model.parameters()) == summary["parameters"]
    assert model.config.hidden_size == 64 and model.config.num_hidden_layers == 2

    out = tmp_path / "sft"
    run_ranks(REPO / "launch" / "train.py",
              ["--task", "sft", "--model", base, "--train-data", sft, "--optimizer", "adamw_pma", "--period", "4",
               "--lr", "1e-3", "--micro-steps", "8", "--eval-every", "0", "--eval-size", "16", "--max-length", "64",
               "--micro-batch-size", "2", "--output-dir", out, "--no-progress"],
              launcher="deepspeed", timeout=300)
    result = json.loads((out / "summary.json").read_text())
    assert result["model"] == str(base) and result["optimizer_steps"] == 8 and math.isfinite(result["eval_loss"])


def test_unloadable_tokenizer_is_named_before_any_process_group(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    text = _text(tmp_path, "a.txt", "hello world\n" * 200)
    with pytest.raises(ConfigError, match=r"could not load tokenizer '/nonexistent/tokenizer'"):
        pretrain.run(["--text", text, "--tokenizer", "/nonexistent/tokenizer", "--output-dir", str(tmp_path / "o")])
    import torch.distributed as dist
    assert not dist.is_initialized()
