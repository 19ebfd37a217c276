"""Width seeds: new units grown into a host layer, at a *unit site*.

A `UnitSite` is built from module references (docs/ARCHITECTURE.md, Seeds, isolation
and blending): the ``producer`` (a Linear or Conv2d whose output units grow), the
per-unit ``unit_ops`` between it and the ``consumer`` (BatchNorm, activation, pooling),
and the ``consumer`` (the Linear or Conv2d that reads the units). Everything a seed or a
fold needs to know about sizes is read from those modules on every call, never stored,
so a fold, a governor restore or a user's own resize can never leave a site stale. The
same site describes a user's own layers (nothing in here knows a host).

A width seed at a site adds ``k`` units. Its *fan-in* copies the producer's structure
for ``k`` units (the producer's kind of layer, then fresh copies of the unit ops) and
reads the producer's input; its *fan-out* copies the consumer's kind of layer for ``k``
inputs (no bias) and yields an additive term at the consumer's output. The host's walk
adds that term where ``target`` says:

- ``"next"``: the consumer is the next block's first linear op (or the head), so the
  term is *pending* until that op has run;
- ``"output"``: the consumer sits inside the block (the transformer MLP), so the term
  joins block ``i``'s output.

The fan-out is zero at birth, so the network's function is unchanged. Folding a seed
into its site (the layers become physically wider) lives in `esper.model.fold`.

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

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

WIDTH_TARGETS = ("next", "output")
WIDTH_INITS = ("split", "random")
DEFAULT_WIDTH_INIT = "random"
WIDTH_SPLIT_NOISE = 0.1


class GlobalAvgPool(nn.Module):
    """Mean over the spatial dims (what a CNN head does before its classifier)."""

    def forward(self, h: Tensor) -> Tensor:
        return h.mean(dim=(-2, -1))


class WidthSeed(nn.Module):
    """``fan_out(fan_in(x))``: ``units`` new units and their term at the consumer."""

    def __init__(self, fan_in: nn.Module, fan_out: nn.Module, units: int) -> None:
        super().__init__()
        self.fan_in, self.fan_out, self.units = fan_in, fan_out, units

    def forward(self, x: Tensor) -> Tensor:
        return self.fan_out(self.fan_in(x))


def _check_linear_op(role: str, module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        return
    if isinstance(module, nn.Conv2d) and module.groups == 1:
        return
    what = type(module).__name__
    if isinstance(module, nn.Conv2d):
        what += f" with groups={module.groups}"
    raise TypeError(
        f"a unit site's {role} must be an nn.Linear or an nn.Conv2d (groups=1), got {what}"
    )


def _has_state(module: nn.Module) -> bool:
    return any(True for _ in module.parameters(recurse=False)) or any(
        True for _ in module.buffers(recurse=False)
    )


def _check_unit_op(module: nn.Module) -> None:
    """A unit op acts on each unit alone: a BatchNorm (per-unit parameters and
    statistics) or a module without state (activation, pooling, dropout)."""
    if isinstance(module, _BatchNorm) or not any(_has_state(m) for m in module.modules()):
        return
    raise TypeError(
        f"a unit site's ops between producer and consumer must be BatchNorm or stateless "
        f"per-unit modules (activation, pooling), got {type(module).__name__} with "
        f"parameters or buffers"
    )


def unit_tensors(layer: nn.Module) -> list[str]:
    """Names of a layer's own tensors whose first dim indexes its output units."""
    names = [n for n, _ in layer.named_parameters(recurse=False)]
    if isinstance(layer, _BatchNorm) and layer.track_running_stats:
        names += ["running_mean", "running_var"]
    return names


def layer_like(layer: nn.Module, in_units: int, out_units: int, bias: bool) -> nn.Module:
    """A fresh layer of ``layer``'s kind (kernel, stride, padding kept) with new sizes."""
    if isinstance(layer, nn.Linear):
        return nn.Linear(in_units, out_units, bias=bias)
    return nn.Conv2d(
        in_units,
        out_units,
        layer.kernel_size,
        stride=layer.stride,
        padding=layer.padding,
        dilation=layer.dilation,
        bias=bias,
        padding_mode=layer.padding_mode,
    )


def _fresh_copy(module: nn.Module) -> nn.Module:
    """A stateless module's copy without the hooks a user may have put on the original."""
    out = copy.deepcopy(module)
    for m in out.modules():
        for name, value in vars(m).items():
            if name.endswith("_hooks") and isinstance(value, dict):
                value.clear()
    return out


def unit_op_like(op: nn.Module, k: int) -> nn.Module:
    """``op`` for ``k`` new units: a BatchNorm of the same settings, or a fresh copy."""
    if isinstance(op, _BatchNorm):
        return type(op)(
            k,
            eps=op.eps,
            momentum=op.momentum,
            affine=op.affine,
            track_running_stats=op.track_running_stats,
        )
    return _fresh_copy(op)


