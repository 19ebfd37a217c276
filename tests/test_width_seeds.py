"""Width seeds and the depth seeds with real capacity: identity at birth, gradients,
isolation, state_dict round trips, folding into a wider host, exact costs, and the
shared counterfactual pass."""

from __future__ import annotations

import copy
import io

import pytest
import torch

from esper.env.masks import blueprint_cost_table
from esper.lifecycle import SeedStage
from esper.model import (
    CNNHost,
    LifecycleConfig,
    MLPHost,
    MorphogeneticModel,
    SlotStateError,
    TransformerHost,
    blueprints_for,
)
from esper.training import fast_counterfactuals, reference_counterfactuals, variants_to_measure
from model_helpers import HOSTS, advance, cnn, randomise

WIDE = ("wide_half", "wide_x1", "wide_x2")
NEW_KINDS = {"cnn": (*WIDE, "inverted"), "mlp": WIDE, "transformer": (*WIDE, "layer")}
LIFECYCLE = LifecycleConfig(min_train_epochs=1, blend_epochs=2)


def train_loss(model: MorphogeneticModel, x: torch.Tensor) -> torch.Tensor:
    """A task-free loss as the Trainer builds it: the forward's, plus the TRAINING
    seeds' own pass when the model uses one."""
    loss = model(x).sin().sum()
    seed_logits = model.seed_forward(x) if model.own_seed_pass else None
    return loss if seed_logits is None else loss + seed_logits.sin().sum()


