"""2-rank CPU DeepSpeed post-training jobs on the real stories260K model and real SFT/DPO data.

One launch (``tests/workers/train_suite.py``) runs its jobs; the tests below assert on its output.
"""
import json
import math

import pytest

from recipes.posttrain.metrics import read_metrics
from tests.launching import require_shared_data, run_ranks

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def suite_run(tmp_path_factory):
    shared = require_shared_data("models", "stories260K").parents[1]
    require_shared_data("sft", "alpaca_mix_train.jsonl")
    require_shared_data("dpo", "hh_rlhf_harmless_base_test_pairs.jsonl")
    out = tmp_path_factory.mktemp("train_suite")
    proc = run_ranks("train_suite.py", [out, shared], nproc=2, launcher="deepspeed", timeout=600)
    return out, json.loads((out / "results.json").read_text()), proc.stdout


@pytest.fixture(scope="module")
def suite(suite_run):
    return suite_run[:2]


def _train_losses(path):
    return [r["train_loss"] for r in read_metrics(path, "train")]


def test_sft_pma_loss_is_finite_and_falls(suite):
    out, results = suite
    losses = _train_losses(out / "pma" / "metrics.jsonl")
    evals = [r["eval_loss"] for r in read_metrics(out / "pma" / "metrics.jsonl", "eval")]
    assert all(math.isfinite(x) for x in losses + evals)
    assert losses[-1] < losses[0] - 0.3, losses
    assert evals[-1] < evals[0] - 0.3, evals
    assert [r["micro_step"] for r in read_metrics(out / "pma" / "metrics.jsonl", "eval")] == [0, 8, 16]


def test_pma_steps_every_micro_step_and_ga_every_k(suite):
    out, results = suite
    assert results["pma"]["optimizer_steps"] == 16  # counted by AdamWPMA itself
    assert results["ga"]["optimizer_steps"] == 16 // 4  # counted by torch.optim.AdamW's state
    assert results["ga"]["engine_global_steps"] == 4
    ga_lines = read_metrics(out / "ga" / "metrics.jsonl", "train")
    assert [(r["micro_step"], r["optimizer_steps"]) for r in ga_lines] == [(4, 1), (8, 2), (12, 3), (16, 4)]
    pma_lines = read_metrics(out / "pma" / "metrics.jsonl", "train")
    assert [(r["micro_step"], r["optimizer_steps"]) for r in pma_lines] == [(4, 4), (8, 8), (12, 12), (16, 16)]
    # same micro-batch and data: both consumed the same samples
    assert results["ga"]["samples"] == results["pma"]["samples"] == 16 * 2 * 2
    losses = _train_losses(out / "ga" / "metrics.jsonl")
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]


def test_resume_continues_the_same_metrics(suite):
    out, results = suite
    assert results["resumed"]["resumed_from"] == "micro00000008"
    # the straight run also logs update variance; compare what both log
    straight = [r for r in read_metrics(out / "pma" / "metrics.jsonl") if r["kind"] in ("train", "eval")]
    resumed = read_metrics(out / "resumed" / "metrics.jsonl")
    key = lambda r: (r["kind"], r["micro_step"])  # noqa: E731
    assert [key(r) for r in resumed] == [key(r) for r in straight]
    for a, b in zip(straight, resumed):
        field = "train_loss" if a["kind"] == "train" else "eval_loss"
        assert a[field] == b[field], (a, b)  # bit-identical: same data, same state
        assert a["optimizer_steps"] == b["optimizer_steps"]
    assert resumed[-1]["wall_clock"] >= [r for r in resumed if r["micro_step"] == 8][-1]["wall_clock"]


