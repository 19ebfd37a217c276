"""Small hosts and lifecycle drivers shared by the model, width and fold tests."""

from __future__ import annotations

import torch

from esper.lifecycle import SeedStage
from esper.model import CNNHost, LifecycleConfig, MLPHost, MorphogeneticModel, TransformerHost


def cnn() -> tuple[CNNHost, torch.Tensor]:
    return CNNHost(width=1, depth=3), torch.randn(6, 1, 8, 8)


def mlp() -> tuple[MLPHost, torch.Tensor]:
    return MLPHost(6, 3, hidden=5, depth=3), torch.randn(6, 6)


def transformer() -> tuple[TransformerHost, torch.Tensor]:
    return TransformerHost(7, d_model=8, n_heads=2, n_layers=3), torch.randint(0, 7, (3, 5))


HOSTS = {"cnn": cnn, "mlp": mlp, "transformer": transformer}

# Seeds reach HOLDING two steps after germination and are never auto-pruned.
QUICK = LifecycleConfig(
    min_train_epochs=1,
    blend_epochs=1,
    blend_threshold=-1.0,
    prune_threshold=-1.0,
    fossilize_threshold=-1.0,
)


def advance(model: MorphogeneticModel, slot_id: str, stage: SeedStage) -> None:
    """Drive a seed through the real lifecycle to ``stage``."""
    while model.slot_state(slot_id).stage != stage:
        model.record_contribution(slot_id, 1.0)
        if model.slot_state(slot_id).stage == SeedStage.HOLDING:
            model.fossilize(slot_id)
        else:
            model.slots[slot_id].step_epoch()


def randomise(model: MorphogeneticModel, seed: int = 3) -> None:
    """Seeds that compute something (a fan-out of zeros would hide a wrong fold)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for sid in model.slot_config.slot_ids:
            for p in model.seed_parameters(sid):
                p.copy_(0.3 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
