"""SFT and DPO objectives on causal-LM logits.

Own implementation rather than TRL's: the DPO loss is three lines (Rafailov et al. 2023, eq. 7),
TRL is not a dependency of this project and pulls in a large tree, and its trainer owns the
training loop we need to control (PMA steps every micro-batch, GA baselines accumulate). The
functions are checked against hand-computed values in ``tests/test_posttrain_losses.py``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .data import IGNORE_INDEX


# rows of the vocabulary scored at a time: a 64 MiB fp32 block whatever the vocabulary size
CHUNK_ELEMENTS = 2**24


class _SelectedLogprobs(torch.autograd.Function):
    """``log_softmax(x)[target]`` for rows of ``x`` (``(rows, vocab)``, any float dtype), in fp32 or wider.

    The full log-softmax over ``rows x vocab`` is never built: each block of rows yields its
    log-sum-exp and the target logit, and only the ``rows``-long log-sum-exp is kept for backward,
    which rebuilds the block's softmax from it. Peak extra memory is one fp32 block, not a fp32
    copy of all logits (``torch.log_softmax`` on bf16 logits upcast first would keep one for backward).
    """

    @staticmethod
    def forward(ctx, x, targets):
        out_dtype = torch.promote_types(x.dtype, torch.float32)
        rows = max(1, CHUNK_ELEMENTS // max(1, x.shape[-1]))
        lse = torch.empty(x.shape[0], dtype=out_dtype, device=x.device)
        picked = torch.empty(x.shape[0], dtype=out_dtype, device=x.device)
        for start in range(0, x.shape[0], rows):
            block = x[start:start + rows].to(out_dtype)
            lse[start:start + rows] = torch.logsumexp(block, dim=-1)
            picked[start:start + rows] = block.gather(-1, targets[start:start + rows, None]).squeeze(-1)
        ctx.save_for_backward(x, targets, lse)
        ctx.rows = rows
        return picked - lse

    @staticmethod
    def backward(ctx, grad):
        x, targets, lse = ctx.saved_tensors
        grad_x = torch.empty_like(x)
        for start in range(0, x.shape[0], ctx.rows):
            stop = start + ctx.rows
            g = grad[start:stop, None].to(lse.dtype)
            # d/dx (x_t - lse) = onehot(t) - softmax(x)
            block = torch.exp(x[start:stop].to(lse.dtype) - lse[start:stop, None]).mul_(-g)
            block.scatter_add_(-1, targets[start:stop, None], g)
            grad_x[start:stop] = block.to(x.dtype)
        return grad_x, None


def selected_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``log_softmax(logits, -1).gather(-1, targets)`` without materialising the log-softmax; fp32 at least."""
    flat = logits.reshape(-1, logits.shape[-1])
    return _SelectedLogprobs.apply(flat, targets.reshape(-1)).view(targets.shape)


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor):
    """Log-probability of each next token and the mask of positions that count (shifted by one)."""
    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    # position t predicts token t+1; dropping the last position before the (contiguous) reshape in
    # selected_logprobs would copy the logits, so every position is scored and the last one discarded
    shifted = torch.cat([targets.clamp(min=0), targets.new_zeros(targets.shape[0], 1)], dim=1)
    logp = selected_logprobs(logits, shifted)[:, :-1]
    return logp * mask, mask


def sft_loss_terms(logits: torch.Tensor, labels: torch.Tensor):
    """(sum of response-token negative log-likelihoods, number of response tokens)."""
    logp, mask = token_logprobs(logits, labels)
    return -logp.sum(), mask.sum()


def sft_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean negative log-likelihood over response tokens only (prompt and padding are masked)."""
    total, count = sft_loss_terms(logits, labels)
    return total / count.clamp(min=1)


def sequence_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of response-token log-probabilities per sequence, shape ``(batch,)``."""
    logp, _ = token_logprobs(logits, labels)
    return logp.sum(-1)


@dataclass
class DPOTerms:
    loss: torch.Tensor            # per pair
    logp_accuracy: torch.Tensor   # policy log p(chosen) > log p(rejected), per pair (0/1)
    reward_accuracy: torch.Tensor  # implicit reward of chosen > rejected, per pair (0/1)
    margin: torch.Tensor          # beta * (chosen log-ratio - rejected log-ratio), per pair


def dpo_terms(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
              ref_rejected: torch.Tensor, beta: float) -> DPOTerms:
    """DPO: ``-log sigmoid(beta * ((pc - rc) - (pr - rr)))`` per pair, with the two accuracies."""
    margin = beta * ((policy_chosen - ref_chosen) - (policy_rejected - ref_rejected))
    return DPOTerms(
        loss=-F.logsigmoid(margin),
        logp_accuracy=(policy_chosen > policy_rejected).float(),
        reward_accuracy=(margin > 0).float(),
        margin=margin,
    )
