"""Memory model of one training rank: SFT and DPO under DeepSpeed ZeRO 0-3, FSDP2 and DDP.

``estimate`` returns the bytes one rank holds at its peak, by part:

- ``weights``: the module's parameters in the compute dtype; 1/W of them under ZeRO-3 and FSDP2 (FSDP2
  keeps its fp32 shards as the weights and casts a unit at a time for compute).
- ``master``: the fp32 master copy DeepSpeed's ZeRO-1/2/3 optimizers keep of their partition (a clone
  even in fp32 training: ``stage_1_and_2.py`` / ``stage3.py`` ``.clone().float()``), 4N/W; ZeRO-0 and
  DDP in bf16 keep a full fp32 master; none in fp32 ZeRO-0, DDP, FSDP2.
- ``gradients``: ZeRO-0 and ZeRO-1 hold full gradients in the compute dtype; ZeRO-2/3 and FSDP2 a 1/W
  partition; DDP full gradients plus its bucket copy; mixed precision adds the fp32 partition gradient
  the optimizer steps on (ZeRO-1/2/3).
- ``optimizer``: fp32 moments (AdamW 2, Lion 1) per parameter, 1/W under ZeRO-1/2/3 and FSDP2.
- ``reference``: DPO's reference: ``copy`` is the full model in the compute dtype on every rank;
  ``cached`` (``recipes/posttrain/reference.py``) is 8 bytes per scored sequence, counted here as 0
  (host-side, kilobytes).
- ``activations``: what a decoder layer keeps for backward, per token: ``9 h + 4 f + 2 h_kv`` elements for
  a gated MLP (norm inputs/outputs, q and the GQA-expanded k, v, attention output, o_proj input, the
  MLP's gate, up, activation and product), ``9 h + 2 f + 2 h_kv`` for a plain one; times layers, tokens
  (micro-batch sequences x length, x2 for DPO's chosen and rejected rows). Activation checkpointing
  keeps only each layer's input (``h`` per token per layer) plus one layer recomputed. Attention is
  assumed flash / memory-efficient (no ``T^2`` scores).
- ``logits``: the logits and their gradient over ``rows x T x vocab`` in the compute dtype, plus one
  64 MiB fp32 block of the selective log-softmax (``recipes/posttrain/losses.py``).
- ``transient``: ZeRO-3's gathered parameters (up to ``stage3_max_live_parameters``), its reduce bucket
  and the fp32 gradient copy of one optimizer sub-group; FSDP2's two gathered units (one computing, one
  prefetched); ZeRO-1/2's reduce bucket; and the update's one fp32 temporary over what one optimizer
  call steps.

On CPU the measured peak RSS also holds the interpreter, libraries and data; ``benchmarks/memory.py``
checks the model on differences above a 0.26M-parameter run of the same job at 25M and 95M parameters
(docs/BENCHMARKS.md: within +-15% for SFT under ZeRO-3 and FSDP2; DPO outside it at one size each).
The parts are summed, although under FSDP2 the activations are gone when the update's temporary exists.
GPU peaks are modelled, not measured.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Dict, Optional

SETUPS = ("ZeRO-0", "ZeRO-1", "ZeRO-2", "ZeRO-3", "FSDP2", "DDP")
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
MOMENTS = {"adamw": 2, "lion": 1}
LOGSOFTMAX_BLOCK_BYTES = 2**24 * 4  # recipes/posttrain/losses.CHUNK_ELEMENTS fp32 elements
# ZeRO-3 bounds the job fills in (recipes/posttrain/zero_memory.py), elements
ZERO3_MAX_LIVE = 30_000_000
ZERO3_REDUCE_BUCKET = 10_000_000
ZERO3_SUB_GROUP = 10_000_000
ZERO12_REDUCE_BUCKET = 500_000_000  # DeepSpeed's default


@dataclass(frozen=True)
class Shape:
    """What the memory of a decoder-only transformer depends on."""

    params: int
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int
    gated_mlp: bool = True

    @property
    def kv_hidden(self) -> int:
        return self.hidden // self.heads * self.kv_heads

    def activation_elements_per_token_layer(self) -> int:
        mlp = (4 if self.gated_mlp else 2) * self.intermediate
        return 9 * self.hidden + mlp + 2 * self.kv_hidden


# the paper's models (published configs) and this repository's measurement models (benchmarks/make_scale_model.py)
SHAPES = {
    "Qwen2-0.5B": Shape(494_032_768, 24, 896, 4864, 14, 2, 151_936),
    "Phi-2 2.7B": Shape(2_779_683_840, 32, 2560, 10240, 32, 32, 51_200, gated_mlp=False),
    "Llama-2-7B": Shape(6_738_415_616, 32, 4096, 11008, 32, 32, 32_000),
    "llama_25m": Shape(25_698_816, 8, 512, 1536, 8, 4, 512),
    "llama_95m": Shape(95_437_824, 8, 1024, 2816, 16, 8, 512),
    "stories260K": Shape(260_032, 5, 64, 172, 8, 4, 512),
}


@dataclass(frozen=True)
class Workload:
    task: str = "sft"                 # "sft" or "dpo"
    micro_batch: int = 1              # sequences (SFT) or pairs (DPO) per rank per micro-step
    seq_len: int = 128
    dpo_reference: str = "cached"     # "cached" or "copy"
    activation_checkpointing: bool = False

    @property
    def rows(self) -> int:
        return self.micro_batch * (2 if self.task == "dpo" else 1)


def estimate(shape: Shape, setup: str, world: int, workload: Workload = Workload(), *,
             dtype: str = "float32", optimizer: str = "adamw") -> Dict[str, float]:
    """Bytes per rank at the training peak, by part, and their ``total``."""
    if setup not in SETUPS:
        raise ValueError(f"unknown set-up {setup!r}; expected one of {SETUPS}")
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"unknown dtype {dtype!r}; expected one of {sorted(DTYPE_BYTES)}")
    if workload.task not in ("sft", "dpo") or workload.dpo_reference not in ("cached", "copy"):
        raise ValueError(f"bad workload {workload}")
    if world < 1:
        raise ValueError(f"world must be >= 1, got {world}")
    n, b, w = shape.params, DTYPE_BYTES[dtype], world
    mixed = b != 4
    stage = int(setup[-1]) if setup.startswith("ZeRO-") else None
    sharded_optimizer = setup == "FSDP2" or (stage or 0) >= 1
    if setup == "FSDP2":
        weights = 4 * n / w
        master = 0.0
    else:
        weights = b * n / (w if stage == 3 else 1)
        if stage is not None and stage >= 1:
            master = 4 * n / w
        else:
            master = 4.0 * n if mixed else 0.0
    if setup == "DDP":
        gradients = 2 * b * n
    elif setup == "FSDP2":
        gradients = 4 * n / w
    elif stage in (0, 1):
        gradients = b * n
    else:
        gradients = b * n / w
    if mixed and stage is not None and stage >= 1:
        gradients += 4 * n / w
    optimizer_states = 4 * MOMENTS[optimizer] * n / (w if sharded_optimizer else 1)
    reference = b * n if (workload.task == "dpo" and workload.dpo_reference == "copy") else 0.0

    tokens = workload.rows * workload.seq_len
    per_layer = shape.activation_elements_per_token_layer()
    if workload.activation_checkpointing:
        activation_elements = tokens * (shape.layers * shape.hidden + per_layer)
    else:
        activation_elements = tokens * shape.layers * per_layer
    activations = b * activation_elements
    logits = 2 * b * tokens * shape.vocab + min(LOGSOFTMAX_BLOCK_BYTES, 4 * tokens * shape.vocab)

    # the update's one fp32 temporary (AdamW's denominator, Lion's direction: pma_dist/functional.py)
    # over what one optimizer call steps: a sub-group under ZeRO-3, the partition under ZeRO-1/2 and
    # FSDP2, every parameter under ZeRO-0 and DDP
    if stage == 3:
        stepped = min(n / w, ZERO3_SUB_GROUP)
        transient = (b * min(n, ZERO3_MAX_LIVE) + b * min(n / w, ZERO3_REDUCE_BUCKET)
                     + 4 * stepped + 4 * stepped)  # gathered params, bucket, sub-group fp32 grad copy, temporary
    elif setup == "FSDP2":
        transient = 2 * b * n / shape.layers + 4 * n / w
    elif stage in (1, 2):
        transient = b * min(n, ZERO12_REDUCE_BUCKET) + 4 * n / w
    else:
        transient = 4.0 * n
    parts = dict(weights=weights, master=master, gradients=gradients, optimizer=optimizer_states,
                 reference=reference, activations=float(activations), logits=float(logits), transient=float(transient))
    parts["total"] = sum(parts.values())
    return parts


def fits(shape: Shape, setup: str, world: int, workload: Workload, memory_bytes: float, *,
         dtype: str = "bfloat16", optimizer: str = "adamw", headroom: float = 0.9) -> bool:
    """Does the modelled peak fit in ``headroom`` of the device memory (the rest: CUDA context, allocator cache)?"""
    return estimate(shape, setup, world, workload, dtype=dtype, optimizer=optimizer)["total"] <= headroom * memory_bytes


def describe(shape: Shape, setup: str, world: int, workload: Workload, *, dtype: str = "bfloat16",
             optimizer: str = "adamw") -> dict:
    """The estimate with its inputs, for JSON reports."""
    return dict(setup=setup, world=world, dtype=dtype, optimizer=optimizer, shape=asdict(shape),
                workload=asdict(workload), bytes=estimate(shape, setup, world, workload, dtype=dtype,
                                                         optimizer=optimizer))


def shape_from_config(config: dict, params: Optional[int] = None) -> Shape:
    """A :class:`Shape` from a Hugging Face ``config.json`` dict (Llama-style field names)."""
    heads = config["num_attention_heads"]
    return Shape(params=params or 0, layers=config["num_hidden_layers"], hidden=config["hidden_size"],
                 intermediate=config["intermediate_size"], heads=heads,
                 kv_heads=config.get("num_key_value_heads") or heads, vocab=config["vocab_size"],
                 gated_mlp=config.get("hidden_act", "silu") in ("silu", "swiglu"))
