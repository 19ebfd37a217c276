"""Folding a fossilized width seed into its host, in place.

A FOSSILIZED width seed is, in function, ``k`` extra units of its site's producer
(`esper.model.width.UnitSite`). `fold_slot` makes that physical: the producer and its
BatchNorms get the seed's fan-in as ``k`` more output units, the consumer gets the
seed's fan-out (times alpha x gate) as ``k`` more input columns, and the slot is empty
again (DORMANT: the site is a wider layer now and can grow again, so k rounds of
widening give the k-times-wider host). The network computes the same function (to
float rounding) with the same parameters.

Design points:

- **Same objects.** Modules stay; each changed Parameter keeps its identity and gets a
  tensor of the new shape (``param.data = ...``), so optimisers, hooks and a user's
  references keep pointing at the live parameter. What an optimiser must still change,
  its state, is described by the returned `FoldPlan`: for every changed parameter, which
  region of the new tensor holds which old tensor (`Piece`); entries no piece covers are
  new and start at zero. `esper.training.surgery` applies a plan to any optimiser.
- **Neighbours.** A width seed at a neighbouring site (`UnitSite.feeds`) still matches
  the old width: a seed that read the folded layer's input gains zero input columns
  for the folded units, one whose term lands on the folded producer gains zero output
  rows for them. Both now read the layer's whole input / feed every unit of their
  consumer, as the architecture asks of width seeds; the zero weights keep the function
  and count as that seed's parameters.
- **A gated fossil** is scaled by its learned per-unit gate: the product goes into the
  consumer's columns and the ``k`` gate logits are gone (the folded network has ``k``
  parameters fewer, and is the plain wider layer).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from esper.lifecycle import SeedStage
from esper.model.slot import SeedSlot, SlotStateError, StageChange
from esper.model.width import WidthSeed, param_layers, unit_tensors


@dataclass(frozen=True)
class Piece:
    """The whole old tensor of ``source`` sits at region ``dst`` of the new tensor."""

    source: nn.Parameter
    dst: tuple[slice, ...]


@dataclass(frozen=True)
class ParamChange:
    """``old`` (what optimisers hold) became ``new`` (what the model holds; the same
    object when its identity could be kept) of another shape; ``old_shape`` is the shape
    ``old``'s optimiser state still has. Entries no piece covers are new: zero."""

    old: nn.Parameter
    new: nn.Parameter
    old_shape: torch.Size
    pieces: tuple[Piece, ...]


@dataclass(frozen=True)
class FoldPlan:
    """What a fold changed: ``changes`` to host (and neighbour seed) parameters, the
    fossil's own parameters (``absorbed``: now inside host tensors, or for gate logits
    multiplied into them) and the slot's stage change."""

    slot_id: str
    changes: tuple[ParamChange, ...]
    absorbed: tuple[nn.Parameter, ...]
    stage_change: StageChange


def _swap(param: nn.Parameter, value: Tensor) -> None:
    # Same Parameter object, new tensor: whoever holds the parameter follows the fold.
    # A graph still alive (a user's last ``loss``) holds the parameter's gradient
    # accumulator, sized for the old shape, and torch would reuse it for the next graph
    # ("invalid gradient ... expected shape compatible with" the old one); torch drops it
    # only when the dtype changes, so the tensor passes through another dtype once.
    param.data = value.new_empty(
        0, dtype=torch.float32 if value.dtype != torch.float32 else torch.float64
    )
    param.data = value
    param.grad = None  # a gradient of the old shape could never be accumulated into


def sync_sizes(layer: nn.Module) -> None:
    """Size attributes read from the tensors (forward uses the tensors; repr and any
    code reading ``in_features`` etc. must not see stale sizes)."""
    weight = getattr(layer, "weight", None)
    if isinstance(layer, nn.Linear):
        layer.out_features, layer.in_features = weight.shape
    elif isinstance(layer, nn.modules.conv._ConvNd):
        layer.out_channels = weight.shape[0]
        layer.in_channels = weight.shape[1] * layer.groups
    elif isinstance(layer, nn.modules.batchnorm._BatchNorm):
        source = weight if weight is not None else layer.running_mean
        if source is not None:
            layer.num_features = source.shape[0]


def _replace_tensor(layer: nn.Module, name: str, value: Tensor, pieces: tuple[Piece, ...]):
    """Give ``layer.name`` the tensor ``value``; a ParamChange when it is a parameter."""
    old = getattr(layer, name)
    if isinstance(old, nn.Parameter):
        shape = old.shape
        _swap(old, value)
        return ParamChange(old, old, shape, pieces)
    setattr(layer, name, value)  # a buffer (BatchNorm statistics): no optimiser state
    return None


@torch.no_grad()
def append_units(layer: nn.Module, new: nn.Module) -> list[ParamChange]:
    """Append ``new``'s output units to ``layer`` (Linear, Conv2d or BatchNorm of the
    same kind, reading the same inputs)."""
    changes = []
    for name in unit_tensors(layer):
        old, add = getattr(layer, name), getattr(new, name)
        if old.shape[1:] != add.shape[1:]:
            raise ValueError(
                f"cannot append units of shape {tuple(add.shape)} to {type(layer).__name__}."
                f"{name} of shape {tuple(old.shape)}: the seed reads another input width"
            )
        n, k = old.shape[0], add.shape[0]
        pieces = (Piece(old, (slice(0, n),)),)
        if isinstance(add, nn.Parameter):
            pieces += (Piece(add, (slice(n, n + k),)),)
        change = _replace_tensor(layer, name, torch.cat([old, add.to(old)], dim=0), pieces)
        if change is not None:
            changes.append(change)
    sync_sizes(layer)
    return changes


