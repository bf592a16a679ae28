"""The real stories260K Llama (Hugging Face format, tied embeddings) under FSDP2 and DDP, 2 gloo ranks.

One launch of tests/workers/fsdp_llama.py: blocks sharded from the model's ``_no_split_modules``, DCP
resume mid-period bit-identical, and the communication ledger equal to the model on every micro-step
(the checkpoint's own traffic is recorded in phase "other" of the micro-step it follows).
"""
from __future__ import annotations

import json

import pytest

from pma_dist.comm import model
from tests.launching import require_shared_data, run_ranks

WORLD, PERIOD, STEPS, SAVE_AT = 2, 4, 6, 3


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    model_dir = require_shared_data("models", "stories260K")
    out = tmp_path_factory.mktemp("fsdp_llama")
    run_ranks("fsdp_llama.py", ["--model", model_dir, "--out", out], nproc=WORLD, timeout=300)
    loaded = [json.loads((out / f"results_rank{r}.json").read_text()) for r in range(WORLD)]
    for rank, result in enumerate(loaded):
        assert "crash" not in result, f"rank {rank} crashed:\n{result['crash']}"
    return loaded


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["fsdp", "ddp"])
def test_llama_resume_mid_period_is_bit_identical(results, backend):
    for rank, result in enumerate(results):
        r = result[backend]
        assert r["tied"], "stories260K ties lm_head to the embeddings; the wrapped model must keep that"
        assert r["params_bit_identical"], (rank, backend)
        assert r["resumed_losses"] == r["losses"][SAVE_AT:], (rank, backend, r)
        assert r["group_step"] == STEPS
        assert r["losses"][-1] < r["losses"][0], f"training did not reduce the loss: {r['losses']}"


@pytest.mark.slow
def test_llama_fsdp_units_are_the_decoder_layers(results):
    for result in results:
        assert result["fsdp"]["fsdp_units"] == [f"model.layers.{i}" for i in range(5)] + [""]


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["fsdp", "ddp"])
def test_llama_measured_bytes_equal_the_model(results, backend):
    for rank, result in enumerate(results):
        data = json.loads(open(result[backend]["ledger_file"]).read())
        training = [r for r in data["records"] if r["phase"] != "other"]
        checkpoint = {r["micro_step"] for r in data["records"] if r["phase"] == "other"}
        assert checkpoint == {SAVE_AT - 1}, f"untrained traffic outside the save step: {checkpoint}"
        assert model.compare({"meta": data["meta"], "records": training}) == [], (rank, backend)
        ops = {r["op"] for r in training}
        assert ops == ({"all_gather", "reduce_scatter", "all_reduce"} if backend == "fsdp" else {"all_reduce"})
