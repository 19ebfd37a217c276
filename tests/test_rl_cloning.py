"""Behaviour cloning from the heuristic (issue 13): the clone reproduces the teacher on
held-out states; DAgger labels the learner's states; PPO fine-tuning keeps a KL guard."""

import pytest
import torch

from esper.env import GLOBAL_DIM, SLOT_DIM, EnvConfig
from esper.env.vector import VectorMorphogenesisEnv
from esper.experiment import run_round
from esper.policy import HeuristicController
from esper.rl import PPOAgent, PPOConfig
from esper.rl.cloning import agreement, clone, collect_demonstrations, discounted_returns

TINY = EnvConfig(
    task_options={"width": 1}, max_epochs=10, batches_per_step=2, growth_penalty_range=(0.0, 0.1)
)


@pytest.fixture(scope="module")
def cloned():
    torch.manual_seed(0)
    vec = VectorMorphogenesisEnv(4, TINY)
    train = collect_demonstrations(vec, HeuristicController, list(range(24)))
    held_out = collect_demonstrations(vec, HeuristicController, list(range(1000, 1008)))
    config = PPOConfig(hidden=64, embed=32, prior_kl_coef=0.1, n_epochs=1, num_minibatches=2)
    agent = PPOAgent(vec.slot_config, GLOBAL_DIM, SLOT_DIM, vec.action_spec.blueprints, config)
    before = agreement(agent, held_out)
    losses = clone(agent, train, epochs=120)
    return vec, agent, train, held_out, before, losses


def test_clone_reproduces_the_heuristic_on_held_out_states(cloned):
    _, agent, _, held_out, before, losses = cloned
    ops = held_out.actions[..., 0]
    assert int((ops != 0).sum()) >= 5  # the teacher germinates / fossilizes / prunes
    after = agreement(agent, held_out)
    assert after["agreement"] >= 0.95, after
    assert after["agreement_non_wait"] >= 0.8, after
    assert before["agreement_non_wait"] < 0.5  # an uncloned policy does not, by chance
    assert losses["cross_entropy"] < 0.2


def test_dagger_labels_the_learners_states_with_legal_teacher_actions(cloned):
    vec, agent, *_ = cloned
    demos = collect_demonstrations(vec, HeuristicController, [7, 8, 9, 10], learner=agent)
    assert demos.actions.shape == (vec.max_epochs, 4, 4)
    for t in range(vec.max_epochs):
        for e in range(4):
            op, slot = demos.actions[t, e, :2].tolist()
            assert demos.masks.op[t, e, op]
            if op:
                assert demos.masks.slot[t, e, op, slot]


def test_discounted_returns():
    r = torch.tensor([[1.0], [0.0], [2.0]])
    assert discounted_returns(r, 0.5).flatten().tolist() == [1.5, 1.0, 2.0]


def test_fine_tuning_with_a_kl_guard_to_the_clone(cloned, tmp_path):
    vec, agent, *_ = cloned
    run_round(vec, 0, 5, agent=agent, learn=True)
    with pytest.raises(ValueError, match="set_prior"):
        agent.update()
    agent.set_prior()
    diagnostics = agent.update()
    assert -1e-6 <= diagnostics["prior_kl"] < 0.05  # starts at the prior: tiny KL
    loaded = PPOAgent.load(agent.save(tmp_path / "a.pt"))
    assert loaded.prior is not None
    for a, b in zip(loaded.prior.parameters(), agent.prior.parameters(), strict=True):
        assert torch.equal(a, b)
