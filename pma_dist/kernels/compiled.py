"""The GPU path: the PMA step as one ``torch.compile`` (inductor) program per bucket of tensors.

Each tensor's update is written as one pure expression (the operations of
:func:`pma_dist.functional.adamw_pma_foreach` / :func:`~pma_dist.functional.lion_pma_foreach`, in
their order), and one compiled function applies it to every tensor of a bucket, so inductor emits one
fused kernel per tensor: each element is read once and written once (fp32: 28 B/param for AdamW-PMA
against the foreach path's ~88 B/param, see :data:`STEP_BYTES_PER_PARAM`).

No recompile per step or per phase. The step's scalars (:mod:`pma_dist.coefficients`) reach the
kernel as tensor data, not as Python numbers the graph would specialise on: one small tensor of the
state dtype per call, copied to the device from pinned memory without blocking (no host
synchronisation per step). The phase-dependent branches of the foreach path are expressed as arithmetic whose neutral form is
exact: ``rescale`` is 1 where the foreach path skips the rescale (``x * 1 == x``), and the two
placements of ``eps`` are ``(sqrt(v) + eps_inner) / divisor + eps_outer`` with one of the two eps 0
(``x + 0 == x`` for the positive ``x`` here). So AdamW-PMA's two variants, its large and small steps
and Lion-PMA each compile once per bucket layout (dtype, device, list length, shapes).

The result equals the foreach path's up to the roundings inductor may do differently (it may contract a
multiply and an add into one FMA and evaluates ``value * m / d`` in its own order); the tests bound the
difference per step (``tests/test_compiled_step.py``).

:class:`pma_dist.optim.PMAOptimizer` runs this path for ``fused=True`` on non-CPU tensors;
:func:`adamw_pma_compiled` and :func:`lion_pma_compiled` run it on any device, CPU included (inductor's
C++ backend), which is how it is tested on machines without a GPU.
"""
from __future__ import annotations

import functools
import os
import shutil
from typing import Dict, List, Optional, Sequence

import torch
from torch import Tensor

from ..coefficients import AdamWStepCoefficients, LionStepCoefficients
from ..schedule import PMAPhase

LOW_PRECISION = (torch.bfloat16, torch.float16)
COMPILED_PARAM_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
#: device types inductor generates code for (Triton on GPUs, C++ on CPU)
COMPILED_DEVICE_TYPES = ("cuda", "xpu", "cpu")

#: Fewest bytes one step moves per parameter (each input read once, each output written once), by path
#: and parameter dtype, moments fp32. Foreach counts each torch op's reads and writes (fp32, AdamW-PMA:
#: m*=d 8, m+=c*g 12, v*=d 8, v+=c*g*g 12, p*=s 8, sqrt 8, /div 8, +eps 8, addcdiv 16 = 88; the paper
#: variant's rescale adds 16 once per period and is left out). bf16 foreach adds the fp32 copies of the
#: parameter and gradient and the copy back (2+4, 2+4, 4+2 = 18). Lion-PMA foreach: p*=s 8, d=m*c 8,
#: d+=c*g 12, sign 8, p+=a*d 12, m*=d 8, m+=c*g 12 = 68.
STEP_BYTES_PER_PARAM = {
    ("adamw", "compiled", torch.float32): 28, ("adamw", "compiled", torch.bfloat16): 22,
    ("adamw", "foreach", torch.float32): 88, ("adamw", "foreach", torch.bfloat16): 88 + 18,
    ("lion", "compiled", torch.float32): 20, ("lion", "compiled", torch.bfloat16): 14,
    ("lion", "foreach", torch.float32): 68, ("lion", "foreach", torch.bfloat16): 68 + 18,
}


@functools.lru_cache(maxsize=None)
def unavailable_reason(device_type: str) -> Optional[str]:
    """``None`` if the compiled step can run on tensors of ``device_type``, otherwise why not."""
    if device_type not in COMPILED_DEVICE_TYPES:
        return (f"torch.compile (inductor) generates no code for {device_type!r} tensors; the compiled step runs "
                f"on {', '.join(COMPILED_DEVICE_TYPES)}")
    try:
        from torch._dynamo.eval_frame import is_dynamo_supported
        if not is_dynamo_supported():
            return "torch.compile is not supported by this Python/torch build"
    except Exception as exc:  # pragma: no cover - torch without dynamo
        return f"torch.compile is unavailable: {exc}"
    if device_type == "cpu":
        compiler = os.environ.get("CXX", "c++")
        if shutil.which(compiler) is None:
            return f"inductor's CPU backend needs a C++ compiler; {compiler!r} (from $CXX, default 'c++') is not on PATH"
    else:
        from torch.utils._triton import has_triton
        if not has_triton():
            return f"inductor needs Triton for {device_type!r} tensors and it is not installed"
    return None


def unsupported_reason(params: Sequence[Tensor], grads: Sequence[Tensor],
                       *moment_lists: Sequence[Tensor]) -> Optional[str]:
    """``None`` if the compiled step can update these lists (one device and dtype), otherwise why not."""
    if not params:
        return None
    first = params[0]
    reason = unavailable_reason(first.device.type)
    if reason is not None:
        return reason
    if first.dtype not in COMPILED_PARAM_DTYPES:
        return f"parameter 0 is {first.dtype}; the compiled step supports float32, float64, bfloat16 and float16"
    state = torch.float32 if first.dtype in LOW_PRECISION else first.dtype
    for i, (p, g) in enumerate(zip(params, grads)):
        if g.dtype != p.dtype or g.device != p.device or g.shape != p.shape:
            return (f"gradient {i} is {g.dtype} {tuple(g.shape)} on {g.device}, its parameter {p.dtype} "
                    f"{tuple(p.shape)} on {p.device}")
        for moments in moment_lists:
            m = moments[i]
            if m.dtype != state or m.device != p.device or m.shape != p.shape:
                return f"moment {i} is {m.dtype} {tuple(m.shape)} on {m.device}; expected {state} {tuple(p.shape)}"
    return None


