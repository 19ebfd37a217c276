"""`PPOAgent`: the learned controller's network, optimiser, buffer, normalisers and checkpoints.

Rollout loop (N lockstep envs; observations ``{"global": [N, G], "slots": [N, S, F]}``)::

    hidden = agent.initial_hidden(N)
    for _ in range(steps):
        step = agent.act(obs, masks, hidden, slot_ids=slot_config.slot_ids)
        obs, rewards, terminated, truncated, final_obs = env.step(step.actions)
        agent.record(step, rewards, terminated, truncated, final_obs=final_obs)
        hidden = agent.reset_hidden(step.hidden, terminated | truncated)
    diagnostics = agent.update(next_obs=obs, next_hidden=hidden)

``final_obs`` is the observation a truncated env reached before its auto-reset (rows of
other envs are ignored); its value bootstraps the truncated return.

Data parallel: ``agent.distribute(ctx, shard)`` makes this agent one rank of a DD-PPO job
(`esper.distributed`): weights come from rank 0, normaliser statistics are merged over
ranks once per update (`PPOConfig.obs_normalizer_sync`), gradients once per optimiser
step, and the sampling noise of env ``i`` is row ``i`` of one ``[E_total, 4]``
draw that every rank makes, so actions do not depend on how the envs are split.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from esper.actions import BLEND_ALGORITHMS, ActionMasks
from esper.checkpointing import CheckpointError
from esper.distributed import (
    SINGLE,
    DistContext,
    EnvShard,
    broadcast_parameters,
    check_in_sync,
    sum_across_ranks,
)
from esper.env.observations import DEFAULT_SCHEMA
from esper.policy.network import FactoredRecurrentActorCritic, Hidden
from esper.rl.buffer import RolloutBuffer
from esper.rl.checkpoint import check_compatible, read_checkpoint, save_checkpoint, saved_config
from esper.rl.normalizers import ObservationNormalizer, RunningMeanStd
from esper.rl.ppo import PPOConfig, compute_gae, explained_variance, ppo_update
from esper.slots import SlotConfig


@dataclass
class AgentStep:
    """One decision of the agent for N envs, plus what the buffer needs to store it."""

    actions: torch.Tensor  # [N, 4] long: op, slot, blueprint, blend
    log_probs: torch.Tensor  # [N, 4]
    values: torch.Tensor  # [N] in reward units
    hidden: Hidden  # state after acting; feed to the next act()
    obs: dict[str, torch.Tensor] = field(repr=False)  # normalised
    masks: ActionMasks = field(repr=False)
    hidden_in: Hidden = field(repr=False)
    slot_ids: tuple[str, ...] = field(repr=False, default=())


class PPOAgent:
    """Masked recurrent PPO controller for any number of slots."""

    def __init__(
        self,
        slot_config: SlotConfig,
        global_dim: int,
        slot_dim: int,
        blueprints: Sequence[str],
        config: PPOConfig | None = None,
        device: torch.device | str = "cpu",
        blends: Sequence[str] = BLEND_ALGORITHMS,
    ) -> None:
        if not isinstance(slot_config, SlotConfig):
            raise TypeError(f"slot_config must be a SlotConfig, got {type(slot_config).__name__}")
        self.slot_config = slot_config
        self.global_dim, self.slot_dim = global_dim, slot_dim
        self.blueprints, self.blends = tuple(blueprints), tuple(blends)
        if not self.blueprints:
            raise ValueError("PPOAgent needs at least one blueprint name")
        self.config = config if config is not None else PPOConfig()
        self.device = torch.device(device)
        # Seeded init without disturbing the caller's global RNG stream.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.config.seed)
            self.network = FactoredRecurrentActorCritic(
                num_slots=slot_config.num_slots,
                global_dim=global_dim,
                slot_dim=slot_dim,
                num_blueprints=len(self.blueprints),
                num_blends=len(self.blends),
                hidden=self.config.hidden,
                embed=self.config.embed,
                op_bias=self.config.initial_op_bias,
            ).to(self.device)
        self.optimizer = torch.optim.Adam(
            self.network.parameters(),
            lr=self.config.learning_rate,
            eps=self.config.adam_eps,
            fused=True,  # one kernel for all parameters: a third of the per-step cost
        )
        self.obs_normalizer = ObservationNormalizer(
            global_dim, slot_dim, clip=self.config.obs_clip, device=self.device
        )
        self.return_normalizer = RunningMeanStd(1, device=self.device)
        self.generator = torch.Generator(device=self.device).manual_seed(self.config.seed)
        self.buffer: RolloutBuffer | None = None
        # Frozen copy of a cloned policy that PPO is kept near (PPOConfig.prior_kl_coef).
        self.prior: FactoredRecurrentActorCritic | None = None
        self.counters = {"updates": 0, "env_steps": 0, "episodes": 0}
        self.dist: DistContext = SINGLE
        self.shard: EnvShard | None = None
        self.verify_sync = False  # compare weight checksums over ranks after each update
        self._local_counts = [0, 0]  # env steps, episodes recorded since the last update

    def distribute(self, ctx: DistContext, shard: EnvShard, verify_sync: bool = False) -> None:
        """Act as rank ``ctx.rank`` stepping the global envs of ``shard``; takes rank 0's
        weights (every rank must call this at the same point)."""
        if shard.count * ctx.world_size != shard.total:
            raise ValueError(
                f"shard of {shard.count} envs x {ctx.world_size} ranks != {shard.total} envs"
            )
        self.dist, self.shard, self.verify_sync = ctx, shard, verify_sync
        broadcast_parameters(self.network, ctx)

    def set_prior(self) -> None:
        """Freeze a copy of the current network as the prior of `PPOConfig.prior_kl_coef`
        (call it after behaviour cloning, before fine-tuning)."""
        self.prior = copy.deepcopy(self.network).eval().requires_grad_(False)

    # -- acting ---------------------------------------------------------------------------
    def initial_hidden(self, num_envs: int) -> Hidden:
        return self.network.get_initial_hidden(num_envs, self.device)

    @staticmethod
    def reset_hidden(hidden: Hidden, done: torch.Tensor) -> Hidden:
        """Zero the state of envs whose episode just ended (they auto-reset)."""
        keep = (~done.bool()).to(hidden[0].dtype).view(1, -1, 1)
        return hidden[0] * keep, hidden[1] * keep

    def _prepare_obs(
        self, obs: Mapping[str, torch.Tensor], update: bool
    ) -> dict[str, torch.Tensor]:
        obs = {k: obs[k].to(self.device) for k in ("global", "slots")}
        if not self.config.normalize_observations:
            return {k: v.float() for k, v in obs.items()}
        if update and self.config.obs_normalizer_sync == "step":
            self.obs_normalizer.update(obs, self.dist)
        elif update:  # folded in (over all ranks) by the next update()
            self.obs_normalizer.accumulate(obs)
        return self.obs_normalizer.normalize(obs)

    def _to_reward_units(self, critic_out: torch.Tensor) -> torch.Tensor:
        if not self.config.normalize_returns:
            return critic_out
        return self.return_normalizer.denormalize(critic_out.unsqueeze(-1)).squeeze(-1)

    def _check_slot_ids(self, slot_ids: Sequence[str] | None, what: str) -> tuple[str, ...]:
        if slot_ids is not None:
            self.slot_config.check_matches(slot_ids, what=what)
        return self.slot_config.slot_ids

    @torch.inference_mode()  # cheaper per op than no_grad; outputs are only read later
    def act(
        self,
        obs: Mapping[str, torch.Tensor],
        masks: ActionMasks,
        hidden: Hidden,
        deterministic: bool = False,
        *,
        slot_ids: Sequence[str] | None = None,
        update_normalizer: bool | None = None,
    ) -> AgentStep:
        """Choose legal actions for N envs. Observation statistics are updated while
        exploring (``update_normalizer`` defaults to ``not deterministic``)."""
        ids = self._check_slot_ids(slot_ids, "the observation")
        update = (not deterministic) if update_normalizer is None else update_normalizer
        norm_obs = self._prepare_obs(obs, update)
        masks = masks.to(self.device)
        noise = None if deterministic else self._sampling_noise(norm_obs["global"].shape[0])
        out = self.network.get_action(norm_obs, hidden, masks, deterministic, noise=noise)
        return AgentStep(
            actions=out.actions,
            log_probs=out.log_probs,
            values=self._to_reward_units(out.values),
            hidden=out.hidden,
            obs=norm_obs,
            masks=masks,
            hidden_in=hidden,
            slot_ids=ids,
        )

    def _sampling_noise(self, batch: int) -> torch.Tensor:
        """This rank's rows of one ``[E_total, 4]`` uniform draw (one number per head)."""
        shard = self.shard if self.shard is not None else EnvShard(0, batch, batch)
        if batch != shard.count:
            raise ValueError(f"got observations of {batch} envs; this rank steps {shard.count}")
        noise = torch.rand(shard.total, 4, generator=self.generator, device=self.device)
        return noise[shard.offset : shard.offset + batch]

    @torch.no_grad()
    def value(self, obs: Mapping[str, torch.Tensor], hidden: Hidden) -> torch.Tensor:
        """V(obs) [N] in reward units from ``hidden`` (no statistics update)."""
        return self._to_reward_units(self.network.get_value(self._prepare_obs(obs, False), hidden))

    def record(
        self,
        step: AgentStep,
        rewards: torch.Tensor,
        terminated: torch.Tensor,
        truncated: torch.Tensor,
        final_obs: Mapping[str, torch.Tensor] | None = None,
    ) -> None:
        """Store the outcome of ``step`` in the buffer."""
        n = step.actions.shape[0]
        if self.buffer is None or self.buffer.num_envs != n:
            if self.buffer is not None and self.buffer.num_steps:
                raise ValueError(
                    f"the buffer holds steps of {self.buffer.num_envs} envs; got a step of {n}"
                )
            self.buffer = RolloutBuffer(self.slot_config, n)
        dev = self.device
        terminated, truncated = terminated.to(dev).bool(), truncated.to(dev).bool()
        boot = None
        if bool((truncated & ~terminated).any()):
            if final_obs is None:
                raise ValueError("an env was truncated: pass final_obs to bootstrap its value")
            boot = self.value(final_obs, step.hidden)
        self.buffer.add(
            slot_ids=step.slot_ids,
            obs=step.obs,
            masks=step.masks,
            actions=step.actions,
            log_probs=step.log_probs,
            values=step.values,
            hidden_in=step.hidden_in,
            rewards=rewards.to(dev).float(),
            terminated=terminated,
            truncated=truncated,
            bootstrap_values=boot,
        )
        ended = int((terminated | truncated).sum())
        self.counters["env_steps"] += n
        self.counters["episodes"] += ended
        self._local_counts[0] += n
        self._local_counts[1] += ended

    # -- learning -------------------------------------------------------------------------
    def update(
        self,
        next_obs: Mapping[str, torch.Tensor] | None = None,
        next_hidden: Hidden | None = None,
    ) -> dict[str, float]:
        """One PPO update on the buffer, then clear it. Envs still mid-episode are cut here
        and bootstrapped from V(next_obs); pass the observation after the last recorded step
        and the hidden state returned with it."""
        buffer = self.buffer
        if buffer is None or buffer.num_steps == 0:
            raise RuntimeError("update() called with an empty buffer: record() steps first")
        if buffer.has_open_segments:
            if next_obs is None or next_hidden is None:
                raise ValueError(
                    "some episodes are still running: pass next_obs and next_hidden so their "
                    "return can be bootstrapped at the rollout end"
                )
            buffer.close_open_segments(self.value(next_obs, next_hidden))
        batch = buffer.build()
        cfg = self.config
        advantages, returns = compute_gae(
            batch.rewards, batch.values, batch.next_values, batch.valid, cfg.gamma, cfg.gae_lambda
        )
        targets = returns
        if cfg.normalize_returns:
            self.return_normalizer.update(returns[batch.valid].unsqueeze(-1), self.dist)
            targets = self.return_normalizer.normalize(returns.unsqueeze(-1)).squeeze(-1)
        self.network.train()
        # Minibatch order from (seed, update index) alone: the sampling generator then
        # advances by the same draws whatever the number of sequences, so an env's
        # actions do not depend on how many envs (or ranks) share the update.
        order = torch.Generator().manual_seed(cfg.seed * 1_000_003 + self.counters["updates"])
        if cfg.prior_kl_coef > 0 and self.prior is None:
            raise ValueError(
                "PPOConfig.prior_kl_coef > 0 needs a prior: call agent.set_prior() after "
                "cloning (esper.rl.cloning), or set prior_kl_coef = 0"
            )
        diagnostics = ppo_update(
            self.network, self.optimizer, batch, advantages, targets, cfg, order, self.dist,
            prior=self.prior if cfg.prior_kl_coef > 0 else None,
        )  # fmt: skip
        diagnostics["explained_variance"] = explained_variance(
            batch.values[batch.valid], returns[batch.valid]
        )
        diagnostics["mean_reward"] = float(batch.rewards[batch.valid].mean())
        diagnostics["n_sequences"] = float(batch.num_sequences)
        buffer.clear()
        if cfg.normalize_observations and cfg.obs_normalizer_sync == "update":
            self.obs_normalizer.commit(self.dist)
        self.counters["updates"] += 1
        if self.dist.active:
            self._count_all_ranks(diagnostics)
        self._local_counts = [0, 0]
        if self.verify_sync:
            check_in_sync(self.network, self.dist)
        return diagnostics

    def _count_all_ranks(self, diagnostics: dict[str, float]) -> None:
        """Counters and reward/sequence diagnostics over every rank's rollouts."""
        local = torch.tensor(
            [*self._local_counts, diagnostics["mean_reward"], diagnostics["n_sequences"]],
            dtype=torch.float64,
        )
        total = sum_across_ranks(local, self.dist)
        self.counters["env_steps"] += int(total[0]) - self._local_counts[0]
        self.counters["episodes"] += int(total[1]) - self._local_counts[1]
        diagnostics["mean_reward"] = float(total[2]) / self.dist.world_size
        diagnostics["n_sequences"] = float(total[3])

    # -- checkpoints ----------------------------------------------------------------------
    def state_dict(self) -> dict[str, object]:
        """Tensors and primitives only, so ``torch.load(weights_only=True)`` reads it back.

        An agent on Esper's own observations also stores their schema (names, version),
        so `load` refuses a file written for other observations with a clear message."""
        schema = {}
        if (self.global_dim, self.slot_dim) == (DEFAULT_SCHEMA.global_dim, DEFAULT_SCHEMA.slot_dim):
            schema = {"observation_schema": DEFAULT_SCHEMA.to_dict()}
        return {
            **schema,
            "slot_ids": list(self.slot_config.slot_ids),
            "global_dim": self.global_dim,
            "slot_dim": self.slot_dim,
            "blueprints": list(self.blueprints),
            "blends": list(self.blends),
            "config": {
                k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self.config).items()
            },
            "network": self.network.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "obs_normalizer": self.obs_normalizer.state_dict(),
            "return_normalizer": self.return_normalizer.state_dict(),
            "generator": self.generator.get_state(),
            "counters": dict(self.counters),
            **({"prior": self.prior.state_dict()} if self.prior is not None else {}),
        }

    def save(self, path: str | Path) -> Path:
        """Write a checkpoint atomically (temp file + rename); returns the path."""
        return save_checkpoint(self.state_dict(), path)

    @classmethod
    def load(
        cls,
        path: str | Path,
        slot_config: SlotConfig | None = None,
        device: torch.device | str = "cpu",
        *,
        global_dim: int | None = None,
        slot_dim: int | None = None,
        blueprints: Sequence[str] | None = None,
    ) -> PPOAgent:
        """Restore an agent; ``slot_config`` may differ from the saved one (any slot count).

        ``global_dim``/``slot_dim``/``blueprints``, when given, must match the checkpoint's
        observation and action schema; otherwise `CheckpointError` names both sides.
        """
        expected = {"global_dim": global_dim, "slot_dim": slot_dim, "blueprints": blueprints}
        return cls.from_checkpoint(read_checkpoint(path), path, slot_config, device, expected)

    @classmethod
    def from_checkpoint(
        cls,
        payload: Mapping[str, Any],
        path: str | Path,
        slot_config: SlotConfig | None = None,
        device: torch.device | str = "cpu",
        expected: Mapping[str, Any] | None = None,
    ) -> PPOAgent:
        """The agent of an already read checkpoint (`esper.rl.checkpoint.read_checkpoint`);
        ``path`` names it in errors, ``expected`` as in `load`."""
        check_compatible(payload, path, expected or {})
        try:
            saved_slots = SlotConfig(tuple(payload["slot_ids"]))
            agent = cls(
                slot_config if slot_config is not None else saved_slots,
                payload["global_dim"],
                payload["slot_dim"],
                payload["blueprints"],
                config=PPOConfig(**saved_config(payload)),
                device=device,
                blends=payload["blends"],
            )
            agent.network.load_state_dict(payload["network"])
            agent.optimizer.load_state_dict(payload["optimizer"])
            agent.obs_normalizer.load_state_dict(payload["obs_normalizer"])
            agent.return_normalizer.load_state_dict(payload["return_normalizer"])
            if "generator" in payload:
                agent.generator.set_state(payload["generator"])
            agent.counters.update({k: int(v) for k, v in payload["counters"].items()})
            if "prior" in payload:  # the frozen clone of PPOConfig.prior_kl_coef
                agent.set_prior()
                agent.prior.load_state_dict(payload["prior"])  # type: ignore[union-attr]
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise CheckpointError(f"checkpoint {path}: inconsistent contents ({first})") from None
        return agent
