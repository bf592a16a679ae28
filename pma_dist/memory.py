"""Memory model of one training rank: SFT and DPO under DeepSpeed ZeRO 0-3, FSDP2 and DDP.

``estimate`` returns the bytes one rank holds at its peak. The peak is what the rank holds all the
time (the *persistent* parts) plus the largest of what its three kinds of phase add on top (the
*phase* parts); parts that never coexist are not summed:

- persistent: ``weights`` (the module's parameters, or their shard), ``master`` (DeepSpeed's fp32
  copy of its partition), ``gradients`` (those that live from one micro-step to the next),
  ``optimizer`` (the moments), ``reference`` (DPO's reference model, when it is a copy) and
  ``buffers`` (fixed-size buffers a setup allocates once and keeps: ZeRO's gradient bucket).
- ``forward_backward``: the training pass: the activations autograd keeps, the logits and their
  gradient, and the setup's gathered parameters, gradient buckets and reduce-scatter buffers
  (with FSDP2 also the sharded gradients, which exist only from the backward to the step).
- ``step``: the optimizer step's temporaries (DeepSpeed's fp32 gradient copy of one sub-group or
  partition, the unfused update's temporary).
- ``evaluation``: a no-grad forward (evaluation, and the DPO reference pass): the key/value cache
  the Hugging Face forward fills, one layer's working set, the logits, and the gathered parameters.

Every term names the source it follows. On CPU the measured number is the peak resident set, which also
holds the interpreter, the libraries and the data; ``benchmarks/memory.py`` compares differences above a
0.26M-parameter run of the same job (docs/bench/memory.md). GPU peaks are modelled, not measured.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Dict, List, Optional

SETUPS = ("ZeRO-0", "ZeRO-1", "ZeRO-2", "ZeRO-3", "FSDP2", "DDP")
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
MOMENTS = {"adamw": 2, "lion": 1}
PERSISTENT_PARTS = ("weights", "master", "gradients", "optimizer", "reference", "buffers")
PHASES = ("forward_backward", "step", "evaluation")
LOGSOFTMAX_BLOCK_ELEMENTS = 2**24  # recipes/posttrain/losses.CHUNK_ELEMENTS: one fp32 block of the selective log-softmax
# the ZeRO-3 bounds the job fills in (recipes/posttrain/zero_memory.ZERO3_BOUNDS), elements
ZERO3_MAX_LIVE = 30_000_000
ZERO3_PREFETCH = 10_000_000
ZERO3_REDUCE_BUCKET = 10_000_000
ZERO3_SUB_GROUP = 10_000_000
ZERO12_REDUCE_BUCKET = 500_000_000  # DeepSpeed's default reduce_bucket_size


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
    tied_embeddings: bool = False

    @property
    def kv_hidden(self) -> int:
        return self.hidden // self.heads * self.kv_heads

    def activation_elements_per_token_layer(self) -> int:
        """Elements a decoder layer keeps for backward per token (checked against a plain forward of
        the 25M/95M Llamas, docs/bench/memory.md): the two norms' inputs, normalised values and
        outputs (6 h), the rotated q, the attention output and o_proj's contiguous input (3 h), k and v
        (2 h_kv), and the MLP's gate, activation, up and product (4 f; a plain MLP keeps 2 f)."""
        mlp = (4 if self.gated_mlp else 2) * self.intermediate
        return 9 * self.hidden + mlp + 2 * self.kv_hidden

    def layer_modules(self) -> List[int]:
        """Elements of a decoder layer's weight matrices in forward order (q, k, v, o, then the MLP);
        norms and biases are under ZeRO-3's persistence threshold and left out."""
        h, f, kv = self.hidden, self.intermediate, self.kv_hidden
        mlp = [h * f, h * f, f * h] if self.gated_mlp else [h * f, f * h]
        return [h * h, h * kv, h * kv, h * h, *mlp]

    @property
    def largest_module(self) -> int:
        """Elements of the largest single weight: a layer's projection, or the (output) embedding."""
        return max(*self.layer_modules(), self.vocab * self.hidden)

    @property
    def layer_params(self) -> int:
        """Parameters of one decoder layer: what is not embedding, output head or final norm, per layer."""
        outside = self.vocab * self.hidden * (1 if self.tied_embeddings else 2) + self.hidden
        return max(0, (self.params - outside) // self.layers)


# the paper's models (published configs) and this repository's measurement models (benchmarks/make_scale_model.py)
SHAPES = {
    "Qwen2-0.5B": Shape(494_032_768, 24, 896, 4864, 14, 2, 151_936, tied_embeddings=True),
    "Phi-2 2.7B": Shape(2_779_683_840, 32, 2560, 10240, 32, 32, 51_200, gated_mlp=False),
    "Llama-2-7B": Shape(6_738_415_616, 32, 4096, 11008, 32, 32, 32_000),
    "llama_25m": Shape(25_698_816, 8, 512, 1536, 8, 4, 512),
    "llama_95m": Shape(95_437_824, 8, 1024, 2816, 16, 8, 512),
    "stories260K": Shape(260_032, 5, 64, 172, 8, 4, 512, tied_embeddings=True),
}


@dataclass(frozen=True)
class Workload:
    task: str = "sft"                 # "sft" or "dpo"
    micro_batch: int = 1              # sequences (SFT) or pairs (DPO) per rank per micro-step
    seq_len: int = 128
    dpo_reference: str = "cached"     # "cached" or "copy"
    activation_checkpointing: bool = False
    eval_batch: int = 0               # sequences or pairs per rank per evaluation forward; 0: the micro-batch

    @property
    def rows(self) -> int:
        return self.micro_batch * (2 if self.task == "dpo" else 1)

    @property
    def eval_rows(self) -> int:
        return (self.eval_batch or self.micro_batch) * (2 if self.task == "dpo" else 1)


def training_activations(shape: Shape, work: Workload, b: int) -> float:
    """What autograd keeps through the forward: every layer's saved tensors, or with activation
    checkpointing each layer's input plus one layer recomputed in backward."""
    tokens = work.rows * work.seq_len
    per_layer = shape.activation_elements_per_token_layer()
    if work.activation_checkpointing:
        return float(b * tokens * (shape.layers * shape.hidden + per_layer))
    return float(b * tokens * shape.layers * per_layer)


def training_logits(shape: Shape, work: Workload, b: int) -> float:
    """The logits and their gradient (rows x T x vocab, compute dtype) and one fp32 block of the
    selective log-softmax (recipes/posttrain/losses.py: nothing else over the vocabulary is kept)."""
    elements = work.rows * work.seq_len * shape.vocab
    return float(2 * b * elements + 4 * min(LOGSOFTMAX_BLOCK_ELEMENTS, elements))


def evaluation_pass(shape: Shape, work: Workload, b: int) -> float:
    """A no-grad forward of ``eval_rows`` rows: the key/value cache the Hugging Face forward fills for
    every layer (``use_cache`` is on outside training), plus the larger of one layer's working set (the
    residual, its normalised copy and the attention output, 3 h, with the MLP's activation, up and product,
    3 f; a plain MLP's fc1 output and activation, 2 f) and the logits with one fp32 log-softmax block."""
    tokens = work.eval_rows * work.seq_len
    cache = b * tokens * shape.layers * 2 * shape.kv_hidden
    layer = b * tokens * (3 * shape.hidden + (3 if shape.gated_mlp else 2) * shape.intermediate)
    logits = b * tokens * shape.vocab + 4 * min(LOGSOFTMAX_BLOCK_ELEMENTS, tokens * shape.vocab)
    return float(cache + max(layer, logits))


def zero3_gathered(shape: Shape, max_live: int = ZERO3_MAX_LIVE) -> int:
    """Elements ZeRO-3 holds gathered at once in a pass once its trace is recorded (measured 32.5-35.4M
    with a 30M limit on the 95M Llama, benchmarks/memory_probe.py): the coordinator prefetches while
    fewer than ``stage3_max_live_parameters`` are live and stops after the parameter that crosses the
    limit, and the module about to run is fetched regardless (partitioned_param_coordinator.py
    ``fetch_sub_module``), so up to the limit plus two of the largest modules; never more than the model."""
    return int(min(shape.params, max_live + 2 * shape.largest_module))


def _check(setup: str, world: int, workload: Workload, dtype: str) -> None:
    if setup not in SETUPS:
        raise ValueError(f"unknown set-up {setup!r}; expected one of {SETUPS}")
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"unknown dtype {dtype!r}; expected one of {sorted(DTYPE_BYTES)}")
    if workload.task not in ("sft", "dpo") or workload.dpo_reference not in ("cached", "copy"):
        raise ValueError(f"bad workload {workload}")
    if world < 1:
        raise ValueError(f"world must be >= 1, got {world}")


