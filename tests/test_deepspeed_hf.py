"""The Hugging Face Trainer with ``deepspeed=ds_configs/hf_zero2_adamw_pma_auto.json`` (the
``--deepspeed cfg.json`` path) trains the real stories260K model for a few steps on 2 CPU ranks,
and refuses gradient accumulation with PMA."""
from __future__ import annotations

import json

import pytest

from tests.launching import require_shared_data, run_ranks

pytestmark = pytest.mark.slow


def test_hf_trainer_trains_with_pma_config_and_refuses_accumulation(tmp_path):
    model = require_shared_data("models", "stories260K")
    text = require_shared_data("text", "tinyshakespeare_train.txt")
    out = tmp_path / "hf.json"
    run_ranks("ds_hf_trainer.py", ["--model", model, "--text", text, "--out", out, "--tmp", tmp_path],
              nproc=2, launcher="torchrun", timeout=600)
    result = json.loads(out.read_text())["train"]
    assert result["world"] == 2 and result["zero_stage"] == 2
    assert result["optimizer"] == "AdamWPMA"
    # "auto" values resolved from TrainingArguments (GA 1, micro 2 x 2 ranks, lr, betas, max_grad_norm)
    assert result["gradient_accumulation_steps"] == 1 and result["train_batch_size"] == 4
    assert result["lr"] == [1e-3] and result["betas"] == [[0.9, 0.999]] and result["gradient_clipping"] == 1.0
    assert result["period"] == [8]  # from the JSON, not an HF setting
    # one PMA step per Trainer step (per micro-batch)
    assert result["global_step"] == 4 and result["group_steps"] == [4]
    assert len(result["losses"]) == 4 and result["all_finite"]
    assert result["param_change_l1"] > 0
    refused = json.loads(out.read_text())["ga2"]  # TrainingArguments(gradient_accumulation_steps=2) -> "auto"
    assert refused["raised"] == "ValueError"
    assert "gradient_accumulation_steps=2" in refused["message"] and '"period" to 2' in refused["message"]
