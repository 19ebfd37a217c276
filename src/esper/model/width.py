"""Width seeds: new units grown into a host layer, and folding them into the host.

A width seed at slot ``r0c{i}`` adds ``k`` units to host block ``i``. Its *fan-in*
computes the units from the block's width input (CNN/MLP: the block's input, so the
units are extra output channels of the block's first layer; transformer: the ``ln2``
output of the block's last layer, so they are extra hidden units of its MLP). Its
*fan-out* maps the units to an additive term at the host's width target:

- ``"next"``: the output of the consumer's first linear op, before its norm and
  activation (the next block's conv/linear, or the logits after the last block);
- ``"output"``: block ``i``'s output (the transformer MLP's output joins the stream).

The fan-out is zero at birth, so the network's function is unchanged; the host
describes each site with a `WidthSite` and names the layers a fold widens
(`Host.width_layers`), so this module and `MorphogeneticModel` stay host-agnostic.

Initialisation (``WIDTH_INITS``): ``"random"`` (default) keeps the fan-in's fresh
default initialisation (what the host's own layers got); ``"split"`` copies the fan-in
of randomly chosen existing units (Net2Wider) plus Gaussian noise of
``WIDTH_SPLIT_NOISE`` times the copied weights' std. Measured on digits, width-1 host
(bench/bench_width_init.py, 8 paired seeds): when every seed is blended and kept
regardless of its contribution, split trains better (+0.034 ± 0.018 val accuracy);
under the lifecycle's gates split seeds fail the blend gate far more often (11 of 24
time out of TRAINING against 2 of 24), and with the heuristic controller random beats
the static host by +0.058 ± 0.016 objective against +0.037 ± 0.026 for split, so random
is the default. (A copied unit duplicates what the host is learning at the same time,
so switching it on adds that change twice: our reading of the gate failures.)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

WIDTH_TARGETS = ("next", "output")
WIDTH_INITS = ("split", "random")
DEFAULT_WIDTH_INIT = "random"
WIDTH_SPLIT_NOISE = 0.1


class GlobalAvgPool(nn.Module):
    """Mean over the spatial dims (what a CNN head does before its classifier)."""

    def forward(self, h: Tensor) -> Tensor:
        return h.mean(dim=(-2, -1))


class WidthSeed(nn.Module):
    """``fan_out(fan_in(x))``: ``units`` new units and their term at the width target."""

    def __init__(self, fan_in: nn.Module, fan_out: nn.Module, units: int) -> None:
        super().__init__()
        self.fan_in, self.fan_out, self.units = fan_in, fan_out, units

    def forward(self, x: Tensor) -> Tensor:
        return self.fan_out(self.fan_in(x))


@dataclass(frozen=True)
class WidthSite:
    """What a host offers for width growth at one block (pure sizes, no host refs).

    ``units``: how many units the grown layer has now (a blueprint's fraction is of
    this); ``fan_in(k)`` / ``fan_out(k)`` build fresh modules for ``k`` new units (the
    fan-out with every parameter zero); ``unit_dim_last``: units are the last dim of
    the fan-in's output (else dim 1, CNN maps).
    """

    units: int
    target: str
    unit_dim_last: bool
    fan_in: Callable[[int], nn.Module]
    fan_out: Callable[[int], nn.Module]

    def __post_init__(self) -> None:
        if self.target not in WIDTH_TARGETS:
            raise ValueError(
                f"WidthSite.target must be one of {WIDTH_TARGETS}, got {self.target!r}"
            )

    def build(self, k: int) -> WidthSeed:
        fan_out = self.fan_out(k)
        for p in fan_out.parameters():
            nn.init.zeros_(p)
        return WidthSeed(self.fan_in(k), fan_out, k)

    def param_count(self, k: int) -> int:
        """Exact parameter count of ``build(k)``, without allocating it."""
        with torch.device("meta"):
            module = WidthSeed(self.fan_in(k), self.fan_out(k), k)
        return sum(p.numel() for p in module.parameters())


def param_layers(module: nn.Module) -> list[nn.Module]:
    """The modules that own parameters directly, in registration order."""
    return [m for m in module.modules() if any(True for _ in m.parameters(recurse=False))]


def _unit_tensors(layer: nn.Module) -> list[str]:
    """Names of a layer's tensors whose first dim indexes its output units."""
    names = [n for n, _ in layer.named_parameters(recurse=False)]
    if isinstance(layer, nn.modules.batchnorm._BatchNorm):
        names += ["running_mean", "running_var"]
    return names


