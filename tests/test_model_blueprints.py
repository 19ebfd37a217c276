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


def test_registry_names_and_order() -> None:
    assert blueprints_for("cnn") == ("norm", "attention", "depthwise", "conv_light", "conv_heavy")
    assert blueprints_for("transformer") == ("norm", "lora", "attention", "mlp")
    assert blueprints_for("mlp") == ("lora", "mlp")
    for topology, table in BLUEPRINTS.items():
        for name, bp in table.items():
            assert (bp.name, bp.topology) == (name, topology)


@pytest.mark.parametrize(
    ("topology", "name"), [(t, n) for t, table in BLUEPRINTS.items() for n in table]
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
