"""The heuristic germinates width seeds by default (issue 12: narrow hosts need units)."""

from __future__ import annotations

import pytest

from esper.actions import LifecycleOp
from esper.env.masks import blueprint_cost_table, compute_action_masks
from esper.env.observations import TrainingProgress, build_observation
from esper.model import CNNHost, MLPHost, MorphogeneticModel, TransformerHost, blueprints_for
from esper.policy.controllers import HeuristicConfig, HeuristicController

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
    blueprint, slot = germination(model, HeuristicConfig(warmup_steps=0))
    assert (blueprint, slot) == ("wide_x1", model.slot_config.slot_ids[-1])


def test_preference_falls_back_when_over_budget_and_can_be_switched_off() -> None:
    model = MorphogeneticModel(CNNHost(width=1))
    cost = model.seed_param_count("r0c2", "wide_x1", "gated")
    half = model.seed_param_count("r0c2", "wide_half", "gated")
    assert half < cost
    blueprint, _ = germination(model, HeuristicConfig(warmup_steps=0), budget=cost - 1)
    assert blueprint == "wide_half"
    rotation = HeuristicConfig(warmup_steps=0, blueprint_preference=())
    assert germination(model, rotation)[0] == blueprints_for("cnn")[0]
