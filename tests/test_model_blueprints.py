"""Blueprints: exact parameter counts, identity at init, registry errors."""

from __future__ import annotations

import pytest
import torch

from esper.model import BLUEPRINTS, UnknownBlueprintError, blueprints_for, get_blueprint

CHANNELS = (1, 2, 3, 8, 17, 64)


def _input(topology: str, channels: int) -> torch.Tensor:
    if topology == "cnn":
        return torch.randn(2, channels, 5, 6)
    if topology == "transformer":
        return torch.randn(2, 7, channels)
    return torch.randn(3, channels)


WIDE = ("wide_half", "wide_x1", "wide_x2")


def test_registry_names_and_order() -> None:
    assert blueprints_for("cnn") == (
        "norm",
        "attention",
        "depthwise",
        "conv_light",
        "conv_heavy",
        "inverted",
        *WIDE,
    )
    assert blueprints_for("transformer") == ("norm", "lora", "attention", "mlp", "layer", *WIDE)
    assert blueprints_for("mlp") == ("lora", "mlp", *WIDE)
    for topology, table in BLUEPRINTS.items():
        for name, bp in table.items():
            assert (bp.name, bp.topology) == (name, topology)
            assert bp.is_width == (name in WIDE)


def test_width_units_are_a_fraction_of_the_layer_at_least_one() -> None:
    units = {name: get_blueprint("cnn", name).units for name in WIDE}
    assert [units[n](4) for n in WIDE] == [2, 4, 8]
    assert [units[n](1) for n in WIDE] == [1, 1, 2]
    with pytest.raises(UnknownBlueprintError, match="not a width blueprint"):
        get_blueprint("cnn", "norm").units(4)


def test_depth_seeds_have_capacity_beyond_the_slot_width() -> None:
    inverted = get_blueprint("cnn", "inverted").factory(2)
    assert inverted.expand.out_channels == 16  # 4x, at least 16: not capped by 2 channels
    layer = get_blueprint("transformer", "layer").factory(8)
    assert layer.mlp_seed[1].out_features == 32


@pytest.mark.parametrize(
    ("topology", "name"),
    [(t, n) for t, table in BLUEPRINTS.items() for n, bp in table.items() if not bp.is_width],
)
def test_param_count_exact_and_identity_at_init(topology: str, name: str) -> None:
    bp = get_blueprint(topology, name)
    sizes = [1, 2, 4, 8, 16, 64] if topology == "transformer" else CHANNELS
    for c in sizes:
        torch.manual_seed(c)
        module = bp.factory(c)
        assert sum(p.numel() for p in module.parameters()) == bp.param_count(c), (name, c)
        x = _input(topology, c)
        out = module(x)
        assert out.shape == x.shape
        assert torch.equal(out, torch.zeros_like(x)), (name, c)
        assert not any(
            isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in module.modules()
        )


def test_transformer_attention_seed_is_causal() -> None:
    torch.manual_seed(0)
    module = get_blueprint("transformer", "attention").factory(8)
    for p in module.parameters():
        torch.nn.init.normal_(p)
    x = torch.randn(1, 6, 8)
    x2 = x.clone()
    x2[:, 4:] += 1.0
    torch.testing.assert_close(module(x)[:, :4], module(x2)[:, :4])


def test_unknown_blueprint_names_allowed_ones() -> None:
    with pytest.raises(UnknownBlueprintError, match="allowed: lora, mlp"):
        get_blueprint("mlp", "conv_heavy")
    with pytest.raises(UnknownBlueprintError, match="exists for cnn"):
        get_blueprint("transformer", "depthwise")
    with pytest.raises(UnknownBlueprintError, match="allowed: cnn, transformer, mlp"):
        blueprints_for("rnn")
