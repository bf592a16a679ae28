"""The memory settings the job applies: ZeRO-3 bounds, the training dtype, the recorded peak."""
import resource

import torch

from recipes.posttrain import config, peak_memory, trainer
from recipes.posttrain.zero_memory import ZERO3_BOUNDS, with_zero3_bounds


def test_zero3_bounds_fill_only_what_the_config_leaves_out():
    ds = {"zero_optimization": {"stage": 3, "reduce_bucket_size": 123}}
    out = with_zero3_bounds(ds)
    assert out["zero_optimization"]["reduce_bucket_size"] == 123  # the user's value stays
    for key, value in ZERO3_BOUNDS.items():
        if key != "reduce_bucket_size":
            assert out["zero_optimization"][key] == value
    assert ds == {"zero_optimization": {"stage": 3, "reduce_bucket_size": 123}}  # not mutated
    for stage in (0, 1, 2):
        plain = {"zero_optimization": {"stage": stage}}
        assert with_zero3_bounds(plain) == plain


def test_training_dtype_follows_the_deepspeed_config(tmp_path):
    bf16 = tmp_path / "bf16.json"
    bf16.write_text('{"bf16": {"enabled": true}}')
    fp16 = tmp_path / "fp16.json"
    fp16.write_text('{"fp16": {"enabled": true}}')
    assert trainer.training_dtype(config.resolve(["--deepspeed", str(bf16)])) == torch.bfloat16
    assert trainer.training_dtype(config.resolve(["--deepspeed", str(fp16)])) == torch.float16
    assert trainer.training_dtype(config.resolve([])) == torch.float32
    assert trainer.training_dtype(config.resolve(["--backend", "fsdp"])) == torch.float32
    assert trainer.zero3_enabled(config.resolve(["--zero-stage", "3"]))
    assert not trainer.zero3_enabled(config.resolve(["--zero-stage", "2"]))


def test_peak_memory_on_cpu_is_the_max_rss_without_a_process_group():
    got = peak_memory.peak_per_rank(torch.device("cpu"))
    assert got["peak_memory_kind"] == "max_rss" and len(got["peak_memory_bytes"]) == 1
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    assert 0 < got["peak_memory_bytes"][0] <= after
