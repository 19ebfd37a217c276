"""Blueprints: the seed modules a controller can germinate, keyed by host topology.

Two kinds. A *residual* blueprint builds a module ``f`` with ``f(h).shape == h.shape``
whose last layer is zero-initialised, so ``f(h) == 0`` exactly at birth and the residual
``h + α·f(h)`` starts as the identity (depth growth). No residual blueprint uses
BatchNorm: its batch statistics would make a seed's output depend on the rest of the
batch; GroupNorm/LayerNorm do not. A *width* blueprint (``wide_*``) adds
``max(1, round(fraction · units))`` units to the host layer at the slot
(`esper.model.width`); the host builds it, and its cost depends on the host's layers,
so ask `MorphogeneticModel.seed_param_count` for it.

The order of ``blueprints_for(topology)`` is the order of the blueprint action head.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor, nn

from esper.slots import TOPOLOGIES


class UnknownBlueprintError(ValueError):
    """A blueprint name is unknown, or does not fit the slot's topology."""


@dataclass(frozen=True)
class Blueprint:
    name: str
    topology: str
    # Residual blueprints: channels -> module with f(h).shape == h.shape, and its exact
    # parameter count. None for width blueprints (the host builds those).
    factory: Callable[[int], nn.Module] | None
    param_count: Callable[[int], int] | None
    width_fraction: float | None = None  # width blueprints: new units / current units
    # Sequence blueprints in which tokens see each other (attention): their factory
    # takes ``causal`` (True: a token sees itself and earlier tokens only).
    mixes_tokens: bool = False

    @property
    def is_width(self) -> bool:
        return self.width_fraction is not None

    def build(self, channels: int, *, causal: bool = True) -> nn.Module:
        """A fresh residual seed for ``channels``; ``causal`` matters only to blueprints
        that mix tokens (a decoder's slot must be causal, an encoder's need not be)."""
        if self.factory is None:
            raise UnknownBlueprintError(
                f"blueprint {self.name!r} adds units to a host layer: the host builds it"
            )
        if self.mixes_tokens:
            return self.factory(channels, causal=causal)  # type: ignore[call-arg]
        return self.factory(channels)

    def units(self, current: int) -> int:
        """New units a width blueprint adds to a layer of ``current`` units."""
        if self.width_fraction is None:
            raise UnknownBlueprintError(f"blueprint {self.name!r} is not a width blueprint")
        return max(1, round(self.width_fraction * current))


def _zero(layer: nn.Module) -> nn.Module:
    for p in layer.parameters():
        nn.init.zeros_(p)
    return layer