def _source_indices(units: int, k: int) -> Tensor:
    """``k`` existing unit indices: each unit once before any is reused (Net2Wider)."""
    rounds = math.ceil(k / units)
    return torch.cat([torch.randperm(units) for _ in range(rounds)])[:k]


@torch.no_grad()
def copy_units(sources: Sequence[nn.Module], seed: WidthSeed, noise: float) -> None:
    """Net2Wider init: the seed's fan-in layers copy randomly chosen source units.

    ``sources`` are the host layers that make the existing units (`Host.width_layers`),
    paired in order with the fan-in's parameterised layers. Input columns the fan-in
    does not read (a host already widened upstream) are not copied.
    """
    targets = param_layers(seed.fan_in)
    if len(targets) != len(sources):
        raise ValueError(
            f"fan-in has {len(targets)} parameterised layers, host source has {len(sources)}"
        )
    units = sources[0].weight.shape[0]
    idx = _source_indices(units, seed.units)
    for k, (src, dst) in enumerate(zip(sources, targets, strict=True)):
        for name in _unit_tensors(dst):
            d, s = getattr(dst, name), getattr(src, name)[idx]
            if s.dim() > 1:
                s = s[:, : d.shape[1]]
            d.copy_(s)
            if k == 0 and name == "weight" and noise > 0.0:
                std = float(getattr(src, name).std()) if getattr(src, name).numel() > 1 else 0.0
                d.add_(torch.randn_like(d) * noise * (std or 1.0))


def _pad_dim1(t: Tensor, size: int) -> Tensor:
    """Zero columns appended so ``t.shape[1] == size`` (inputs the seed never read)."""
    if t.shape[1] == size:
        return t
    pad = t.new_zeros((t.shape[0], size - t.shape[1], *t.shape[2:]))
    return torch.cat([t, pad], dim=1)


def _set(layer: nn.Module, name: str, value: Tensor) -> None:
    old = getattr(layer, name)
    if isinstance(old, nn.Parameter):
        setattr(layer, name, nn.Parameter(value, requires_grad=old.requires_grad))
    else:
        setattr(layer, name, value)


@torch.no_grad()
def append_units(layer: nn.Module, new: nn.Module) -> None:
    """Append ``new``'s output units to ``layer`` (Linear, Conv2d or BatchNorm)."""
    for name in _unit_tensors(layer):
        old, add = getattr(layer, name), getattr(new, name)
        if old.dim() > 1:
            add = _pad_dim1(add, old.shape[1])
        _set(layer, name, torch.cat([old, add.to(old)], dim=0))
    n = layer.weight.shape[0]
    for attr in ("out_features", "out_channels", "num_features"):
        if hasattr(layer, attr):
            setattr(layer, attr, n)


@torch.no_grad()
def append_inputs(layer: nn.Module, weight: Tensor) -> None:
    """Append input columns ``weight`` ([out, k, ...]) to a Linear or Conv2d."""
    old = layer.weight
    if weight.shape[0] != old.shape[0]:
        raise ValueError(f"fan-out has {weight.shape[0]} outputs, consumer has {old.shape[0]}")
    _set(layer, "weight", torch.cat([old, weight.to(old)], dim=1))
    n = layer.weight.shape[1]
    for attr in ("in_features", "in_channels"):
        if hasattr(layer, attr):
            setattr(layer, attr, n)


@torch.no_grad()
def fold_seed(
    sources: Sequence[nn.Module], consumer: nn.Module, seed: WidthSeed, scale: Tensor
) -> None:
    """Make ``sources`` and ``consumer`` physically wider so that the host computes what
    host + seed computed. ``scale`` ([k]) multiplies each unit's fan-out (alpha x gate)."""
    targets = param_layers(seed.fan_in)
    if len(targets) != len(sources):
        raise ValueError(
            f"fan-in has {len(targets)} parameterised layers, host source has {len(sources)}"
        )
    for src, new in zip(sources, targets, strict=True):
        append_units(src, new)
    out = param_layers(seed.fan_out)[-1].weight
    shape = (1, -1) + (1,) * (out.dim() - 2)
    append_inputs(consumer, out * scale.to(out).view(shape))
