"""Runs: train a controller on envs in lockstep, evaluate it, resume from checkpoints.

One *round* is one episode of each of the E envs, stepped in lockstep; for PPO one
round is one update. Env ``i`` in round ``k`` is reset with a seed that depends only on
(run seed, i, k), so what an env sees never depends on E, and a run resumed from the
checkpoint written after round ``k`` continues exactly as an uninterrupted run.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from esper.actions import FactoredAction, LifecycleOp
from esper.env.vector import VectorMorphogenesisEnv
from esper.policy.controllers import (
    ControllerBatch,
    HeuristicController,
    RandomController,
    StaticController,
)
from esper.rl import PPOAgent
from esper.run_config import RunConfig
from esper.seeding import episode_seed
from esper.telemetry import EpisodeEnded, EpisodeStep, GovernorRollback, Telemetry, seed_event
from esper.telemetry.events import SeedFossilized, SeedGerminated, SeedPruned, seed_event_class

COUNTS = ("germinated", "fossilized", "pruned", "illegal", "rollbacks")


@dataclass
class EpisodeRecord:
    """What one finished episode achieved."""

    round: int
    env: int
    episode_return: float = 0.0
    quality: float = math.nan
    growth: float = 0.0
    objective: float = math.nan
    params_added: int = 0
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(COUNTS, 0))
    train_flops: int = 0  # cumulative compute of the episode (info["flops"])

    def event(self) -> EpisodeEnded:
        return EpisodeEnded(
            self.round, self.env, self.episode_return, self.quality, self.growth,
            self.objective, self.params_added, **self.counts, train_flops=self.train_flops,
        )  # fmt: skip


def make_scripted(
    config: RunConfig,
    round_index: int,
    num_envs: int,
    evaluation: bool = False,
    env_offset: int = 0,
    action_spec=None,
) -> ControllerBatch:
    """A fresh scripted controller per env and round (random ones seeded per episode).
    ``shipped`` (the packaged policy, `esper.policies`) needs the envs' ``action_spec``."""
    name, seed = config.run.controller, config.run.seed
    if name == "shipped":
        from esper.policies import PolicyController, load_policy

        if action_spec is None:
            raise ValueError("the shipped controller needs the envs' action_spec")
        agent = load_policy(action_spec.slot_config, action_spec.blueprints)
        return ControllerBatch(lambda i: PolicyController(agent), num_envs)
    if name == "heuristic":
        return ControllerBatch(lambda i: HeuristicController(config.heuristic), num_envs)
    if name == "random":
        return ControllerBatch(
            lambda i: RandomController(
                seed=episode_seed(seed, env_offset + i, round_index, evaluation)
            ),
            num_envs,
        )
    if name == "static":
        return ControllerBatch(lambda i: StaticController(), num_envs)
    raise ValueError(
        f"no scripted controller {name!r}; allowed: heuristic, random, static, shipped"
    )


def run_round(
    vec: VectorMorphogenesisEnv,
    round_index: int,
    seed: int,
    *,
    agent: PPOAgent | None = None,
    scripted: ControllerBatch | None = None,
    deterministic: bool = False,
    learn: bool = False,
    evaluation: bool = False,
    telemetry: Telemetry | None = None,
    env_offset: int = 0,
    on_step: Callable[[int], None] | None = None,
) -> list[EpisodeRecord]:
    """Play one episode in every env; with ``learn`` the agent's buffer records it.

    ``env_offset`` is the global index of ``vec``'s first env when the envs are split over
    processes (`esper.distributed`): env ``i`` here is global env ``env_offset + i``, with
    that env's seeds and index in records and events. ``on_step(t)`` is called after
    lockstep step ``t`` (0-based) of every env, for live progress."""
    if (agent is None) == (scripted is None):
        raise ValueError("run_round needs exactly one of agent= or scripted=")
    num_envs = vec.num_envs
    env_ids = range(env_offset, env_offset + num_envs)
    seeds = [episode_seed(seed, i, round_index, evaluation) for i in env_ids]
    obs, masks, _ = vec.reset(seeds=seeds)
    hidden = agent.initial_hidden(num_envs) if agent is not None else None
    records = [EpisodeRecord(round_index, i) for i in env_ids]
    for step_index in range(vec.max_epochs):
        if agent is not None:
            step = agent.act(
                obs, masks, hidden, deterministic, slot_ids=vec.slot_config.slot_ids,
                update_normalizer=learn,
            )  # fmt: skip
            actions, hidden = step.actions, step.hidden
        else:
            actions = scripted.act(obs, masks)
        out = vec.step(actions)
        if learn:
            agent.record(step, out.rewards, out.terminated, out.truncated, final_obs=out.final_obs)
        for i, info in enumerate(out.infos):
            reward = float(out.rewards[i])
            _account(records[i], info, reward, vec.envs[i].host_params)
            if telemetry is not None:
                _emit_step(telemetry, round_index, env_offset + i, step_index, vec, reward, info)
        obs, masks = out.obs, out.masks
        if on_step is not None:
            on_step(step_index)
    if telemetry is not None:
        for record in records:
            telemetry.emit(record.event())
    return records


