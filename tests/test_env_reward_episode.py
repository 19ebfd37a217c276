"""End to end: episode returns telescope to the objective change, prunes and rollbacks included."""

import pytest

from esper.env import MorphogenesisEnv
from esper.model import LifecycleConfig
from esper.policy.controllers import RandomController

FAST_LIFECYCLE = LifecycleConfig(min_train_epochs=1, blend_epochs=1, embargo_epochs=1)


@pytest.mark.parametrize("mode", ["objective", "contribution"])
def test_episode_return_equals_objective_change(mode):
    # lr=50 makes the host diverge now and then: the governor rolls back and penalises.
    env = MorphogenesisEnv(
        batches_per_step=2,
        max_epochs=12,
        reward_mode=mode,
        growth_penalty=0.1,
        lifecycle=FAST_LIFECYCLE,
        task_options={"lr": 50.0},
    )
    reasons: list[str] = []
    targets: set[str] = set()
    shaping_seen = False
    for episode in range(2):
        obs, info = env.reset(seed=episode + 1)
        controller = RandomController(seed=episode)
        total = penalties = 0.0
        done = False
        while not done:
            action, _ = controller.act(obs, env.conditional_masks(), None)
            obs, reward, _, done, info = env.step(action)
            total += reward
            penalties += info["reward_parts"]["penalty"]
            shaping_seen |= info["reward_parts"]["shaping"] != 0.0
            reasons += [event["reason"] for event in info["events"]]
            targets |= {event["target"] for event in info["events"]}
        change = info["objective"] - info["initial_objective"] - penalties
        assert total == pytest.approx(change, abs=1e-9)
    assert any(r.startswith("governor_") for r in reasons), reasons
    # Seeds were removed: pruned (policy, lifecycle, rollback) or undone by a rollback.
    assert targets & {"PRUNED", "DORMANT"}, reasons
    assert shaping_seen == (mode == "contribution")
