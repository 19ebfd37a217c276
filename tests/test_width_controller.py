"""The heuristic germinates width seeds by default (issue 12: narrow hosts need units)."""

from __future__ import annotations

import pytest
import torch

from esper.actions import LifecycleOp
from esper.env.masks import blueprint_cost_table, compute_action_masks
from esper.env.observations import TrainingProgress, build_observation
from esper.lifecycle import SeedStage
from esper.model import (
    CNNHost,
    MLPHost,
    MorphogeneticModel,
    SlotState,
    TransformerHost,
    blueprints_for,
)
from esper.policy.controllers import HeuristicConfig, HeuristicController
from esper.slots import SlotConfig

HOSTS = {
    "cnn": lambda: CNNHost(width=1),
    "mlp": lambda: MLPHost(6, 3, hidden=4),
    "transformer": lambda: TransformerHost(7, d_model=8, n_heads=2),
}


def germination(model: MorphogeneticModel, config: HeuristicConfig, budget: float = 1e9):
    names = blueprints_for(model.topology)
    costs = blueprint_cost_table(model.slot_config, names, model=model)
    states = model.slot_states()
    progress = TrainingProgress(5, 20, 0.5, 0.5, 0.8, 0.8, plateau_epochs=3)
    obs = build_observation(progress, states, host_params=500, blueprints=names)
    masks = compute_action_masks(states, model.slot_config, costs, budget_left=budget)
    heuristic = HeuristicController(config)
    action, _ = heuristic.act(obs, masks, heuristic.initial_state())
    assert action.op == LifecycleOp.GERMINATE
    return names[action.blueprint], model.slot_config.slot_ids[action.slot]


@pytest.mark.parametrize("topology", HOSTS)
def test_heuristic_prefers_doubling_the_deepest_layer(topology) -> None:
    model = MorphogeneticModel(HOSTS[topology]())
    # The plateau rule (the underfitting rush switched off) widens the deepest layer.
    plateau_only = HeuristicConfig(warmup_steps=0, underfit_accuracy=0.0)
    blueprint, slot = germination(model, plateau_only)
    assert (blueprint, slot) == ("wide_x1", model.slot_config.slot_ids[-1])


def test_preference_falls_back_when_over_budget_and_can_be_switched_off() -> None:
    model = MorphogeneticModel(CNNHost(width=1))
    cost = model.seed_param_count("r0c2", "wide_x1", "gated")
    half = model.seed_param_count("r0c2", "wide_half", "gated")
    assert half < cost
    plateau_only = HeuristicConfig(warmup_steps=0, underfit_accuracy=0.0)
    blueprint, _ = germination(model, plateau_only, budget=cost - 1)
    assert blueprint == "wide_half"
    rotation = HeuristicConfig(warmup_steps=0, blueprint_preference=(), underfit_accuracy=0.0)
    assert germination(model, rotation)[0] == blueprints_for("cnn")[0]


CNN_NAMES = blueprints_for("cnn")


def rush_scene(stages, train_acc: float, val_acc: float, plateau: int = 0):
    """A 3-slot CNN scene: observation and masks with the given accuracies."""
    config = SlotConfig.for_grid(1, len(stages))
    states = [
        SlotState(sid, stage, 0.0, 0, None, None, 0, None, 0, "cnn", 1, 0.5)
        for sid, stage in zip(config, stages, strict=True)
    ]
    progress = TrainingProgress(2, 20, 1.0, 1.0, train_acc, val_acc, plateau_epochs=plateau)
    obs = build_observation(progress, states, host_params=163, blueprints=CNN_NAMES)
    costs = torch.full((len(stages), len(CNN_NAMES)), 50)
    masks = compute_action_masks(states, config, costs, budget_left=1e9)
    return obs, masks


def test_underfitting_host_is_widened_in_every_free_slot_at_once() -> None:
    # The rush on; otherwise defaults: one live seed, germinate on plateau.
    heuristic = HeuristicController(HeuristicConfig(underfit_accuracy=0.9))
    state = heuristic.initial_state()
    free, training = SeedStage.DORMANT, SeedStage.TRAINING
    # Underfitting (train ≈ val, both low), no plateau, seeds already alive: still widen,
    # shallowest free slot first, with the first width seed.
    for stages, slot in (((free, free, free), 0), ((training, free, free), 1),
                         ((training, training, free), 2)):  # fmt: skip
        obs, masks = rush_scene(stages, 0.55, 0.60)
        action, state = heuristic.act(obs, masks, state)
        assert (action.op, action.slot, CNN_NAMES[action.blueprint]) == (
            LifecycleOp.GERMINATE,
            slot,
            "wide_x1",
        )
    # An overfitting gap, or a host that already fits its training data: no rush, and
    # without a plateau the one live seed blocks germination as before.
    for train_acc, val_acc in ((0.80, 0.70), (0.95, 0.94)):
        obs, masks = rush_scene((training, free, free), train_acc, val_acc)
        assert heuristic.act(obs, masks, state)[0].op == LifecycleOp.WAIT
    # Off (the default): the same underfitting scene waits for a plateau.
    off = HeuristicController()
    obs, masks = rush_scene((free, free, free), 0.55, 0.60)
    assert off.act(obs, masks, off.initial_state())[0].op == LifecycleOp.WAIT


@pytest.mark.parametrize(
    "bad", [{"underfit_accuracy": 1.5}, {"overfit_gap": -0.1}, {"underfit_slot_preference": "x"}]
)
def test_rush_config_rejects_bad_values(bad) -> None:
    with pytest.raises(ValueError, match=next(iter(bad))):
        HeuristicConfig(**bad)
