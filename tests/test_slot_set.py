"""One slot set behind both wrappers: Esper's hosts and a user's hooked model answer the
lifecycle API the same way (the trainer, the env and the Grower call only that)."""

from __future__ import annotations

import inspect
import math

import pytest
import torch
from torch import nn

from esper.grow import SlottedModel, attach
from esper.lifecycle import SeedStage
from esper.model import CNNHost, GrowableModel, LifecycleConfig, MorphogeneticModel

FAST = LifecycleConfig(min_train_epochs=1, max_train_epochs=3, blend_epochs=2)
# What the trainer, the env and the Grower call on a model (besides forward).
LIFECYCLE_API = (
    "germinate", "prune", "fossilize", "record_contribution", "step_epoch", "slot_state",
    "slot_states", "param_counts", "growth_ratio", "seed_parameters", "host_parameters",
    "training_seeds", "seed_param_count", "can_germinate", "can_fossilize", "can_prune",
)  # fmt: skip


class UserCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.head = nn.Linear(4 * 8 * 8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.bn(self.conv(x))).flatten(1))


def _esper() -> tuple[GrowableModel, str, str]:
    host = CNNHost(in_channels=3, num_classes=5, width=2, depth=2, image_size=(8, 8))
    return MorphogeneticModel(host, lifecycle=FAST), "r0c0", "conv_light"


def _user() -> tuple[GrowableModel, str, str]:
    return attach(UserCNN(), ["conv"], torch.randn(2, 3, 8, 8), FAST), "r0c0", "conv_light"


WRAPPERS = {"esper_host": _esper, "user_model": _user}


def test_both_wrappers_are_the_one_slot_set_with_one_signature_per_operation():
    for name in LIFECYCLE_API:
        shared = inspect.signature(getattr(GrowableModel, name))
        for wrapper in (MorphogeneticModel, SlottedModel):
            assert issubclass(wrapper, GrowableModel)
            assert inspect.signature(getattr(wrapper, name)) == shared, (wrapper, name)
    # Only what differs by nature is defined twice: the forward, the own pass, the host.
    own = {"forward", "seed_forward", "host_parameters", "germinate"}  # germinate: width init
    for wrapper in (MorphogeneticModel, SlottedModel):
        redefined = {n for n in LIFECYCLE_API if n in vars(wrapper)}
        assert redefined <= own, (wrapper, redefined - own)


@pytest.mark.parametrize("make", list(WRAPPERS.values()), ids=list(WRAPPERS))
def test_own_seed_pass_is_on_by_default(make):
    model, _, _ = make()
    assert model.own_seed_pass is True
    model.own_seed_pass = False
    assert model.own_seed_pass is False
    with pytest.raises(TypeError, match=r"own_seed_pass must be True or False, got 'yes'"):
        model.own_seed_pass = "yes"


@pytest.mark.parametrize("make", list(WRAPPERS.values()), ids=list(WRAPPERS))
def test_a_stale_reading_is_accepted_and_moves_no_gate(make):
    """The trainer marks a contribution it did not re-measure with stderr = NaN: no
    gate may pass on it and no auto-prune may fire (SlottedModel used to reject it)."""
    model, sid, blueprint = make()
    changes = model.germinate(sid, blueprint)
    assert [c.target for c in changes] == [SeedStage.GERMINATED, SeedStage.TRAINING]
    model.record_contribution(sid, 5.0, math.nan)  # would pass the blend gate if exact
    model.step_epoch()
    assert model.slot_state(sid).stage == SeedStage.TRAINING
    model.record_contribution(sid, 5.0, 0.0)
    model.step_epoch()
    assert model.slot_state(sid).stage == SeedStage.BLENDING
    model.record_contribution(sid, -5.0, math.nan)  # would auto-prune if exact
    model.step_epoch()
    model.step_epoch()
    assert model.slot_state(sid).stage == SeedStage.HOLDING
    assert not model.can_fossilize(sid)
    with pytest.raises(ValueError, match=r"stderr of slot r0c0's contribution must be >= 0"):
        model.record_contribution(sid, 1.0, -0.5)


@pytest.mark.parametrize("make", list(WRAPPERS.values()), ids=list(WRAPPERS))
def test_counts_and_growth_ratio_follow_one_rule(make):
    model, sid, blueprint = make()
    host = sum(p.numel() for p in model.host_parameters())
    assert model.growth_ratio() == 0.0
    expected = model.seed_param_count(sid, blueprint)
    model.germinate(sid, blueprint)
    counts = model.param_counts()
    assert (counts.host, counts.live_seeds, counts.fossils) == (host, expected, 0)
    assert model.growth_ratio() == expected / host
    change = model.prune(sid)
    assert (change.source, change.target) == (SeedStage.TRAINING, SeedStage.PRUNED)
    assert model.param_counts().live_seeds == 0


def test_a_host_without_parameters_of_its_own_counts_as_one():
    model = nn.Sequential(nn.Identity(), nn.Flatten())
    slotted = attach(model, ["0"], torch.randn(2, 6))
    slotted.germinate("r0c0", "mlp")
    assert slotted.growth_ratio() == slotted.param_counts().live_seeds  # finite, not 1/0
