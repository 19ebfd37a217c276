"""The governor rolls diverging envs back to their last good state and never raises."""

from __future__ import annotations

import dataclasses
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from esper.lifecycle import SeedStage
from esper.model import CNNHost, MorphogeneticModel
from esper.training import Governor, GovernorConfig, Trainer, get_task
from model_helpers import QUICK


@pytest.fixture(scope="module")
def digits():
    task = get_task("digits", batches_per_step=5)
    return task, task.make_data()


def make_trainer(task, data, **governor) -> Trainer:
    torch.manual_seed(0)
    model = MorphogeneticModel(task.make_host(data), task.default_slots, lifecycle=QUICK)
    gov = dataclasses.replace(task.hparams.governor, **governor)
    return Trainer(model, data, dataclasses.replace(task.hparams, governor=gov), seed=0)


def host_state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.host.state_dict().items()}


def assert_host_equal(model, expected) -> None:
    for k, v in model.host.state_dict().items():
        assert torch.equal(v, expected[k]), k


def test_nan_mid_episode_rolls_back_prunes_and_trains_on(digits):
    task, data = digits
    trainer = make_trainer(task, data, penalty=0.7)
    model = trainer.model
    model.germinate("r0c1", "conv_light")
    for _ in range(2):
        trainer.train_step()
    good = host_state(model)
    model.germinate("r0c2", "conv_light")  # after the snapshot: the rollback undoes it
    with torch.no_grad():
        next(model.host.parameters()).view(-1)[0] = math.nan
    result = trainer.train_step()
    event = result.governor_event
    assert event is not None and event.reason == "non_finite" and event.restored
    assert result.penalty == 0.7 and event.pruned == ("r0c1",)
    assert model.slot_state("r0c1").stage in (SeedStage.PRUNED, SeedStage.EMBARGOED)
    assert model.slot_state("r0c2").stage == SeedStage.DORMANT
    assert_host_equal(model, good)
    assert math.isfinite(result.val_loss) and result.contributions == {}
    assert len(trainer.host_optimizer.state) == 0  # momentum from the NaN step is gone
    after = [trainer.train_step() for _ in range(3)]
    assert all(r.governor_event is None and math.isfinite(r.train_loss) for r in after)
    assert after[-1].val_loss < result.val_loss and after[-1].train_acc > 0.3


def test_spike_after_post_snapshot_fossilization_restores_the_holding_seed_state(digits):
    task, data = digits
    trainer = make_trainer(task, data, consecutive=2, min_history=3)
    model = trainer.model
    model.germinate("r0c1", "conv_light")
    for _ in range(4):
        assert trainer.train_step().governor_event is None
    assert model.slot_state("r0c1").stage == SeedStage.HOLDING
    good = host_state(model)
    good_seed = [p.detach().clone() for p in model.seed_parameters("r0c1")]
    model.fossilize("r0c1")  # after the last snapshot
    with torch.no_grad():  # a sustained blow-up: logits 60x too confident
        for p in model.host.parameters():
            if p.ndim == 2:
                p.mul_(60.0)
    first = trainer.train_step()
    assert first.governor_event is None and first.val_loss > 3 * trainer.signals.val_loss_history[0]
    second = trainer.train_step()
    event = second.governor_event
    # 60x logits: far beyond twice the chance-level loss, so it counts as divergence.
    assert event is not None and event.reason == "diverged" and event.restored
    assert event.snapshot_epoch == 3 and second.penalty == trainer.config.governor.penalty
    # The fossil did not exist at the snapshot: the seed is back as it was, then pruned.
    assert event.pruned == ("r0c1",)
    assert any(
        c.slot_id == "r0c1" and c.source == SeedStage.FOSSILIZED and c.target == SeedStage.PRUNED
        for c in second.stage_changes
    )
    assert_host_equal(model, good)
    assert model.seed_parameters("r0c1") == [] and good_seed
    after = [trainer.train_step() for _ in range(2)]
    assert all(r.governor_event is None for r in after)
    assert after[-1].val_loss < first.val_loss


def test_fossil_from_before_the_snapshot_survives_a_rollback(digits):
    task, data = digits
    trainer = make_trainer(task, data)
    model = trainer.model
    model.germinate("r0c0", "norm")
    trainer.train_step()
    trainer.train_step()
    model.fossilize("r0c0")
    trainer.train_step()  # snapshot now holds the fossil
    fossil = [p.detach().clone() for p in model.seed_parameters("r0c0")]
    with torch.no_grad():
        next(model.host.parameters()).fill_(math.inf)
    result = trainer.train_step()
    assert result.governor_event is not None and result.governor_event.pruned == ()
    assert model.slot_state("r0c0").stage == SeedStage.FOSSILIZED
    for p, q in zip(model.seed_parameters("r0c0"), fossil, strict=True):
        assert torch.equal(p, q)
    assert "r0c0" in trainer.seed_optimizers  # fossils keep learning with the host


