"""GAE, truncation bootstrap, first-minibatch ratios, KL early stop, value normalisation."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from esper.policy.network import two_length_split
from esper.rl import PPOAgent, PPOConfig, RolloutBuffer, compute_gae
from esper.rl.ppo import flat_gradients, minibatch_columns
from esper.rl.synthetic import GLOBAL_DIM, SLOT_DIM, CueRecallEnv

SMALL = {"hidden": 32, "embed": 16}


def reference_gae(rewards, values, bootstrap, gamma, lam):
    """Textbook GAE for one segment; ``bootstrap`` = V(s_T) (0 after a termination)."""
    n = len(rewards)
    adv, running = [0.0] * n, 0.0
    for t in reversed(range(n)):
        nxt = values[t + 1] if t + 1 < n else bootstrap
        running = rewards[t] + gamma * nxt - values[t] + gamma * lam * running
        adv[t] = running
    return adv


@settings(max_examples=40, deadline=None)
@given(
    lengths=st.lists(st.integers(1, 6), min_size=1, max_size=4),
    gamma=st.floats(0.5, 1.0),
    lam=st.floats(0.0, 1.0),
    seed=st.integers(0, 1000),
)
def test_gae_matches_the_textbook_recursion_per_segment(lengths, gamma, lam, seed):
    gen = torch.Generator().manual_seed(seed)
    horizon, m = max(lengths), len(lengths)
    rewards = torch.randn(horizon, m, generator=gen, dtype=torch.float64)
    values = torch.randn(horizon, m, generator=gen, dtype=torch.float64)
    boots = torch.randn(m, generator=gen, dtype=torch.float64)
    valid = torch.arange(horizon)[:, None] < torch.tensor(lengths)[None, :]
    next_values = torch.zeros_like(values)
    for j, n in enumerate(lengths):
        next_values[: n - 1, j] = values[1:n, j]
        next_values[n - 1, j] = boots[j]
    adv, ret = compute_gae(rewards, values, next_values, valid, gamma, lam)
    for j, n in enumerate(lengths):
        ref = reference_gae(
            rewards[:n, j].tolist(), values[:n, j].tolist(), float(boots[j]), gamma, lam
        )
        assert adv[:n, j].tolist() == pytest.approx(ref, abs=1e-9)
        assert ret[:n, j].tolist() == pytest.approx((adv[:n, j] + values[:n, j]).tolist())
        assert bool((adv[n:, j] == 0).all())


def _one_step_buffer(terminated: bool, truncated: bool) -> RolloutBuffer:
    env = CueRecallEnv(2, num_slots=2)
    obs, masks = env.reset()
    buf = RolloutBuffer(env.slot_config, 2)
    zeros = torch.zeros(1, 2, 4)
    buf.add(
        slot_ids=env.slot_config.slot_ids,
        obs=obs,
        masks=masks,
        actions=torch.zeros(2, 4, dtype=torch.long),
        log_probs=torch.zeros(2, 4),
        values=torch.tensor([1.0, 1.0]),
        hidden_in=(zeros, zeros),
        rewards=torch.tensor([1.0, 1.0]),
        terminated=torch.tensor([terminated, terminated]),
        truncated=torch.tensor([truncated, truncated]),
        bootstrap_values=torch.tensor([10.0, 10.0]),
    )
    return buf


@pytest.mark.parametrize(
    ("terminated", "truncated", "expected"),
    [(True, False, 0.0), (False, True, 9.0), (True, True, 0.0)],  # terminal wins over truncation
)
def test_truncated_episodes_bootstrap_and_terminated_ones_do_not(terminated, truncated, expected):
    batch = _one_step_buffer(terminated, truncated).build()
    adv, _ = compute_gae(batch.rewards, batch.values, batch.next_values, batch.valid, 0.9, 0.95)
    # r + gamma * V(next) - V = 1 + 0.9 * boot - 1
    assert adv[0].tolist() == pytest.approx([expected, expected])


def collect(agent: PPOAgent, env: CueRecallEnv, episodes: int = 2):
    obs, masks = env.reset()
    hidden = agent.initial_hidden(env.num_envs)
    for _ in range(episodes * env.length):
        step = agent.act(obs, masks, hidden, slot_ids=env.slot_config.slot_ids)
        out = env.step(step.actions)
        agent.record(step, out.rewards, out.terminated, out.truncated)
        hidden = agent.reset_hidden(step.hidden, out.terminated | out.truncated)
        obs, masks = out.obs, out.masks
    return obs, hidden


def test_first_minibatch_ratio_is_one_for_every_head_and_update_reports_diagnostics():
    env = CueRecallEnv(16, num_slots=4, length=4, seed=1)
    agent = PPOAgent(env.slot_config, GLOBAL_DIM, SLOT_DIM, env.blueprints, PPOConfig(**SMALL))
    collect(agent, env)
    # Replaying the whole buffer reproduces the stored per-head log-probs.
    batch = agent.buffer.build()
    with torch.no_grad():
        out = agent.network.evaluate_actions(batch.obs, batch.actions, batch.masks, batch.hidden0)
    ratio = (out.log_probs - batch.log_probs).exp()[batch.valid]
    torch.testing.assert_close(ratio, torch.ones_like(ratio), atol=1e-6, rtol=0)
    diag = agent.update()
    for head in ("op", "slot", "blueprint", "blend"):
        assert diag[f"first_ratio_dev/{head}"] <= 1e-6
        assert 0.0 <= diag[f"entropy/{head}"] <= 1.0
    expected_keys = {"approx_kl", "clip_frac", "explained_variance", "grad_norm"}
    assert expected_keys <= diag.keys()
    assert diag["grad_norm"] > 0 and diag["n_minibatch_steps"] > 0
    assert agent.buffer.num_steps == 0 and agent.counters["updates"] == 1


def test_kl_early_stop_is_checked_before_the_optimiser_step():
    env = CueRecallEnv(16, num_slots=3, seed=2)
    cfg = PPOConfig(**SMALL, learning_rate=0.05, target_kl=1e-7, n_epochs=4, num_minibatches=4)
    agent = PPOAgent(env.slot_config, GLOBAL_DIM, SLOT_DIM, env.blueprints, cfg)
    collect(agent, env)
    diag = agent.update()
    # The first minibatch has KL 0 and steps; the next one sees a moved policy and stops.
    assert diag["early_stopped"] == 1.0 and diag["n_minibatch_steps"] == 1.0

    agent = PPOAgent(
        env.slot_config, GLOBAL_DIM, SLOT_DIM, env.blueprints, PPOConfig(**SMALL, target_kl=None)
    )
    collect(agent, env)
    diag = agent.update()
    assert diag["early_stopped"] == 0.0 and diag["n_minibatch_steps"] == 16.0


def test_values_are_denormalised_for_gae_and_the_critic_learns_normalised_returns():
    env = CueRecallEnv(8, num_slots=2, seed=3)
    agent = PPOAgent(env.slot_config, GLOBAL_DIM, SLOT_DIM, env.blueprints, PPOConfig(**SMALL))
    agent.return_normalizer.mean.fill_(5.0)
    agent.return_normalizer.var.fill_(4.0)
    obs, masks = env.reset()
    hidden = agent.initial_hidden(8)
    step = agent.act(obs, masks, hidden, update_normalizer=False)
    with torch.no_grad():
        raw = agent.network.get_value(agent.obs_normalizer.normalize(obs), hidden)
    torch.testing.assert_close(step.values, 5.0 + 2.0 * raw, atol=1e-4, rtol=0)


def test_update_needs_next_obs_while_episodes_are_running():
    env = CueRecallEnv(4, num_slots=2, length=3, seed=4)
    agent = PPOAgent(env.slot_config, GLOBAL_DIM, SLOT_DIM, env.blueprints, PPOConfig(**SMALL))
    obs, masks = env.reset()
    hidden = agent.initial_hidden(4)
    step = agent.act(obs, masks, hidden)
    out = env.step(step.actions)
    agent.record(step, out.rewards, out.terminated, out.truncated)
    with pytest.raises(ValueError, match="next_obs"):
        agent.update()
    diag = agent.update(next_obs=out.obs, next_hidden=step.hidden)
    assert diag["n_sequences"] == 4.0


@settings(max_examples=40, deadline=None)
@given(
    lengths=st.lists(st.integers(1, 40), min_size=1, max_size=30),
    num_mb=st.integers(1, 8),
    group=st.booleans(),
    seed=st.integers(0, 1000),
)
def test_minibatches_use_every_sequence_once_and_none_is_empty(lengths, num_mb, group, seed):
    num_mb = min(num_mb, len(lengths))
    gen = torch.Generator().manual_seed(seed)
    groups = minibatch_columns(torch.tensor(lengths), num_mb, group, gen)
    assert len(groups) == num_mb and all(len(g) > 0 for g in groups)
    assert sorted(torch.cat(groups).tolist()) == list(range(len(lengths)))


def test_length_grouped_minibatches_pad_less_and_equal_lengths_split_like_random():
    lengths = torch.tensor([1, 4, 16, 32] * 4)

    def lstm_rows(groups):
        return sum(two_length_split(lengths[g], int(lengths[g].max()))[2] for g in groups)

    for seed in range(5):
        grouped = minibatch_columns(lengths, 2, True, torch.Generator().manual_seed(seed))
        shuffled = minibatch_columns(lengths, 2, False, torch.Generator().manual_seed(seed))
        # Cut where the length changes near half the steps: {1, 4, 16} | {32}.
        assert sorted(int(lengths[g].sum()) for g in grouped) == [84, 128]
        assert lstm_rows(grouped) == 224 < lstm_rows(shuffled)
    equal = torch.full((12,), 5)
    for seed in range(3):
        a = minibatch_columns(equal, 3, True, torch.Generator().manual_seed(seed))
        b = minibatch_columns(equal, 3, False, torch.Generator().manual_seed(seed))
        assert sorted(len(g) for g in a) == sorted(len(g) for g in b) == [4, 4, 4]
    with pytest.raises(ValueError, match="num_minibatches"):
        minibatch_columns(equal, 13, True)


@pytest.mark.parametrize("group", [True, False])
def test_first_minibatch_ratio_is_one_when_episodes_end_mid_rollout(group):
    # 6 steps of 4-step episodes: every env has a 4-step and an open 2-step segment.
    env = CueRecallEnv(16, num_slots=4, length=4, seed=5)
    cfg = PPOConfig(**SMALL, group_by_length=group, target_kl=None)
    agent = PPOAgent(env.slot_config, GLOBAL_DIM, SLOT_DIM, env.blueprints, cfg)
    obs, masks = env.reset()
    hidden = agent.initial_hidden(16)
    for _ in range(6):
        step = agent.act(obs, masks, hidden)
        out = env.step(step.actions)
        agent.record(step, out.rewards, out.terminated, out.truncated)
        hidden = agent.reset_hidden(step.hidden, out.terminated)
        obs, masks = out.obs, out.masks
    diag = agent.update(next_obs=obs, next_hidden=hidden)
    for head in ("op", "slot", "blueprint", "blend"):
        assert diag[f"first_ratio_dev/{head}"] <= 1e-6
    assert diag["n_minibatch_steps"] == cfg.n_epochs * cfg.num_minibatches
    if group:  # two lengths, four minibatches: each minibatch holds one length
        assert diag["padded_rows_per_step"] == 0.0


def test_flat_gradient_buffer_accumulates_and_clips_like_clip_grad_norm():
    torch.manual_seed(0)
    nets = [torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Linear(7, 3)) for _ in range(2)]
    nets[1].load_state_dict(nets[0].state_dict())
    x = torch.randn(11, 5)
    params = list(nets[0].parameters())
    grads, views = flat_gradients(params)
    for _ in range(2):  # backward accumulates into the views, and zeroing the buffer resets
        grads.zero_()
        (nets[0](x) ** 2).sum().backward()
    assert all(p.grad is v for p, v in zip(params, views, strict=True))
    assert grads.abs().sum() > 0
    norm = torch.linalg.vector_norm(grads)
    grads.mul_((0.5 / (norm + 1e-6)).clamp(max=1.0))
    (nets[1](x) ** 2).sum().backward()
    ref_norm = torch.nn.utils.clip_grad_norm_(nets[1].parameters(), 0.5)
    torch.testing.assert_close(norm, ref_norm)
    for p, q in zip(params, nets[1].parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad)
