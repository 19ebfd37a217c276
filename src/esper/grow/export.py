"""Export a grown model to a plain `nn.Module`, and to a file that needs only torch.

`export_model` deep-copies the grown model (the live one is untouched) and drops Esper's
hooks. Width seeds (`esper.grow.widen`) that are part of the eval-mode function
(BLENDING, HOLDING, FOSSILIZED) are folded into the user's own layers (`esper.model.fold`;
a blending seed with its fan-out scaled by its alpha × gate), so those layers are
physically wider. At every depth slot whose seed changes the eval-mode function the
submodule is replaced by ``h = submodule(x); h + α·g·f(h)``: fossils with α = 1,
BLENDING / HOLDING seeds with their current α (and learned gate), so the export computes
exactly what the grown model computes in eval mode. Dead seeds (DORMANT, PRUNED,
EMBARGOED) and seeds still TRAINING (invisible to the eval forward) are removed. No
SeedSlot, lifecycle or hook remains.

Only torch modules and the user's own classes remain (``trace=True``, the default): each
depth seed's replacement is a ``torch.fx.GraphModule`` traced through the seed's Esper
classes (`FoldedSeed`, the blueprints' `LowRankAdapter`, `SqueezeExcite`, ..., the learned
gate), whose submodules are torch's own layers, plain ``nn.Module`` containers, and the
user's submodule itself (kept as a leaf, untraced). That graph takes the submodule's one
input, as every point `attach` probes does when called by a ``Sequential`` or with one
tensor; a submodule your forward calls with more arguments needs ``trace=False``, which
keeps `FoldedSeed` (and the blueprint classes inside it), as does a seed fx cannot trace
(none of Esper's blueprints today: tested). To hand the model to someone without Esper
(or without your code), `save_portable` writes a ``torch.export`` program that loads
with ``torch.export.load`` alone.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, fx, nn

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


class _OneInput(nn.Module):
    """`FoldedSeed` for a submodule called with one input: what fx can trace."""

    def __init__(self, folded: FoldedSeed) -> None:
        super().__init__()
        self.inner, self.seed, self.gate, self.alpha = (
            folded.inner,
            folded.seed,
            folded.gate,
            folded.alpha,
        )

    def forward(self, x: Tensor) -> Tensor:
        h = self.inner(x)
        f = self.seed(h)
        if self.gate is not None:
            f = self.gate(f)
        return h + self.alpha * f


class _InnerIsLeaf(fx.Tracer):
    """Traces through Esper's seed classes, never into the user's own submodule."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return module_qualified_name == "inner" or super().is_leaf_module(m, module_qualified_name)


def plain_seed(folded: FoldedSeed) -> nn.Module:
    """``folded`` as a ``torch.fx.GraphModule`` of torch modules (the user's submodule
    kept as it is); ``folded`` itself where fx cannot trace the seed."""
    root = _OneInput(folded)
    try:
        graph = _InnerIsLeaf().trace(root)
    except Exception:  # fx raises many kinds; the FoldedSeed computes the same thing
        return folded
    return fx.GraphModule(root, graph, class_name="FoldedSeed")


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, attr, module)


def export_model(slotted: SlottedModel, trace: bool = True) -> nn.Module:
    """A plain copy of the grown model (see module docstring); same device and dtype.
    ``trace``: depth seeds become torch-only ``GraphModule`` s (False: `FoldedSeed`)."""
    if not isinstance(slotted, SlottedModel):
        raise TypeError(f"export_model needs a SlottedModel, got {type(slotted).__name__}")
    twin = copy.deepcopy(slotted)  # its own model and slots: the live ones stay as they are
    for point in twin.widen_points:
        sid = point.spec.slot_id
        slot = twin.slots[sid]
        if slot.holds_width and slot.stage in _FOLDED:
            # In the copy only: a BLENDING / HOLDING width seed is, in eval mode, k units
            # whose fan-out is scaled by alpha × gate, exactly what a fold writes into the
            # consumer; so it folds like a fossil.
            slot.stage = SeedStage.FOSSILIZED
            twin.fold_in_place(sid)
    plain = twin.detach()  # the user's modules, the folded widths in their own layers
    # Deepest names first: wrapping "layer1" before "layer1.0" would hide the inner one.
    for point in sorted(twin.points, key=lambda p: -p.name.count(".")):
        slot = twin.slots[point.spec.slot_id]
        if slot.stage not in _FOLDED or slot.seed is None:
            continue
        seed = copy.deepcopy(slot.seed)
        gate = copy.deepcopy(slot.gate) if slot.gate is not None else None
        alpha = 1.0 if slot.stage == SeedStage.FOSSILIZED else slot.alpha
        folded = FoldedSeed(plain.get_submodule(point.name), seed, alpha, gate)
        _set_submodule(plain, point.name, plain_seed(folded) if trace else folded)
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
