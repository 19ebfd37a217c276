"""Training FLOPs: exact on a tiny MLP host, seeds and counterfactuals counted; the
counts composed per block equal the counter's on every host, seed kind and stage."""

from __future__ import annotations

import pytest
import torch

from esper.lifecycle import SeedStage
from esper.model import MLPHost, MorphogeneticModel, blueprints_for
from esper.training import TaskData, TrainConfig, Trainer
from esper.training.counterfactual import fast_counterfactuals, variants_to_measure
from esper.training.flops import BACKWARD_FACTOR, BlockFlops, count_flops, forward_flops
from model_helpers import HOSTS, QUICK, advance, randomise

IN, HIDDEN, CLASSES, DEPTH = 4, 5, 3, 2
# Two Linear-ReLU blocks and a classifier: 2 FLOPs per multiply-add.
HOST_FORWARD = 2 * (IN * HIDDEN + HIDDEN * HIDDEN + HIDDEN * CLASSES)


def tiny_data(n_train: int = 40, n_val: int = 12) -> TaskData:
    g = torch.Generator().manual_seed(0)
    return TaskData(
        "classification",
        torch.randn(n_train, IN, generator=g),
        torch.randint(0, CLASSES, (n_train,), generator=g),
        torch.randn(n_val, IN, generator=g),
        torch.randint(0, CLASSES, (n_val,), generator=g),
        CLASSES,
    )


def tiny_trainer(**overrides) -> Trainer:
    torch.manual_seed(0)
    model = MorphogeneticModel(MLPHost(IN, CLASSES, hidden=HIDDEN, depth=DEPTH))
    config = TrainConfig(batch_size=16, **overrides)
    return Trainer(model, tiny_data(), config, seed=0)


def test_static_host_episode_flops_are_exact():
    trainer = tiny_trainer()
    assert forward_flops(trainer.model, torch.zeros(3, IN)) == 3 * HOST_FORWARD
    steps = [trainer.train_step() for _ in range(3)]
    for step in steps:
        assert step.samples == 40
        assert step.train_flops == 40 * (1 + BACKWARD_FACTOR) * HOST_FORWARD
        assert step.eval_flops == 12 * HOST_FORWARD  # one validation, no seeds to credit
    expected = sum(s.train_flops + s.eval_flops for s in steps)
    assert trainer.flops.total == expected == 3 * (40 * 3 + 12) * HOST_FORWARD


def test_training_seed_costs_train_flops_and_a_counterfactual_pass():
    trainer = tiny_trainer(batches_per_step=1)
    trainer.model.germinate("r0c1", "mlp")
    seed_forward = forward_flops(trainer.model.slots["r0c1"].seed, torch.zeros(1, HIDDEN))
    assert seed_forward > 0
    step = trainer.train_step()
    # The TRAINING seed is hidden from the host's forward and learns in a pass of its
    # own (MorphogeneticModel.seed_forward): from the seed's block on (block 0 is reused).
    seed_pass = HOST_FORWARD - 2 * IN * HIDDEN + seed_forward
    assert step.train_flops == 16 * 3 * (HOST_FORWARD + seed_pass)
    # Validation: the live model (seed off in eval), then the "seed on" variant, which
    # shares the prefix up to the slot and reruns only the seed and what follows it.
    after_slot = 2 * HIDDEN * CLASSES
    assert step.eval_flops == 12 * (HOST_FORWARD + seed_forward + after_slot)


def test_counting_has_no_side_effects_on_training():
    a, b = tiny_trainer(), tiny_trainer()
    forward_flops(b.model, b.data.train_x[:2], train=True)  # extra count on b only
    ra, rb = a.train_step(), b.train_step()
    assert ra.train_loss == rb.train_loss and ra.val_loss == rb.val_loss
    for pa, pb in zip(a.model.state_dict().values(), b.model.state_dict().values(), strict=True):
        if isinstance(pa, torch.Tensor):
            assert torch.equal(pa, pb)


def test_env_reports_cumulative_episode_flops():
    from esper.env import MorphogenesisEnv

    env = MorphogenesisEnv(task="digits", max_epochs=2, batches_per_step=2, seed=0)
    _, info = env.reset()
    assert info["flops"] == info["flops_eval"] > 0  # the reset's validation
    totals = [info["flops"]]
    for _ in range(2):
        _, _, _, _, info = env.step(env.action_space.sample() * 0)  # WAIT
        assert info["flops"] == info["flops_train"] + info["flops_eval"]
        totals.append(info["flops"])
    assert totals[0] < totals[1] < totals[2]
    step_cost = totals[2] - totals[1]
    assert step_cost == totals[1] - totals[0]  # static host: every step costs the same


# -- composed per-piece counts equal the counter on the real pass ----------------------

STAGES = (SeedStage.TRAINING, SeedStage.BLENDING, SeedStage.HOLDING, SeedStage.FOSSILIZED)


def _grown(topology: str, blueprint: str, stages, fold: bool = False):
    """Seeds of ``blueprint`` at r0c0 / r0c2 in two of ``stages``, and a folded (or
    fossilized) width seed at r0c1."""
    torch.manual_seed(1)
    host, x = HOSTS[topology]()
    model = MorphogeneticModel(host, lifecycle=QUICK)
    plan = {"r0c1": ("wide_x1", SeedStage.FOSSILIZED)}
    pairs = zip(("r0c0", "r0c2"), stages, strict=True)
    plan.update({sid: (blueprint, stage) for sid, stage in pairs})
    for sid, (bp, _) in plan.items():
        model.germinate(sid, bp, "gated" if sid == "r0c2" else "linear")
    randomise(model)
    for sid, (_, stage) in plan.items():
        advance(model, sid, stage)
    if fold:
        model.fold_in_place("r0c1")
    return model, x


def _check(model, x, meter: BlockFlops) -> None:
    model.eval()
    for variants in ({}, variants_to_measure(model)):
        with torch.no_grad():
            _, counted = count_flops(
                lambda v=variants: fast_counterfactuals(model, x, *_labels(x), v)
            )
        assert meter.eval_row(model, x, variants) * x.shape[0] == counted, variants
    model.train()
    assert meter.train_rows(model, x[:2]) == forward_flops(model, x[:2], train=True)


def _labels(x):
    """Targets and task kind for ``x`` (token ids: a language model's next tokens)."""
    if x.dtype == torch.long:
        return torch.zeros_like(x), "lm"
    return torch.zeros(x.shape[0], dtype=torch.long), "classification"


@pytest.mark.parametrize("topology", sorted(HOSTS))
def test_composed_block_counts_equal_the_counter(topology):
    meter = BlockFlops()  # one cache across structures: pieces are reused between them
    for blueprint in blueprints_for(topology):
        for stages in ((STAGES[0], STAGES[1]), (STAGES[2], STAGES[3]), (STAGES[1], STAGES[0])):
            for fold in (False, True):
                model, x = _grown(topology, blueprint, stages, fold)
                _check(model, x, meter)
