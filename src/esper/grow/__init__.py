"""Grow your own model: seed slots on any `nn.Module`, growth in your own loop, export.

- `attach(model, names, sample, causal=True, widen=())` -> `SlottedModel`: slots on
  named submodules (``causal``: whether attention seeds on ``[N, T, D]`` outputs see
  only earlier tokens) and width sites on the named Linear / Conv2d layers (``widen``;
  consumers found by tracing, `esper.grow.widen`). TRAINING seeds learn in their own
  pass with the loop unchanged; a loop that adds
  ``criterion(slotted.seed_forward(x), y)`` gives them the exact fully-on gradient
  (`esper.grow.seedpass`).
- `Grower(slotted, optimizer, val_data)`: call ``grower.step(...)`` from your loop.
- `load_slotted(model, path)`: re-attach and load a saved grown model.
- `export_model(slotted)` -> `nn.Module` of torch modules and your own classes (width
  seeds folded into your layers); `save_portable(...)` -> torch-only file.
"""

from esper.grow.attach import AttachError, AttachPoint, SlottedModel, attach, load_slotted
from esper.grow.export import FoldedSeed, export_model, save_portable
from esper.grow.grower import Grower, GrowerConfig, GrowthStep
from esper.grow.widen import WidenPoint

__all__ = [
    "AttachError",
    "AttachPoint",
    "FoldedSeed",
    "Grower",
    "GrowerConfig",
    "GrowthStep",
    "SlottedModel",
    "WidenPoint",
    "attach",
    "export_model",
    "load_slotted",
    "save_portable",
]
