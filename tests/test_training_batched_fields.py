"""The batched training phase (`esper.training.batched`) against each env alone, field by
field of `TrainConfig`: every field is classified, every field that changes the step
gives the same trajectory batched and alone (float64), and the rest is refused.

Float64 throughout, so batched and alone agree to ~1e-12 (grouped kernels only sum in
another order); the training loss is summed in float32 (the trainer's loss runs on
float32 logits) and compared to 1e-6.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from esper.model import LifecycleConfig, MorphogeneticModel
from esper.training import TrainConfig, Trainer, get_task
from esper.training.batched import (
    CONFIG_FIELDS,
    CONFIG_VALUES,
    batched_support,
    config_support,
    train_batched,
)
from esper.training.step import ClipSet

STEPS = 3
ENVS = 3
LIFECYCLE = LifecycleConfig(
    min_train_epochs=1, blend_epochs=2, blend_threshold=-10.0, prune_threshold=-10.0
)
# Per env and step, seeds to germinate before that step: env 0 trains a residual seed
# (its own pass runs grouped); env 1's width seed blends from step 1, when a residual
# seed in front of it trains (that own pass crosses it, so it runs alone); env 2 has none.
GERMINATE = {(0, 0): ("r0c0", "conv_light"), (1, 0): ("r0c1", "wide_x1"), (1, 1): ("r0c0", "norm")}

# A value other than the default for every field that changes the training step: the
# "same" fields in every env, the "per env" ones one value per env.
STEP_CASES: dict[str, list[dict]] = {
    "lr": [{"lr": 0.1}] * ENVS,
    "momentum": [{"momentum": 0.5}] * ENVS,
    "weight_decay": [{"weight_decay": 1e-2}] * ENVS,
    "batch_size": [{"batch_size": 50}] * ENVS,
    "batches_per_step": [{"batches_per_step": None}] * ENVS,  # an epoch, short last batch
    "grad_clip": [{"grad_clip": 0.5}] * ENVS,
    "seed_lr": [{"seed_lr": 0.01}, {"seed_lr": 0.2}, {}],
}


@pytest.fixture(scope="module")
def digits():
    task = get_task("digits")
    data = task.make_data()
    return task, dataclasses.replace(data, train_x=data.train_x.double(), val_x=data.val_x.double())


def _trainers(digits, overrides: list[dict]) -> list[Trainer]:
    task, data = digits
    out = []
    for e, over in enumerate(overrides):
        torch.manual_seed(100 + e)
        model = MorphogeneticModel(task.make_host(data), task.default_slots, lifecycle=LIFECYCLE)
        config = dataclasses.replace(task.hparams, **{"batches_per_step": 2, **over})
        out.append(Trainer(model, data, config, seed=10 + e))
    return out


def _run(trainers: list[Trainer], batched: bool) -> list[list]:
    results: list[list] = [[] for _ in trainers]
    for t in range(STEPS):
        for e, tr in enumerate(trainers):
            if (e, t) in GERMINATE:
                tr.model.germinate(*GERMINATE[e, t])
        if batched:
            assert batched_support(trainers) is None
            phases = train_batched(trainers)
            steps = [tr.train_step(trained=p) for tr, p in zip(trainers, phases, strict=True)]
        else:
            steps = [tr.train_step() for tr in trainers]
        for e, step in enumerate(steps):
            results[e].append(step)
    return results


def _assert_same_run(alone: list[Trainer], batched: list[Trainer], a: list, b: list) -> None:
    for e in range(len(alone)):
        for t, (x, y) in enumerate(zip(a[e], b[e], strict=True)):
            where = f"env {e} step {t}"
            assert x.samples == y.samples and x.stage_changes == y.stage_changes, where
            assert x.train_loss == pytest.approx(y.train_loss, rel=1e-6), where
            assert x.train_acc == y.train_acc, where
            assert x.val_loss == pytest.approx(y.val_loss, rel=1e-9), where
            assert x.contributions == pytest.approx(y.contributions, rel=1e-7, abs=1e-10), where
            assert x.seed_grad_norms.keys() == y.seed_grad_norms.keys(), where
            assert x.seed_grad_norms == pytest.approx(y.seed_grad_norms, rel=1e-9), where
        sa, sb = alone[e].model.state_dict(), batched[e].model.state_dict()
        tensors = [k for k, v in sa.items() if torch.is_tensor(v)]
        for k in tensors:
            assert torch.allclose(sa[k], sb[k], rtol=1e-9, atol=1e-12), f"env {e} {k}"
        # What a step leaves behind includes the host's gradients of its last batch.
        params = zip(
            alone[e].model.host_parameters(), batched[e].model.host_parameters(), strict=True
        )
        for p, q in params:
            assert q.grad is not None and torch.allclose(p.grad, q.grad, rtol=1e-8, atol=1e-12)


def test_every_config_field_is_classified():
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    assert set(CONFIG_FIELDS) == names, "classify new TrainConfig fields in CONFIG_FIELDS"
    kinds = {"values", "same", "per env", "after training"}
    assert set(CONFIG_FIELDS.values()) <= kinds
    assert {n for n, k in CONFIG_FIELDS.items() if k == "values"} == set(CONFIG_VALUES)
    # Every field that changes the step is run batched and alone below.
    assert set(STEP_CASES) == {n for n, k in CONFIG_FIELDS.items() if k in ("same", "per env")}


@pytest.fixture(scope="module")
def default_run(digits):
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        trainers = _trainers(digits, [{}] * ENVS)
        _run(trainers, batched=False)
    finally:
        torch.set_default_dtype(before)
    return trainers


@pytest.mark.parametrize("field", list(STEP_CASES))
def test_batched_step_equals_each_env_alone(float64, digits, default_run, field):
    overrides = STEP_CASES[field]
    alone = _trainers(digits, overrides)
    alone_results = _run(alone, batched=False)
    batched = _trainers(digits, overrides)
    batched_results = _run(batched, batched=True)
    _assert_same_run(alone, batched, alone_results, batched_results)
    # The value did change the run, so the comparison above covered it.
    changed = [
        not torch.equal(p, q)
        for tr, base in zip(alone, default_run, strict=True)
        for p, q in zip(tr.model.parameters(), base.model.parameters(), strict=True)
    ]
    assert any(changed), f"{field}: the case did not change the trajectory"


def test_default_config_batched_equals_alone(float64, digits, default_run):
    batched = _trainers(digits, [{}] * ENVS)
    results = _run(batched, batched=True)
    alone = _trainers(digits, [{}] * ENVS)
    _assert_same_run(alone, batched, _run(alone, batched=False), results)


@pytest.mark.parametrize("field", [n for n, k in CONFIG_FIELDS.items() if k == "same"])
def test_envs_that_differ_in_a_shared_field_are_refused(digits, field):
    other = {
        "lr": 0.1,
        "momentum": 0.5,
        "weight_decay": 1e-2,
        "batch_size": 50,
        "batches_per_step": 3,
        "grad_clip": 0.5,
    }[field]
    trainers = _trainers(digits, [{}, {field: other}])
    reason = batched_support(trainers)
    assert reason is not None and field in reason and repr(other) in reason
    with pytest.raises(ValueError, match=field):
        train_batched(trainers)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("optimizer", "adam", "sgd"),
        ("optimizer", "adamw", "sgd"),
        ("amp", "bf16", "mixed precision"),
    ],
)
def test_values_the_batched_step_does_not_implement_are_refused(digits, field, value, message):
    config = dataclasses.replace(digits[0].hparams, **{field: value})
    reason = config_support(config)
    assert reason is not None and message in reason and repr(value) in reason
    trainers = _trainers(digits, [{field: value}] * 2)
    assert batched_support(trainers) == reason


def test_hooks_on_the_host_are_refused_not_skipped(digits):
    trainers = _trainers(digits, [{}] * 2)
    assert batched_support(trainers) is None
    handle = trainers[1].model.host.blocks[1][0].register_forward_hook(lambda *a: None)
    reason = batched_support(trainers)
    assert reason is not None and "hooks" in reason and "blocks.1.0" in reason
    handle.remove()
    handle = nn.modules.module.register_module_forward_hook(lambda *a: None)
    try:  # a global module hook would miss the grouped pass just the same
        assert "global hook" in (batched_support(trainers) or "")
    finally:
        handle.remove()
    trainers[0].model.host.classifier.weight.register_post_accumulate_grad_hook(lambda p: None)
    assert "classifier" in (batched_support(trainers) or "")


def test_pooling_is_read_from_the_pool_module(float64, digits):
    # A different max-pool in every env (3x3, stride 2, padding 1): the grouped pass
    # must pool as the module does, not as a fixed 2x2 pool.
    def run(batched: bool) -> list[Trainer]:
        trainers = _trainers(digits, [{}] * ENVS)
        for tr in trainers:
            for block in tr.model.host.blocks:
                if isinstance(block[-1], nn.MaxPool2d):
                    block[-1] = nn.MaxPool2d(3, stride=2, padding=1)
        return trainers, _run(trainers, batched)

    (alone, a), (batched, b) = run(False), run(True)
    _assert_same_run(alone, batched, a, b)
    trainers = _trainers(digits, [{}] * 2)
    trainers[1].model.host.blocks[1][-1] = nn.MaxPool2d(3, stride=2, padding=1)
    assert batched_support(trainers) == "batched envs must have hosts of one shape"


def _with_grads(grads: list[torch.Tensor]) -> list[nn.Parameter]:
    params = [nn.Parameter(torch.zeros_like(g)) for g in grads]
    for p, g in zip(params, grads, strict=True):
        p.grad = g.clone()
    return params


def test_clip_sets_clip_as_clip_grad_norm_does():
    torch.manual_seed(0)
    # Three envs' gradients; env 1's norm is below the limit (left as it is).
    envs = [
        [torch.randn(4, 3, dtype=torch.float64) * s, torch.randn(5, dtype=torch.float64) * s]
        for s in (2, 0.1, 3)
    ]
    one = _with_grads(envs[0])
    ClipSet(tuple(one)).clip_(1.0)
    reference = _with_grads(envs[0])
    nn.utils.clip_grad_norm_(reference, 1.0)
    # One optimiser's set: bit for bit torch's own clip (the per-env trajectory).
    assert all(torch.equal(p.grad, q.grad) for p, q in zip(one, reference, strict=True))
    # Stacked envs: each env's share clipped on its own.
    stacked = _with_grads([torch.cat([g[0] for g in envs]), torch.stack([g[1] for g in envs])])
    ClipSet(tuple(stacked), envs=3).clip_(1.0)
    for e, grads in enumerate(envs):
        alone = _with_grads(grads)
        nn.utils.clip_grad_norm_(alone, 1.0)
        assert torch.allclose(stacked[0].grad[4 * e : 4 * e + 4], alone[0].grad, rtol=1e-12)
        assert torch.allclose(stacked[1].grad[e], alone[1].grad, rtol=1e-12)
    assert torch.equal(stacked[1].grad[1], envs[1][1])  # below the limit: unchanged
