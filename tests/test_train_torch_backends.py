"""launch/train.py with --backend fsdp / ddp: one 2-rank torchrun launch of several jobs, plus flag checks.

The jobs (``tests/workers/train_backends_suite.py``) use the built-in fallback model, so they need
no shared data; the assertions are on the metrics JSONL and summaries they write.
"""
import json
import math

import pytest

from recipes.posttrain.config import ConfigError, resolve
from recipes.posttrain.metrics import read_metrics
from tests.launching import run_ranks


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    out = tmp_path_factory.mktemp("train_backends")
    run_ranks("train_backends_suite.py", [out], nproc=2, launcher="torchrun", timeout=300)
    return out, json.loads((out / "results.json").read_text())


def _rows(out, name, kind):
    return read_metrics(out / name / "metrics.jsonl", kind)


@pytest.mark.slow
def test_fsdp_pma_trains_and_steps_every_micro_step(suite):
    out, results = suite
    train = _rows(out, "fsdp_pma", "train")
    evals = _rows(out, "fsdp_pma", "eval")
    assert [(r["micro_step"], r["optimizer_steps"]) for r in train] == [(2, 2), (4, 4), (6, 6), (8, 8)]
    assert results["fsdp_pma"]["optimizer_steps"] == 8  # counted by AdamWPMA's own clock
    assert all(r["backend"] == "fsdp" for r in train + evals)
    losses = [r["train_loss"] for r in train] + [r["eval_loss"] for r in evals]
    assert all(math.isfinite(x) for x in losses)
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"] - 0.2, evals
    # 17 held-out examples over 2 ranks in batches of 4: rank 1 runs a discarded extra forward so
    # FSDP2's all-gathers match up, and every example is still counted exactly once
    assert len({r["eval_tokens"] for r in evals}) == 1
    variance = _rows(out, "fsdp_pma", "update_variance")  # the LM head is a DTensor shard: gathered
    assert [r["micro_step"] for r in variance] == [4, 8]
    assert all(r["update_variance"] > 0 for r in variance)


@pytest.mark.slow
def test_fsdp_and_ddp_run_the_same_pma_training(suite):
    out, _ = suite
    fsdp = [r["train_loss"] for r in _rows(out, "fsdp_pma", "train")]
    ddp = [r["train_loss"] for r in _rows(out, "ddp_pma", "train")]
    # same model, data, optimizer: only the reduction (reduce-scatter vs all-reduce) order differs
    assert ddp == pytest.approx(fsdp, rel=1e-4)
    fsdp_eval = [r["eval_loss"] for r in _rows(out, "fsdp_pma", "eval")]
    ddp_eval = [r["eval_loss"] for r in _rows(out, "ddp_pma", "eval")]
    assert ddp_eval == pytest.approx(fsdp_eval, rel=1e-4)


@pytest.mark.slow
def test_ddp_ga_steps_once_per_k_micro_steps(suite):
    out, results = suite
    train = _rows(out, "ddp_ga", "train")
    assert [(r["micro_step"], r["optimizer_steps"]) for r in train] == [(2, 1), (4, 2), (6, 3), (8, 4)]
    assert results["ddp_ga"]["optimizer_steps"] == 4  # torch.optim.AdamW's state["step"]
    assert results["ddp_ga"]["samples"] == results["ddp_pma"]["samples"] == 8 * 4 * 2
    losses = [r["train_loss"] for r in train]
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]
    # GA is not PMA: with the same K and data it must take a different path
    assert losses != [r["train_loss"] for r in _rows(out, "ddp_pma", "train")]


@pytest.mark.slow
def test_fsdp_resume_continues_the_same_metrics(suite):
    out, results = suite
    assert results["fsdp_resumed"]["resumed_from"] == "micro00000004"

    def strip(rows):
        return [{k: v for k, v in r.items() if k != "wall_clock"} for r in rows]

    assert strip(read_metrics(out / "fsdp_resumed" / "metrics.jsonl")) == strip(
        [r for r in read_metrics(out / "fsdp_pma" / "metrics.jsonl") if r["kind"] != "update_variance"])
    manifest = json.loads((out / "fsdp_resumed" / "checkpoints" / "micro00000008" / "manifest.json").read_text())
    assert ".metadata" in manifest["files"]  # the DCP checkpoint is covered by the sha256 manifest
    assert manifest["client_state"]["identity"]["checkpoint_format"] == "dcp"


