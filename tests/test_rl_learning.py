"""PPO solves a small task that needs memory and respects masks, within a bounded budget."""

import time

import torch

from esper.actions import LifecycleOp
from esper.rl import PPOAgent, PPOConfig
from esper.rl.synthetic import GLOBAL_DIM, SLOT_DIM, CueRecallEnv

MAX_UPDATES = 80
THRESHOLD = 0.9  # a memoryless policy cannot beat 0.5: it must guess between two legal slots


def legal(masks, actions) -> bool:
    idx = torch.arange(actions.shape[0])
    op, slot, bp, blend = actions.unbind(-1)
    ok = masks.op[idx, op]
    ok &= (op == LifecycleOp.WAIT) | masks.slot[idx, op, slot]
    ok &= (op != LifecycleOp.GERMINATE) | (masks.blueprint[idx, slot, bp] & masks.blend[idx, blend])
    return bool(ok.all())


def evaluate(agent: PPOAgent, seed: int) -> float:
    env = CueRecallEnv(128, num_slots=3, length=3, seed=seed)
    obs, masks = env.reset()
    hidden, total = agent.initial_hidden(env.num_envs), 0.0
    for _ in range(env.length):
        step = agent.act(obs, masks, hidden, deterministic=True)
        assert legal(masks, step.actions)
        out = env.step(step.actions)
        total += float(out.rewards.sum())
        hidden, obs, masks = step.hidden, out.obs, out.masks
    return total / env.num_envs


def test_ppo_learns_to_recall_a_cue_under_masks():
    torch.manual_seed(0)
    env = CueRecallEnv(32, num_slots=3, length=3, seed=1)
    config = PPOConfig(learning_rate=1e-3, n_epochs=8, ent_coef=0.003, hidden=64, embed=32, seed=0)
    agent = PPOAgent(env.slot_config, GLOBAL_DIM, SLOT_DIM, env.blueprints, config)
    obs, masks = env.reset()
    hidden = agent.initial_hidden(env.num_envs)
    start, score, history = time.perf_counter(), 0.0, []
    for update in range(1, MAX_UPDATES + 1):
        for _ in range(2 * env.length):
            step = agent.act(obs, masks, hidden, slot_ids=env.slot_config.slot_ids)
            assert legal(masks, step.actions)  # exploration never breaks a mask
            out = env.step(step.actions)
            agent.record(step, out.rewards, out.terminated, out.truncated)
            hidden = agent.reset_hidden(step.hidden, out.terminated | out.truncated)
            obs, masks = out.obs, out.masks
        agent.update(next_obs=obs, next_hidden=hidden)
        if update % 5 == 0:
            score = evaluate(agent, seed=1000 + update)
            history.append(score)
            if score >= THRESHOLD:
                break
    elapsed = time.perf_counter() - start
    assert score >= THRESHOLD, f"mean return {history} after {update} updates ({elapsed:.0f} s)"