def lora_rank(channels: int) -> int:
    return max(1, min(8, channels // 4))


def attention_heads(channels: int) -> int:
    """Up to 4 heads, each at least 4 wide."""
    for heads in (4, 2):
        if channels % heads == 0 and channels // heads >= 4:
            return heads
    return 1


def squeeze_width(channels: int) -> int:
    return max(1, channels // 4)


def expanded_width(channels: int) -> int:
    """Hidden width of the inverted-residual seed: 4x, and at least 16, so a seed in a
    narrow slot still brings real capacity."""
    return max(16, 4 * channels)


# New units / current units of the width blueprints, in action-head order.
WIDTH_FRACTIONS = {"wide_half": 0.5, "wide_x1": 1.0, "wide_x2": 2.0}


# --------------------------------------------------------------------------------------
# Modules


class SqueezeExcite(nn.Module):
    """f(h) = h · tanh(W2 relu(W1 mean_hw(h))); W2 = 0 at init, so f = 0 exactly."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        hidden = squeeze_width(channels)
        self.fc1 = nn.Linear(channels, hidden)
        self.fc2 = _zero(nn.Linear(hidden, channels))

    def forward(self, h: Tensor) -> Tensor:
        s = self.fc2(F.relu(self.fc1(h.mean(dim=(-2, -1)))))
        return h * s.tanh()[..., None, None]


class LowRankAdapter(nn.Module):
    """LoRA-style ``B(A h)`` on the last dim; B = 0 at init."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        rank = lora_rank(channels)
        self.down = nn.Linear(channels, rank, bias=False)
        self.up = _zero(nn.Linear(rank, channels, bias=False))

    def forward(self, h: Tensor) -> Tensor:
        return self.up(self.down(h))


class AttentionSeed(nn.Module):
    """Pre-norm self-attention, causal (a decoder's) or not (an encoder's); output
    projection zero at init."""

    def __init__(self, channels: int, causal: bool = True) -> None:
        super().__init__()
        self.causal = bool(causal)
        self.n_heads = attention_heads(channels)
        self.norm = nn.LayerNorm(channels)
        self.qkv = nn.Linear(channels, 3 * channels)
        self.proj = _zero(nn.Linear(channels, channels))

    def forward(self, h: Tensor) -> Tensor:
        b, t, d = h.shape
        q, k, v = self.qkv(self.norm(h)).split(d, dim=-1)
        shape = (b, t, self.n_heads, d // self.n_heads)
        q, k, v = (z.view(shape).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        return self.proj(y.transpose(1, 2).reshape(b, t, d))


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expand, GroupNorm, ReLU, depthwise 3x3, ReLU, 1x1 project
    (zero at init). The hidden width is ``expanded_width(c)``, not capped by ``c``."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        e = expanded_width(channels)
        self.expand = nn.Conv2d(channels, e, 1, bias=False)
        self.norm = nn.GroupNorm(1, e)
        self.depthwise = nn.Conv2d(e, e, 3, padding=1, groups=e, bias=False)
        self.project = _zero(nn.Conv2d(e, channels, 1))

    def forward(self, h: Tensor) -> Tensor:
        z = F.relu(self.norm(self.expand(h)))
        return self.project(F.relu(self.depthwise(z)))


class DecoderLayerSeed(nn.Module):
    """A whole pre-norm decoder layer as a residual seed: ``f(h) = a + mlp(ln2(h + a))``
    with ``a = attn(ln1(h))``, so ``h + f(h)`` is the layer (a decoder's with ``causal``,
    else an encoder's). The attention output projection and the MLP's last layer start
    at zero, so ``f(h) == 0`` at birth."""

    def __init__(self, channels: int, causal: bool = True) -> None:
        super().__init__()
        self.attn_seed = AttentionSeed(channels, causal)  # ln1, qkv, proj (zero)
        self.mlp_seed = _transformer_mlp(channels, expansion=4)  # ln2, fc, GELU, fc (zero)

    def forward(self, h: Tensor) -> Tensor:
        a = self.attn_seed(h)
        return a + self.mlp_seed(h + a)


def _norm_cnn(c: int) -> nn.Module:
    return _zero(nn.GroupNorm(1, c))


def _depthwise(c: int) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(c, c, 3, padding=1, groups=c, bias=False),
        nn.ReLU(),
        _zero(nn.Conv2d(c, c, 1)),
    )


def _conv_light(c: int) -> nn.Module:
    return _zero(nn.Conv2d(c, c, 3, padding=1))


def _conv_heavy(c: int) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(c, c, 3, padding=1, bias=False),
        nn.GroupNorm(1, c),
        nn.ReLU(),
        _zero(nn.Conv2d(c, c, 3, padding=1)),
    )


def _layer_norm(c: int) -> nn.Module:
    return _zero(nn.LayerNorm(c))


def _transformer_mlp(c: int, expansion: int = 2) -> nn.Module:
    return nn.Sequential(
        nn.LayerNorm(c),
        nn.Linear(c, expansion * c),
        nn.GELU(),
        _zero(nn.Linear(expansion * c, c)),
    )


def _hidden_mlp(c: int) -> nn.Module:
    return nn.Sequential(nn.Linear(c, c), nn.ReLU(), _zero(nn.Linear(c, c)))


def _registry() -> dict[str, dict[str, Blueprint]]:
    def bp(topology: str, name: str, factory, count, mixes=False) -> tuple[str, Blueprint]:
        return name, Blueprint(name, topology, factory, count, mixes_tokens=mixes)

    def wide(topology: str) -> list[tuple[str, Blueprint]]:
        return [
            (name, Blueprint(name, topology, None, None, fraction))
            for name, fraction in WIDTH_FRACTIONS.items()
        ]

    def inverted_count(c: int) -> int:
        e = expanded_width(c)
        return c * e + 2 * e + 9 * e + e * c + c

    cnn = dict(
        [
            bp("cnn", "norm", _norm_cnn, lambda c: 2 * c),
            bp(
                "cnn",
                "attention",
                SqueezeExcite,
                lambda c: 2 * c * squeeze_width(c) + squeeze_width(c) + c,
            ),
            bp("cnn", "depthwise", _depthwise, lambda c: 9 * c + c * c + c),
            bp("cnn", "conv_light", _conv_light, lambda c: 9 * c * c + c),
            bp("cnn", "conv_heavy", _conv_heavy, lambda c: 18 * c * c + 3 * c),
            bp("cnn", "inverted", InvertedResidual, inverted_count),
            *wide("cnn"),
        ]
    )
    transformer = dict(
        [
            bp("transformer", "norm", _layer_norm, lambda c: 2 * c),
            bp("transformer", "lora", LowRankAdapter, lambda c: 2 * c * lora_rank(c)),
            bp("transformer", "attention", AttentionSeed, lambda c: 4 * c * c + 6 * c, True),
            bp("transformer", "mlp", _transformer_mlp, lambda c: 4 * c * c + 5 * c),
            bp("transformer", "layer", DecoderLayerSeed, lambda c: 12 * c * c + 13 * c, True),
            *wide("transformer"),
        ]
    )
    mlp = dict(
        [
            bp("mlp", "lora", LowRankAdapter, lambda c: 2 * c * lora_rank(c)),
            bp("mlp", "mlp", _hidden_mlp, lambda c: 2 * c * c + 2 * c),
            *wide("mlp"),
        ]
    )
    return {"cnn": cnn, "transformer": transformer, "mlp": mlp}


# A constant table built once; nothing mutates it after import.
BLUEPRINTS: dict[str, dict[str, Blueprint]] = _registry()


def _check_topology(topology: str) -> None:
    if topology not in BLUEPRINTS:
        raise UnknownBlueprintError(
            f"unknown topology {topology!r}; allowed: {', '.join(TOPOLOGIES)}"
        )


def blueprints_for(topology: str) -> tuple[str, ...]:
    """Blueprint names for a topology, in action-head order."""
    _check_topology(topology)
    return tuple(BLUEPRINTS[topology])


def get_blueprint(topology: str, name: str) -> Blueprint:
    _check_topology(topology)
    table = BLUEPRINTS[topology]
    if name not in table:
        elsewhere = [t for t, names in BLUEPRINTS.items() if name in names]
        hint = f" ({name!r} exists for {', '.join(elsewhere)})" if elsewhere else ""
        raise UnknownBlueprintError(
            f"unknown blueprint {name!r} for topology {topology!r}{hint}; "
            f"allowed: {', '.join(table)}"
        )
    return table[name]