@pytest.mark.slow
def test_ddp_resumes_an_fsdp_checkpoint(suite):
    out, results = suite
    assert results["ddp_from_fsdp"]["resumed_from"] == "micro00000004"
    rows = read_metrics(out / "ddp_from_fsdp" / "metrics.jsonl")
    assert [r["backend"] for r in rows if r["micro_step"] > 4] == ["ddp"] * 3
    reference = [r for r in read_metrics(out / "fsdp_pma" / "metrics.jsonl") if r["kind"] != "update_variance"]
    assert [(r["kind"], r["micro_step"], r["optimizer_steps"]) for r in rows] == [
        (r["kind"], r["micro_step"], r["optimizer_steps"]) for r in reference]
    losses = [r.get("train_loss", r.get("eval_loss")) for r in rows]
    assert losses == pytest.approx([r.get("train_loss", r.get("eval_loss")) for r in reference], rel=1e-4)


@pytest.mark.slow
def test_fsdp_dpo_with_lion_pma(suite):
    out, results = suite
    evals = _rows(out, "fsdp_dpo", "eval")
    assert results["fsdp_dpo"]["optimizer_steps"] == 4
    assert all(math.isfinite(r["eval_loss"]) for r in evals)
    assert evals[0]["eval_loss"] == pytest.approx(math.log(2), abs=1e-6)  # policy == reference at start
    assert evals[-1]["eval_loss"] != evals[0]["eval_loss"]


@pytest.mark.parametrize("argv, message", [
    (["--backend", "fsdp", "--deepspeed", "x.json"],
     "--deepspeed x.json is a DeepSpeed setting, but --backend is fsdp"),
    (["--backend", "ddp", "--zero-stage", "2"], "--zero-stage 2 is a DeepSpeed setting, but --backend is ddp"),
    (["--backend", "fsdp", "--resume"], "--resume with --backend fsdp needs --trust-checkpoint"),
])
def test_deepspeed_only_flags_are_refused_for_torch_backends(argv, message):
    with pytest.raises(ConfigError) as info:
        resolve(argv)
    assert message in str(info.value)


def test_torch_backend_config_keeps_k_and_marks_dcp_checkpoints():
    cfg = resolve(["--backend", "ddp", "--optimizer", "adamw_ga", "--period", "4", "--micro-steps", "8",
                   "--gradient-clipping", "0.5", "--model", "builtin-fallback"])
    assert (cfg.period, cfg.gradient_clipping, cfg.identity()["checkpoint_format"]) == (4, 0.5, "dcp")
    assert cfg.ds_config is None  # no DeepSpeed dict doubles as the config of an FSDP/DDP run
    assert resolve(["--model", "builtin-fallback"]).identity()["checkpoint_format"] == "deepspeed"


@pytest.mark.slow
@pytest.mark.parametrize("name, saved", [("fsdp_pma", "saved_fsdp"), ("ddp_pma", "saved_ddp")])
def test_saved_model_reproduces_the_final_eval_loss(suite, name, saved):
    """--save-model under FSDP2 (full state dict gathered from the shards) and DDP: reloaded in one process, the
    model scores the run's held-out split at its final eval loss."""
    from recipes.posttrain import data, fallback
    from tests.saved_model import SAVED_MODEL_RTOL, eval_loss_of_saved_model

    out, results = suite
    _, evals = data.holdout_split(fallback.synthetic_records("sft", 4096 + 17, seed=1234), 17)
    assert eval_loss_of_saved_model(out / saved, evals, 64) == pytest.approx(results[name]["eval_loss"],
                                                                           rel=SAVED_MODEL_RTOL)
