"""Lifecycle decisions read a paired validation-loss contribution and its standard error."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from esper.actions import LifecycleOp
from esper.env.masks import blueprint_cost_table, compute_action_masks
from esper.lifecycle import SeedStage
from esper.model import LifecycleConfig, MLPHost, MorphogeneticModel
from esper.training import fast_counterfactuals, reference_counterfactuals, variants_to_measure
from esper.training.objective import task_loss

SLOT = "r0c0"


def model_at(stage: SeedStage, lifecycle: LifecycleConfig) -> MorphogeneticModel:
    """A one-slot MLP model whose seed has been driven to ``stage`` by the real lifecycle."""
    torch.manual_seed(0)
    model = MorphogeneticModel(MLPHost(4, 3, hidden=6, depth=1), lifecycle=lifecycle)
    model.germinate(SLOT, "mlp")
    model.record_contribution(SLOT, 1.0)
    while model.slot_state(SLOT).stage < stage:
        model.step_epoch()
    assert model.slot_state(SLOT).stage == stage
    return model


FAST = dict(min_train_epochs=1, blend_epochs=1, max_hold_epochs=50)
values = st.floats(-1.0, 1.0, allow_nan=False)
errors = st.one_of(st.none(), st.floats(0.0, 1.0, allow_nan=False))
zs = st.sampled_from([0.0, 1.0, 2.0, 3.0])


@settings(max_examples=40, deadline=None)
@given(c=values, se=errors, z=zs, threshold=st.floats(-0.2, 0.2))
def test_blend_gate_passes_unless_significantly_harmful(c, se, z, threshold):
    model = model_at(
        SeedStage.TRAINING, LifecycleConfig(**FAST, gate_z=z, blend_threshold=threshold)
    )
    model.record_contribution(SLOT, c, se)
    model.step_epoch()
    upper = c + z * (se or 0.0)
    expected = SeedStage.BLENDING if upper >= threshold else SeedStage.TRAINING
    assert model.slot_state(SLOT).stage == expected


@settings(max_examples=40, deadline=None)
@given(c=values, se=errors, z=zs, prune=st.floats(-0.2, 0.2), fossil=st.floats(-0.2, 0.2))
def test_holding_prunes_only_on_significant_harm_and_fossilizes_only_on_significant_help(
    c, se, z, prune, fossil
):
    lifecycle = LifecycleConfig(**FAST, gate_z=z, prune_threshold=prune, fossilize_threshold=fossil)
    model = model_at(SeedStage.HOLDING, lifecycle)
    model.record_contribution(SLOT, c, se)
    margin = z * (se or 0.0)
    state = model.slot_state(SLOT)
    assert state.contribution == c and state.contribution_se == se
    assert state.contribution_lower == pytest.approx(c - margin)
    assert model.can_fossilize(SLOT) == (c - margin >= fossil)
    # The action masks offer FOSSILIZE exactly when the model allows it.
    costs = blueprint_cost_table(model.slot_config, ["mlp"])
    masks = compute_action_masks(
        model.slot_states(), model.slot_config, costs, fossilize_threshold=fossil
    )
    assert bool(masks.slot[LifecycleOp.FOSSILIZE, 0]) == model.can_fossilize(SLOT)
    model.step_epoch()
    pruned = model.slot_state(SLOT).stage == SeedStage.EMBARGOED or (
        model.slot_state(SLOT).stage == SeedStage.PRUNED
    )
    assert pruned == (c + margin < prune)


@settings(max_examples=30, deadline=None)
@given(noise=st.floats(-1.99, 1.99), se=st.floats(1e-4, 0.5))
def test_noise_within_the_tolerance_neither_keeps_nor_prunes_a_seed(noise, se):
    """A seed of zero true effect, read within 2 standard errors of zero."""
    model = model_at(SeedStage.HOLDING, LifecycleConfig(**FAST, gate_z=2.0))
    model.record_contribution(SLOT, noise * se, se)
    assert not model.can_fossilize(SLOT)
    model.step_epoch()
    assert model.slot_state(SLOT).stage == SeedStage.HOLDING


def test_nan_error_passes_no_gate_and_prunes_nothing():
    model = model_at(SeedStage.HOLDING, LifecycleConfig(**FAST))
    model.record_contribution(SLOT, 0.5, math.nan)
    assert not model.can_fossilize(SLOT)
    model.step_epoch()
    assert model.slot_state(SLOT).stage == SeedStage.HOLDING
    with pytest.raises(ValueError, match="stderr"):
        model.record_contribution(SLOT, 0.5, -1.0)
    with pytest.raises(ValueError, match="gate_z"):
        LifecycleConfig(gate_z=-1.0)


def test_standard_error_round_trips_through_state_dict():
    lifecycle = LifecycleConfig(**FAST)
    model = model_at(SeedStage.HOLDING, lifecycle)
    model.record_contribution(SLOT, 0.25, 0.05)
    torch.manual_seed(1)
    copy = MorphogeneticModel(MLPHost(4, 3, hidden=6, depth=1), lifecycle=lifecycle)
    copy.load_state_dict(model.state_dict())
    assert copy.slot_state(SLOT) == model.slot_state(SLOT)


@pytest.mark.parametrize("stage", [SeedStage.TRAINING, SeedStage.HOLDING])
def test_contribution_is_the_paired_mean_loss_difference_with_its_standard_error(stage):
    model = model_at(stage, LifecycleConfig(**FAST)).double().eval()
    with torch.no_grad():
        for p in model.seed_parameters(SLOT):
            p.copy_(0.5 * torch.randn(p.shape, generator=torch.Generator().manual_seed(3)))
    g = torch.Generator().manual_seed(4)
    x = torch.randn(50, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (50,), generator=g)
    variants = variants_to_measure(model)
    fast = fast_counterfactuals(model, x, y, "classification", variants, eval_batch_size=16)
    ref = reference_counterfactuals(model, x, y, "classification", variants, eval_batch_size=7)
    alpha = variants[SLOT]
    with torch.no_grad():
        live = torch.stack([task_loss(model(x[i : i + 1]), y[i : i + 1]) for i in range(50)])
        other = torch.stack(
            [
                task_loss(model(x[i : i + 1], alpha_override={SLOT: alpha}), y[i : i + 1])
                for i in range(50)
            ]
        )
    d = (other - live) if alpha == 0.0 else (live - other)
    assert (alpha == 1.0) == (stage == SeedStage.TRAINING)
    for result in (fast, ref):
        assert result.contributions[SLOT] == pytest.approx(float(d.mean()), abs=1e-9)
        se = float(d.std(unbiased=True)) / math.sqrt(50)
        assert result.contribution_se[SLOT] == pytest.approx(se, rel=1e-6)
        assert se > 0
    # Accuracy-based credit is kept alongside, in quality units.
    assert set(fast.quality_contributions) == {SLOT}
