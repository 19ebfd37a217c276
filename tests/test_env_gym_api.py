"""The Gymnasium contract: check_env, masks, illegal actions, truncation, registration."""

import warnings

import gymnasium
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

from esper.actions import ActionIndexError, FactoredAction, LifecycleOp
from esper.env import ENV_ID, EpisodeOverError, JointActionWrapper, MorphogenesisEnv
from esper.model import LifecycleConfig, blueprints_for

NUM_BLUEPRINTS = len(blueprints_for("cnn"))

TINY = {"batches_per_step": 1, "max_epochs": 3}
FAST_LIFECYCLE = LifecycleConfig(min_train_epochs=1, blend_epochs=1, embargo_epochs=1)


@pytest.mark.parametrize(
    ("options", "num_slots"),
    [({"slots": ["r0c1"]}, 1), ({}, 3), ({"task_options": {"depth": 8}}, 8)],
    ids=["1-slot", "3-slots", "8-slots"],
)
def test_check_env_passes_for_env_and_joint_wrapper(options, num_slots):
    env = MorphogenesisEnv(**TINY, **options)
    assert env.slot_config.num_slots == num_slots
    assert env.observation_space["slots"].shape[0] == num_slots
    check_env(env, skip_render_check=True)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*different from the unwrapped version.*")
        check_env(JointActionWrapper(env), skip_render_check=True)


def test_exact_joint_mask_never_triggers_the_illegal_fallback():
    env = JointActionWrapper(
        MorphogenesisEnv(batches_per_step=1, max_epochs=10, lifecycle=FAST_LIFECYCLE)
    )
    rng = np.random.default_rng(0)
    ops = set()
    for episode in range(3):
        env.reset(seed=episode)
        done = False
        while not done:
            mask = env.action_masks()
            assert mask[0]  # WAIT
            index = int(rng.choice(np.flatnonzero(mask)))
            _, _, terminated, done, info = env.step(index)
            assert not terminated
            assert not info["illegal_action"], env.layout.decode(index)
            ops.add(info["executed_action"][0])
        assert info["illegal_actions"] == 0
    assert {LifecycleOp.GERMINATE, LifecycleOp.PRUNE} <= ops


def test_combination_passing_flat_masks_but_illegal_runs_as_wait():
    env = MorphogenesisEnv(**TINY)
    env.reset(seed=0)
    env.step(FactoredAction(LifecycleOp.GERMINATE, 0, 0, 0))
    flat = env.action_masks()
    assert flat.dtype == bool and flat.shape == (4 + 3 + NUM_BLUEPRINTS + 3,)
    prune_empty = np.array([LifecycleOp.PRUNE, 1, 0, 0])
    heads = np.split(flat, np.cumsum(env.action_space.nvec)[:-1])
    assert all(head[value] for head, value in zip(heads, prune_empty, strict=True))
    assert not env.conditional_masks().allows(env.parse_action(prune_empty))
    _, _, _, _, info = env.step(prune_empty)
    assert info["illegal_action"] and info["illegal_actions"] == 1
    assert info["executed_action"] == (0, 0, 0, 0)
    assert info["stages"]["r0c1"] == "DORMANT"
    _, _, _, _, info = env.step(np.array([0, 2, 4, 2]))  # WAIT ignores the other heads
    assert not info["illegal_action"] and info["illegal_actions"] == 1


def test_actions_outside_the_space_raise():
    env = MorphogenesisEnv(**TINY)
    env.reset(seed=0)
    with pytest.raises(ActionIndexError, match="op index 4 out of range: allowed 0..3"):
        env.step(np.array([4, 0, 0, 0]))
    with pytest.raises(ActionIndexError, match="slot index 3 out of range"):
        env.step([1, 3, 0, 0])
    with pytest.raises(ActionIndexError, match="4 integers"):
        env.step([0, 0, 0])
    with pytest.raises(ActionIndexError, match="4 integers"):
        env.step(np.array([0.5, 0, 0, 0]))
    joint = JointActionWrapper(env)
    size = 1 + 3 * NUM_BLUEPRINTS * 3 + 2 * 3  # WAIT, GERMINATE x S x B x L, 2 ops x S
    with pytest.raises(
        ActionIndexError, match=f"joint action {size} out of range: allowed 0..{size - 1}"
    ):
        joint.step(size)


def test_episode_truncates_and_then_refuses_steps():
    env = gymnasium.make(ENV_ID, slots=["r0c2"], batches_per_step=1, max_epochs=2)
    obs, info = env.reset(seed=3)
    assert obs["slots"].shape == (1, env.unwrapped.observation_space["slots"].shape[1])
    assert info["epoch"] == 0 and info["stages"] == {"r0c2": "DORMANT"}
    _, _, terminated, truncated, info = env.step(env.action_space.sample())
    assert (terminated, truncated) == (False, False)
    _, _, terminated, truncated, info = env.step(np.zeros(4, dtype=np.int64))
    assert (terminated, truncated) == (False, True) and info["epoch"] == 2
    with pytest.raises(EpisodeOverError, match="call reset"):
        env.unwrapped.step(np.zeros(4, dtype=np.int64))


def test_make_without_arguments_gives_the_digits_default():
    env = gymnasium.make(ENV_ID)
    base = env.unwrapped
    assert base.config.task == "digits" and base.max_epochs == 20
    assert base.slot_config.slot_ids == ("r0c0", "r0c1", "r0c2")
    assert tuple(base.action_space.nvec) == (4, 3, NUM_BLUEPRINTS, 3)


def test_bad_options_name_the_value():
    with pytest.raises(ValueError, match="max_epochs must be >= 1, got 0"):
        MorphogenesisEnv(max_epochs=0)
    with pytest.raises(ValueError, match="unknown reward mode 'shaped'"):
        MorphogenesisEnv(reward_mode="shaped")
    with pytest.raises(ValueError, match="takes no options"):
        MorphogenesisEnv(**TINY).reset(options={"task": "text"})
