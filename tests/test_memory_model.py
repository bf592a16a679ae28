"""The memory model's arithmetic (pma_dist/memory.py) on a toy shape, every part worked out by hand.

Whether the model matches measured peaks is not a test: ``benchmarks/memory.py`` prints that check
(model vs measured, +-15 %) next to its measurements.
"""
import pytest

from pma_dist.memory import (SHAPES, ZERO3_MAX_LIVE, ZERO3_PREFETCH, ZERO3_REDUCE_BUCKET, ZERO3_SUB_GROUP, Shape,
                             Workload, estimate, fits, peak_phase, zero3_gathered)

# 1000 parameters, 2 layers, hidden 8, MLP 16, 2 heads / 1 kv head (kv hidden 4), vocab 10, untied:
# activations per token per layer = 9*8 + 4*16 + 2*4 = 144 elements; a layer's weight matrices are
# q 64, k 32, v 32, o 64, gate/up/down 128 each (largest module 128 > vocab*hidden 80); the layers hold
# (1000 - 2*80 - 8) / 2 = 416 parameters each, the root (embeddings, head, final norm) 168
TOY = Shape(params=1000, layers=2, hidden=8, intermediate=16, heads=2, kv_heads=1, vocab=10)
SFT = Workload(task="sft", micro_batch=2, seq_len=5)  # 2 rows x 5 = 10 tokens, evaluated 2 rows at a time


def test_toy_shape_by_hand():
    assert TOY.kv_hidden == 4 and TOY.activation_elements_per_token_layer() == 144
    assert TOY.layer_modules() == [64, 32, 32, 64, 128, 128, 128]
    assert TOY.largest_module == 128 and TOY.layer_params == 416


def test_qwen2_layer_count_matches_its_published_layer():
    # q 896^2, k and v 896x128, o 896^2, gate/up/down 3x896x4864, q/k/v biases 896+128+128, two norms 2x896
    assert SHAPES["Qwen2-0.5B"].layer_params == 802_816 + 2 * 114_688 + 802_816 + 13_074_432 + 1_152 + 1_792
    assert SHAPES["Qwen2-0.5B"].largest_module == 151_936 * 896  # the tied embedding


def test_zero3_fp32_sft_by_hand():
    e = estimate(TOY, "ZeRO-3", 2, SFT, dtype="float32")
    # partition, fp32 master, gradient partition buffer: 4 B x 1000 / 2 each; two moments halved; the bucket
    # holds min(1e7, 1000) fp32 elements
    assert (e["weights"], e["master"], e["gradients"], e["optimizer"], e["buffers"]) == (2000, 2000, 2000, 4000, 4000)
    assert zero3_gathered(TOY) == 1000  # the limit (3e7) plus two modules is more than the model: all of it
    # activations 4*10*2*144 = 11520, logits + grad 2*4*100 = 800 and one fp32 block 4*100 = 400, gathered
    # 4*1000, the bucket's flat copy and its half-size partitions 4*1000*1.5, one module's full gradient 4*128
    assert e["forward_backward"] == 11520 + 1200 + 4000 + 6000 + 512
    assert e["step"] == 4 * 500 + 4 * 500  # one sub-group's fp32 gradient copy (the partition) + the temporary
    # cache 4*10*2 layers*2*4 = 640, the layer's 3h + 3f = 72 per token (2880) > logits 400 + block 400
    assert e["evaluation"] == 640 + 2880 + 4000
    assert e["reference"] == 0 and e["total"] == 14000 + 23232
    assert peak_phase(e) == "forward_backward"


def test_zero3_bf16_adds_the_flatten_copy_to_the_step():
    e = estimate(TOY, "ZeRO-3", 2, SFT, dtype="bfloat16")
    assert (e["weights"], e["master"], e["gradients"], e["optimizer"], e["buffers"]) == (1000, 2000, 1000, 4000, 2000)
    assert e["forward_backward"] == 2 * 10 * 2 * 144 + (2 * 2 * 100 + 400) + 2000 + 3000 + 256
    assert e["step"] == (4 + 2) * 500 + 4 * 500  # bf16 flatten + fp32 copy of the sub-group, the temporary
    assert e["total"] == 10000 + 11816


def test_fused_step_has_no_temporary():
    assert estimate(TOY, "ZeRO-3", 2, SFT, fused_step=True)["step"] == 4 * 500
    assert estimate(TOY, "FSDP2", 2, SFT, fused_step=True)["step"] == 2000  # the sharded gradients only


