"""Mask semantics, batched == per-env, flat per-head masks."""

import math
from dataclasses import dataclass

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from esper.actions import ActionMasks, LifecycleOp
from esper.env.masks import (
    blueprint_cost_table,
    compute_action_masks,
    compute_batch_masks,
    flat_masks,
    stage_tensors,
)
from esper.lifecycle import LIVE_STAGES, SeedStage
from esper.slots import InjectionSpec, SlotConfig, SlotMismatchError


@dataclass(frozen=True)
class Slot:
    slot_id: str
    stage: SeedStage
    contribution_lower: float | None  # what the FOSSILIZE mask compares


stage_st = st.sampled_from(list(SeedStage))
contribution_st = st.one_of(st.none(), st.floats(-0.2, 0.2))


@st.composite
def env_states(draw, num_slots: int, num_blueprints: int):
    slots = [Slot(f"r0c{i}", draw(stage_st), draw(contribution_st)) for i in range(num_slots)]
    costs = draw(
        st.lists(
            st.lists(st.integers(-1, 50), min_size=num_blueprints, max_size=num_blueprints),
            min_size=num_slots,
            max_size=num_slots,
        )
    )
    budget = draw(st.one_of(st.just(math.inf), st.integers(0, 60).map(float)))
    return slots, torch.tensor(costs, dtype=torch.int64), budget


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 6), st.integers(1, 4), st.integers(1, 5), st.data())
def test_batched_masks_equal_per_env_masks(num_envs, num_slots, num_blueprints, data):
    config = SlotConfig.for_grid(1, num_slots)
    envs = [data.draw(env_states(num_slots, num_blueprints)) for _ in range(num_envs)]
    threshold = data.draw(st.floats(-0.1, 0.1))
    per_env = [
        compute_action_masks(
            slots, config, costs, budget_left=budget, fossilize_threshold=threshold
        )
        for slots, costs, budget in envs
    ]
    stages, contributions = zip(*(stage_tensors(slots) for slots, _, _ in envs), strict=True)
    batch = compute_batch_masks(
        torch.stack(stages),
        torch.stack(contributions),
        torch.stack([costs for _, costs, _ in envs]),
        torch.tensor([budget for _, _, budget in envs]),
        fossilize_threshold=threshold,
    )
    expected = ActionMasks.stack(per_env)
    for name, tensor in batch.as_dict().items():
        assert torch.equal(tensor, expected.as_dict()[name]), name


@settings(max_examples=80, deadline=None)
@given(st.integers(1, 6), st.integers(1, 4), st.data())
def test_mask_semantics(num_slots, num_blueprints, data):
    config = SlotConfig.for_grid(1, num_slots)
    slots, costs, budget = data.draw(env_states(num_slots, num_blueprints))
    masks = compute_action_masks(slots, config, costs, budget_left=budget)
    assert masks.op[LifecycleOp.WAIT]
    for i, slot in enumerate(slots):
        fits = [0 <= c <= budget for c in costs[i].tolist()]
        dormant = slot.stage == SeedStage.DORMANT
        assert masks.blueprint[i].tolist() == [dormant and f for f in fits]
        assert masks.slot[LifecycleOp.GERMINATE, i] == (dormant and any(fits))
        assert masks.slot[LifecycleOp.PRUNE, i] == (slot.stage in LIVE_STAGES)
        fossil_ok = (
            slot.stage == SeedStage.HOLDING
            and slot.contribution_lower is not None
            and slot.contribution_lower >= 0.0
        )
        assert masks.slot[LifecycleOp.FOSSILIZE, i] == fossil_ok
    for op in (LifecycleOp.GERMINATE, LifecycleOp.FOSSILIZE, LifecycleOp.PRUNE):
        assert masks.op[op] == masks.slot[op].any()
    flat = flat_masks(masks)
    sizes = (4, num_slots, num_blueprints, 3)
    assert flat.shape == (sum(sizes),)
    for head in torch.split(flat, sizes):
        assert head.any()


def test_mask_example_and_budget():
    config = SlotConfig.for_grid(1, 4)
    slots = [
        Slot("r0c0", SeedStage.DORMANT, None),
        Slot("r0c1", SeedStage.HOLDING, 0.03),
        Slot("r0c2", SeedStage.HOLDING, -0.01),
        Slot("r0c3", SeedStage.EMBARGOED, None),
    ]
    costs = torch.tensor([[10, 100]] * 4)
    masks = compute_action_masks(slots, config, costs, budget_left=50)
    assert masks.op.tolist() == [True, True, True, True]
    assert masks.slot[LifecycleOp.GERMINATE].tolist() == [True, False, False, False]
    assert masks.slot[LifecycleOp.FOSSILIZE].tolist() == [False, True, False, False]
    assert masks.slot[LifecycleOp.PRUNE].tolist() == [False, True, True, False]
    assert masks.blueprint[0].tolist() == [True, False]
    tight = compute_action_masks(slots, config, costs, budget_left=5)
    assert not tight.op[LifecycleOp.GERMINATE]
    assert flat_masks(tight)[4:8].tolist() == [False, True, True, False]  # union of ops
    assert flat_masks(tight)[8:10].tolist() == [True, False]  # nothing fits: index 0 offered


def test_slot_order_is_checked():
    config = SlotConfig.for_grid(1, 2)
    slots = [Slot("r0c1", SeedStage.DORMANT, None), Slot("r0c0", SeedStage.DORMANT, None)]
    with pytest.raises(SlotMismatchError, match="slot_states has"):
        compute_action_masks(slots, config, torch.zeros(2, 1, dtype=torch.int64))


def test_blueprint_cost_table_marks_wrong_topology():
    specs = [
        InjectionSpec("r0c0", 4, "cnn", 0.0),
        InjectionSpec("r0c1", 8, "mlp", 1.0),
    ]
    config = SlotConfig.from_specs(specs)

    def count(topology, name, channels):
        return channels * 10 if (topology, name) != ("mlp", "conv") else None

    table = blueprint_cost_table(config, ("conv", "norm"), count, blends=("linear",))
    assert table.tolist() == [[40, 40], [-1, 80]]
    gated = blueprint_cost_table(config, ("conv", "norm"), count)  # gate: +channels
    assert gated.tolist() == [[44, 44], [-1, 88]]


def test_batch_masks_follow_device_and_shapes():
    stages = torch.tensor([[0, 4, 7]])
    masks = compute_batch_masks(stages, torch.tensor([[math.nan, 0.5, math.nan]]), torch.ones(3, 2))
    assert masks.op.shape == (1, 4) and masks.slot.shape == (1, 4, 3)
    assert masks.blueprint.shape == (1, 3, 2) and masks.blend.shape == (1, 3)
    with pytest.raises(SlotMismatchError, match="contributions shape"):
        compute_batch_masks(stages, torch.zeros(1, 2), torch.ones(3, 2))


def test_bench_masks_quick_runs(capsys):
    import runpy
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "bench" / "bench_masks.py"
    argv = sys.argv
    sys.argv = [str(script), "--quick", "--no-reference"]
    try:
        runpy.run_path(str(script), run_name="__main__")
    finally:
        sys.argv = argv
    out = capsys.readouterr().out
    assert out.count("\n") == 2 + 9 and "  256   64" in out