def test_rollback_that_cannot_restore_reports_instead_of_raising():
    gov = Governor(GovernorConfig(penalty=2.0))
    gov.snapshot(MorphogeneticModel(CNNHost(1, 10, width=4, depth=3, image_size=8)), epoch=0)
    other = MorphogeneticModel(CNNHost(1, 10, width=2, depth=3, image_size=8))
    other.germinate("r0c0", "norm")
    event = gov.rollback(other, epoch=5, reason="non_finite", value=math.nan)
    assert not event.restored and "does not match" in event.error
    assert event.pruned == ("r0c0",) and event.penalty == 2.0
    assert Governor().rollback(other, 0, "spike", 9.0).error == "no snapshot taken yet"


@settings(max_examples=40, deadline=None)
@given(
    history=st.lists(st.floats(0.5, 2.0), min_size=3, max_size=12),
    consecutive=st.integers(1, 4),
    k_sigma=st.floats(1.0, 5.0),
)
def test_spike_needs_consecutive_steps_beyond_k_sigma(history, consecutive, k_sigma):
    gov = Governor(GovernorConfig(window=12, consecutive=consecutive, k_sigma=k_sigma))
    for v in history:
        gov.history.append(v)  # a known healthy past
    threshold = gov.threshold()
    assert gov.observe(threshold * 0.999) == "ok"  # within bounds: healthy, enters history
    verdicts = [gov.observe(gov.threshold() + 1.0) for _ in range(consecutive)]
    assert verdicts == ["suspect"] * (consecutive - 1) + ["spike"]
    assert gov.observe(math.nan) == "non_finite" and gov.observe(math.inf) == "non_finite"


def test_no_spike_judged_before_min_history():
    gov = Governor(GovernorConfig(min_history=4, consecutive=1))
    assert [gov.observe(v) for v in (1.0, 1.0, 50.0, 1.0)] == ["ok"] * 4
    assert gov.observe(1e6) == "spike"


def test_real_divergence_from_a_huge_learning_rate_is_rolled_back(digits):
    """lr = 50 diverges from the first step, so the recent history looks "normal"; the
    ceiling relative to a uniform guess still catches it."""
    task, data = digits
    torch.manual_seed(0)
    model = MorphogeneticModel(task.make_host(data), task.default_slots, lifecycle=QUICK)
    trainer = Trainer(model, data, dataclasses.replace(task.hparams, lr=50.0), seed=0)
    events = [trainer.train_step().governor_event for _ in range(4)]
    reasons = {e.reason for e in events if e is not None}
    assert reasons and reasons <= {"diverged", "non_finite"}
    assert trainer.governor.ceiling() == pytest.approx(2.0 * math.log(10))


def test_spike_right_after_a_change_of_the_model_is_excused_once():
    gov = Governor(GovernorConfig(consecutive=1, grace_steps=1), chance_loss=math.log(10))
    for v in (1.0, 0.9, 0.8, 0.8):
        assert gov.observe(v) == "ok"
    gov.model_changed()  # e.g. a seed started blending
    assert gov.observe(1.5) == "suspect"  # the bump after growth is not a fault...
    assert gov.observe(1.5) == "spike"  # ...but a bump that persists is
    gov.model_changed()
    assert gov.observe(50.0) == "diverged"  # divergence is never excused


def test_threshold_is_robust_to_one_odd_step_and_needs_a_relative_rise():
    config = GovernorConfig(window=10, min_rise=0.3)
    gov = Governor(config)
    for v in (1.0, 1.0, 1.0, 1.0, 1.0):
        gov.history.append(v)
    assert gov.threshold() == pytest.approx(1.3)  # flat history: the relative rise decides
    gov.history.append(1.29)  # one odd step does not move a median/MAD threshold
    assert gov.threshold() == pytest.approx(1.3)
    with pytest.raises(ValueError, match="chance_loss"):
        Governor(config, chance_loss=0.0)


def test_bench_quick_counts_false_and_real_rollbacks():
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        [sys.executable, str(root / "bench" / "bench_governor.py"), "--quick", "--gates"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        check=True,
    ).stdout
    rows = {line[:22].strip(): line[22:].split() for line in out.splitlines() if line[:1] in "hb"}
    assert len([name for name in rows if name.startswith("healthy")]) == 4
    # Both broken runs are caught in every episode: lr = 50 and a NaN weight.
    assert float(rows["broken lr=50"][4]) == 1.0 and float(rows["broken NaN weight"][4]) == 1.0
    assert "gates:" in out
