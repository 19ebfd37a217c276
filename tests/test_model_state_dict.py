"""state_dict round trips in every lifecycle stage, through torch.load(weights_only=True)."""

from __future__ import annotations

import io

import pytest
import torch

from esper.lifecycle import SeedStage
from esper.model import (
    CNNHost,
    LifecycleConfig,
    MorphogeneticModel,
    SlotStateError,
    TransformerHost,
)

S = SeedStage
CFG = LifecycleConfig(min_train_epochs=1, blend_epochs=3, embargo_epochs=2)


def _fresh(topology: str, seed: int) -> MorphogeneticModel:
    torch.manual_seed(seed)
    if topology == "cnn":
        host = CNNHost(in_channels=3, num_classes=5, width=2, depth=4, image_size=12)
    else:
        host = TransformerHost(vocab_size=7, d_model=8, n_heads=2, n_layers=4, max_seq_len=6)
    return MorphogeneticModel(host, lifecycle=CFG)


def _input(topology: str) -> torch.Tensor:
    torch.manual_seed(123)
    if topology == "cnn":
        return torch.randn(3, 3, 12, 12)
    return torch.randint(0, 7, (2, 6))


def _roundtrip(model: MorphogeneticModel, topology: str) -> MorphogeneticModel:
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    clone = _fresh(topology, seed=999)  # different random init: everything must come from disk
    clone.load_state_dict(state)
    return clone


def _perturb(model: MorphogeneticModel) -> None:
    """Move every parameter off its init so that zero-init seeds are not trivially equal."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))


def _setup(topology: str) -> MorphogeneticModel:
    """Four slots in four different stages, then the last one cycles through its life."""
    m = _fresh(topology, seed=0)
    blends = ("gated", "sigmoid", "linear", "gated")
    bps = (
        ("conv_heavy", "attention", "depthwise", "norm")
        if topology == "cnn"
        else ("attention", "mlp", "lora", "norm")
    )
    for i, sid in enumerate(m.slot_config.slot_ids):
        m.germinate(sid, bps[i], blends[i])
        m.record_contribution(sid, 0.1 * (i + 1))
    return m


@pytest.mark.parametrize("topology", ["cnn", "transformer"])
def test_round_trip_in_every_stage(topology: str) -> None:
    m = _setup(topology)
    x = _input(topology)
    seen: set[SeedStage] = set()
    ids = m.slot_config.slot_ids
    for step in range(11):
        if step == 4:
            m.fossilize(ids[0])
        if step == 5:
            m.prune(ids[1], reason="policy")
        if step == 6:
            m.record_contribution(ids[2], -0.5)  # auto-prune at the next step
        if step == 9:
            m.germinate(ids[1], "norm", "linear")
        _perturb(m)
        m.eval()
        clone = _roundtrip(m, topology).eval()
        assert clone.slot_states() == m.slot_states(), step
        assert torch.equal(clone(x), m(x)), step
        overrides = {sid: 0.0 for sid in ids[::2]}
        assert torch.equal(clone(x, alpha_override=overrides), m(x, alpha_override=overrides))
        assert clone.param_counts() == m.param_counts()
        assert clone.step_epoch() == m.step_epoch()
        seen.update(s.stage for s in m.slot_states())
    assert seen >= {S.TRAINING, S.BLENDING, S.HOLDING, S.FOSSILIZED, S.PRUNED, S.EMBARGOED}
    assert seen >= {S.DORMANT}


def test_mid_blend_alpha_survives() -> None:
    m = _setup("cnn")
    m.step_epoch()
    alphas = [s.alpha for s in m.slot_states()]
    assert all(0 < a < 1 for a in alphas)
    clone = _roundtrip(m, "cnn")
    assert [s.alpha for s in clone.slot_states()] == alphas
    gate = clone.slots["r0c0"].gate
    assert gate is not None and torch.equal(gate.logit, m.slots["r0c0"].gate.logit)


def test_loading_an_empty_model_removes_seeds() -> None:
    m = _setup("cnn")
    empty = _fresh("cnn", seed=0)
    m.load_state_dict(empty.state_dict())
    assert all(s.stage == S.DORMANT for s in m.slot_states())
    assert m.param_counts().live_seeds == 0 and list(m.slots.parameters()) == []


def test_loading_into_a_different_host_fails_clearly() -> None:
    m = _setup("cnn")
    other = MorphogeneticModel(CNNHost(in_channels=3, num_classes=5, width=4, depth=4))
    with pytest.raises(SlotStateError, match="does not match"):
        other.load_state_dict(m.state_dict())
