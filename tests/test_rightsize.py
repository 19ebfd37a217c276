"""Growth that finds the right size (issue 20): width seeds joint from birth
(`LifecycleConfig.width_joint`) and the λ-aware `RightSizeController`."""

from __future__ import annotations

import pytest
import torch

from esper.actions import LifecycleOp
from esper.env import EnvConfig, MorphogenesisEnv
from esper.lifecycle import SeedStage
from esper.model import CNNHost, LifecycleConfig, MorphogeneticModel
from esper.policy import RightSizeConfig, RightSizeController

JOINT = LifecycleConfig(width_joint=True, fold_on_fossilize=True)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"nats_per_accuracy": -1.0}, "nats_per_accuracy must be a finite number >= 0, got -1.0"),
        ({"grow_until": 1.5}, r"grow_until must be in \[0, 1\], got 1.5"),
        ({"settle_from": -0.1}, r"settle_from must be in \[0, 1\], got -0.1"),
        ({"patience": -2}, "patience must be an int >= 0, got -2"),
        ({"slot_preference": "middle"}, "slot_preference must be 'deep' or 'shallow', got 'mid"),
        ({"blueprints": ()}, "blueprints must name at least one blueprint"),
    ],
)
def test_rightsize_config_names_bad_values(kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        RightSizeConfig(**kwargs)


def test_width_joint_must_be_a_bool() -> None:
    with pytest.raises(ValueError, match="width_joint must be a bool, got 'yes'"):
        LifecycleConfig(width_joint="yes")  # type: ignore[arg-type]


def test_a_joint_width_seed_is_fully_on_at_birth_and_preserves_the_function() -> None:
    torch.manual_seed(0)
    model = MorphogeneticModel(CNNHost(width=1, depth=3), lifecycle=JOINT).eval()
    x = torch.randn(5, 1, 8, 8)
    with torch.no_grad():
        before = model(x)
    for sid in model.slot_config.slot_ids:
        changes = model.germinate(sid, "wide_x1")
        assert [c.target for c in changes][-1] == SeedStage.HOLDING
        assert model.slot_state(sid).alpha == 1.0
    with torch.no_grad():
        torch.testing.assert_close(model(x), before, atol=0.0, rtol=0.0)
    # The seed is on in the training forward: the task loss trains it from its first step.
    model.train()
    model(x).sum().backward()
    grads = [p.grad for p in model.seed_parameters("r0c0")]
    assert any(g is not None and bool(g.abs().sum() > 0) for g in grads)
    # A depth seed keeps the isolated path.
    other = MorphogeneticModel(CNNHost(width=1, depth=3), lifecycle=JOINT)
    other.germinate("r0c1", "conv_light")
    assert other.slot_state("r0c1").stage == SeedStage.TRAINING


def play(
    lam: float, width: int = 1, seed: int = 3, steps: int = 10
) -> tuple[MorphogenesisEnv, list]:
    env = MorphogenesisEnv(
        EnvConfig(
            task="digits",
            task_options={"width": width},
            max_epochs=steps,
            growth_penalty=lam,
            lifecycle=JOINT,
        )
    )
    obs, _ = env.reset(seed=seed)
    controller = RightSizeController()
    state = controller.initial_state()
    ops = []
    for _ in range(steps):
        action, state = controller.act(obs, env.conditional_masks(), state)
        ops.append((action.op, action.slot))
        obs, *_ = env.step(action)
    return env, ops


def test_a_price_no_unit_can_pay_grows_nothing_and_stops() -> None:
    """At λ = 5 every width seed costs more than any credit it can show: each slot is
    tried, pruned, and never tried again (it stops)."""
    env, ops = play(5.0)
    assert env.model.param_counts().fossils == 0
    assert LifecycleOp.FOSSILIZE not in [op for op, _ in ops]
    germinated = [slot for op, slot in ops if op == LifecycleOp.GERMINATE]
    assert len(germinated) == len(set(germinated)) <= env.slot_config.num_slots


def test_a_free_unit_is_kept_folded_and_the_layer_grows_again() -> None:
    """At λ = 0 a seed that helps at all pays: kept, folded (the host's layers are
    wider) and its slot widened again."""
    env, ops = play(0.0, steps=16)
    assert env.model.param_counts().fossils > 0
    assert env.model.host.widths != CNNHost(width=1, depth=3).widths
    fossilized = [slot for op, slot in ops if op == LifecycleOp.FOSSILIZE]
    germinated = [slot for op, slot in ops if op == LifecycleOp.GERMINATE]
    assert fossilized and len(germinated) > len(set(germinated))  # a slot grew twice


def test_no_seed_is_planted_after_grow_until() -> None:
    env = MorphogenesisEnv(
        EnvConfig(task="digits", task_options={"width": 1}, max_epochs=6, lifecycle=JOINT)
    )
    obs, _ = env.reset(seed=1)
    controller = RightSizeController(RightSizeConfig(grow_until=0.5))
    state = controller.initial_state()
    for step in range(6):
        action, state = controller.act(obs, env.conditional_masks(), state)
        if step >= 3:
            assert action.op != LifecycleOp.GERMINATE
        obs, *_ = env.step(action)


def test_no_seed_is_kept_before_settle_from() -> None:
    """λ = 0 (every helpful seed pays) and settle_from = 0.5 of 8 steps: seeds are
    planted from the start but the first FOSSILIZE comes at step 4 or later."""
    lifecycle = LifecycleConfig(min_train_epochs=1, blend_epochs=1, max_hold_epochs=20)
    env = MorphogenesisEnv(
        EnvConfig(task="digits", task_options={"width": 1}, max_epochs=8,
                  growth_penalty=0.0, lifecycle=lifecycle)
    )  # fmt: skip
    obs, _ = env.reset(seed=2)
    controller = RightSizeController(RightSizeConfig(settle_from=0.5, grow_until=0.5))
    state = controller.initial_state()
    ops = []
    for _ in range(8):
        action, state = controller.act(obs, env.conditional_masks(), state)
        ops.append(action.op)
        obs, *_ = env.step(action)
    assert ops[0] == LifecycleOp.GERMINATE
    assert LifecycleOp.FOSSILIZE not in ops[:4] and LifecycleOp.FOSSILIZE in ops[4:]