def _account(record: EpisodeRecord, info: dict[str, Any], reward: float, host_params: int):
    record.episode_return += reward
    record.quality, record.growth = info["quality"], info["growth"]
    record.objective = info["objective"]
    record.params_added = round(info["growth"] * host_params)
    record.train_flops = int(info.get("flops", 0))
    record.counts["illegal"] += int(info.get("illegal_action", False))
    record.counts["rollbacks"] += int(info.get("governor_event") is not None)
    for event in info.get("events", []):
        kind = _seed_kind(event)
        if kind is not None:
            record.counts[kind] += 1


_COUNTED = {SeedGerminated: "germinated", SeedFossilized: "fossilized", SeedPruned: "pruned"}


def _seed_kind(event: dict[str, str]) -> str | None:
    return _COUNTED.get(seed_event_class(event["source"], event["target"]))


def _emit_step(
    tel: Telemetry, round_index: int, env: int, step: int, vec, reward: float, info
) -> None:
    space = vec.action_spec
    op, slot, blueprint, blend = info["executed_action"]
    executed = FactoredAction(LifecycleOp(op), slot, blueprint, blend)
    tel.emit(
        EpisodeStep(
            round_index, env, step, executed.describe(space), executed.op.name, reward,
            info["quality"], info["growth"], list(info["stages"].values()),
            illegal=bool(info.get("illegal_action", False)),
        )
    )  # fmt: skip
    for event in info.get("events", []):
        tel.emit(seed_event(episode=round_index, env=env, step=step, **event))
    if info.get("governor_event") is not None:
        penalty = float(info.get("reward_parts", {}).get("penalty", 0.0))
        tel.emit(GovernorRollback(round_index, env, step, info["governor_event"], penalty))


@dataclass(frozen=True)
class Progress:
    """Where a run stands, reported after every lockstep env step (live progress).

    ``phase`` is "train", "baseline" (the static-host round) or "eval"; env steps count
    the steps of every env (one lockstep step of E envs is E env steps).
    """

    phase: str
    round: int  # 0-based round in flight, counted over the run (a resumed one included)
    rounds: int  # rounds of the run: ``round + 1`` of the last is ``rounds``
    step: int  # steps of this round done, 1..steps
    steps: int
    env_steps: int  # done in this phase, this session
    env_steps_total: int  # to do in this phase, this session
    elapsed_s: float  # since this phase started in this session

    @property
    def steps_per_s(self) -> float:
        return self.env_steps / self.elapsed_s if self.elapsed_s > 0 else 0.0

    @property
    def eta_s(self) -> float:
        rate = self.steps_per_s
        return (self.env_steps_total - self.env_steps) / rate if rate > 0 else math.inf


class ProgressClock:
    """Turns per-step callbacks into `Progress` reports for one phase of a session.

    ``rounds`` are this session's (what its env-step total and ETA count); ``run_rounds``
    (default: ``rounds``) are the whole run's, which the reported round numbers, counted
    over the run, go up to: a resumed run reads "round 5/6", never "round 5/2"."""

    def __init__(
        self, phase: str, rounds: int, steps: int, envs: int, live, run_rounds: int | None = None
    ) -> None:
        self.phase, self.rounds, self.steps, self.envs, self.live = phase, rounds, steps, envs, live
        self.run_rounds = rounds if run_rounds is None else run_rounds
        self.start = time.monotonic()

    def on_step(self, round_index: int, rounds_before: int) -> Callable[[int], None] | None:
        """The ``on_step`` for `run_round` of round ``round_index``, the phase's
        ``rounds_before``-th round in this session (None without a ``live`` callback)."""
        if self.live is None:
            return None

        def report(step: int) -> None:
            done = (rounds_before * self.steps + step + 1) * self.envs
            self.live(
                Progress(
                    self.phase, round_index, self.run_rounds, step + 1,
                    self.steps, done, self.rounds * self.steps * self.envs,
                    time.monotonic() - self.start,
                )
            )  # fmt: skip

        return report


def static_round(
    vec: VectorMorphogenesisEnv, seed: int, env_offset: int = 0, on_step=None
) -> list[EpisodeRecord]:
    """Round 0's episodes played by the static host (no controller): a run's baseline."""
    scripted = ControllerBatch(lambda i: StaticController(), vec.num_envs)
    return run_round(vec, 0, seed, scripted=scripted, env_offset=env_offset, on_step=on_step)


def summarize(records: list[EpisodeRecord]) -> dict[str, float]:
    """Mean and std of the episode metrics (what tables and checkpoints report)."""
    out: dict[str, float] = {"episodes": float(len(records))}
    for key in ("quality", "growth", "objective", "episode_return", "params_added"):
        values = torch.tensor([float(getattr(r, key)) for r in records], dtype=torch.float64)
        out[key] = float(values.mean())
        out[f"{key}_std"] = float(values.std(unbiased=False)) if len(values) > 1 else 0.0
    for key in COUNTS:
        out[key] = float(sum(r.counts[key] for r in records))
    return out
