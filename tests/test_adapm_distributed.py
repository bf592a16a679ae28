"""AdaPM on 2 ranks: DDP and DeepSpeed ZeRO-0 (JSON ``"type": "AdaPM"``) match a single process;
ZeRO-1/2/3 and DeepSpeed bf16 are refused with clear errors (FSDP2 is supported: tests/test_adapm_fsdp.py).
One launch for the module."""
from __future__ import annotations

import json

import pytest

from tests.launching import run_ranks

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("adapm_dist") / "results.json"
    run_ranks("adapm_dist.py", [out], nproc=2, launcher="torchrun", timeout=400)
    return json.loads(out.read_text())


def _no_crash(entry):
    assert "crash" not in entry, entry.get("crash")
    return entry


def test_ddp_matches_single_process(results):
    assert _no_crash(results["ddp"])["max_diff"] < 1e-12  # float64


def test_deepspeed_zero0_json_type_matches_single_process(results):
    entry = _no_crash(results["zero0"])
    assert entry["optimizer"] == "AdaPM"
    # the config-built optimizer got the engine's parameter names, so the paper's policy applies
    assert entry["policies"]["q_proj.weight"] == "query:lowrank(r=2)"
    assert entry["policies"]["v_proj.weight"] == "value:full"
    assert entry["policies"]["o_proj.weight"] == "attn_out:none"
    assert entry["max_diff"] < 1e-5 * entry["max_abs"]  # float32 all-reduce order


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_deepspeed_zero_flat_partitions_are_refused(results, stage):
    entry = _no_crash(results[f"zero{stage}"])
    assert entry["error"] is not None, "AdaPM trained on flat ZeRO partitions"
    assert entry["where"] == "initialize", "refused only after work began"  # the integration checks at set-up
    assert f"AdaPM cannot run under DeepSpeed ZeRO stage {stage}" in entry["error"]
    assert "use FSDP2 instead" in entry["error"]  # the way out for sharded training


def test_deepspeed_bf16_wrapper_is_refused(results):
    entry = _no_crash(results["bf16_zero0"])
    assert entry["error"] is not None and "bf16 optimizer wrapper" in entry["error"]


def test_dtensor_layouts_other_than_fsdp2_row_shards_are_refused(results):
    entry = _no_crash(results["replicated_dtensor"])
    assert "Shard(0) on a 1-D mesh" in entry["error"] and "'q_proj.weight'" in entry["error"]
    assert "Replicate()" in entry["error"]


def test_package_exports_adapm(results):
    assert results["pma_dist_exports_adapm"] is True
