"""Behaviour cloning: warm-start the learned controller from a scripted one.

A PPO controller that starts from a uniform policy prunes its own seeds long before
they can pay and, on a 2-core budget of episodes, never learns to grow. Cloning a
hand-written controller (the *teacher*, e.g. `esper.policy.HeuristicController`) first
gives PPO a policy that already grows; PPO then fine-tunes it, kept near the clone by
`PPOConfig.prior_kl_coef` (see `PPOAgent.set_prior`). Three plain functions:

1. `collect_demonstrations` plays whole episodes in lockstep envs and records, per
   step, the raw observation, the conditional masks and the teacher's action. With
   ``learner=agent`` (DAgger, Ross et al. 2011) the learner's actions drive the envs and
   the teacher only labels the states the learner reaches; the teacher's own state
   (cooldowns, step counts) then follows its labels, as if they had been executed.
2. `clone` fits the agent's heads by masked cross-entropy of the teacher's actions over
   whole sequences (one batched LSTM call per minibatch, `evaluate_actions`; heads an
   action does not use contribute nothing), and the critic to the discounted returns
   the episodes earned, so fine-tuning starts with a critic that knows them.
3. `agreement` replays sequences and counts the steps where the agent's most likely
   action equals the teacher's (all four heads), on the teacher's own states.

Observations are normalised by the agent's running statistics, which `clone` first
folds the demonstrations into (so the agent acts on the scale it was cloned on).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from esper.actions import ActionMasks
from esper.env.vector import VectorMorphogenesisEnv
from esper.policy.controllers import ControllerBatch
from esper.rl.agent import PPOAgent


@dataclass
class Demonstrations:
    """Time-major whole episodes: ``[T, M, ...]`` for M episodes of T steps each."""

    obs: dict[str, torch.Tensor]  # raw (unnormalised) observations
    masks: ActionMasks
    actions: torch.Tensor  # [T, M, 4] the teacher's actions
    rewards: torch.Tensor  # [T, M] the rewards of the executed actions

    @property
    def num_episodes(self) -> int:
        return self.actions.shape[1]

    def select(self, columns: torch.Tensor | slice) -> Demonstrations:
        return Demonstrations(
            {k: v[:, columns] for k, v in self.obs.items()},
            ActionMasks(*(t[:, columns] for t in self.masks.as_tuple())),
            self.actions[:, columns],
            self.rewards[:, columns],
        )

    def __add__(self, other: Demonstrations) -> Demonstrations:
        if other.actions.shape[0] != self.actions.shape[0]:
            raise ValueError(
                f"episodes of {self.actions.shape[0]} and {other.actions.shape[0]} steps "
                "cannot be stacked"
            )
        return Demonstrations(
            {k: torch.cat([v, other.obs[k]], 1) for k, v in self.obs.items()},
            ActionMasks(
                *(
                    torch.cat([a, b], 1)
                    for a, b in zip(self.masks.as_tuple(), other.masks.as_tuple(), strict=True)
                )
            ),
            torch.cat([self.actions, other.actions], 1),
            torch.cat([self.rewards, other.rewards], 1),
        )


def collect_demonstrations(
    vec: VectorMorphogenesisEnv,
    make_teacher: Callable[[], object],
    seeds: Sequence[int],
    *,
    learner: PPOAgent | None = None,
    deterministic: bool = False,
) -> Demonstrations:
    """One episode per seed, ``vec.num_envs`` at a time (``len(seeds)`` a multiple of it).

    ``make_teacher()`` returns a fresh `esper.policy.Controller` per episode. Without a
    ``learner`` the teacher's actions are executed; with one (DAgger) the learner's are
    (sampled, or its argmax with ``deterministic``) and the teacher's are the labels."""
    n = vec.num_envs
    if not seeds or len(seeds) % n:
        raise ValueError(f"need a positive multiple of {n} seeds (one per env), got {len(seeds)}")
    parts = []
    for start in range(0, len(seeds), n):
        obs, masks, _ = vec.reset(seeds=list(seeds[start : start + n]))
        teachers = ControllerBatch(lambda i: make_teacher(), n)  # type: ignore[arg-type, return-value]
        hidden = learner.initial_hidden(n) if learner is not None else None
        steps: list[tuple[dict[str, torch.Tensor], ActionMasks, torch.Tensor, torch.Tensor]] = []
        for _ in range(vec.max_epochs):
            label = teachers.act(obs, masks)
            executed = label
            if learner is not None:
                step = learner.act(obs, masks, hidden, deterministic, update_normalizer=False)
                executed, hidden = step.actions, step.hidden
            out = vec.step(executed)
            steps.append((obs, masks, label, out.rewards))
            obs, masks = out.obs, out.masks
        parts.append(
            Demonstrations(
                {k: torch.stack([s[0][k] for s in steps]) for k in ("global", "slots")},
                ActionMasks(
                    *(torch.stack(m) for m in zip(*(s[1].as_tuple() for s in steps), strict=True))
                ),
                torch.stack([s[2] for s in steps]),
                torch.stack([s[3] for s in steps]).float(),
            )
        )
    demos = parts[0]
    for part in parts[1:]:
        demos = demos + part
    return demos