@dataclass(frozen=True, eq=False)
class UnitSite:
    """Width growth at one layer: ``producer`` -> ``unit_ops`` -> ``consumer``.

    ``consumer_ops``: stateless per-unit reductions the host applies outside its modules
    between the units and the consumer (a CNN head's global average pool); the fan-out
    runs them before its layer. ``target``: where the consumer's term joins the host's
    walk (module docstring). Sizes (`units`, `in_units`, `out_units`) are read from the
    layers' weights on every call. Two sites are neighbours when one's consumer is the
    other's producer (`feeds`): growth at one changes the other's input.
    """

    producer: nn.Module
    unit_ops: tuple[nn.Module, ...]
    consumer: nn.Module
    target: str = "next"
    consumer_ops: tuple[nn.Module, ...] = ()
    # Consumer inputs per unit: 1, or H*W where a map is flattened into a Linear (the
    # channel-major flatten puts a new unit's H*W features after all existing ones).
    unit_span: int = 1

    def __post_init__(self) -> None:
        if (
            isinstance(self.unit_span, bool)
            or not isinstance(self.unit_span, int)
            or (self.unit_span < 1)
        ):
            raise ValueError(f"UnitSite.unit_span must be an int >= 1, got {self.unit_span!r}")
        if self.target not in WIDTH_TARGETS:
            raise ValueError(f"UnitSite.target must be one of {WIDTH_TARGETS}, got {self.target!r}")
        _check_linear_op("producer", self.producer)
        _check_linear_op("consumer", self.consumer)
        for op in self.unit_ops:
            _check_unit_op(op)
        for op in self.consumer_ops:
            if any(_has_state(m) for m in op.modules()):
                raise TypeError(
                    f"a unit site's consumer_ops must be stateless, got {type(op).__name__}"
                )
        if isinstance(self.producer, nn.Linear) != isinstance(self.consumer, nn.Linear) and not (
            self.consumer_ops
        ):
            raise TypeError(
                f"unit site: producer {type(self.producer).__name__} and consumer "
                f"{type(self.consumer).__name__} need a consumer_ops reduction between them"
            )

    # -- sizes, read live ------------------------------------------------------------
    @property
    def units(self) -> int:
        """How many units the producer makes now (a blueprint's fraction is of this)."""
        return int(self.producer.weight.shape[0])

    @property
    def in_units(self) -> int:
        """Width of the producer's input (what a seed's fan-in reads)."""
        return int(self.producer.weight.shape[1])

    @property
    def out_units(self) -> int:
        """Width of the consumer's output (where a seed's term lands)."""
        return int(self.consumer.weight.shape[0])

    @property
    def unit_dim_last(self) -> bool:
        """Units are the last dim of the fan-in's output (Linear), else dim 1 (maps)."""
        return isinstance(self.producer, nn.Linear)

    @property
    def unit_layers(self) -> tuple[nn.Module, ...]:
        """The layers whose tensors hold one entry per unit: what a fold widens and a
        split initialisation copies from (the producer, then its BatchNorms)."""
        return (self.producer, *(op for op in self.unit_ops if isinstance(op, _BatchNorm)))

    def feeds(self, other: UnitSite) -> bool:
        """This site's units are the input of ``other``'s producer."""
        return other.producer is self.consumer

    # -- seeds -----------------------------------------------------------------------
    def build(self, k: int) -> WidthSeed:
        """A seed of ``k`` units, its fan-out zero (identity at birth). The fan-out is
        created before the fan-in: the random draws of seeds built before this class
        existed, so recorded trajectories stay exact."""
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"a width seed needs an int >= 1 of units, got {k!r}")
        fan_out = layer_like(self.consumer, k * self.unit_span, self.out_units, bias=False)
        if self.consumer_ops:
            fan_out = nn.Sequential(*(_fresh_copy(op) for op in self.consumer_ops), fan_out)
        for p in fan_out.parameters():
            nn.init.zeros_(p)
        fan_in = nn.Sequential(
            layer_like(self.producer, self.in_units, k, bias=self.producer.bias is not None),
            *(unit_op_like(op, k) for op in self.unit_ops),
        )
        return WidthSeed(fan_in, fan_out, k)

    def param_count(self, k: int) -> int:
        """Exact parameter count of ``build(k)``, without allocating it."""
        with torch.device("meta"):
            module = self.build(k)
        return sum(p.numel() for p in module.parameters())


def param_layers(module: nn.Module) -> list[nn.Module]:
    """The modules that own parameters directly, in registration order."""
    return [m for m in module.modules() if any(True for _ in m.parameters(recurse=False))]


def _source_indices(units: int, k: int) -> Tensor:
    """``k`` existing unit indices: each unit once before any is reused (Net2Wider)."""
    rounds = math.ceil(k / units)
    return torch.cat([torch.randperm(units) for _ in range(rounds)])[:k]


@torch.no_grad()
def copy_units(sources: Sequence[nn.Module], seed: WidthSeed, noise: float) -> None:
    """Net2Wider init: the seed's fan-in layers copy randomly chosen source units.

    ``sources`` are the layers that make the existing units (`UnitSite.unit_layers`),
    paired in order with the fan-in's parameterised layers. Input columns the fan-in
    does not read are not copied.
    """
    targets = param_layers(seed.fan_in)
    if len(targets) != len(sources):
        raise ValueError(
            f"fan-in has {len(targets)} parameterised layers, host source has {len(sources)}"
        )
    units = sources[0].weight.shape[0]
    idx = _source_indices(units, seed.units)
    for k, (src, dst) in enumerate(zip(sources, targets, strict=True)):
        for name in unit_tensors(dst):
            d, s = getattr(dst, name), getattr(src, name)[idx]
            if s.dim() > 1:
                s = s[:, : d.shape[1]]
            d.copy_(s)
            if k == 0 and name == "weight" and noise > 0.0:
                std = float(getattr(src, name).std()) if getattr(src, name).numel() > 1 else 0.0
                d.add_(torch.randn_like(d) * noise * (std or 1.0))