# ---------------------------------------------------------------------------------------------- update bodies
def _f32(t: Tensor) -> Tensor:
    return t.float() if t.dtype in LOW_PRECISION else t


def _adamw_lists(params: List[Tensor], grads: List[Tensor], exp_avgs: List[Tensor], exp_avg_sqs: List[Tensor],
                 c: Tensor) -> None:
    # c: decay1, grad_coef1, decay2, grad_coef2, param_scale, eps_inner, divisor, eps_outer, step_coef, rescale
    for p, g, m, v in zip(params, grads, exp_avgs, exp_avg_sqs):
        g = _f32(g)
        m_new = m * c[0] + c[1] * g
        v_new = v * c[2] + c[3] * g * g
        denom = (torch.sqrt(v_new) + c[5]) / c[6] + c[7]
        theta = _f32(p) * c[4] + c[8] * m_new / denom
        p.copy_(theta)
        m.copy_(m_new * c[9])
        v.copy_(v_new * c[9])


def _lion_lists(params: List[Tensor], grads: List[Tensor], exp_avgs: List[Tensor], c: Tensor) -> None:
    # c: param_scale, decay1, grad_coef1, step_alpha, decay2, grad_coef2, rescale
    for p, g, m in zip(params, grads, exp_avgs):
        g = _f32(g)
        direction = torch.sign(m * c[1] + c[2] * g)
        p.copy_(_f32(p) * c[0] + c[3] * direction)
        m.copy_((m * c[4] + c[5] * g) * c[6])


@functools.lru_cache(maxsize=None)
def _compiled(name: str):
    body = {"adamw": _adamw_lists, "lion": _lion_lists}[name]
    # Not fullgraph=True: with it, a bucket layout past dynamo's recompile limit (8 per function: e.g. many
    # ZeRO-3 sub-groups of different lengths) is a hard error; without it dynamo runs that layout eagerly,
    # the same operations unfused. The bodies have no graph break (the compile-count test would see one).
    return torch.compile(body)


def _device_scalars(values: Sequence[float], like: Tensor) -> Tensor:
    """The step's scalars as one tensor of the state dtype on ``like``'s device (rounded as torch rounds a
    Python scalar for an op in that dtype), copied from pinned memory without blocking the host."""
    device = like.device
    host = torch.tensor(values, dtype=torch.float32 if like.dtype in LOW_PRECISION else like.dtype)
    if device.type == "cpu":
        return host
    # the caching host allocator keeps a pinned block until the copy that reads it has run
    return host.pin_memory().to(device, non_blocking=True)


# ---------------------------------------------------------------------------------------------- entry points
def adamw_pma_compiled(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    exp_avgs: Sequence[Tensor],
    exp_avg_sqs: Sequence[Tensor],
    *,
    phase: PMAPhase,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    variant: str,
) -> None:
    """AdamW-PMA on lists of one device and dtype, in one compiled pass; the foreach path's numbers up to
    the roundings bounded in ``tests/test_compiled_step.py``."""
    if not params:
        return
    _require_supported(params, grads, exp_avgs, exp_avg_sqs)
    c = AdamWStepCoefficients.for_step(phase, lr=lr, beta1=beta1, beta2=beta2, eps=eps,
                                       weight_decay=weight_decay, variant=variant)
    eps_inner, eps_outer = (c.eps, 0.0) if c.eps_before_divide else (0.0, c.eps)
    scalars = _device_scalars([c.decay1, c.grad_coef1, c.decay2, c.grad_coef2, c.param_scale, eps_inner,
                               c.divisor, eps_outer, c.step_coef, c.rescale], params[0])
    with torch.no_grad():  # also when called outside an optimizer's step (parameters are leaves that need grad)
        _compiled("adamw")(list(params), list(grads), list(exp_avgs), list(exp_avg_sqs), scalars)


def lion_pma_compiled(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    exp_avgs: Sequence[Tensor],
    *,
    phase: PMAPhase,
    lr: float,
    beta1: float,
    beta2: float,
    weight_decay: float,
) -> None:
    """Lion-PMA on lists of one device and dtype, in one compiled pass (see :func:`adamw_pma_compiled`)."""
    if not params:
        return
    _require_supported(params, grads, exp_avgs)
    c = LionStepCoefficients.for_step(phase, lr=lr, beta1=beta1, beta2=beta2, weight_decay=weight_decay)
    scalars = _device_scalars([c.param_scale, c.decay1, c.grad_coef1, c.step_alpha, c.decay2, c.grad_coef2,
                               c.rescale], params[0])
    with torch.no_grad():
        _compiled("lion")(list(params), list(grads), list(exp_avgs), scalars)


def _require_supported(params, grads, *moments) -> None:
    reason = unsupported_reason(params, grads, *moments)
    if reason is not None:
        raise ValueError(f"the compiled PMA step cannot update these tensors: {reason}")

