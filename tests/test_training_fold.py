"""A fold inside an episode, through the `Trainer`: optimisers carried (the next step is
the unfolded model's), a governor rollback across the fold restores the pre-fold model
exactly and training goes on, FLOP counts follow the structure."""

from __future__ import annotations

import copy
import dataclasses
import math

import pytest
import torch

from esper.lifecycle import SeedStage
from esper.model import CNNHost, MorphogeneticModel
from esper.training import Governor, Trainer, get_task
from esper.training.flops import FlopMeter, forward_flops
from model_helpers import QUICK


@pytest.fixture(scope="module")
def digits():
    task = get_task("digits", batches_per_step=5)
    return task, task.make_data()


def fossil_trainer(task, data, **hparams) -> Trainer:
    """A trainer whose model holds a FOSSILIZED width seed at r0c1, after a healthy
    step that snapshotted it (so the governor's snapshot is pre-fold)."""
    torch.manual_seed(0)
    model = MorphogeneticModel(task.make_host(data), task.default_slots, lifecycle=QUICK)
    trainer = Trainer(model, data, dataclasses.replace(task.hparams, **hparams), seed=0)
    model.germinate("r0c1", "wide_x1")
    while model.slot_state("r0c1").stage != SeedStage.HOLDING:
        trainer.train_step()
    model.fossilize("r0c1")
    step = trainer.train_step()
    assert step.governor_event is None and trainer.governor.snapshot_epoch == step.epoch
    return trainer


def assert_states_equal(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for key, value in want.items():
        if torch.is_tensor(value):
            assert got[key].shape == value.shape and torch.equal(got[key], value), key
        else:
            assert got[key] == value, key


def test_fold_then_rollback_restores_the_pre_fold_model_and_trains_on(digits) -> None:
    task, data = digits
    trainer = fossil_trainer(task, data)
    model = trainer.model
    pre_fold = copy.deepcopy(model)  # what the governor's snapshot holds
    x = data.val_x[:32]
    trainer.fold("r0c1")
    assert model.slot_state("r0c1").stage == SeedStage.DORMANT
    assert model.host.widths != pre_fold.host.widths
    torch.testing.assert_close(trainer.predict(x), pre_fold.eval()(x), atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        model.host.blocks[1][0].weight.fill_(math.nan)  # the next step diverges
    step = trainer.train_step()
    event = step.governor_event
    assert event is not None and event.reason == "non_finite"
    assert event.restored and event.error is None, event.error
    pre_fold.step_epoch()  # the rollback's step still advances the lifecycle once
    assert_states_equal(model.state_dict(), pre_fold.state_dict())
    assert model.slot_state("r0c1").stage == SeedStage.FOSSILIZED  # the fossil is back
    assert torch.equal(trainer.predict(x), pre_fold.eval()(x))
    for _ in range(2):  # training continues, with optimisers over the restored tensors
        step = trainer.train_step()
        assert step.governor_event is None and math.isfinite(step.train_loss)
    trainer.fold("r0c1")  # and the restored fossil folds again
    trainer.train_step()


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_the_trainers_step_after_a_fold_equals_the_unfolded_trainers(digits, optimizer) -> None:
    task, data = digits
    lr = 0.05 if optimizer == "sgd" else 1e-3
    folded = fossil_trainer(task, data, optimizer=optimizer, lr=lr, weight_decay=1e-4)
    unfolded = fossil_trainer(task, data, optimizer=optimizer, lr=lr, weight_decay=1e-4)
    assert_states_equal(folded.model.state_dict(), unfolded.model.state_dict())
    folded.fold("r0c1")
    assert "r0c1" not in folded.seed_optimizers  # the fossil joined the host's optimiser
    a, b = folded.train_step(), unfolded.train_step()
    assert a.train_loss == pytest.approx(b.train_loss, rel=1e-5)
    want = unfolded.model.fold_width().host.state_dict()
    for key, value in folded.model.host.state_dict().items():
        torch.testing.assert_close(value, want[key], atol=2e-5, rtol=1e-4, msg=key)


def test_governor_restores_a_snapshot_from_before_a_fold() -> None:
    torch.manual_seed(1)
    model = MorphogeneticModel(CNNHost(width=1), lifecycle=QUICK)
    model.germinate("r0c0", "wide_x1")
    model.germinate("r0c2", "wide_half")
    for sid in ("r0c0", "r0c2"):
        while model.slot_state(sid).stage != SeedStage.HOLDING:
            model.record_contribution(sid, 1.0)
            model.slots[sid].step_epoch()
    model.record_contribution("r0c0", 1.0)
    model.fossilize("r0c0")
    governor = Governor()
    governor.snapshot(model, epoch=3)
    want = copy.deepcopy(model.state_dict())
    model.fold_in_place("r0c0")
    model.prune("r0c2")  # and more changes after the fold
    event = governor.rollback(model, epoch=4, reason="spike", value=9.0)
    assert event.restored and event.error is None
    assert event.pruned == ("r0c2",)  # the snapshot's live seed, restored then pruned
    assert model.slot_state("r0c2").stage == SeedStage.PRUNED
    got = model.state_dict()
    kept = {k for k in want if not k.startswith("slots.r0c2.")}
    assert kept == {k for k in got if not k.startswith("slots.r0c2.")}
    assert_states_equal({k: got[k] for k in kept}, {k: want[k] for k in kept})
    assert model.slot_state("r0c0").stage == SeedStage.FOSSILIZED  # unfolded again


def test_flop_counts_follow_a_fold(digits) -> None:
    task, data = digits
    torch.manual_seed(2)
    model = MorphogeneticModel(task.make_host(data), task.default_slots, lifecycle=QUICK)
    model.germinate("r0c1", "wide_x1")
    while model.slot_state("r0c1").stage != SeedStage.HOLDING:
        model.record_contribution("r0c1", 1.0)
        model.slots["r0c1"].step_epoch()
    model.record_contribution("r0c1", 1.0)
    model.fossilize("r0c1")
    meter, x = FlopMeter(), data.train_x[:2]
    unfolded, _ = meter.train_forward(model, x)
    model.fold_in_place("r0c1")
    folded, _ = meter.train_forward(model, x)
    # The same multiply-adds, now in one wider layer: recounted, and equal.
    assert folded == unfolded == forward_flops(model, x, train=True)
    bigger = copy.deepcopy(model)
    bigger.germinate("r0c1", "wide_x1")  # the wider layer's seed costs more than the first
    assert forward_flops(bigger, x, train=True) > folded


def test_after_structure_change_names_host_parameters_no_optimiser_holds(digits) -> None:
    task, data = digits
    trainer = fossil_trainer(task, data)
    trainer.host_optimizer = torch.optim.SGD(trainer.model.host_parameters()[1:], lr=0.1)
    with pytest.raises(RuntimeError, match=r"host parameters \['blocks.0.0.weight'\]"):
        trainer.after_structure_change()
