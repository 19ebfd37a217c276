"""Unit sites read their sizes live; a fossilized width seed folds into the host in
place (same modules and Parameter objects, same function and parameter counts, the
slot empty again); a model restores to a state of another structure."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from esper.lifecycle import SeedStage
from esper.model import (
    CNNHost,
    LifecycleConfig,
    MorphogeneticModel,
    SlotStateError,
    TransformerHost,
    UnitSite,
    restore_state,
)
from model_helpers import HOSTS, advance, cnn, randomise

LIFECYCLE = LifecycleConfig(min_train_epochs=1, blend_epochs=2)


def outputs(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(train-mode, eval-mode) outputs, each on a copy (BatchNorm updates its stats)."""
    return copy.deepcopy(model).train()(x), copy.deepcopy(model).eval()(x)


def grown(topology: str, blend: str = "linear", stages=None) -> tuple[MorphogeneticModel, ...]:
    """A model with a fossil at r0c1 and, optionally, seeds at r0c0 / r0c2 in ``stages``."""
    torch.manual_seed(5)
    host, x = HOSTS[topology]()
    model = MorphogeneticModel(host, lifecycle=LIFECYCLE)
    plan = {"r0c1": ("wide_x1", SeedStage.FOSSILIZED), **(stages or {})}
    for sid, (bp, _) in plan.items():
        model.germinate(sid, bp, blend)
    randomise(model)
    for sid, (_, stage) in plan.items():
        advance(model, sid, stage)
    model.train()(x)  # the seeds' BatchNorms get running statistics of their own
    return model, x


# -- live sites -----------------------------------------------------------------------


def test_site_sizes_are_read_from_the_layers_every_time() -> None:
    model, _ = grown("cnn")
    site = model.slots["r0c1"].width_site
    assert (site.units, site.in_units, site.out_units) == (2, 1, 4)
    before = model.seed_param_count("r0c1", "wide_x1")
    model.fold_in_place("r0c1")
    assert model.slots["r0c1"].width_site is site  # the slot's site object, not rebuilt
    assert (site.units, site.in_units, site.out_units) == (4, 1, 4)
    assert model.host.widths == model.host.block_channels() == [1, 4, 4]
    # A new seed at the folded slot is a fraction of the wider layer, and costs so.
    assert model.seed_param_count("r0c1", "wide_x1") > before
    assert model.slot_state("r0c1").channels == 4
    assert model.slot_config.channels_for("r0c1") == 4


def test_a_unit_site_on_plain_user_layers_builds_identity_seeds() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 4, 3, stride=2, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Conv2d(4, 5, 5, padding=2, bias=True),
    )
    site = UnitSite(producer=net[0], unit_ops=(net[1], net[2]), consumer=net[3])
    seed = site.build(3)
    assert not site.unit_dim_last and site.unit_layers == (net[0], net[1])
    assert seed.fan_in[0].stride == (2, 2) and seed.fan_in[0].bias is not None
    assert seed.fan_out.kernel_size == (5, 5) and seed.fan_out.bias is None
    x = torch.randn(2, 3, 8, 8)
    assert seed(x).shape == net(x).shape and not seed(x).any()  # zero fan-out
    assert site.param_count(3) == sum(p.numel() for p in seed.parameters())
    assert net[0].weight.shape[0] == 4  # building a seed never touches the layers


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"producer": nn.LayerNorm(4)}, "producer must be an nn.Linear or an nn.Conv2d"),
        ({"consumer": nn.Conv2d(4, 4, 3, groups=2)}, "consumer .* got Conv2d with groups=2"),
        ({"unit_ops": (nn.LayerNorm(4),)}, "BatchNorm or stateless .* got LayerNorm"),
        ({"target": "side"}, "target must be one of"),
    ],
)
def test_unit_site_rejects_layers_it_cannot_widen(kwargs, match) -> None:
    parts = {"producer": nn.Linear(3, 4), "unit_ops": (), "consumer": nn.Linear(4, 2)}
    with pytest.raises((TypeError, ValueError), match=match):
        UnitSite(**{**parts, **kwargs})