def test_fsdp2_dpo_by_hand():
    work = Workload(task="dpo", micro_batch=1, seq_len=5, eval_batch=4)  # 2 rows training, 8 rows evaluation
    e = estimate(TOY, "FSDP2", 2, work, dtype="float32", fused_step=True)
    assert (e["weights"], e["master"], e["gradients"], e["optimizer"], e["buffers"]) == (2000, 0, 0, 4000, 0)
    # activations + logits 11520 + 1200 > sharded grads 2000; root 168 and four layer units 4*416, fp32
    assert e["forward_backward"] == 12720 + 4 * (168 + 4 * 416)
    # 40 tokens: cache 4*40*2*8 = 2560, layer 4*40*72 = 11520 (> logits 3200); root and two units
    assert e["evaluation"] == 2560 + 11520 + 4 * (168 + 2 * 416)
    assert e["total"] == 6000 + 20048 and peak_phase(e) == "forward_backward"
    big_eval = estimate(TOY, "FSDP2", 2, Workload(task="dpo", micro_batch=1, seq_len=5, eval_batch=8),
                        fused_step=True)
    assert big_eval["evaluation"] == 5120 + 23040 + 4000 and big_eval["total"] == 6000 + 32160
    assert peak_phase(big_eval) == "evaluation"


def test_fsdp2_backward_holds_the_larger_of_activations_and_gradients():
    tiny = Workload(task="sft", micro_batch=1, seq_len=1)  # activations 4*2*144 + logits 80 + 40 = 1272
    assert estimate(TOY, "FSDP2", 2, tiny)["forward_backward"] == 2000 + 4 * (168 + 4 * 416)


def test_zero1_bf16_by_hand():
    e = estimate(TOY, "ZeRO-1", 4, SFT, dtype="bfloat16")
    assert (e["weights"], e["master"], e["gradients"], e["optimizer"], e["buffers"]) == (2000, 1000, 2000, 2000, 2000)
    assert e["forward_backward"] == 2 * 10 * 2 * 144 + 800
    assert e["step"] == 4 * 250 + 4 * 250  # the fp32 partition gradient + the update's temporary
    assert e["total"] == 9000 + 6560


def test_dpo_doubles_rows_and_the_copy_costs_one_model():
    e = estimate(TOY, "ZeRO-0", 2, Workload(task="dpo", micro_batch=2, seq_len=5, dpo_reference="copy"),
                 dtype="bfloat16")
    assert e["reference"] == 2000 and e["master"] == 4000 and e["optimizer"] == 8000  # ZeRO-0: nothing sharded
    assert e["forward_backward"] == 2 * 20 * 2 * 144 + (2 * 2 * 200 + 4 * 200)
    assert e["step"] == 4 * 1000  # the update's temporary over every parameter
    assert e["total"] == 18000 + 13120
    cached = estimate(TOY, "ZeRO-0", 2, Workload(task="dpo", micro_batch=2, seq_len=5), dtype="bfloat16")
    assert e["total"] - cached["total"] == 2000


def test_activation_checkpointing_keeps_layer_inputs_and_one_layer():
    e = estimate(TOY, "ZeRO-3", 2, Workload(micro_batch=2, seq_len=5, activation_checkpointing=True))
    assert e["forward_backward"] == 4 * 10 * (2 * 8 + 144) + 1200 + 4000 + 6000 + 512


def test_ddp_lion():
    d = estimate(TOY, "DDP", 2, SFT, dtype="float32", optimizer="lion")
    assert (d["weights"], d["master"], d["gradients"], d["buffers"], d["optimizer"]) == (4000, 0, 4000, 4000, 4000)


def test_zero3_constants_are_the_jobs_bounds():
    from recipes.posttrain.zero_memory import ZERO3_BOUNDS

    assert (ZERO3_BOUNDS["stage3_max_live_parameters"], ZERO3_BOUNDS["stage3_prefetch_bucket_size"],
            ZERO3_BOUNDS["reduce_bucket_size"], ZERO3_BOUNDS["sub_group_size"]) == (
        ZERO3_MAX_LIVE, ZERO3_PREFETCH, ZERO3_REDUCE_BUCKET, ZERO3_SUB_GROUP)


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="ZeRO-4"):
        estimate(TOY, "ZeRO-4", 2)
    with pytest.raises(ValueError, match="fp8"):
        estimate(TOY, "ZeRO-3", 2, dtype="fp8")
    with pytest.raises(ValueError, match="world"):
        estimate(TOY, "ZeRO-3", 0)


def test_7b_on_a40_what_fits():
    a40 = 48e9
    seq = Workload(task="sft", micro_batch=4, seq_len=1024)
    llama = SHAPES["Llama-2-7B"]
    # ZeRO-1: 13.5 GB bf16 weights + 13.5 GB bf16 grads, 10.1 GB of sharded fp32 states and bucket, plus
    # ~23 GB of activations: no
    assert not fits(llama, "ZeRO-1", 8, seq, a40)
    assert fits(llama, "ZeRO-3", 8, Workload(task="sft", micro_batch=4, seq_len=1024, activation_checkpointing=True),
                a40)
    assert SHAPES["Qwen2-0.5B"].kv_hidden == 128
