import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from esper.actions import (
    NUM_OPS,
    ActionIndexError,
    ActionMasks,
    ActionSpace,
    FactoredAction,
    LifecycleOp,
)
from esper.slots import SlotConfig

BLUEPRINTS = ("norm", "attention", "conv_light")


@given(st.integers(1, 8), st.integers(1, 8))
def test_head_sizes_follow_the_slot_config(rows, cols):
    space = ActionSpace(SlotConfig.for_grid(rows, cols), BLUEPRINTS)
    assert space.head_sizes == (NUM_OPS, rows * cols, len(BLUEPRINTS), 3)


@given(st.integers(1, 64), st.data())
def test_from_indices_validates_every_head(num_slots, data):
    space = ActionSpace(SlotConfig.for_grid(1, num_slots), BLUEPRINTS)
    sizes = space.head_sizes
    values = [data.draw(st.integers(-3, size + 3)) for size in sizes]
    in_range = all(0 <= v < s for v, s in zip(values, sizes, strict=True))
    if in_range:
        action = FactoredAction.from_indices(*values, space=space)
        assert action.as_tuple() == tuple(values)
    else:
        with pytest.raises(ActionIndexError) as info:
            FactoredAction.from_indices(*values, space=space)
        head = next(i for i, (v, s) in enumerate(zip(values, sizes, strict=True)) if not 0 <= v < s)
        name = ("op", "slot", "blueprint", "blend")[head]
        assert f"{name} index {values[head]}" in str(info.value)
        assert f"0..{sizes[head] - 1}" in str(info.value)


def test_space_rejects_bad_names():
    config = SlotConfig.for_grid(1, 2)
    with pytest.raises(ValueError, match="unknown blend algorithm 'cubic'.*linear, sigmoid, gated"):
        ActionSpace(config, BLUEPRINTS, blends=("linear", "cubic"))
    with pytest.raises(ValueError, match="duplicate blueprint"):
        ActionSpace(config, ("norm", "norm"))
    with pytest.raises(ValueError, match="unknown blueprint 'huge'"):
        ActionSpace(config, BLUEPRINTS).blueprint_index("huge")


def test_masks_allow_reads_the_conditional_rows():
    space = ActionSpace(SlotConfig.for_grid(1, 2), BLUEPRINTS)
    op = torch.tensor([True, True, False, True])
    slot = torch.zeros(4, 2, dtype=torch.bool)
    slot[LifecycleOp.GERMINATE, 1] = True
    slot[LifecycleOp.PRUNE, 0] = True
    blueprint = torch.zeros(2, 3, dtype=torch.bool)
    blueprint[1, 2] = True
    masks = ActionMasks(op, slot, blueprint, torch.ones(3, dtype=torch.bool))
    assert masks.allows(FactoredAction.wait())
    assert masks.allows(FactoredAction.from_indices(1, 1, 2, 0, space))
    assert not masks.allows(FactoredAction.from_indices(1, 1, 0, 0, space))  # blueprint
    assert not masks.allows(FactoredAction.from_indices(1, 0, 2, 0, space))  # slot
    assert masks.allows(FactoredAction.from_indices(3, 0, 0, 0, space))  # blueprint ignored
    assert not masks.allows(FactoredAction.from_indices(2, 0, 0, 0, space))  # op
    batch = ActionMasks.stack([masks, masks])
    assert batch.slot.shape == (2, 4, 2)
    assert batch[1].allows(FactoredAction.from_indices(1, 1, 2, 0, space))
    assert (
        FactoredAction.from_indices(1, 1, 2, 0, space).describe(space)
        == "GERMINATE r0c1 conv_light linear"
    )
