"""A TRAINING seed never changes one bit of the host's trajectory, whatever the config."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from esper.lifecycle import SeedStage
from esper.model import LifecycleConfig, MorphogeneticModel
from esper.training import Trainer, get_task


def _host_after(steps: int, *, seed: bool, **overrides) -> list[torch.Tensor]:
    task = get_task("digits")
    data = task.make_data()
    torch.manual_seed(0)
    lifecycle = LifecycleConfig(min_train_epochs=10, max_train_epochs=20)
    model = MorphogeneticModel(task.make_host(data), task.default_slots, lifecycle)
    config = dataclasses.replace(task.hparams, batches_per_step=4, **overrides)
    trainer = Trainer(model, data, config, seed=0, device="cpu")
    if seed:
        model.germinate(task.default_slots[1], "conv_light")
    for _ in range(steps):
        trainer.train_step()
        if seed:
            assert model.slot_state(task.default_slots[1]).stage == SeedStage.TRAINING
    return [p.detach().clone() for p in model.host_parameters()]


@pytest.mark.parametrize("grad_clip", [None, 0.05])
def test_training_seed_leaves_the_host_bit_identical(grad_clip):
    alone = _host_after(3, seed=False, grad_clip=grad_clip)
    with_seed = _host_after(3, seed=True, grad_clip=grad_clip)
    for a, b in zip(alone, with_seed, strict=True):
        assert torch.equal(a, b)