def estimate(shape: Shape, setup: str, world: int, workload: Workload = Workload(), *,
             dtype: str = "float32", optimizer: str = "adamw", fused_step: bool = False) -> Dict[str, float]:
    """Bytes per rank by part (:data:`PERSISTENT_PARTS`, :data:`PHASES`) and their ``total``:
    the persistent parts plus the largest phase.

    ``fused_step``: the optimizer step runs as one fused kernel with no temporary (pma_dist's CPU
    kernel, which ``fused=None`` selects on CPU); otherwise the multi-tensor path makes one fp32
    temporary over what one call steps (AdamW's denominator, Lion's direction: pma_dist/functional.py).
    """
    _check(setup, world, workload, dtype)
    n, b, w = shape.params, DTYPE_BYTES[dtype], world
    mixed = b != 4
    moments = 4 * MOMENTS[optimizer]
    stage = int(setup[-1]) if setup.startswith("ZeRO-") else None
    activations = training_activations(shape, workload, b)
    logits = training_logits(shape, workload, b)
    evaluation = evaluation_pass(shape, workload, b)
    reference = b * n if (workload.task == "dpo" and workload.dpo_reference == "copy") else 0.0
    layer = shape.layer_params

    def update_temporary(stepped: float) -> float:
        return 0.0 if fused_step else 4.0 * stepped

    if stage == 3:
        gathered = b * zero3_gathered(shape)
        bucket = min(ZERO3_REDUCE_BUCKET, n)
        sub_group = min(ZERO3_SUB_GROUP, n / w)
        parts = dict(
            weights=b * n / w,          # the partition (stage3.py lp_param_buffer)
            master=4 * n / w,           # fp32 copy of the partition (stage3.py fp32_partitioned_groups_flat, a clone)
            gradients=b * n / w,        # grad_partitions_flat_buffer, in the gradient-accumulation (model) dtype
            optimizer=moments * n / w,
            reference=reference,
            buffers=b * bucket,         # the ipg bucket (torch.empty(reduce_bucket_size)), kept once filled
            # activations and logits, the gathered parameters, reduce_scatter_coalesced's flat copy of the
            # bucket and its output partitions, and a parameter's full gradient before its hook copies it
            # into the bucket
            forward_backward=(activations + logits + gathered + b * bucket * (1 + 1 / w)
                              + b * shape.largest_module),
            # _prepare_fp32_grad_for_sub_group: a flat fp32 copy of one sub-group's gradient (a bf16 flatten first)
            step=(4 + (b if mixed else 0)) * sub_group + update_temporary(sub_group),
            evaluation=evaluation + gathered,
        )
    elif setup == "FSDP2":
        grads = 4 * n / w  # sharded fp32 gradients: from the first reduce-scatter of a backward to zero_grad
        # FSDP2 units: one per decoder layer, the root holds embeddings, head and final norm
        root = n - shape.layers * layer
        parts = dict(
            weights=4 * n / w,          # fp32 shards (the compute dtype only in the unsharded units)
            master=0.0,
            gradients=0.0,
            optimizer=moments * n / w,  # optimizer state in the shards' dtype
            reference=reference,
            buffers=0.0,
            # the backward holds what is left of the activations and the sharded gradients made so far
            # (at most the larger of the two), the root unit (not resharded after forward), and four layer
            # units: the one computing, the next prefetched, its unsharded gradients and the previous
            # unit's reduce-scatter input (reduce_scatter_max_input_buffers = 1; _fsdp_param_group.py)
            forward_backward=max(activations + logits, grads) + b * (root + 4 * layer),
            step=grads + update_temporary(n / w),
            evaluation=evaluation + b * (root + 2 * layer),  # the computing and the prefetched unit
        )
    else:
        # ZeRO-0/1/2 and DDP (not validated on this machine): full-size weights in the compute dtype
        if stage is not None and stage >= 1:
            master = 4 * n / w
        else:
            master = 4.0 * n if mixed else 0.0
        if setup == "DDP":
            gradients, buffers = b * n, b * n  # gradients and DDP's bucket copy of them
        elif stage in (0, 1):
            gradients, buffers = b * n, 0.0
        else:
            gradients, buffers = b * n / w, b * min(n, ZERO12_REDUCE_BUCKET)  # ZeRO-2's ipg bucket
        if stage == 1:
            buffers = b * min(n, ZERO12_REDUCE_BUCKET)
        sharded = stage is not None and stage >= 1
        stepped = n / w if sharded else n
        parts = dict(
            weights=b * n, master=master, gradients=gradients, optimizer=moments * n / (w if sharded else 1),
            reference=reference, buffers=buffers,
            forward_backward=activations + logits,
            # the fp32 gradient partition the sharded optimizers step on (stage_1_and_2.py), the update's temporary
            step=(4 * stepped if (mixed and sharded) else 0.0) + update_temporary(stepped),
            evaluation=evaluation,
        )
    parts = {k: float(v) for k, v in parts.items()}
    parts["total"] = sum(parts[k] for k in PERSISTENT_PARTS) + max(parts[k] for k in PHASES)
    return parts