def outputs(model: MorphogeneticModel, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(train-mode, eval-mode) outputs, each on a copy (BatchNorm updates its stats)."""
    return copy.deepcopy(model).train()(x), copy.deepcopy(model).eval()(x)


@pytest.mark.parametrize(
    ("topology", "blueprint"), [(t, b) for t, kinds in NEW_KINDS.items() for b in kinds]
)
@pytest.mark.parametrize("blend", ["linear", "gated"])
def test_identity_at_birth_in_every_slot_and_stage(topology, blueprint, blend) -> None:
    torch.manual_seed(0)
    host, x = HOSTS[topology]()
    base = MorphogeneticModel(host, lifecycle=LIFECYCLE)
    want = outputs(base, x)
    for stage in (SeedStage.TRAINING, SeedStage.BLENDING, SeedStage.HOLDING, SeedStage.FOSSILIZED):
        model = copy.deepcopy(base)
        for sid in model.slot_config.slot_ids:
            model.germinate(sid, blueprint, blend)
            advance(model, sid, stage)
        for got, ref in zip(outputs(model, x), want, strict=True):
            assert torch.equal(got, ref), (stage, (got - ref).abs().max())


@pytest.mark.parametrize("own_seed_pass", [True, False])
@pytest.mark.parametrize("topology", HOSTS)
def test_new_units_get_gradient_at_once_and_fan_in_after_one_step(topology, own_seed_pass):
    torch.manual_seed(1)
    host, x = HOSTS[topology]()
    model = MorphogeneticModel(host, lifecycle=LIFECYCLE, own_seed_pass=own_seed_pass).train()
    for sid in model.slot_config.slot_ids:
        model.germinate(sid, "wide_x1")
    seeds = {sid: model.slots[sid].seed for sid in model.slot_config.slot_ids}
    opt = torch.optim.SGD([p for s in seeds.values() for p in s.parameters()], lr=0.1)
    train_loss(model, x).backward()
    for sid, seed in seeds.items():
        out = [p.grad for p in seed.fan_out.parameters()]
        assert all(g is not None and g.abs().sum() > 0 for g in out), sid
    opt.step()
    opt.zero_grad()
    train_loss(model, x).backward()
    for sid, seed in seeds.items():
        grads = [p.grad for p in seed.fan_in.parameters() if p.dim() > 1]
        assert all(g is not None and g.abs().sum() > 0 for g in grads), sid


@pytest.mark.parametrize("own_seed_pass", [True, False])
@pytest.mark.parametrize("topology", HOSTS)
def test_training_width_seed_leaves_host_bit_identical(topology, own_seed_pass) -> None:
    torch.manual_seed(2)
    host, x = HOSTS[topology]()
    base = MorphogeneticModel(host, lifecycle=LIFECYCLE, own_seed_pass=own_seed_pass).train()
    grown = copy.deepcopy(base)
    for sid in grown.slot_config.slot_ids:
        grown.germinate(sid, "wide_x2")
    randomise(grown)  # a seed that already computes something must still stay hidden
    base(x).sin().sum().backward()
    assert torch.equal(grown(x), base(x))
    train_loss(grown, x).backward()
    for (name, p), q in zip(base.host.named_parameters(), grown.host.parameters(), strict=True):
        assert torch.equal(p.grad, q.grad), name
    for (name, b), c in zip(base.host.named_buffers(), grown.host.buffers(), strict=True):
        assert torch.equal(b, c), name  # BatchNorm statistics too
    for sid in grown.slot_config.slot_ids:
        assert all(p.grad is not None for p in grown.seed_parameters(sid)), sid


def _round_trip(model: MorphogeneticModel, make) -> MorphogeneticModel:
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    fresh = MorphogeneticModel(make()[0], lifecycle=LIFECYCLE)
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    return fresh


@pytest.mark.parametrize("topology", HOSTS)
def test_state_dict_round_trips_at_every_stage(topology) -> None:
    torch.manual_seed(4)
    make = HOSTS[topology]
    model = MorphogeneticModel(make()[0], lifecycle=LIFECYCLE)
    x = make()[1]
    model.germinate("r0c0", "wide_x1", "gated")
    model.germinate("r0c1", "wide_half")
    randomise(model)
    for stage in (SeedStage.TRAINING, SeedStage.BLENDING, SeedStage.HOLDING, SeedStage.FOSSILIZED):
        advance(model, "r0c0", stage)
        loaded = _round_trip(model, make)
        assert loaded.slot_states() == model.slot_states()
        for got, ref in zip(outputs(loaded, x), outputs(model, x), strict=True):
            assert torch.equal(got, ref), stage


@pytest.mark.parametrize("topology", HOSTS)
@pytest.mark.parametrize("blend", ["linear", "gated"])
def test_fold_width_equals_the_model(topology, blend) -> None:
    torch.manual_seed(5)
    host, x = HOSTS[topology]()
    model = MorphogeneticModel(host, lifecycle=LIFECYCLE)
    sids = model.slot_config.slot_ids
    for sid, bp in zip(sids, ("wide_x2", "wide_half", "wide_x1"), strict=False):
        model.germinate(sid, bp, blend)
    randomise(model)
    with pytest.raises(SlotStateError, match="TRAINING"):
        model.fold_width()
    for sid in sids:
        advance(model, sid, SeedStage.FOSSILIZED)
    model.train()(x)  # give the seeds' BatchNorms running stats of their own
    folded = model.fold_width()
    for got, ref in zip(outputs(folded, x), outputs(model, x), strict=True):
        torch.testing.assert_close(got, ref, atol=1e-6, rtol=1e-5)
    # Folded layers are dense: adjacent seeds' units also get (zero) weights to each
    # other, which the seed form does not have, so the folded count can only be larger.
    gates = sum(model.slots[s].seed.units for s in sids) if blend == "gated" else 0
    seeds = sum(model.slots[s].num_seed_params() for s in sids)
    assert folded.param_counts().total >= model.param_counts().host + seeds - gates
    assert all(s.stage == SeedStage.DORMANT for s in folded.slot_states())
    if topology == "cnn":
        assert folded.host.block_channels() == [1 + 2, 2 + 1, 4 + 4]
    # A plain host built with the folded widths loads the folded weights (weights_only).
    if topology == "transformer":
        plain = TransformerHost(7, 8, 2, 3, mlp_hidden=folded.host.mlp_widths())
    elif topology == "cnn":
        plain = CNNHost(width=1, widths=folded.host.block_channels())
    else:
        plain = MLPHost(6, 3, 5, 3, widths=folded.host.block_channels())
    buffer = io.BytesIO()
    torch.save(folded.host.state_dict(), buffer)
    buffer.seek(0)
    plain.load_state_dict(torch.load(buffer, weights_only=True))
    torch.testing.assert_close(plain.eval()(x), model.eval()(x), atol=1e-6, rtol=1e-5)


def test_fold_keeps_other_seeds() -> None:
    torch.manual_seed(6)
    host, x = cnn()
    model = MorphogeneticModel(host, lifecycle=LIFECYCLE)
    model.germinate("r0c0", "wide_x1")
    model.germinate("r0c2", "conv_light")
    randomise(model)
    advance(model, "r0c0", SeedStage.FOSSILIZED)
    advance(model, "r0c2", SeedStage.HOLDING)
    folded = model.fold_width()
    assert folded.slot_state("r0c2").stage == SeedStage.HOLDING
    assert folded.param_counts().total == model.param_counts().total  # one seed: no cross terms
    torch.testing.assert_close(folded.eval()(x), model.eval()(x), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("depth", [1, 2, 4])
@pytest.mark.parametrize("topology", HOSTS)
def test_cost_table_is_exact_for_every_slot_and_blend(topology, depth) -> None:
    host = {
        "cnn": lambda: CNNHost(width=1, depth=depth, image_size=16),
        "mlp": lambda: MLPHost(6, 3, hidden=5, depth=depth),
        "transformer": lambda: TransformerHost(7, d_model=8, n_heads=2, n_layers=depth),
    }[topology]
    model = MorphogeneticModel(host())
    names = blueprints_for(topology)
    gated = blueprint_cost_table(model.slot_config, names, model=model)
    plain = blueprint_cost_table(model.slot_config, names, model=model, blends=("linear",))
    for i, sid in enumerate(model.slot_config.slot_ids):
        for j, name in enumerate(names):
            for blend, table in (("gated", gated), ("linear", plain)):
                probe = MorphogeneticModel(host())
                probe.germinate(sid, name, blend)
                assert int(table[i, j]) == probe.param_counts().live_seeds, (sid, name, blend)


def test_cost_table_without_model_refuses_width_blueprints() -> None:
    model = MorphogeneticModel(CNNHost(width=1))
    with pytest.raises(ValueError, match="pass model="):
        blueprint_cost_table(model.slot_config, blueprints_for("cnn"))


@pytest.mark.parametrize("topology", HOSTS)
def test_fast_counterfactuals_equal_reference_with_width_seeds(topology) -> None:
    torch.manual_seed(7)
    host, _ = HOSTS[topology]()
    model = MorphogeneticModel(host, lifecycle=LIFECYCLE).double()
    plan = [("wide_x1", SeedStage.BLENDING), ("wide_half", SeedStage.TRAINING)]
    plan.append(
        ("wide_x2", SeedStage.FOSSILIZED)
        if topology != "cnn"
        else ("conv_light", SeedStage.HOLDING)
    )
    for sid, (bp, stage) in zip(model.slot_config.slot_ids, plan, strict=True):
        model.germinate(sid, bp, "gated")
        advance(model, sid, stage)
    randomise(model)
    model.eval()
    if topology == "transformer":
        x, y, kind = torch.randint(0, 7, (40, 5)), torch.randint(0, 7, (40, 5)), "lm"
    else:
        x = torch.randn(40, *((1, 8, 8) if topology == "cnn" else (6,))).double()
        y, kind = torch.randint(0, 10 if topology == "cnn" else 3, (40,)), "classification"
    variants = variants_to_measure(model)
    assert len(variants) == 3
    fast = fast_counterfactuals(model, x, y, kind, variants, eval_batch_size=16)
    ref = reference_counterfactuals(model, x, y, kind, variants, eval_batch_size=16)
    assert fast.val_loss == pytest.approx(ref.val_loss, abs=1e-9)
    for sid in variants:
        assert fast.contributions[sid] == pytest.approx(ref.contributions[sid], abs=1e-9)
        assert fast.variant_losses[sid] == pytest.approx(ref.variant_losses[sid], abs=1e-9)


@pytest.mark.parametrize("topology", HOSTS)
def test_seed_pass_reuses_the_forwards_prefix_exactly(topology) -> None:
    torch.manual_seed(8)
    host, x = HOSTS[topology]()
    model = MorphogeneticModel(host, lifecycle=LIFECYCLE).train()
    model.germinate("r0c1", "wide_x1")
    model.germinate("r0c2", "layer" if topology == "transformer" else "wide_half")
    randomise(model)
    cached, fresh = copy.deepcopy(model), copy.deepcopy(model)
    cached(x)  # leaves the activation entering block 1 for the seed pass
    a, b = cached.seed_forward(x), fresh.seed_forward(x)
    assert torch.equal(a, b)
    a.sin().sum().backward()
    b.sin().sum().backward()
    for p, q in zip(cached.parameters(), fresh.parameters(), strict=True):
        assert (p.grad is None) == (q.grad is None)
        assert p.grad is None or torch.equal(p.grad, q.grad)
    assert cached.seed_forward(x) is not None  # the prefix is used once, then recomputed


def test_seeds_built_in_eval_mode_run_in_eval_mode() -> None:
    """A seed germinated (or loaded) while the model is in eval mode must not use
    batch statistics: its BatchNorm follows the model's mode."""
    torch.manual_seed(9)
    host, x = cnn()
    model = MorphogeneticModel(host, lifecycle=LIFECYCLE).eval()
    model.germinate("r0c1", "wide_x1")
    advance(model, "r0c1", SeedStage.FOSSILIZED)
    randomise(model)
    assert not any(m.training for m in model.modules())
    torch.testing.assert_close(model.fold_width()(x), model(x), atol=1e-6, rtol=1e-5)
    loaded = MorphogeneticModel(cnn()[0], lifecycle=LIFECYCLE).eval()
    loaded.load_state_dict(model.state_dict())
    assert not any(m.training for m in loaded.modules())
    assert torch.equal(loaded(x), model(x))
