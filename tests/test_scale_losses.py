"""The selective log-softmax of recipes/posttrain/losses.py against a float64 log_softmax written here.

Tolerances, for fp32 arithmetic (unit roundoff u = 2**-24) on one row of V logits with max m,
log-sum-exp L = m + log S and target logit x_t: ``x_t - L`` rounds once (u * (|x_t| + |L|)); S, a sum
of V terms in (0, 1] each with <= 2u error from exp, has relative error <= (V + 1) u, which is an
absolute error <= (V + 1) u in log S; log and the add of m round once more (<= u |L| + u). So one token's
error is <= u (|x_t| + 2 |L| + V + 4). A sequence sum adds the token bounds. The gradient of one
element is g * (onehot - p) with p = exp(x - L); p's relative error is <= the bound above plus 2u
(exp), so the element's error is <= |g| * (bound + 3u).
"""
import pytest
import torch

from recipes.posttrain import losses
from recipes.posttrain.data import IGNORE_INDEX

U32 = 2.0**-24


def _reference(logits, targets):
    """float64 log-softmax of the same logits, gathered (what the job computed before, in exact-ish arithmetic)."""
    x = logits.detach().double().requires_grad_(True)
    out = torch.log_softmax(x, dim=-1).gather(-1, targets[..., None]).squeeze(-1)
    return x, out


def _token_bound(logits, targets):
    x = logits.detach().double()
    lse = torch.logsumexp(x, dim=-1)
    picked = x.gather(-1, targets[..., None]).squeeze(-1)
    return U32 * (picked.abs() + 2 * lse.abs() + x.shape[-1] + 4), lse


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk", [losses.CHUNK_ELEMENTS, 3 * 50])  # one block; blocks of 3 rows (odd split)
def test_selected_logprobs_and_gradient_match_float64_log_softmax(monkeypatch, dtype, chunk):
    monkeypatch.setattr(losses, "CHUNK_ELEMENTS", chunk)
    g = torch.Generator().manual_seed(0)
    logits = (4 * torch.randn(2, 7, 50, generator=g)).to(dtype).requires_grad_(True)
    targets = torch.randint(0, 50, (2, 7), generator=g)
    got = losses.selected_logprobs(logits, targets)
    assert got.dtype == torch.float32  # fp32 at least, whatever the logits' dtype
    x64, want = _reference(logits, targets)
    bound, lse = _token_bound(logits, targets)
    assert ((got.double() - want).abs() <= bound).all(), (got.double() - want).abs().max()

    weights = torch.randn(2, 7, generator=g)
    (got * weights).sum().backward()
    (want * weights.double()).sum().backward()
    element = weights.double().abs()[..., None] * (bound[..., None] + 3 * U32)
    if dtype == torch.bfloat16:  # the fp32 gradient is rounded to the logits' dtype: 2**-8 relative
        element = element + x64.grad.abs() * 2.0**-8
    assert ((logits.grad.double() - x64.grad).abs() <= element).all()


def test_sequence_logprobs_match_the_full_log_softmax_within_the_summed_bound():
    g = torch.Generator().manual_seed(1)
    logits = 3 * torch.randn(3, 9, 40, generator=g)
    labels = torch.randint(0, 40, (3, 9), generator=g)
    labels[:, :3] = IGNORE_INDEX  # prompt
    labels[2, 6:] = IGNORE_INDEX  # padding
    got = losses.sequence_logprobs(logits, labels)
    targets, mask = labels[:, 1:], labels[:, 1:] != IGNORE_INDEX
    _, want = _reference(logits[:, :-1], targets.clamp(min=0))
    bound, _ = _token_bound(logits[:, :-1], targets.clamp(min=0))
    want, bound = (want * mask).sum(-1), (bound * mask).sum(-1)
    assert ((got.double() - want).abs() <= bound).all()


def test_backward_keeps_no_fp32_copy_of_bf16_logits():
    # what autograd saves for backward, beyond the logits themselves: the old path (upcast, then
    # log_softmax) kept a fp32 rows x vocab table; the selective one keeps only targets and one fp32 per row
    logits = torch.randn(2, 16, 1000).to(torch.bfloat16).requires_grad_(True)
    targets = torch.randint(0, 1000, (2, 16))
    saved = []

    def pack(t):
        if t.untyped_storage().data_ptr() != logits.untyped_storage().data_ptr():
            saved.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        losses.selected_logprobs(logits, targets).sum().backward()
    rows = 2 * 16
    assert sum(saved) <= rows * (8 + 4) + 64, saved  # int64 targets + fp32 log-sum-exp (+ the reshape's index)
    assert logits.grad.dtype == torch.bfloat16
