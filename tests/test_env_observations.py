"""Observation schema: fixed per-slot width, bounded O(1) values, versioned schema."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from esper.env.observations import (
    DEFAULT_SCHEMA,
    GLOBAL_DIM,
    MAX_BLUEPRINTS,
    SLOT_DIM,
    ObservationSchema,
    SchemaMismatchError,
    TrainingProgress,
    build_observation,
)
from esper.lifecycle import SeedStage
from esper.model import SlotState, blueprints_for
from esper.slots import TOPOLOGIES

BLUEPRINTS = ("norm", "attention", "conv_light")


wild = st.floats(allow_nan=True, allow_infinity=True)
view_st = st.builds(
    SlotState,
    slot_id=st.just("r0c0"),
    stage=st.sampled_from(list(SeedStage)),
    alpha=st.floats(0, 1),
    epochs_in_stage=st.integers(0, 1000),
    blueprint=st.sampled_from([None, *BLUEPRINTS]),
    blend=st.sampled_from([None, "linear", "sigmoid", "gated"]),
    seed_params=st.integers(0, 10**7),
    contribution=st.one_of(st.none(), wild),
    embargo_left=st.integers(0, 50),
    topology=st.sampled_from(["cnn", "transformer", "mlp"]),
    channels=st.integers(1, 4096),
    position=st.floats(0, 1),
)
progress_st = st.builds(
    TrainingProgress,
    epoch=st.integers(0, 100),
    max_epochs=st.integers(1, 100),
    train_loss=wild,
    val_loss=wild,
    train_accuracy=st.floats(0, 1),
    val_accuracy=st.floats(0, 1),
    quality_delta=wild,
    val_loss_delta=wild,
    gap_to_best_quality=st.floats(0, 10),
    plateau_epochs=st.integers(0, 100),
    growth=st.floats(0, 1e6),
    budget_left_fraction=st.floats(0, 1),
    governor_rollback=st.booleans(),
    last_op=st.one_of(st.none(), st.integers(0, 3)),
    last_action_illegal=st.booleans(),
)


@settings(max_examples=100, deadline=None)
@given(progress_st, st.lists(view_st, min_size=1, max_size=12))
def test_features_are_bounded_and_shapes_fixed(progress, views):
    obs = build_observation(progress, views, host_params=500, blueprints=BLUEPRINTS)
    assert obs["global"].shape == (GLOBAL_DIM,)
    assert obs["slots"].shape == (len(views), SLOT_DIM)
    for block in obs.values():
        assert block.dtype == torch.float32
        assert torch.isfinite(block).all()
        assert block.abs().max() <= 1.0


def test_slot_rows_do_not_depend_on_other_slots():
    progress = TrainingProgress(3, 10, 0.5, 0.6, 0.8, 0.7)
    a = SlotState("r0c0", SeedStage.BLENDING, 0.5, 2, "norm", "linear", 40, 0.02, 0, "cnn", 8, 0.5)
    b = SlotState("r0c1", SeedStage.DORMANT, 0.0, 0, None, None, 0, None, 0, "cnn", 4, 0.0)
    one = build_observation(progress, [a], host_params=500, blueprints=BLUEPRINTS)
    many = build_observation(progress, [b, a, b, b], host_params=500, blueprints=BLUEPRINTS)
    assert torch.equal(one["slots"][0], many["slots"][1])
    row = one["slots"][0]
    s = DEFAULT_SCHEMA
    assert row[s.slot_index("stage_blending")] == 1 and row[: len(SeedStage)].sum() == 1
    assert row[s.slot_index("alpha")] == pytest.approx(0.5)
    assert row[s.slot_index("contribution")] == pytest.approx(math.tanh(0.2))
    assert row[s.slot_index("blueprint_0")] == 1 and row[s.slot_index("blend_linear")] == 1


def test_schema_round_trip_and_mismatch():
    stored = DEFAULT_SCHEMA.to_dict()
    assert ObservationSchema.from_dict(stored) == DEFAULT_SCHEMA
    DEFAULT_SCHEMA.check_matches(ObservationSchema.from_dict(stored))
    older = ObservationSchema(version=0)
    with pytest.raises(SchemaMismatchError, match="v3.*checkpoint has v0"):
        DEFAULT_SCHEMA.check_matches(older)
    renamed = ObservationSchema(slot_features=(*DEFAULT_SCHEMA.slot_features[:-1], "other"))
    with pytest.raises(SchemaMismatchError, match="slot_features differ"):
        DEFAULT_SCHEMA.check_matches(renamed)
    with pytest.raises(SchemaMismatchError, match="not an observation schema"):
        ObservationSchema.from_dict({"version": 1})
    with pytest.raises(KeyError, match="unknown slot feature 'nope'"):
        DEFAULT_SCHEMA.slot_index("nope")


def test_too_many_blueprints_is_an_error():
    with pytest.raises(ValueError, match="MAX_BLUEPRINTS"):
        build_observation(
            TrainingProgress(0, 1, 1, 1, 0, 0),
            [],
            host_params=1,
            blueprints=[f"b{i}" for i in range(MAX_BLUEPRINTS + 1)],
        )


def test_every_topologys_blueprints_fit_the_one_hot():
    for topology in TOPOLOGIES:
        assert len(blueprints_for(topology)) <= MAX_BLUEPRINTS
