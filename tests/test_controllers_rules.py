"""Controller rules on hand-built observations and masks (no training)."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from esper.actions import FactoredAction, LifecycleOp
from esper.env.masks import compute_action_masks
from esper.env.observations import TrainingProgress, build_observation
from esper.lifecycle import SeedStage
from esper.model import SlotState
from esper.policy.controllers import (
    HeuristicConfig,
    HeuristicController,
    RandomController,
    StaticController,
)
from esper.slots import SlotConfig

BLUEPRINTS = ("norm", "attention", "conv_light")


def state(slot_id: str, stage: SeedStage, contribution: float | None) -> SlotState:
    return SlotState(slot_id, stage, 0.0, 3, None, None, 0, contribution, 0, "cnn", 4, 0.5)


def scene(stages, contributions=None, plateau=0, budget=1e9):
    config = SlotConfig.for_grid(1, len(stages))
    contributions = contributions or [None] * len(stages)
    states = [
        state(sid, stage, c) for sid, stage, c in zip(config, stages, contributions, strict=True)
    ]
    progress = TrainingProgress(5, 20, 0.5, 0.5, 0.8, 0.8, plateau_epochs=plateau)
    obs = build_observation(progress, states, host_params=500, blueprints=BLUEPRINTS)
    costs = torch.tensor([[8, 40, 150]] * len(stages))
    masks = compute_action_masks(states, config, costs, budget_left=budget)
    return obs, masks


@settings(max_examples=100, deadline=None)
@given(
    st.lists(st.sampled_from(list(SeedStage)), min_size=1, max_size=6),
    st.integers(0, 5),
    st.integers(0, 200),
    st.integers(0, 10_000),
)
def test_every_controller_acts_legally(stages, plateau, budget, seed):
    contributions = [0.05 * ((i % 3) - 1) for i in range(len(stages))]
    obs, masks = scene(stages, contributions, plateau, budget)
    for controller in (
        HeuristicController(HeuristicConfig(warmup_steps=0)),
        RandomController(seed),
        StaticController(),
    ):
        state = controller.initial_state()
        for _ in range(3):
            action, state = controller.act(obs, masks, state)
            assert isinstance(action, FactoredAction)
            assert masks.allows(action), (type(controller).__name__, action)


def test_heuristic_priorities():
    heuristic = HeuristicController(HeuristicConfig(warmup_steps=0, plateau_patience=2))
    state = heuristic.initial_state()
    # A HOLDING seed above threshold is fossilized before anything else.
    obs, masks = scene([SeedStage.DORMANT, SeedStage.HOLDING], [None, 0.02], plateau=5)
    action, _ = heuristic.act(obs, masks, state)
    assert action == FactoredAction(LifecycleOp.FOSSILIZE, 1)
    # A harmful seed is pruned, then germination waits for the cooldown.
    obs, masks = scene([SeedStage.DORMANT, SeedStage.BLENDING], [None, -0.05], plateau=5)
    action, state = heuristic.act(obs, masks, state)
    assert action == FactoredAction(LifecycleOp.PRUNE, 1)
    obs, masks = scene([SeedStage.DORMANT, SeedStage.EMBARGOED], plateau=5)
    action, state = heuristic.act(obs, masks, state)
    assert action.op == LifecycleOp.WAIT
    # No plateau: wait. Plateau: germinate with the blueprint rotation.
    heuristic = HeuristicController(HeuristicConfig(warmup_steps=0, plateau_patience=2))
    state = heuristic.initial_state()
    obs, masks = scene([SeedStage.DORMANT, SeedStage.DORMANT], plateau=1)
    assert heuristic.act(obs, masks, state)[0].op == LifecycleOp.WAIT
    obs, masks = scene([SeedStage.DORMANT, SeedStage.DORMANT], plateau=2)
    first, state = heuristic.act(obs, masks, state)
    second, state = heuristic.act(obs, masks, state)
    assert first == FactoredAction(LifecycleOp.GERMINATE, 1, 0, 0)  # deepest free slot
    assert second == FactoredAction(LifecycleOp.GERMINATE, 1, 1, 0)
    shallow = HeuristicController(HeuristicConfig(warmup_steps=0, slot_preference="shallow"))
    assert shallow.act(obs, masks, shallow.initial_state())[0].slot == 0
    # A live seed blocks further germination (max_live_seeds = 1).
    obs, masks = scene([SeedStage.TRAINING, SeedStage.DORMANT], plateau=5)
    assert heuristic.act(obs, masks, state)[0].op == LifecycleOp.WAIT


def test_heuristic_rotation_skips_blueprints_over_budget():
    heuristic = HeuristicController(HeuristicConfig(warmup_steps=0, plateau_patience=0))
    state = heuristic.initial_state()
    obs, masks = scene([SeedStage.DORMANT], budget=50)
    picks = []
    for _ in range(4):
        action, state = heuristic.act(obs, masks, state)
        picks.append(action.blueprint)
    assert picks == [0, 1, 0, 1]


def test_random_controller_is_reproducible_and_covers_ops():
    obs, masks = scene([SeedStage.DORMANT, SeedStage.HOLDING], [None, 0.1])
    runs = []
    for _ in range(2):
        controller = RandomController(seed=3)
        runs.append([controller.act(obs, masks, None)[0] for _ in range(60)])
    assert runs[0] == runs[1]
    assert {a.op for a in runs[0]} == set(LifecycleOp)