def test_dpo_run_finite_falling_loss_and_accuracy(suite):
    out, results = suite
    losses = _train_losses(out / "dpo" / "metrics.jsonl")
    assert all(math.isfinite(x) for x in losses)
    assert losses[0] == pytest.approx(math.log(2), abs=0.05)  # policy == reference at the start
    assert losses[-1] < losses[0] - 0.01, losses
    evals = read_metrics(out / "dpo" / "metrics.jsonl", "eval")
    assert evals[0]["eval_loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert evals[0]["eval_reward_accuracy"] == 0.0  # no margin before training
    for r in evals:
        assert 0.0 <= r["eval_accuracy"] <= 1.0 and r["eval_pairs"] == 16
    assert results["dpo"]["optimizer_steps"] == 16


def test_update_variance_is_logged_per_window(suite):
    out, _ = suite
    rows = read_metrics(out / "pma" / "metrics.jsonl", "update_variance")
    # K = 4, window of 2 periods: one value every 8 micro-steps
    assert [r["micro_step"] for r in rows] == [8, 16]
    assert all(r["update_variance"] > 0 and math.isfinite(r["update_variance"]) for r in rows)
    # --variance-every 8 on the K = 4 GA run: a delta per 8 micro-steps, so one window of 2 at 16
    rows = read_metrics(out / "ga" / "metrics.jsonl", "update_variance")
    assert [(r["micro_step"], r["window_periods"]) for r in rows] == [(16, 2)]
    assert rows[0]["update_variance"] > 0


def test_bad_data_file_is_a_clear_error(suite):
    _, results = suite
    assert results["bad_error"] is not None
    assert "bad.jsonl line 2: missing field 'output'" in results["bad_error"]


def test_fallback_is_loudly_labelled_and_trains(suite_run):
    out, results, stdout = suite_run
    assert "FALLBACK: no real model/data found" in stdout
    assert results["fallback"]["fallback"] is True and results["fallback"]["model"] == "builtin-fallback"
    rows = read_metrics(out / "fallback" / "metrics.jsonl")
    assert all(r["fallback"] is True for r in rows)
    losses = _train_losses(out / "fallback" / "metrics.jsonl")
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]


def _warmup_cosine(micro, total, warmup):
    """The schedule written out independently: linear to the peak over ``warmup`` micro-steps, then a half cosine."""
    if micro < warmup:
        return (micro + 1) / warmup
    return (1 + math.cos(math.pi * (micro - warmup) / (total - warmup))) / 2


@pytest.mark.parametrize("name", ["scheduled_ga", "scheduled_pma"])
def test_lr_schedule_follows_samples_for_every_method(suite, name):
    out, results = suite
    rows = read_metrics(out / name / "metrics.jsonl", "train")
    # one train line per micro-step (--log-every 1); the rate logged at micro-step m (1-based) is the one set
    # for the step taken there: peak 3e-3, 16 micro-steps, 4 of them warm-up
    assert [r["micro_step"] for r in rows] == list(range(1, 17))
    assert [r["lr"] for r in rows] == pytest.approx([3e-3 * _warmup_cosine(m - 1, 16, 4) for m in range(1, 17)],
                                                    rel=1e-12)
    summary = results[name]
    assert summary["lr"] == 3e-3 and summary["lr_schedule"] == "warmup_cosine" and summary["warmup_fraction"] == 0.25
    assert summary["last_lr"] == pytest.approx(3e-3 * _warmup_cosine(15, 16, 4), rel=1e-12)
    assert summary["lr_decay"] == ("periodic" if name == "scheduled_pma" else None)


def test_select_split_is_evaluated_beside_the_eval_split(suite):
    out, results = suite
    evals = read_metrics(out / "scheduled_ga" / "metrics.jsonl", "eval")
    # scored once, with the final eval (it chooses hyper-parameters by the final loss)
    assert ["select_loss" in r for r in evals] == [False] * (len(evals) - 1) + [True]
    last = evals[-1]
    assert math.isfinite(last["select_loss"]) and last["select_tokens"] > 0
    assert last["select_loss"] != last["eval_loss"]  # two different sets of 16 records
    assert results["scheduled_ga"]["select_loss"] == last["select_loss"]
    assert "select_loss" not in read_metrics(out / "ga" / "metrics.jsonl", "eval")[0]  # off by default


@pytest.mark.parametrize("name, saved", [("scheduled_ga", "saved_ga"), ("scheduled_pma", "saved_zero3")])
def test_saved_model_reproduces_the_final_eval_loss(suite, name, saved):
    """--save-model (ZeRO-0, and ZeRO-3's gathered shards): the written HF model, reloaded in one process, scores
    the run's eval split at the run's final eval loss."""
    from recipes.posttrain import data
    from tests.saved_model import SAVED_MODEL_RTOL, eval_loss_of_saved_model

    out, results = suite
    _, evals, _ = data.holdout_splits(data.load_records(results[name]["train_data"], "sft"), 16, 16)
    assert eval_loss_of_saved_model(out / saved, evals, 128) == pytest.approx(results[name]["eval_loss"],
                                                                            rel=SAVED_MODEL_RTOL)
