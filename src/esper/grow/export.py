"""Export a grown model to a plain `nn.Module`, and to a file that needs only torch.

`export_model` deep-copies the user's model (the live one is untouched), drops Esper's
hooks, and at every slot whose seed changes the eval-mode function replaces the
submodule by ``FoldedSeed(submodule, seed)``: ``h = submodule(...); h + α·g·f(h)``.
Fossils fold with α = 1; BLENDING / HOLDING seeds keep their current α (and learned
gate), so the export computes exactly what the grown model computes in eval mode. Dead
seeds (DORMANT, PRUNED, EMBARGOED) and seeds still TRAINING (invisible to the eval
forward) are removed. No SeedSlot, lifecycle or hook remains.

The exported module still uses Python classes: the user's own, torch's, and small
classes from ``esper.model.blueprints`` / this file for the seeds. To hand it to someone
without Esper (or without the user's code), `save_portable` writes a ``torch.export``
program that loads with ``torch.export.load`` alone.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from esper.grow.attach import SlottedModel
from esper.lifecycle import SeedStage

_FOLDED = frozenset({SeedStage.BLENDING, SeedStage.HOLDING, SeedStage.FOSSILIZED})


class FoldedSeed(nn.Module):
    """A user's submodule followed by a residual seed: ``h + alpha·gate(f(h))``."""

    def __init__(
        self, inner: nn.Module, seed: nn.Module, alpha: float, gate: nn.Module | None = None
    ) -> None:
        super().__init__()
        self.inner, self.seed, self.gate = inner, seed, gate
        self.alpha = float(alpha)

    def forward(self, *args: Any, **kwargs: Any) -> Tensor:
        h = self.inner(*args, **kwargs)
        f = self.seed(h)
        if self.gate is not None:
            f = self.gate(f)
        return h + self.alpha * f


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, attr, module)


def export_model(slotted: SlottedModel) -> nn.Module:
    """A plain copy of the grown model (see module docstring); same device and dtype."""
    if not isinstance(slotted, SlottedModel):
        raise TypeError(f"export_model needs a SlottedModel, got {type(slotted).__name__}")
    plain = copy.deepcopy(slotted.model)
    slotted.strip_hooks(plain)  # deepcopy keeps them, still pointing at the live slots
    # Deepest names first: wrapping "layer1" before "layer1.0" would hide the inner one.
    for point in sorted(slotted.points, key=lambda p: -p.name.count(".")):
        slot = slotted.slots[point.spec.slot_id]
        if slot.stage not in _FOLDED or slot.seed is None:
            continue
        seed = copy.deepcopy(slot.seed)
        gate = copy.deepcopy(slot.gate) if slot.gate is not None else None
        alpha = 1.0 if slot.stage == SeedStage.FOSSILIZED else slot.alpha
        _set_submodule(
            plain, point.name, FoldedSeed(plain.get_submodule(point.name), seed, alpha, gate)
        )
    plain.train(slotted.training)
    return plain


def save_portable(
    module: nn.Module,
    path: str | Path,
    example_args: tuple[Any, ...],
    *,
    dynamic_batch: bool = True,
) -> Path:
    """Write ``torch.export.export(module.eval(), example_args)`` to ``path`` (``.pt2``).

    ``torch.export.load(path).module()`` runs it with torch alone: the graph holds torch
    operators only, so neither Esper nor the user's classes are needed.

    ``dynamic_batch`` (default): dim 0 of every tensor in ``example_args`` is exported as
    a dynamic batch dimension, so the file runs on any batch size (1 included), not only
    the example's; the example then needs a batch of at least 2 rows, since torch.export
    fixes a dimension traced at size 1. ``dynamic_batch=False`` exports the example's
    shapes exactly. Raises the exporter's error (with the reason) when the model is not
    exportable, e.g. Python control flow on tensor values, or code that fixes the batch
    size (``x.view(32, -1)``).
    """
    path = Path(path)
    args = tuple(example_args)
    dynamic_shapes = None
    if dynamic_batch:
        small = [
            i for i, a in enumerate(args) if isinstance(a, Tensor) and a.ndim and a.shape[0] < 2
        ]
        if small:
            raise ValueError(
                f"save_portable: example argument {small[0]} has a batch of "
                f"{args[small[0]].shape[0]}; pass at least 2 rows so the batch dimension "
                "can be exported as dynamic, or dynamic_batch=False to fix the example's shape"
            )
        dynamic_shapes = tuple(
            {0: torch.export.Dim.DYNAMIC} if isinstance(a, Tensor) and a.ndim else None
            for a in args
        )
    was_training = module.training
    module.eval()
    try:
        program = torch.export.export(module, args, dynamic_shapes=dynamic_shapes)
    finally:
        module.train(was_training)
    torch.export.save(program, path)
    return path
