"""Lifecycle mechanics of MorphogeneticModel: gates, auto-prunes, embargo, errors, counts."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from esper.lifecycle import SeedStage, can_transition, is_live
from esper.model import (
    CNNHost,
    LifecycleConfig,
    MLPHost,
    MorphogeneticModel,
    SlotStateError,
    TransformerHost,
    UnknownBlueprintError,
    blueprints_for,
    get_blueprint,
)
from esper.slots import SlotConfig, SlotIdError

S = SeedStage
CFG = LifecycleConfig(
    min_train_epochs=2, max_train_epochs=4, blend_epochs=2, max_hold_epochs=2, embargo_epochs=2
)


def _model(cfg: LifecycleConfig = CFG) -> MorphogeneticModel:
    return MorphogeneticModel(MLPHost(4, 2, hidden=6, depth=3), lifecycle=cfg)


def _stages(model: MorphogeneticModel) -> list[SeedStage]:
    return [s.stage for s in model.slot_states()]


def test_happy_path_to_fossil() -> None:
    m = _model()
    m.germinate("r0c1", "mlp", "sigmoid")
    st1 = m.slot_state("r0c1")
    assert (st1.stage, st1.alpha, st1.blueprint, st1.blend) == (S.TRAINING, 0.0, "mlp", "sigmoid")
    m.record_contribution("r0c1", 0.2)
    assert m.step_epoch() == []  # min_train_epochs not reached yet
    [change] = m.step_epoch()
    assert (change.slot_id, change.source, change.target) == ("r0c1", S.TRAINING, S.BLENDING)
    assert change.reason == "blend_gate_passed"
    assert 0 < m.slot_state("r0c1").alpha < 1
    assert m.step_epoch() == []
    assert m.slot_state("r0c1").alpha == 1.0
    [change] = m.step_epoch()
    assert change.target == S.HOLDING and m.can_fossilize("r0c1")
    m.fossilize("r0c1")
    counts = m.param_counts()
    assert counts.fossils == get_blueprint("mlp", "mlp").param_count(6) and counts.live_seeds == 0
    for _ in range(10):
        assert m.step_epoch() == []
    assert m.slot_state("r0c1").stage == S.FOSSILIZED
    assert not (m.can_prune("r0c1") or m.can_germinate("r0c1") or m.can_fossilize("r0c1"))


def test_training_gate_failure_prunes_then_embargo_then_dormant() -> None:
    m = _model()
    m.germinate("r0c0", "lora")
    m.record_contribution("r0c0", -0.1)
    changes = [m.step_epoch() for _ in range(CFG.max_train_epochs)]
    assert [c.reason for c in changes[-1]] == ["train_timeout"]
    assert m.slot_state("r0c0").embargo_left == CFG.embargo_epochs
    assert m.seed_parameters("r0c0") == [] and m.param_counts().live_seeds == 0
    with pytest.raises(SlotStateError, match=r"r0c0.*PRUNED.*only while DORMANT"):
        m.germinate("r0c0", "lora")
    [c] = m.step_epoch()
    assert (c.target, m.slot_state("r0c0").embargo_left) == (S.EMBARGOED, 2)
    with pytest.raises(SlotStateError, match=r"EMBARGOED \(2 epochs of embargo left\)"):
        m.germinate("r0c0", "lora")
    assert m.step_epoch() == [] and m.slot_state("r0c0").embargo_left == 1
    [c] = m.step_epoch()
    assert c.target == S.DORMANT and m.can_germinate("r0c0")
    m.germinate("r0c0", "mlp")  # the slot is usable again


@pytest.mark.parametrize("stage", [S.BLENDING, S.HOLDING])
def test_negative_contribution_prunes_blending_and_holding(stage: SeedStage) -> None:
    m = _model()
    m.germinate("r0c2", "mlp", "gated")
    m.record_contribution("r0c2", 0.0)  # equal to the thresholds: passes, is not pruned
    while m.slot_state("r0c2").stage != stage:
        m.step_epoch()
    m.record_contribution("r0c2", -1e-6)
    [c] = m.step_epoch()
    assert (c.source, c.target, c.reason) == (stage, S.PRUNED, "negative_contribution")


def test_hold_timeout_prunes() -> None:
    m = _model()
    m.germinate("r0c0", "mlp")
    m.record_contribution("r0c0", 1.0)
    while m.slot_state("r0c0").stage != S.HOLDING:
        m.step_epoch()
    for _ in range(CFG.max_hold_epochs):
        assert m.step_epoch() == []
    [c] = m.step_epoch()
    assert c.reason == "hold_timeout"


def test_bad_input_errors_name_slot_stage_and_allowed() -> None:
    m = _model(LifecycleConfig(fossilize_threshold=0.5, min_train_epochs=1, blend_epochs=1))
    with pytest.raises(SlotIdError, match=r"'r0c7'.*r0c0, r0c1, r0c2"):
        m.germinate("r0c7", "mlp")
    with pytest.raises(SlotIdError):
        m.slot_state("early")
    with pytest.raises(UnknownBlueprintError, match=r"'conv_heavy'.*allowed: lora, mlp"):
        m.germinate("r0c0", "conv_heavy")
    with pytest.raises(ValueError, match=r"'fast'.*linear, sigmoid, gated"):
        m.germinate("r0c0", "mlp", "fast")
    assert m.slot_state("r0c0").stage == S.DORMANT  # failed calls change nothing
    with pytest.raises(SlotStateError, match=r"fossilize slot r0c0: it is DORMANT.*HOLDING"):
        m.fossilize("r0c0")
    with pytest.raises(SlotStateError, match=r"prune slot r0c0: it is DORMANT"):
        m.prune("r0c0")
    m.germinate("r0c0", "mlp")
    with pytest.raises(SlotStateError, match=r"germinate slot r0c0: it is TRAINING"):
        m.germinate("r0c0", "lora")
    with pytest.raises(SlotStateError, match="TRAINING"):
        m.fossilize("r0c0")
    m.record_contribution("r0c0", 0.6)
    m.step_epoch(), m.step_epoch()
    assert m.slot_state("r0c0").stage == S.HOLDING
    m.record_contribution("r0c0", 0.1)
    with pytest.raises(SlotStateError, match="fossilize_threshold=0.5"):
        m.fossilize("r0c0")
    with pytest.raises(ValueError, match="max_train_epochs=1"):
        LifecycleConfig(min_train_epochs=2, max_train_epochs=1)


def test_slot_config_subset_and_errors() -> None:
    host = CNNHost(depth=4)
    m = MorphogeneticModel(host, SlotConfig.from_ids(["r0c3", "r0c1"]))
    assert m.slot_config.slot_ids == ("r0c1", "r0c3")
    assert [s.channels for s in m.slot_states()] == [4, 16]
    with pytest.raises(SlotIdError, match=r"'r0c4'.*r0c0, r0c1, r0c2, r0c3"):
        MorphogeneticModel(host, ["r0c4"])


def test_param_counts_and_growth_ratio_are_exact() -> None:
    host = CNNHost(width=2, depth=3)
    m = MorphogeneticModel(host, lifecycle=CFG)
    host_params = sum(p.numel() for p in host.parameters())
    m.germinate("r0c0", "conv_heavy", "gated")
    m.germinate("r0c2", "attention")
    expected_live = get_blueprint("cnn", "conv_heavy").param_count(2) + 2
    expected_live += get_blueprint("cnn", "attention").param_count(8)
    counts = m.param_counts()
    assert (counts.host, counts.live_seeds, counts.fossils) == (host_params, expected_live, 0)
    assert m.growth_ratio() == expected_live / host_params
    assert sum(p.numel() for p in m.parameters()) == counts.total
    assert {id(p) for p in m.host_parameters()}.isdisjoint(id(p) for p in m.seed_parameters("r0c0"))


@pytest.mark.parametrize("num_slots", [1, 3, 8, 16])
@pytest.mark.parametrize("topology", ["cnn", "transformer"])
def test_many_slots(topology: str, num_slots: int) -> None:
    torch.manual_seed(num_slots)
    if topology == "cnn":
        host = CNNHost(width=1, depth=16)
        x = torch.randn(2, 1, 8, 8)
    else:
        host = TransformerHost(vocab_size=5, d_model=8, n_heads=2, n_layers=16, max_seq_len=6)
        x = torch.randint(0, 5, (2, 6))
    ids = [f"r0c{i}" for i in range(0, 16, 16 // num_slots)][:num_slots]
    m = MorphogeneticModel(host, ids, CFG).eval()
    before = m(x)
    names = blueprints_for(topology)
    for i, sid in enumerate(ids):
        m.germinate(sid, names[i % len(names)], ("linear", "sigmoid", "gated")[i % 3])
        m.record_contribution(sid, 1.0)
    assert torch.equal(m(x), before)
    while any(s.stage != S.HOLDING for s in m.slot_states()):
        m.step_epoch()
    for sid in ids:
        m.fossilize(sid)
    assert len(m.slot_states()) == num_slots and m.param_counts().live_seeds == 0
    assert torch.equal(m(x), before)  # zero-init seeds are still the identity


OPS = st.one_of(
    st.tuples(st.just("germinate"), st.integers(0, 3), st.integers(0, 2), st.integers(0, 2)),
    st.tuples(st.just("prune"), st.integers(0, 3)),
    st.tuples(st.just("fossilize"), st.integers(0, 3)),
    st.tuples(st.just("record"), st.integers(0, 3), st.floats(-1.0, 1.0)),
    st.tuples(st.just("step")),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=st.lists(OPS, max_size=40))
def test_random_operation_sequences_stay_legal(ops: list[tuple]) -> None:
    m = MorphogeneticModel(MLPHost(3, 2, hidden=4, depth=4), ["r0c0", "r0c2", "r0c3"], CFG)
    x = torch.randn(2, 3)
    ids = [*m.slot_config.slot_ids, "r0c1"]  # r0c1 exists in the host but is not enabled
    for op in ops:
        before = _stages(m)
        changes = []
        try:
            sid = ids[op[1]] if len(op) > 1 else None
            if op[0] == "germinate":
                bp = ("lora", "mlp", "conv_light")[op[2]]
                m.germinate(sid, bp, ("linear", "sigmoid", "gated")[op[3]])
            elif op[0] == "prune":
                m.prune(sid)
            elif op[0] == "fossilize":
                m.fossilize(sid)
            elif op[0] == "record":
                m.record_contribution(sid, op[2])
            else:
                changes = m.step_epoch()
        except (SlotStateError, UnknownBlueprintError, SlotIdError):
            assert _stages(m) == before  # a refused operation changes nothing
            continue
        for c in changes:
            assert can_transition(c.source, c.target)
        for old, state in zip(before, m.slot_states(), strict=True):
            assert (
                old == state.stage
                or can_transition(old, state.stage)
                or (
                    # germinate passes through GERMINATED; step_epoch may chain PRUNED->...
                    old == S.DORMANT and state.stage == S.TRAINING
                )
            )
            has_seed = is_live(state.stage) or state.stage == S.FOSSILIZED
            assert (state.seed_params > 0) == has_seed
            assert (state.blueprint is not None) == has_seed
            assert 0.0 <= state.alpha <= 1.0
            assert state.embargo_left == 0 or state.stage in (S.PRUNED, S.EMBARGOED)
            if state.stage == S.HOLDING or state.stage == S.FOSSILIZED:
                assert state.alpha == 1.0
        counts = m.param_counts()
        assert sum(p.numel() for p in m.parameters()) == counts.total
    assert m(x).shape == (2, 2)
