"""Masks against the real model: random states, random legal actions, many episodes.

Masks must always allow WAIT, never allow a transition the lifecycle forbids, agree with
the model's own can_* rules, keep germination within the parameter budget, and every
action they allow must execute.
"""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from esper.actions import BLEND_ALGORITHMS, LifecycleOp
from esper.env.masks import blueprint_cost_table, compute_action_masks
from esper.env.wrappers import JointActionLayout
from esper.lifecycle import SeedStage, can_transition
from esper.model import CNNHost, LifecycleConfig, MorphogeneticModel, blueprints_for

TARGET = {
    LifecycleOp.GERMINATE: SeedStage.GERMINATED,
    LifecycleOp.FOSSILIZE: SeedStage.FOSSILIZED,
    LifecycleOp.PRUNE: SeedStage.PRUNED,
}
LIFECYCLE = LifecycleConfig(min_train_epochs=1, max_train_epochs=3, blend_epochs=2)
BLUEPRINTS = blueprints_for("cnn")


def fresh_model(depth: int) -> MorphogeneticModel:
    return MorphogeneticModel(CNNHost(width=1, depth=depth), lifecycle=LIFECYCLE)


step_st = st.tuples(
    st.lists(st.one_of(st.none(), st.floats(-0.05, 0.05)), min_size=4, max_size=4),
    st.integers(0, 10_000),  # which legal action
    st.booleans(),  # act or wait
)


@settings(max_examples=40, deadline=None)
@given(
    st.integers(1, 4),
    st.one_of(st.none(), st.floats(0.0, 3.0)),
    st.lists(step_st, min_size=1, max_size=25),
)
def test_random_legal_episodes(depth, max_growth, steps):
    model = fresh_model(depth)
    config = model.slot_config
    costs = blueprint_cost_table(config, BLUEPRINTS, model=model)
    host = model.param_counts().host
    budget = float("inf") if max_growth is None else max_growth * host
    layout = JointActionLayout(config.num_slots, len(BLUEPRINTS), len(BLEND_ALGORITHMS))
    for contributions, pick, act in steps:
        counts = model.param_counts()
        left = budget - counts.live_seeds - counts.fossils
        masks = compute_action_masks(model.slot_states(), config, costs, budget_left=left)
        assert masks.op[LifecycleOp.WAIT]
        for i, slot_id in enumerate(config.slot_ids):
            stage = model.slot_state(slot_id).stage
            for op, target in TARGET.items():
                if masks.slot[op, i]:
                    assert can_transition(stage, target), (slot_id, stage, op)
            assert masks.slot[LifecycleOp.FOSSILIZE, i] == model.can_fossilize(slot_id)
            assert masks.slot[LifecycleOp.PRUNE, i] == model.can_prune(slot_id)
            if masks.slot[LifecycleOp.GERMINATE, i]:
                assert model.can_germinate(slot_id)
        legal = torch.nonzero(layout.mask(masks)).reshape(-1).tolist()
        if act:
            action = layout.decode(legal[pick % len(legal)])
            assert masks.allows(action)
            slot_id = config.slot_id_for_index(action.slot)
            if action.op == LifecycleOp.GERMINATE:
                bp, blend = BLUEPRINTS[action.blueprint], BLEND_ALGORITHMS[action.blend]
                before = model.param_counts()
                model.germinate(slot_id, bp, blend)
                after = model.param_counts()
                assert after.live_seeds + after.fossils <= budget
                # Exact counts; the table holds the dearest blend (gated: its gate too).
                added = after.total - before.total
                assert added == model.seed_param_count(slot_id, bp, blend)
                cost = int(costs[action.slot, action.blueprint])
                assert cost == model.seed_param_count(slot_id, bp, "gated") >= added
            elif action.op == LifecycleOp.FOSSILIZE:
                model.fossilize(slot_id)
            elif action.op == LifecycleOp.PRUNE:
                model.prune(slot_id)
        for slot_id, value in zip(config.slot_ids, contributions, strict=False):
            stage = model.slot_state(slot_id).stage
            if value is not None and stage not in (SeedStage.DORMANT, SeedStage.EMBARGOED):
                model.record_contribution(slot_id, value)
        model.step_epoch()


def test_joint_layout_round_trip():
    layout = JointActionLayout(3, 5, 3)
    assert layout.size == 1 + 45 + 6
    seen = {layout.encode(layout.decode(i)) for i in range(layout.size)}
    assert seen == set(range(layout.size))
