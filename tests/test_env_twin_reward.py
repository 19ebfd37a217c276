"""reward_mode="twin": a static twin in lockstep as the reward's baseline; the return
still telescopes: Σ r = (J_T − J_0) − (b_T − b_0) − Σ penalty = J_T − b_T − Σ penalty."""

import pytest

from esper.actions import FactoredAction
from esper.env import MorphogenesisEnv
from esper.policy import HeuristicController, StaticController

TINY = {"task_options": {"width": 1}, "max_epochs": 6, "batches_per_step": 3}


def _episode(env, controller, seed):
    obs, info = env.reset(seed=seed)
    first, state, rewards, penalty = info, controller.initial_state(), [], 0.0
    for _ in range(env.max_epochs):
        action, state = controller.act(obs, env.conditional_masks(), state)
        obs, reward, _, _, info = env.step(action)
        rewards.append(reward)
        penalty += info["reward_parts"]["penalty"]
    return first, info, rewards, penalty


def test_twin_of_a_static_host_is_the_host_itself():
    env = MorphogenesisEnv(**TINY, reward_mode="twin")
    first, last, rewards, _ = _episode(env, StaticController(), seed=3)
    assert first["twin_quality"] == first["quality"]
    assert last["twin_quality"] == last["quality"]  # identical init and data order
    assert rewards == [0.0] * env.max_epochs


class _GrowEarly:
    """Germinate a width seed at step 1, fossilize when legal (a seed that changes q)."""

    def initial_state(self):
        return 0

    def act(self, obs, masks, step):
        if bool(masks.op[2]) and bool(masks.slot[2].any()):
            return FactoredAction(2, int(masks.slot[2].nonzero()[0])), step + 1
        if step == 1 and bool(masks.op[1]):
            slot = int(masks.slot[1].nonzero()[-1])
            bp = int(masks.blueprint[slot].nonzero()[-1])
            return FactoredAction(1, slot, bp, 0), step + 1
        return FactoredAction.wait(), step + 1


@pytest.mark.parametrize("controller", [HeuristicController(), _GrowEarly()])
def test_twin_return_telescopes_to_gain_over_the_static_host(controller):
    lam = 0.1
    env = MorphogenesisEnv(**TINY, reward_mode="twin", growth_penalty=lam)
    first, last, rewards, penalty = _episode(env, controller, seed=5)
    # The twin is exactly the static host of the same seed.
    static = MorphogenesisEnv(**TINY, growth_penalty=lam)
    _, static_last, _, _ = _episode(static, StaticController(), seed=5)
    assert last["twin_quality"] == static_last["quality"]
    gain = (last["objective"] - first["objective"]) - (last["twin_quality"] - first["twin_quality"])
    assert sum(rewards) == pytest.approx(gain - penalty, abs=1e-9)
    assert sum(rewards) == pytest.approx(
        last["objective"] - static_last["objective"] - penalty, abs=1e-9
    )
    # Same episode in objective mode: rewards differ only by the twin's quality changes.
    plain = MorphogenesisEnv(**TINY, growth_penalty=lam)
    _, plain_last, plain_rewards, _ = _episode(plain, controller, seed=5)
    assert plain_last["objective"] == last["objective"]
    assert sum(plain_rewards) - sum(rewards) == pytest.approx(
        last["twin_quality"] - first["twin_quality"], abs=1e-9
    )
    assert last["growth"] > 0 or isinstance(controller, HeuristicController)