def discounted_returns(rewards: torch.Tensor, gamma: float) -> torch.Tensor:
    """``[T, M]`` returns G_t = r_t + γ G_{t+1} of whole episodes (no bootstrap)."""
    out = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[0])
    for t in range(rewards.shape[0] - 1, -1, -1):
        running = rewards[t] + gamma * running
        out[t] = running
    return out


def clone(
    agent: PPOAgent,
    demos: Demonstrations,
    *,
    epochs: int = 60,
    minibatch_episodes: int = 8,
    learning_rate: float = 1e-3,
    value_coef: float = 0.5,
    seed: int = 0,
    update_normalizer: bool = True,
) -> dict[str, float]:
    """Fit ``agent.network`` to the teacher's actions (and the critic to the returns).

    Adam of its own (the agent's optimiser state is left for PPO); minibatches of whole
    episodes in an order drawn from ``seed``. Returns the last epoch's mean losses."""
    if epochs < 1 or minibatch_episodes < 1:
        raise ValueError(
            f"epochs and minibatch_episodes must be >= 1, got {epochs}, {minibatch_episodes}"
        )
    net, dev = agent.network, agent.device
    raw = {k: v.to(dev) for k, v in demos.obs.items()}
    if agent.config.normalize_observations:
        if update_normalizer:
            agent.obs_normalizer.update(raw)
        obs = agent.obs_normalizer.normalize(raw)
    else:
        obs = {k: v.float() for k, v in raw.items()}
    masks, actions = demos.masks.to(dev), demos.actions.to(dev)
    returns = discounted_returns(demos.rewards.to(dev), agent.config.gamma)
    if agent.config.normalize_returns:
        if update_normalizer:
            agent.return_normalizer.update(returns.reshape(-1, 1))
        returns = agent.return_normalizer.normalize(returns.unsqueeze(-1)).squeeze(-1)
    optimizer = torch.optim.Adam(net.parameters(), lr=learning_rate)
    generator = torch.Generator().manual_seed(seed)
    m = demos.num_episodes
    net.train()
    last: dict[str, float] = {}
    for _ in range(epochs):
        totals = {"cross_entropy": 0.0, "value_loss": 0.0}
        batches = torch.randperm(m, generator=generator).split(minibatch_episodes)
        for cols in batches:
            cols = cols.to(dev)
            out = net.evaluate_actions(
                {k: v[:, cols] for k, v in obs.items()},
                actions[:, cols],
                masks[:, cols],
                net.get_initial_hidden(len(cols), dev),
            )
            # Log-probs are 0 on heads the action does not use: summing over heads is
            # the masked cross-entropy of the factored action.
            ce = -out.log_probs.sum(-1).mean()
            v_loss = 0.5 * (out.values - returns[:, cols]).square().mean()
            loss = ce + value_coef * v_loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), agent.config.max_grad_norm * 10)
            optimizer.step()
            totals["cross_entropy"] += float(ce.detach()) / len(batches)
            totals["value_loss"] += float(v_loss.detach()) / len(batches)
        last = totals
    return last


@torch.no_grad()
def agreement(agent: PPOAgent, demos: Demonstrations) -> dict[str, float]:
    """Fraction of steps where the agent's argmax action equals the teacher's, replaying
    each episode from a zero state on the teacher's own observations; also on the steps
    where the teacher did something other than WAIT (the rare, decisive ones)."""
    net, dev = agent.network, agent.device
    raw = {k: v.to(dev) for k, v in demos.obs.items()}
    obs = agent.obs_normalizer.normalize(raw) if agent.config.normalize_observations else raw
    masks, labels = demos.masks.to(dev), demos.actions.to(dev)
    hidden = net.get_initial_hidden(demos.num_episodes, dev)
    net.eval()
    same = []
    for t in range(labels.shape[0]):
        step = net.get_action(
            {k: v[t] for k, v in obs.items()}, hidden, masks[t], deterministic=True
        )
        hidden = step.hidden
        same.append((step.actions == labels[t]).all(-1))
    net.train()
    match = torch.stack(same)
    acting = labels[..., 0] != 0
    return {
        "agreement": float(match.float().mean()),
        "agreement_non_wait": float(match[acting].float().mean()) if acting.any() else float("nan"),
        "steps": float(match.numel()),
        "non_wait_steps": float(acting.sum()),
    }