def test_host_sites_are_neighbours_through_shared_layers() -> None:
    sites = CNNHost(width=1, depth=3).sites()
    assert sites[0].feeds(sites[1]) and sites[1].feeds(sites[2])
    assert not sites[1].feeds(sites[0]) and not sites[2].feeds(sites[0])
    trans = TransformerHost(7, d_model=8, n_heads=2, n_layers=2).sites()
    assert not trans[0].feeds(trans[1])  # the MLPs share no layer


# -- folding in place -----------------------------------------------------------------


@pytest.mark.parametrize("topology", HOSTS)
def test_fold_in_place_keeps_modules_parameters_function_and_counts(topology) -> None:
    model, x = grown(topology)
    want = outputs(model, x)
    counts = model.param_counts()
    modules = {name: id(m) for name, m in model.host.named_modules()}
    params = {name: id(p) for name, p in model.host.named_parameters()}
    plan = model.fold_in_place("r0c1")
    assert {name: id(m) for name, m in model.host.named_modules()} == modules
    assert {name: id(p) for name, p in model.host.named_parameters()} == params
    assert all(change.new is change.old for change in plan.changes)
    for got, ref in zip(outputs(model, x), want, strict=True):
        torch.testing.assert_close(got, ref, atol=1e-6, rtol=1e-5)
    assert model.param_counts() == counts  # the folded units are still growth
    assert model.growth_ratio() > 0
    state = model.slot_state("r0c1")
    assert state.stage == SeedStage.DORMANT and state.seed_params == 0
    assert plan.stage_change.source == SeedStage.FOSSILIZED
    assert plan.stage_change.target == SeedStage.DORMANT
    assert model.can_germinate("r0c1")  # the wider layer can grow again


def test_a_gated_fossil_folds_its_gate_into_the_weights() -> None:
    model, x = grown("mlp", blend="gated")
    want = outputs(model, x)
    units = model.slots["r0c1"].seed.units
    counts = model.param_counts()
    model.fold_in_place("r0c1")
    for got, ref in zip(outputs(model, x), want, strict=True):
        torch.testing.assert_close(got, ref, atol=1e-6, rtol=1e-5)
    assert model.param_counts().total == counts.total - units  # the k gate logits


@pytest.mark.parametrize("topology", ["cnn", "mlp"])
def test_live_neighbours_get_zero_weights_to_the_folded_units(topology) -> None:
    stages = {"r0c0": ("wide_half", SeedStage.BLENDING), "r0c2": ("wide_x2", SeedStage.TRAINING)}
    model, x = grown(topology, stages=stages)
    want = outputs(model, x)
    k = model.slots["r0c1"].seed.units
    up_out = model.slots["r0c0"].seed.fan_out
    up_out = up_out if isinstance(up_out, nn.Conv2d | nn.Linear) else up_out[-1]
    down_in = model.slots["r0c2"].seed.fan_in[0]
    up_before, down_before = up_out.weight.detach().clone(), down_in.weight.detach().clone()
    model.fold_in_place("r0c1")
    for got, ref in zip(outputs(model, x), want, strict=True):
        torch.testing.assert_close(got, ref, atol=1e-6, rtol=1e-5)
    # r0c0's units now also feed the folded units; r0c2 reads them: zero at the fold.
    assert torch.equal(up_out.weight[:-k], up_before) and not up_out.weight[-k:].any()
    assert torch.equal(down_in.weight[:, :-k], down_before)
    assert not down_in.weight[:, -k:].any()
    assert model.slot_state("r0c0").stage == SeedStage.BLENDING  # still live, still there
    model.train()(x).sum().backward()  # and the whole thing trains
    model.seed_forward(x).sum().backward()


