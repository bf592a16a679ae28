"""SFT/DPO objectives against hand-computed values; the Lion baseline against Lion-PMA with K = 1."""
import math

import pytest
import torch

from recipes.posttrain.data import IGNORE_INDEX
from recipes.posttrain.losses import dpo_terms, sequence_logprobs, sft_loss, sft_loss_terms


def _logits_for(probabilities):
    """Logits whose softmax is ``probabilities`` (rows of a (batch, time, vocab) table)."""
    return torch.tensor(probabilities, dtype=torch.float64).log()


def test_sft_loss_counts_only_response_tokens():
    # vocab 2; position t predicts token t+1. Prompt = tokens 0..1, response = tokens 2..3.
    probs = [[[0.5, 0.5], [0.9, 0.1], [0.2, 0.8], [0.7, 0.3]]]
    labels = torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, 1, 0]])
    # response targets: token 1 at t=2 (predicted by position 1: p=0.1), token 0 at t=3 (position 2: p=0.2)
    expected = -(math.log(0.1) + math.log(0.2)) / 2
    assert sft_loss(_logits_for(probs), labels).item() == pytest.approx(expected, rel=1e-12)
    total, count = sft_loss_terms(_logits_for(probs), labels)
    assert count.item() == 2 and total.item() == pytest.approx(2 * expected, rel=1e-12)


def test_sequence_logprobs_ignore_padding_and_prompt():
    probs = [[[0.5, 0.5], [0.25, 0.75], [0.6, 0.4]], [[0.3, 0.7], [0.5, 0.5], [0.5, 0.5]]]
    labels = torch.tensor([[IGNORE_INDEX, 1, 0], [IGNORE_INDEX, 1, IGNORE_INDEX]])
    got = sequence_logprobs(_logits_for(probs), labels)
    assert got.tolist() == pytest.approx([math.log(0.5) + math.log(0.25), math.log(0.7)], rel=1e-12)


def test_dpo_loss_and_accuracies_by_hand():
    policy_chosen, policy_rejected = torch.tensor([-3.0, -5.0]), torch.tensor([-4.0, -4.5])
    ref_chosen, ref_rejected = torch.tensor([-3.5, -4.0]), torch.tensor([-3.5, -5.0])
    t = dpo_terms(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta=0.5)
    # pair 0: 0.5 * ((-3 + 3.5) - (-4 + 3.5)) = 0.5 ; pair 1: 0.5 * ((-5 + 4) - (-4.5 + 5)) = -0.75
    assert t.margin.tolist() == pytest.approx([0.5, -0.75])
    assert t.loss.tolist() == pytest.approx([math.log1p(math.exp(-0.5)), math.log1p(math.exp(0.75))])
    assert t.logp_accuracy.tolist() == [1.0, 0.0]  # -3 > -4 ; -5 < -4.5
    assert t.reward_accuracy.tolist() == [1.0, 0.0]


def test_dpo_loss_at_reference_is_log2():
    x = torch.tensor([-2.0, -7.0])
    t = dpo_terms(x, x - 1, x, x - 1, beta=0.1)
    assert t.loss.tolist() == pytest.approx([math.log(2)] * 2)
    assert t.reward_accuracy.tolist() == [0.0, 0.0]  # no margin yet
    assert t.logp_accuracy.tolist() == [1.0, 1.0]
