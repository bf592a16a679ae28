"""Model loading for the setup (recipes/posttrain/trainer.load_model_and_tokenizer), 2 ranks, stories260K.

Under ZeRO-3 every parameter is partitioned as it is created (an empty placeholder plus a half-sized
shard per rank), gathered it equals the checkpoint tensor exactly (a copy, no arithmetic), bf16
configs load bf16 weights (the checkpoint rounded to bf16, exactly), and a ZeRO-3 job gives the same
losses as with the previous full-model load then partition: the same values in the same partitions
feed the same kernels, so the tolerance is 0. Under FSDP2 the parameters are created on the meta
device, sharded, then filled shard by shard: they equal the checkpoint, the buffers survive, and the
job's losses equal the full-load path's (tolerance 0, for the same reason).
"""
import json

import pytest

from tests.launching import require_shared_data, run_ranks

pytestmark = pytest.mark.slow


def _launch(tmp_path_factory, worker: str):
    """Run ``worker`` on 2 ranks; its per-rank reports."""
    shared = require_shared_data("models", "stories260K").parents[1]
    require_shared_data("sft", "alpaca_mix_train.jsonl")
    out = tmp_path_factory.mktemp(worker.removesuffix(".py"))
    run_ranks(worker, [out, shared], nproc=2, launcher="torchrun", timeout=600)
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    return _launch(tmp_path_factory, "scale_load.py")


@pytest.mark.parametrize("name, dtype", [("zero3_fp32", "torch.float32"), ("zero3_bf16", "torch.bfloat16")])
def test_zero3_load_is_partitioned_at_creation_and_equals_the_checkpoint(reports, name, dtype):
    for report in reports:
        facts = report[name]
        assert facts["zero3_after_load"] is False  # the HfDeepSpeedConfig lived only for the load
        assert facts["params"]
        for pname, p in facts["params"].items():
            assert p["partitioned"] and p["local_numel"] == 0, pname
            assert p["shard_numel"] == -(-p["full_numel"] // 2), pname  # ceil(n / 2) per rank
            assert p["dtype"] == dtype
            if "equals_checkpoint" in p:
                assert p["equals_checkpoint"], pname
        assert sum("equals_checkpoint" in p for p in facts["params"].values()) >= len(facts["params"]) - 1


def test_zero0_loads_the_full_fp32_model(reports):
    for report in reports:
        for pname, p in report["zero0_fp32"]["params"].items():
            assert not p["partitioned"] and p["local_numel"] == p["full_numel"] and p["dtype"] == "torch.float32"
            assert p.get("equals_checkpoint", True), pname


def test_zero3_job_losses_equal_the_full_load_losses(reports):
    new, old = reports[0]["job_zero3"], reports[0]["job_zero3_full_load"]
    assert new["train"] and new["train"] == old["train"]
    assert new["eval_loss"] == old["eval_loss"]
    assert new["peak_memory_kind"] == "max_rss" and len(new["peak_memory_bytes"]) == 2
    assert all(b > 100 * 2**20 for b in new["peak_memory_bytes"])  # a Python process with torch: > 100 MiB


@pytest.fixture(scope="module")
def fsdp_reports(tmp_path_factory):
    return _launch(tmp_path_factory, "scale_fsdp_load.py")


def test_fsdp2_meta_load_fills_shards_equal_to_the_checkpoint(fsdp_reports):
    for report in fsdp_reports:
        assert report["meta_after_load"] is True  # nothing materialised before fully_shard
        assert report["buffers_equal"]  # rotary frequencies survive to_empty
        for name, p in report["params"].items():
            assert p["equals_checkpoint"], name
            assert p["local_numel"] < p["full_numel"], name  # a shard, not the whole tensor


def test_fsdp2_job_losses_equal_the_full_load_losses(fsdp_reports):
    new, old = fsdp_reports[0]["job_sharded_load"], fsdp_reports[0]["job_full_load"]
    assert new["train"] and new["train"] == old["train"] and new["eval_loss"] == old["eval_loss"]
