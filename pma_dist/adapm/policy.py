"""Which momentum each parameter block gets, chosen from parameter names (AdaPM paper, Sec. 4.1).

The paper's partition of a transformer:

* embeddings and the attention output projection: no momentum (``"none"``; AdaGrad-style update
  with the AdamW second moment), because their gradients are sparse and not persistent;
* query, key and MLP matrices: debiased low-rank momentum (``"lowrank"``);
* value: full momentum (``"full"``), because a low-rank value momentum slows convergence.

Anything the rules do not recognise (norms, biases, unknown matrices) keeps full momentum: it is
the safe choice, and those tensors are small. ``lm_head`` is treated like the embedding it is
usually tied to. Fused QKV matrices (GPT-2 ``c_attn``, Phi-3 ``qkv_proj``) are split into their
query/key/value slices along the output axis, each slice with its own policy.

A :class:`Segment` also says how the Adam-mini-style second moment is shared (``"element"``: one per
entry, as in AdamW; ``"row"``: one per output neuron; ``"head"``: one per attention head;
``"tensor"``: one per tensor), following Adam-mini's partition: embeddings per entry, query/key per
head, other matrices per output neuron, vectors per tensor.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Dict, Mapping, Optional, Sequence, Tuple

KINDS = ("none", "lowrank", "full")

# (role, pattern searched in the parameter name). First match wins; patterns only apply to 2-D
# weights. Names of GPT-2 (HF and nanoGPT), Llama/Mistral/Qwen, Phi-1.5/2 and Phi-3.
_ROLE_RULES: Tuple[Tuple[str, str], ...] = (
    ("embedding", r"(^|\.)(wte|wpe|embed_tokens|embed_positions|word_embeddings|position_embeddings|lm_head|embed_out)\.weight$"),
    ("qkv", r"(^|\.)(c_attn|qkv_proj)\.weight$"),
    ("query", r"(^|\.)(q_proj|query)\.weight$"),
    ("key", r"(^|\.)(k_proj|key)\.weight$"),
    ("value", r"(^|\.)(v_proj|value)\.weight$"),
    ("attn_out", r"(^|\.)(attn\.c_proj|o_proj|self_attn\.dense|out_proj)\.weight$"),
    ("mlp", r"(^|\.)(mlp\.c_fc|mlp\.c_proj|gate_proj|up_proj|down_proj|gate_up_proj|fc1|fc2)\.weight$"),
)

ROLE_KIND: Dict[str, str] = {
    "embedding": "none",
    "attn_out": "none",
    "query": "lowrank",
    "key": "lowrank",
    "mlp": "lowrank",
    "value": "full",
    "other": "full",
}

_ROLE_PARTITION = {"embedding": "element", "query": "head", "key": "head"}


@dataclass(frozen=True)
class Segment:
    """A slice ``[start, start+length)`` of a parameter along ``out_axis`` with one policy."""

    role: str
    kind: str
    out_axis: int
    start: int
    length: int
    partition: str  # second-moment sharing of AdaPM-mini
    rank: int = 0  # rank of the low-rank momentum (lowrank only)
    heads: int = 0  # attention heads of a "head" partition

    def view(self, t, ndim: int):
        """The segment of ``t`` as an (out, in) matrix (a view), or ``t`` itself for vectors."""
        if ndim != 2:
            return t
        s = t.narrow(self.out_axis, self.start, self.length)
        return s.t() if self.out_axis == 1 else s

    def matrix_shape(self, shape: Sequence[int]) -> Tuple[int, ...]:
        if len(shape) != 2:
            return tuple(shape)
        other = shape[1 - self.out_axis]
        return (self.length, other)


@dataclass(frozen=True)
class ParamPlan:
    name: str
    shape: Tuple[int, ...]
    segments: Tuple[Segment, ...]


def check_overrides(overrides: Optional[Mapping[str, str]]) -> Tuple[Tuple[re.Pattern, str, str], ...]:
    if overrides is None:
        return ()
    if not isinstance(overrides, Mapping):
        raise TypeError(f"Invalid policy_overrides: {overrides!r} (expected a mapping regex -> one of {KINDS})")
    compiled = []
    for pattern, kind in overrides.items():
        if kind not in KINDS:
            raise ValueError(f"Invalid policy_overrides[{pattern!r}] = {kind!r} (expected one of {KINDS})")
        try:
            compiled.append((re.compile(pattern), pattern, kind))
        except (re.error, TypeError) as err:
            raise ValueError(f"Invalid policy_overrides pattern {pattern!r}: {err}") from None
    return tuple(compiled)


def role_of(name: str, ndim: int) -> str:
    if ndim == 2:
        for role, pattern in _ROLE_RULES:
            if re.search(pattern, name):
                return role
    return "other"


def rank_for(rank_ratio: float, shape: Tuple[int, ...]) -> int:
    return max(1, math.ceil(rank_ratio * min(shape)))


def plan_param(
    name: str,
    shape: Tuple[int, ...],
    *,
    rank_ratio: float,
    overrides: Tuple[Tuple[re.Pattern, str, str], ...] = (),
    num_heads: Optional[int] = None,
    num_kv_heads: Optional[int] = None,
    qkv_sizes: Optional[Sequence[int]] = None,
) -> ParamPlan:
    ndim = len(shape)
    role = role_of(name, ndim)
    override = next(((pattern, kind) for regex, pattern, kind in overrides if regex.search(name)), None)

    if role == "qkv" and override is None:
        out_axis, sizes = _fused_qkv_layout(name, shape, qkv_sizes)
        segments, start = [], 0
        for sub_role, length in zip(("query", "key", "value"), sizes):
            segments.append(_segment(name, shape, sub_role, ROLE_KIND[sub_role], out_axis, start, length,
                                     rank_ratio, _heads_of(sub_role, num_heads, num_kv_heads)))
            start += length
        return ParamPlan(name, tuple(shape), tuple(segments))

    if role == "qkv":
        role = "other"  # an override takes the fused matrix as one block
    kind = override[1] if override else ROLE_KIND[role]
    if kind == "lowrank" and ndim != 2:
        raise ValueError(
            f"policy_overrides[{override[0]!r}] asks for 'lowrank' momentum on parameter {name!r} of shape "
            f"{tuple(shape)}, but low-rank momentum needs a 2-D matrix"
        )
    length = shape[0] if ndim >= 1 else 1
    heads = _heads_of(role, num_heads, num_kv_heads)
    return ParamPlan(name, tuple(shape), (_segment(name, shape, role, kind, 0, 0, length, rank_ratio, heads),))


def _heads_of(role: str, num_heads: Optional[int], num_kv_heads: Optional[int]) -> Optional[int]:
    """Heads of a query block, or key-value heads of a key block (grouped-query attention)."""
    return num_kv_heads if role == "key" and num_kv_heads is not None else num_heads


def _segment(name, shape, role, kind, out_axis, start, length, rank_ratio, num_heads) -> Segment:
    ndim = len(shape)
    if ndim != 2:
        partition = "tensor"
    else:
        partition = _ROLE_PARTITION.get(role, "row")
        if partition == "head":
            if num_heads is None:
                partition = "row"
            elif length % num_heads:
                raise ValueError(
                    f"{num_heads} heads do not divide the {role} block of {name!r} ({length} output rows); "
                    f"pass the model's num_heads (and num_kv_heads for grouped-query attention)"
                )
    heads = num_heads if partition == "head" else 0
    seg = Segment(role, kind, out_axis, start, length, partition, heads=heads)
    if kind == "lowrank":
        seg = Segment(role, kind, out_axis, start, length, partition,
                      rank=rank_for(rank_ratio, seg.matrix_shape(shape)), heads=heads)
    return seg


def _fused_qkv_layout(name, shape, qkv_sizes) -> Tuple[int, Tuple[int, int, int]]:
    """Output axis and (q, k, v) sizes of a fused QKV weight, from its shape and optional sizes."""
    if qkv_sizes is not None:
        sizes = tuple(int(s) for s in qkv_sizes)
        axes = [a for a in (0, 1) if shape[a] == sum(sizes)]
        if not axes:
            raise ValueError(f"qkv_sizes={tuple(qkv_sizes)} (sum {sum(sizes)}) matches no axis of fused QKV "
                             f"parameter {name!r} of shape {tuple(shape)}")
        return axes[0], sizes  # (3d, d): axis 0 (nn.Linear); (d, 3d): axis 1 (HF GPT-2 Conv1D)
    for axis in (0, 1):
        if shape[axis] == 3 * shape[1 - axis]:
            third = shape[axis] // 3
            return axis, (third, third, third)
    raise ValueError(
        f"cannot tell the query/key/value split of fused parameter {name!r} of shape {tuple(shape)}: "
        f"pass qkv_sizes=(q, k, v) (e.g. for grouped-query attention) or a policy_overrides entry for it"
    )