def test_folding_all_slots_twice_gives_the_static_wider_host() -> None:
    """Two rounds of all-slot widening by x1, each folded: the CNN width 1 -> 2 -> 4,
    layer for layer and parameter for parameter the static host of that width."""
    torch.manual_seed(0)
    model = MorphogeneticModel(CNNHost(width=1, depth=3), lifecycle=LIFECYCLE)
    x = torch.randn(4, 1, 8, 8)
    for width in (2, 4):
        for sid in model.slot_config.slot_ids:
            model.germinate(sid, "wide_x1")
        randomise(model, seed=width)
        for sid in model.slot_config.slot_ids:
            advance(model, sid, SeedStage.FOSSILIZED)
        want = outputs(model, x)
        for sid in model.slot_config.slot_ids:
            model.fold_in_place(sid)
        for got, ref in zip(outputs(model, x), want, strict=True):
            torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
        static = CNNHost(width=width, depth=3)
        assert model.host.widths == static.widths
        assert sum(p.numel() for p in model.host.parameters()) == sum(
            p.numel() for p in static.parameters()
        )
        static.load_state_dict(model.host.state_dict())  # same architecture
        torch.testing.assert_close(static.eval()(x), want[1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("prepare", "match"),
    [
        (lambda m: None, "r0c0: it is empty, not a width seed"),
        (lambda m: m.germinate("r0c0", "wide_x1"), "TRAINING; only a FOSSILIZED seed folds"),
        (lambda m: m.germinate("r0c0", "conv_light"), "r0c0: it holds a Conv2d, not a width seed"),
    ],
)
def test_folding_a_slot_without_a_fossilized_width_seed_is_refused(prepare, match) -> None:
    model = MorphogeneticModel(CNNHost(width=1), lifecycle=LIFECYCLE)
    prepare(model)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(SlotStateError, match=match):
        model.fold_in_place("r0c0")
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items() if torch.is_tensor(v))


# -- restoring across a fold ----------------------------------------------------------


@pytest.mark.parametrize("topology", HOSTS)
def test_restore_returns_to_the_pre_fold_model_with_the_same_objects(topology) -> None:
    stages = {"r0c2": ("wide_half", SeedStage.HOLDING)}
    model, x = grown(topology, stages=stages)
    before = copy.deepcopy(model.state_dict())
    want = outputs(model, x)
    params = {name: id(p) for name, p in model.host.named_parameters()}
    specs = model.slot_states()
    model.fold_in_place("r0c1")
    restore_state(model, copy.deepcopy(before))
    after = model.state_dict()
    assert after.keys() == before.keys()
    for key, value in before.items():
        same = torch.equal(after[key], value) if torch.is_tensor(value) else after[key] == value
        assert same, key
    assert {name: id(p) for name, p in model.host.named_parameters()} == params
    assert model.slot_states() == specs
    assert model.slot_state("r0c1").stage == SeedStage.FOSSILIZED
    for got, ref in zip(outputs(model, x), want, strict=True):
        assert torch.equal(got, ref)


def test_a_folded_state_restores_into_a_fresh_narrow_model() -> None:
    model, x = grown("cnn")
    model.fold_in_place("r0c1")
    fresh = MorphogeneticModel(cnn()[0], lifecycle=LIFECYCLE)
    with pytest.raises(SlotStateError, match="does not match"):
        fresh.load_state_dict(model.state_dict())  # plain loading cannot widen
    restore_state(fresh, model.state_dict())
    assert fresh.host.widths == model.host.widths
    assert fresh.param_counts() == model.param_counts()  # growth survives the round trip
    for got, ref in zip(outputs(fresh, x), outputs(model, x), strict=True):
        assert torch.equal(got, ref)


def test_a_failed_restore_leaves_the_model_as_it_was() -> None:
    model, x = grown("cnn")
    model.fold_in_place("r0c1")
    want = outputs(model, x)
    bad = copy.deepcopy(model.state_dict())
    bad["slots.r0c0._extra_state"]["channels"] = 99  # a slot that cannot match
    bad["host.blocks.0.0.weight"] = torch.zeros(7, 1, 3, 3)
    with pytest.raises(SlotStateError, match="does not match"):
        restore_state(model, bad)
    assert model.host.widths == [1, 4, 4]
    for got, ref in zip(outputs(model, x), want, strict=True):
        assert torch.equal(got, ref)
