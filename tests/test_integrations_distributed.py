"""PMA optimizers through accelerate (DeepSpeed plugin, ZeRO-2; plain multi-process), FSDP2 and TRL's
SFTTrainer (DDP) on 2 CPU ranks, full model and PEFT/LoRA adapters, against a one-process plain loop over
the same global batches (workers: ``tests/workers/integrations_accelerate.py``, ``integrations_trl.py``).

Tolerances. AdamW-PMA (eps=1e-3, lr=1e-3, 8 steps, gradients clipped to norm 1): the runs differ only
in float32 rounding of the gradient (the all-reduce sums two ranks' means and divides; the plain loop
takes one mean), |dg| <= RHO = 1e-6, and a step moves by at most 2 * lr * |dg| / eps, so
|dp| <= 8 * 2 * 1e-3 * 1e-6 / 1e-3 = 1.6e-5; ADAMW_TOL = 5e-5 leaves a factor 3 for the later gradients
moving with the parameters. Lion-PMA moves every element by +-lr (large step) or +-lr/K (small step),
so a rounding difference either changes nothing or flips one sign, which only an element whose
update direction is within rounding of 0 can do: at most LION_FLIPS = 1e-3 of the elements may differ
by more than lr/(2K). The negative control (the plain loop with period 8) must miss both bounds.
"""
from __future__ import annotations

import json

import pytest

from tests.launching import require_shared_data, run_ranks

pytestmark = pytest.mark.slow

pytest.importorskip("accelerate", reason="accelerate is not installed")

ADAMW_TOL = 5e-5
LION_FLIPS = 1e-3


@pytest.mark.parametrize("frontend,methods,lora", [
    ("accelerate-deepspeed", ["adamw_pma", "lion_pma"], True),
    ("fsdp2", ["adamw_pma", "lion_pma"], True),
    ("accelerate-ddp", ["adamw_pma"], False),
])
def test_two_ranks_step_every_micro_batch_and_match_plain_loop(tmp_path, frontend, methods, lora):
    if lora:
        pytest.importorskip("peft", reason="PEFT is not installed (pip install -e '.[integrations]')")
    model = require_shared_data("models", "stories260K")
    text = require_shared_data("text", "tinyshakespeare_train.txt")
    out = tmp_path / "result.json"
    run_ranks("integrations_accelerate.py", ["--frontend", frontend, "--methods", ",".join(methods), "--model", model,
                                            "--text", text, "--out", out] + (["--lora"] if lora else []),
              nproc=2, timeout=300)
    results = json.loads(out.read_text())
    assert sorted(results) == sorted(methods)
    for method, result in results.items():
        assert result["world"] == 2
        assert result["optimizer"] == {"adamw_pma": "AdamWPMA", "lion_pma": "LionPMA"}[method]
        assert result["period"] == [4]
        assert set(result["group_steps"]) == {8}  # one PMA step per micro-batch (8 micro-batches per rank)
        assert result["moved"] > 0
        if lora:
            assert result["frozen_tensors"] > 0 and result["frozen_moved"] == 0.0  # only the adapters train
            assert 0 < result["trainable_tensors"] < result["frozen_tensors"]
        if method == "adamw_pma":
            assert result["max_diff"] <= ADAMW_TOL, (method, result)
            assert result["control_diff"] > 4 * ADAMW_TOL, (method, result)
        else:
            assert result["mismatched_fraction"] <= LION_FLIPS, (method, result)
            assert result["control_mismatched_fraction"] > 100 * LION_FLIPS, (method, result)


@pytest.mark.parametrize("trainer,data", [("sft", ("sft", "alpaca_mix_train.jsonl")),
                                          ("dpo", ("dpo", "hh_rlhf_harmless_base_test_pairs.jsonl"))])
def test_trl_trainers_on_two_ranks_match_plain_loop(tmp_path, trainer, data):
    """TRL SFTTrainer / DPOTrainer, DDP over 2 CPU ranks (worker: tests/workers/integrations_trl.py)."""
    pytest.importorskip("trl", reason="TRL is not installed (pip install -e '.[integrations]')")
    model = require_shared_data("models", "stories260K")
    out = tmp_path / "result.json"
    run_ranks("integrations_trl.py", ["--trainer", trainer, "--model", model, "--data", require_shared_data(*data),
                                      "--out", out, "--tmp", tmp_path], nproc=2, timeout=300)
    result = json.loads(out.read_text())
    assert result["world"] == 2 and result["ranks_saw_other_rows"]
    assert result["global_step"] == 8 and result["batches"] == [8, 8]
    assert set(result["group_steps"]) == {8} and set(result["period"]) == {4}  # one PMA step per micro-batch
    assert result["moved"] > 0
    assert result["max_diff"] <= ADAMW_TOL, result
    assert result["control_diff"] > 4 * ADAMW_TOL, result
