"""Trainer end to end: learns digits, keeps per-seed optimisers, per-env data order."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from esper.lifecycle import SeedStage
from esper.model import LifecycleConfig, MorphogeneticModel
from esper.training import StepResult, TaskData, Trainer, get_task


@pytest.fixture(scope="module")
def digits():
    task = get_task("digits")
    return task, task.make_data()


def make_trainer(task, data, seed=0, init_seed=0, **overrides) -> Trainer:
    torch.manual_seed(init_seed)
    model = MorphogeneticModel(task.make_host(data), task.default_slots)
    config = dataclasses.replace(task.hparams, **overrides)
    return Trainer(model, data, config, seed=seed, device="cpu")


def test_digits_host_beats_chance_by_a_wide_margin(digits):
    task, data = digits
    trainer = make_trainer(task, data)
    results = [trainer.train_step() for _ in range(6)]
    assert all(isinstance(r, StepResult) for r in results)
    assert results[-1].val_acc > 0.6  # chance is 0.1
    assert results[-1].train_loss < results[0].train_loss
    assert results[-1].samples == data.n_train  # a step is one epoch by default
    assert trainer.signals.epoch == 6
    assert trainer.signals.best_quality == max(r.quality for r in results)


def test_batches_per_step_and_seed_optimisers_follow_the_slots(digits):
    task, data = digits
    trainer = make_trainer(task, data, batches_per_step=3)
    model = trainer.model
    assert trainer.seed_optimizers == {}
    model.germinate("r0c1", "conv_light")
    before = [p.detach().clone() for p in model.seed_parameters("r0c1")]
    result = trainer.train_step()
    assert result.samples == 3 * task.hparams.batch_size
    assert set(trainer.seed_optimizers) == {"r0c1"}
    # TRAINING seeds learn behind the host: parameters moved, prospective credit reported.
    after = model.seed_parameters("r0c1")
    assert any(not torch.equal(a, b) for a, b in zip(after, before, strict=True))
    assert result.prospective == {"r0c1"} and "r0c1" in result.contributions
    assert model.slot_state("r0c1").contribution == result.contributions["r0c1"]
    assert result.seed_grad_norms["r0c1"] > 0
    model.prune("r0c1")
    trainer.train_step()
    assert trainer.seed_optimizers == {}


def test_host_optimiser_never_holds_seed_parameters(digits):
    task, data = digits
    trainer = make_trainer(task, data, batches_per_step=1)
    trainer.model.germinate("r0c0", "norm")
    trainer.train_step()
    host_ids = {id(p) for g in trainer.host_optimizer.param_groups for p in g["params"]}
    seed_ids = {id(p) for p in trainer.model.seed_parameters("r0c0")}
    assert seed_ids and not host_ids & seed_ids


def test_seed_goes_through_lifecycle_on_recorded_contributions():
    task = get_task("synthetic", shape=(1, 8, 8), n_train=256, n_val=128, noise=2.0)
    data = task.make_data()
    torch.manual_seed(0)
    # Thresholds at -1 (accuracy deltas cannot go below): the seed never gets pruned.
    lifecycle = LifecycleConfig(
        min_train_epochs=1, blend_epochs=2, blend_threshold=-1.0, prune_threshold=-1.0
    )
    model = MorphogeneticModel(task.make_host(data), lifecycle=lifecycle)
    trainer = Trainer(model, data, dataclasses.replace(task.hparams, batches_per_step=2))
    model.germinate("r0c2", "conv_light")
    seen = []
    for _ in range(3):
        stage_before = model.slot_state("r0c2").stage
        result = trainer.train_step()
        seen.append(stage_before)
        # The credit is measured in the stage the seed was in while the step ran.
        assert ("r0c2" in result.prospective) == (stage_before == SeedStage.TRAINING)
        assert "r0c2" in result.contributions
    assert seen == [SeedStage.TRAINING, SeedStage.BLENDING, SeedStage.BLENDING]
    assert model.slot_state("r0c2").stage == SeedStage.HOLDING
    assert model.slot_state("r0c2").alpha == 1.0


def run_envs(task, data: TaskData, num_envs: int, steps: int) -> list[list[StepResult]]:
    trainers = [make_trainer(task, data, seed=100 + i, init_seed=0) for i in range(num_envs)]
    out: list[list[StepResult]] = [[] for _ in trainers]
    for _ in range(steps):
        for i, t in enumerate(trainers):
            out[i].append(t.train_step())
    return out


def test_env0_sees_the_same_data_with_1_or_4_envs():
    task = get_task("synthetic", shape=(1, 8, 8), n_train=192, n_val=64, batches_per_step=2)
    data = task.make_data()
    one, four = run_envs(task, data, 1, 2), run_envs(task, data, 4, 2)
    assert [r.train_loss for r in one[0]] == [r.train_loss for r in four[0]]
    assert [r.val_loss for r in one[0]] == [r.val_loss for r in four[0]]
    assert four[1][0].train_loss != four[0][0].train_loss  # same init, other data order


def test_lm_step_reports_bits_per_char(tmp_path):
    (tmp_path / "t.txt").write_text("abcabcabd " * 300, encoding="utf-8")
    task = get_task("text", path=tmp_path / "t.txt", seq_len=16, d_model=16, n_heads=2)
    data = task.make_data()
    trainer = make_trainer(task, data, batches_per_step=20)
    first = trainer.train_step()
    second = trainer.train_step()
    assert first.bits_per_char == pytest.approx(first.val_loss / 0.6931471805599453)
    assert second.quality == pytest.approx(-second.val_loss)
    assert second.val_loss < 2.0  # uniform over 5 symbols is ln 5 = 1.61 after a while
