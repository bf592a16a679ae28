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


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor):
    """Log-probability of each next token and the mask of positions that count (shifted by one)."""
    logits = logits[:, :-1]
    if logits.dtype in (torch.float16, torch.bfloat16):  # log-softmax over the vocabulary in fp32 at least
        logits = logits.float()
    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    logp = torch.log_softmax(logits, dim=-1).gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
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