@torch.no_grad()
def append_inputs(layer: nn.Module, source: nn.Parameter, scale: Tensor) -> ParamChange:
    """Append ``source`` ([out, k, ...], scaled per input unit) as input columns of a
    Linear or Conv2d."""
    old = layer.weight
    if source.shape[0] != old.shape[0] or source.shape[2:] != old.shape[2:]:
        raise ValueError(
            f"fan-out weight of shape {tuple(source.shape)} does not fit as input columns "
            f"of {type(layer).__name__} weight {tuple(old.shape)}"
        )
    c, k = old.shape[1], source.shape[1]
    columns = source * scale.to(source).view((1, -1) + (1,) * (source.dim() - 2))
    pieces = (
        Piece(old, (slice(None), slice(0, c))),
        Piece(source, (slice(None), slice(c, c + k))),
    )
    change = _replace_tensor(layer, "weight", torch.cat([old, columns.to(old)], dim=1), pieces)
    sync_sizes(layer)
    return change  # type: ignore[return-value]


@torch.no_grad()
def pad_inputs(layer: nn.Module, k: int) -> ParamChange:
    """``k`` zero input columns for a Linear or Conv2d (inputs it never read before)."""
    old = layer.weight
    zeros = old.new_zeros((old.shape[0], k, *old.shape[2:]))
    pieces = (Piece(old, (slice(None), slice(0, old.shape[1]))),)
    change = _replace_tensor(layer, "weight", torch.cat([old, zeros], dim=1), pieces)
    sync_sizes(layer)
    return change  # type: ignore[return-value]


@torch.no_grad()
def pad_units(layer: nn.Module, k: int) -> list[ParamChange]:
    """``k`` zero output units for a Linear or Conv2d (outputs it never fed before)."""
    changes = []
    for name in unit_tensors(layer):
        old = getattr(layer, name)
        zeros = old.new_zeros((k, *old.shape[1:]))
        pieces = (Piece(old, (slice(0, old.shape[0]),)),)
        change = _replace_tensor(layer, name, torch.cat([old, zeros], dim=0), pieces)
        if change is not None:
            changes.append(change)
    sync_sizes(layer)
    return changes


def fold_slot(slot: SeedSlot, others: Iterable[SeedSlot]) -> FoldPlan:
    """Fold ``slot``'s FOSSILIZED width seed into its site's layers (module docstring);
    ``others`` are the model's other slots, whose width seeds next to the site are
    widened to match. The slot ends DORMANT."""
    seed, site = slot.seed, slot.width_site
    if not isinstance(seed, WidthSeed) or site is None:
        what = "is empty" if seed is None else f"holds a {type(seed).__name__}"
        raise SlotStateError(f"cannot fold slot {slot.slot_id}: it {what}, not a width seed")
    if slot.stage != SeedStage.FOSSILIZED:
        raise SlotStateError(
            f"cannot fold slot {slot.slot_id}: its width seed is {slot.stage.name}; only a "
            f"FOSSILIZED seed folds into the host (fossilize or prune it first)"
        )
    sources, targets = site.unit_layers, param_layers(seed.fan_in)
    if len(targets) != len(sources):  # checked before anything changes
        raise ValueError(
            f"slot {slot.slot_id}: the seed's fan-in has {len(targets)} parameterised "
            f"layers, its site {len(sources)}"
        )
    k, span = seed.units, site.unit_span
    # One multiplier per consumer input column: a flattened unit owns ``span`` of them.
    scale = slot.unit_scale().repeat_interleave(span)
    changes: list[ParamChange] = []
    for other in others:
        if other is slot or not isinstance(other.seed, WidthSeed) or other.width_site is None:
            continue
        if site.feeds(other.width_site):  # it reads the units being folded
            changes.append(pad_inputs(param_layers(other.seed.fan_in)[0], k * span))
        if other.width_site.feeds(site):  # its term lands on the widened producer
            changes.extend(pad_units(param_layers(other.seed.fan_out)[-1], k))
    for layer, new in zip(sources, targets, strict=True):
        changes.extend(append_units(layer, new))
    fan_out = param_layers(seed.fan_out)[-1]
    changes.append(append_inputs(site.consumer, fan_out.weight, scale))
    absorbed = tuple(slot.parameters())
    # The lifecycle has no FOSSILIZED -> DORMANT edge: a fossil stays one. After a fold
    # there is no fossil left in the slot, only a wider host layer, so the slot starts
    # over as an empty one (what `SeedSlot._reset` makes).
    slot._reset(SeedStage.DORMANT)
    change = StageChange(slot.slot_id, SeedStage.FOSSILIZED, SeedStage.DORMANT, "folded")
    return FoldPlan(slot.slot_id, tuple(changes), absorbed, change)
