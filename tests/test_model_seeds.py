"""Seeds in a model: identity at germination, gradient isolation, blending, overrides."""

from __future__ import annotations

import copy
import itertools
import threading

import pytest
import torch

from esper.lifecycle import SeedStage
from esper.model import (
    CNNHost,
    LifecycleConfig,
    MLPHost,
    MorphogeneticModel,
    TransformerHost,
    blend_alpha,
    blueprints_for,
)
from esper.slots import SlotIdError

FAST = LifecycleConfig(min_train_epochs=1, blend_epochs=3)


def _cnn() -> tuple[MorphogeneticModel, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    x, y = torch.randn(6, 3, 9, 8), torch.randint(0, 4, (6,))
    host = CNNHost(in_channels=3, num_classes=4, width=2, depth=3, image_size=(9, 8))
    return MorphogeneticModel(host, lifecycle=FAST), x, y


def _transformer() -> tuple[MorphogeneticModel, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    x = torch.randint(0, 9, (3, 8))
    host = TransformerHost(vocab_size=9, d_model=8, n_heads=2, n_layers=3, max_seq_len=8)
    return MorphogeneticModel(host, lifecycle=FAST), x, torch.randint(0, 9, (3, 8))


def _mlp() -> tuple[MorphogeneticModel, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    x, y = torch.randn(5, 6), torch.randint(0, 3, (5,))
    return MorphogeneticModel(MLPHost(6, 3, hidden=8, depth=3), lifecycle=FAST), x, y


MAKERS = {"cnn": _cnn, "transformer": _transformer, "mlp": _mlp}


def _loss(model: MorphogeneticModel, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    logits = model(x)
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


def _to_holding(model: MorphogeneticModel, slot_id: str) -> None:
    model.record_contribution(slot_id, 1.0)
    while model.slot_state(slot_id).stage != SeedStage.HOLDING:
        model.step_epoch()


def _randomise_seed(model: MorphogeneticModel, slot_id: str) -> None:
    """Move the seed away from its zero init, as training would."""
    with torch.no_grad():
        for p in model.seed_parameters(slot_id):
            p.add_(0.3 * torch.randn_like(p))


@pytest.mark.parametrize("topology", list(MAKERS))
def test_germination_leaves_output_unchanged(topology: str) -> None:
    model, x, _ = MAKERS[topology]()
    model.eval()
    before = model(x)
    slots = list(model.slot_config)
    blends = ("linear", "sigmoid", "gated")
    for i, bp in enumerate(blueprints_for(topology)):
        for j, sid in enumerate(slots):
            trial = copy.deepcopy(model)
            trial.germinate(sid, bp, blends[(i + j) % 3])
            assert torch.equal(trial(x), before), (bp, sid)
            _to_holding(trial, sid)  # identity still holds at alpha = 1 (zero-init last layer)
            assert torch.equal(trial(x), before), (bp, sid)


@pytest.mark.parametrize("own_seed_pass", [True, False])
@pytest.mark.parametrize("topology", list(MAKERS))
def test_training_seed_is_isolated_but_learns(topology: str, own_seed_pass: bool) -> None:
    for blueprint in blueprints_for(topology):
        model, x, y = MAKERS[topology]()
        model.own_seed_pass = own_seed_pass
        reference = copy.deepcopy(model)
        sid = model.slot_config.slot_ids[1]
        model.germinate(sid, blueprint)
        _randomise_seed(model, sid)
        model.train(), reference.train()
        out = model(x)
        assert torch.equal(out, reference(x))  # value unchanged even in train mode
        loss = _loss(model, x, y)
        seed_logits = model.seed_forward(x)
        assert (seed_logits is not None) == (model.training_seeds() == [sid])
        if own_seed_pass:  # what the Trainer adds: the seed's own loss, host detached
            flat = seed_logits.reshape(-1, seed_logits.shape[-1])
            loss = loss + torch.nn.functional.cross_entropy(flat, y.reshape(-1))
        loss.backward()
        _loss(reference, x, y).backward()
        for (name, p), q in zip(
            model.host.named_parameters(), reference.host.parameters(), strict=True
        ):
            assert torch.equal(p.grad, q.grad), (blueprint, name)
        for (name, b), c in zip(model.host.named_buffers(), reference.host.buffers(), strict=True):
            assert torch.equal(b, c), (blueprint, name)  # the seed pass keeps no BN stats
        seed_grads = [p.grad for p in model.seed_parameters(sid)]
        assert all(g is not None for g in seed_grads), blueprint
        assert sum(g.abs().sum() for g in seed_grads) > 0, blueprint


@pytest.mark.parametrize("topology", ["cnn", "transformer"])
def test_host_before_fossil_keeps_learning(topology: str) -> None:
    model, x, y = MAKERS[topology]()
    last = model.slot_config.slot_ids[-1]
    model.germinate(last, blueprints_for(topology)[-1])
    _to_holding(model, last)
    model.fossilize(last)
    _randomise_seed(model, last)
    assert model.slot_state(last).alpha == 1.0
    model.train()
    _loss(model, x, y).backward()
    first_block = list(model.host.blocks[0].parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in first_block)
    # A fossil is part of the host: gradient also reaches the host through the seed.
    with_fossil = [p.grad.clone() for p in first_block]
    model.zero_grad()
    logits = model(x, alpha_override={last: 0.0})
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
    loss.backward()
    assert any(not torch.equal(a, p.grad) for a, p in zip(with_fossil, first_block, strict=True))


def test_learned_gate_is_trained() -> None:
    model, x, y = _cnn()
    sid = "r0c1"
    model.germinate(sid, "conv_light", "gated")
    model.record_contribution(sid, 1.0)
    model.step_epoch()
    assert model.slot_state(sid).stage == SeedStage.BLENDING
    _randomise_seed(model, sid)
    gate = model.slots[sid].gate.logit
    before = gate.detach().clone()
    opt = torch.optim.SGD(model.seed_parameters(sid), lr=0.5)
    assert any(p is gate for p in model.seed_parameters(sid))
    model.train()
    _loss(model, x, y).backward()
    opt.step()
    assert not torch.equal(gate.detach(), before)
    assert model.slot_state(sid).seed_params == 9 * 4 * 4 + 4 + 4


@pytest.mark.parametrize("blend", ["linear", "sigmoid", "gated"])
def test_blend_ramp_and_blended_output(blend: str) -> None:
    model, x, _ = _mlp()
    sid = "r0c0"
    model.germinate(sid, "mlp", blend)
    _randomise_seed(model, sid)
    model.eval()
    model.record_contribution(sid, 0.5)
    alphas = []
    for _ in range(FAST.min_train_epochs + FAST.blend_epochs):
        model.step_epoch()
        state = model.slot_state(sid)
        alphas.append(state.alpha)
        if state.stage == SeedStage.BLENDING and blend != "gated":
            # The blended output is exactly the one an explicit override of alpha gives.
            assert torch.equal(model(x), model(x, alpha_override={sid: state.alpha}))
    assert model.slot_state(sid).stage == SeedStage.HOLDING
    assert alphas[-1] == 1.0
    ramp = alphas[: FAST.blend_epochs]
    assert all(0 < a < b for a, b in itertools.pairwise(ramp)) and ramp[-1] == 1.0
    if blend == "linear":
        assert alphas == pytest.approx([1 / 3, 2 / 3, 1.0, 1.0])


def test_blend_schedules() -> None:
    for blend in ("linear", "sigmoid", "gated"):
        assert blend_alpha(blend, 0.0) == 0.0 and blend_alpha(blend, 1.0) == 1.0
    xs = [i / 10 for i in range(11)]
    sig = [blend_alpha("sigmoid", v) for v in xs]
    assert sig == sorted(sig) and sig[5] == pytest.approx(0.5)


def test_alpha_override_is_per_call_and_thread_safe() -> None:
    model, x, _ = _mlp()
    for sid in ("r0c0", "r0c2"):
        model.germinate(sid, "mlp", "linear")
        _randomise_seed(model, sid)
        _to_holding(model, sid)
    model.eval()
    host_only = MorphogeneticModel(copy.deepcopy(model.host)).eval()
    cases = [{"r0c0": 0.0, "r0c2": 0.0}, {"r0c0": 1.0}, {"r0c2": 0.0}, None]
    with torch.no_grad():
        expected = [model(x, alpha_override=c) for c in cases]
    assert torch.equal(expected[0], host_only(x))
    assert len({tuple(e.flatten().tolist()) for e in expected[1:]}) >= 2
    assert torch.equal(expected[1], expected[3])  # HOLDING alpha is 1 already
    errors: list[str] = []

    def worker(k: int) -> None:
        with torch.no_grad():
            for _ in range(30):
                if not torch.equal(model(x, alpha_override=cases[k]), expected[k]):
                    errors.append(f"case {k}")

    threads = [threading.Thread(target=worker, args=(k % len(cases),)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert [s.alpha for s in model.slot_states()] == [1.0, 0.0, 1.0]


def test_bad_overrides() -> None:
    model, x, _ = _mlp()
    with pytest.raises(SlotIdError, match="r0c9"):
        model(x, alpha_override={"r0c9": 0.0})
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        model(x, alpha_override={"r0c0": 1.5})
    with pytest.raises(ValueError, match="block range"):
        model.run_blocks(torch.zeros(1, 8), 2, 1)


def test_seeds_follow_model_dtype_and_features_match_head() -> None:
    model, x, _ = _mlp()
    model = model.double().eval()
    model.germinate("r0c1", "mlp", "gated")
    assert all(p.dtype == torch.float64 for p in model.seed_parameters("r0c1"))
    _randomise_seed(model, "r0c1")
    _to_holding(model, "r0c1")
    xd = x.double()
    assert torch.equal(model.host.head(model.forward_features(xd)), model(xd))
