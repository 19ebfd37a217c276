"""MaskedCategorical: masked entries never drawn, normalised entropy, fp32 math, clear errors."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from esper.policy import InvalidMaskError, MaskedCategorical


@settings(max_examples=40, deadline=None)
@given(k=st.integers(1, 40), extra=st.integers(0, 10), scale=st.floats(-50, 50))
def test_uniform_logits_over_valid_actions_have_normalised_entropy_one(k, extra, scale):
    logits = torch.full((1, k + extra), float(scale))
    mask = torch.zeros(1, k + extra, dtype=torch.bool)
    mask[0, torch.randperm(k + extra)[:k]] = True
    dist = MaskedCategorical(logits, mask)
    expected = 1.0 if k > 1 else 0.0
    assert dist.normalized_entropy().item() == pytest.approx(expected, abs=1e-5)
    assert dist.entropy().item() == pytest.approx(math.log(k), abs=1e-5)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(2, 12))
def test_masked_actions_are_never_sampled_and_probabilities_sum_to_one(seed, n):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(64, n, generator=gen) * 5
    mask = torch.rand(64, n, generator=gen) < 0.5
    mask[torch.arange(64), torch.randint(n, (64,), generator=gen)] = True
    dist = MaskedCategorical(logits, mask)
    draws = torch.stack([dist.sample(gen) for _ in range(50)])
    assert bool(mask.gather(1, draws.T).all())
    assert bool(mask.gather(1, dist.mode()[:, None]).all())
    assert torch.allclose(dist.probs.sum(-1), torch.ones(64))
    assert bool((dist.probs[~mask] == 0).all())


def test_entropy_is_between_zero_and_one_and_gradients_stay_finite():
    logits = torch.randn(8, 6, requires_grad=True)
    mask = torch.tensor([[True, False, True, False, False, False]] * 8)
    dist = MaskedCategorical(logits, mask)
    ent = dist.normalized_entropy()
    assert bool(((ent >= 0) & (ent <= 1 + 1e-6)).all())
    (ent.sum() + dist.log_prob(torch.zeros(8, dtype=torch.long)).sum()).backward()
    assert torch.isfinite(logits.grad).all()
    assert bool((logits.grad[:, 1] == 0).all())  # masked logits receive no gradient


def test_single_valid_action_has_zero_entropy_and_log_prob_zero():
    mask = torch.tensor([[False, True, False]])
    dist = MaskedCategorical(torch.randn(1, 3), mask)
    assert dist.normalized_entropy().item() == 0.0
    assert dist.log_prob(torch.tensor([1])).item() == pytest.approx(0.0, abs=1e-6)


def test_a_row_without_valid_action_raises_a_clear_error():
    mask = torch.tensor([[True, False], [False, False]])
    with pytest.raises(InvalidMaskError, match=r"allow no action.*index \[1\]"):
        MaskedCategorical(torch.zeros(2, 2), mask)
    with pytest.raises(InvalidMaskError, match="bool"):
        MaskedCategorical(torch.zeros(2, 2), mask.int())
    with pytest.raises(InvalidMaskError, match="shape"):
        MaskedCategorical(torch.zeros(2, 3), mask)


def test_math_is_float32_under_autocast():
    logits = torch.randn(4, 5).bfloat16()
    mask = torch.ones(4, 5, dtype=torch.bool)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        dist = MaskedCategorical(logits, mask)
    assert dist.log_probs.dtype == torch.float32
    assert dist.entropy().dtype == torch.float32
