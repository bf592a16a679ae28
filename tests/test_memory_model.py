"""The memory model's arithmetic (pma_dist/memory.py) on a toy shape, every part worked out by hand."""
import pytest

from pma_dist.memory import SHAPES, Shape, Workload, estimate, fits

# 1000 parameters, 2 layers, hidden 8, MLP 16, 2 heads / 1 kv head (kv hidden 4), vocab 10:
# activations per token per layer = 9*8 + 4*16 + 2*4 = 144 elements
TOY = Shape(params=1000, layers=2, hidden=8, intermediate=16, heads=2, kv_heads=1, vocab=10)
SFT = Workload(task="sft", micro_batch=2, seq_len=5)  # 2 rows x 5 = 10 tokens


def test_zero3_fp32_sft_by_hand():
    e = estimate(TOY, "ZeRO-3", 2, SFT, dtype="float32")
    assert e["weights"] == 2000 and e["master"] == 2000 and e["gradients"] == 2000  # 4 B x 1000 / 2 each
    assert e["optimizer"] == 4000  # two fp32 moments, halved
    assert e["activations"] == 4 * 10 * 2 * 144  # 11520
    assert e["logits"] == 2 * 4 * 10 * 10 + 4 * 10 * 10  # logits + grad (800) + one fp32 block (400)
    # whole model gathered, bucket, sub-group fp32 grad copy, the update's fp32 temporary
    assert e["transient"] == 4 * 1000 + 4 * 500 + 4 * 500 + 4 * 500
    assert e["reference"] == 0 and e["total"] == 32720


def test_zero1_bf16_by_hand():
    e = estimate(TOY, "ZeRO-1", 4, SFT, dtype="bfloat16")
    assert (e["weights"], e["master"], e["optimizer"]) == (2000, 1000, 2000)
    assert e["gradients"] == 2 * 1000 + 4 * 1000 / 4  # full bf16 grads + the fp32 partition gradient
    assert e["activations"] == 2 * 10 * 2 * 144 and e["logits"] == 400 + 400
    assert e["transient"] == 2 * 1000 + 4 * 250  # reduce bucket (the whole model) + the update's temporary
    assert e["total"] == 17560


def test_dpo_doubles_rows_and_the_copy_costs_one_model():
    e = estimate(TOY, "ZeRO-0", 2, Workload(task="dpo", micro_batch=2, seq_len=5, dpo_reference="copy"),
                 dtype="bfloat16")
    assert e["reference"] == 2000 and e["master"] == 4000 and e["optimizer"] == 8000  # ZeRO-0: nothing sharded
    assert e["activations"] == 2 * 20 * 2 * 144 and e["logits"] == 2 * 2 * 200 + 4 * 200
    assert e["transient"] == 4 * 1000  # the update's temporary over every parameter
    assert e["total"] == 35120
    cached = estimate(TOY, "ZeRO-0", 2, Workload(task="dpo", micro_batch=2, seq_len=5), dtype="bfloat16")
    assert e["total"] - cached["total"] == 2000


def test_activation_checkpointing_keeps_layer_inputs_and_one_layer():
    e = estimate(TOY, "ZeRO-3", 2, Workload(micro_batch=2, seq_len=5, activation_checkpointing=True))
    assert e["activations"] == 4 * 10 * (2 * 8 + 144)


def test_fsdp2_and_ddp():
    f = estimate(TOY, "FSDP2", 2, SFT, dtype="bfloat16")
    assert (f["weights"], f["master"], f["gradients"], f["optimizer"], f["transient"]) == (2000, 0, 2000, 4000, 2000 + 2000)
    d = estimate(TOY, "DDP", 2, SFT, dtype="float32", optimizer="lion")
    assert (d["weights"], d["master"], d["gradients"], d["optimizer"]) == (4000, 0, 8000, 4000)


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="ZeRO-4"):
        estimate(TOY, "ZeRO-4", 2)
    with pytest.raises(ValueError, match="fp8"):
        estimate(TOY, "ZeRO-3", 2, dtype="fp8")


def test_7b_on_a40_what_fits():
    a40 = 48e9
    seq = Workload(task="sft", micro_batch=4, seq_len=1024)
    llama = SHAPES["Llama-2-7B"]
    # ZeRO-1: 13.5 GB bf16 weights + 13.5 GB bf16 grads alone, plus ~23 GB of activations: no
    assert not fits(llama, "ZeRO-1", 8, seq, a40)
    assert fits(llama, "ZeRO-3", 8, Workload(task="sft", micro_batch=4, seq_len=1024, activation_checkpointing=True),
                a40)
    assert SHAPES["Qwen2-0.5B"].kv_hidden == 128