def peak_phase(parts: Dict[str, float]) -> str:
    """The phase that sets the peak in an :func:`estimate`."""
    return max(PHASES, key=lambda k: parts[k])


def fits(shape: Shape, setup: str, world: int, workload: Workload, memory_bytes: float, *,
         dtype: str = "bfloat16", optimizer: str = "adamw", headroom: float = 0.9) -> bool:
    """Does the modelled peak fit in ``headroom`` of the device memory (the rest: CUDA context, allocator cache)?"""
    return estimate(shape, setup, world, workload, dtype=dtype, optimizer=optimizer)["total"] <= headroom * memory_bytes


def describe(shape: Shape, setup: str, world: int, workload: Workload, *, dtype: str = "bfloat16",
             optimizer: str = "adamw") -> dict:
    """The estimate with its inputs, for JSON reports."""
    parts = estimate(shape, setup, world, workload, dtype=dtype, optimizer=optimizer)
    return dict(setup=setup, world=world, dtype=dtype, optimizer=optimizer, shape=asdict(shape),
                workload=asdict(workload), bytes=parts, peak_phase=peak_phase(parts))


def shape_from_config(config: dict, params: Optional[int] = None) -> Shape:
    """A :class:`Shape` from a Hugging Face ``config.json`` dict (Llama-style field names)."""
    heads = config["num_attention_heads"]
    return Shape(params=params or 0, layers=config["num_hidden_layers"], hidden=config["hidden_size"],
                 intermediate=config["intermediate_size"], heads=heads,
                 kv_heads=config.get("num_key_value_heads") or heads, vocab=config["vocab_size"],
                 gated_mlp=config.get("hidden_act", "silu") in ("silu", "swiglu"),
                 tied_embeddings=bool(config.get("tie_word_embeddings", False)))
