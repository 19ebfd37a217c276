"""`MorphogenesisEnv`: host training as a Gymnasium environment.

See docs/ARCHITECTURE.md, The environment.

* ``reset(seed=)`` builds a fresh host (initialised from the episode seed), its trainer
  (whose data order comes from the same seed) and validates it once: that quality is
  the reward baseline ``q_0``.
* ``step(action)`` applies the decision, then trains one step (one epoch or
  ``batches_per_step`` batches), validates, credits seeds and advances the lifecycle
  (`Trainer.train_step`), and returns the new observation. An episode is ``max_epochs``
  steps; the last one returns ``truncated=True`` (never ``terminated``: the task could
  go on, so agents should bootstrap from the final observation).
* ``step`` is three phases a lockstep runner may call itself: ``begin_step(action)``
  (apply), ``train_phase(trained=, validated=)`` (host training and everything the
  trainer does after it) and ``end_step(begun, result)`` (twin, reward, observation).
  Observation, reward, masks and actions are the growth step the `Grower` runs too
  (`esper.env.growth_step`).
* λ and the budget are part of the observation (schema v3). With
  ``growth_penalty_range=(lo, hi)`` every reset draws the episode's λ uniformly from
  [lo, hi] (from the episode seed, so a seed always gets the same λ); the draw is in
  ``info["growth_penalty"]`` and prices that episode's objective and rewards.
* ``reward_mode="twin"`` also trains a static twin of the host in lockstep (identical
  initialisation and data order, never grows) as the reward's baseline
  (esper.env.rewards): one extra host training and validation per step.
* Actions are ``MultiDiscrete([4, S, B, L])`` = (op, slot, blueprint, blend).
  ``action_masks()`` gives the flat per-head masks (MaskablePPO layout);
  ``conditional_masks()`` the exact conditional `ActionMasks`. A combination that
  passes every flat head mask but is illegal (e.g. PRUNE of an empty slot) runs as
  WAIT, with ``info["illegal_action"] = True`` and a per-episode count. An action
  outside the space raises `ActionIndexError`.
"""

from __future__ import annotations

import copy
import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any, ClassVar

import gymnasium as gym
import numpy as np
import torch

from esper.actions import (
    ActionIndexError,
    ActionMasks,
    ActionSpace,
    FactoredAction,
    LifecycleOp,
)
from esper.env.growth_step import GrowthStepper, Reading
from esper.env.masks import blueprint_cost_table, flat_masks
from esper.env.observations import GLOBAL_DIM, SLOT_DIM
from esper.env.rewards import RewardConfig, RewardMode
from esper.lifecycle import SeedStage
from esper.model import LifecycleConfig, MorphogeneticModel, StageChange, blueprints_for
from esper.slots import SlotConfig
from esper.training import TaskData, Trainer, get_task
from esper.training.counterfactual import CounterfactualResult
from esper.training.objective import EvalTotals
from esper.training.trainer import StepResult


@dataclass(frozen=True)
class EnvConfig:
    """Everything that defines an env; every field is also a keyword of the env."""

    task: str = "digits"
    # Options of `get_task` (task options and `TrainConfig` overrides), e.g. {"depth": 8}.
    task_options: Mapping[str, Any] = field(default_factory=dict)
    slots: Sequence[str] | None = None  # enabled slot ids; None = the task's default slots
    max_epochs: int | None = None  # steps per episode; None = the task's max_epochs
    batches_per_step: int | None = None  # None = the task's setting (often a full epoch)
    reward_mode: RewardMode = "objective"  # or "contribution", "twin" (esper.env.rewards)
    growth_penalty: float = 0.05  # λ in q − λ·g
    # (lo, hi): draw each episode's λ uniformly from [lo, hi] instead (the policy observes
    # it), so one policy learns every trade-off. None = always growth_penalty.
    growth_penalty_range: tuple[float, float] | None = None
    # {option: (lo, hi)}: integer task options drawn per episode, uniformly from lo..hi
    # (inclusive, from the episode seed), e.g. {"width": (1, 3), "depth": (3, 5)}: a
    # curriculum of hosts. The slots stay the env's (the task's default slots at its
    # `task_options`), so every drawn host must have them; a deeper host's extra blocks
    # have no slot. Hosts of different shapes do not batch (`run.batched_envs`).
    host_ranges: Mapping[str, tuple[int, int]] = field(default_factory=dict)
    contribution_weight: float = 1.0
    # Parameter budget as a growth ratio: live + fossil seed params <= max_growth · host
    # params. None = no budget. Masks never offer a blueprint that would exceed it.
    max_growth: float | None = None
    lifecycle: LifecycleConfig | None = None
    device: str = "cpu"
    data_seed: int = 0  # realisation of the data set (split); the same for every env
    data_root: str | None = None

    def __post_init__(self) -> None:
        if self.max_epochs is not None and self.max_epochs < 1:
            raise ValueError(f"max_epochs must be >= 1, got {self.max_epochs}")
        if self.max_growth is not None and not self.max_growth >= 0:
            raise ValueError(f"max_growth must be >= 0 or None, got {self.max_growth}")
        if self.growth_penalty_range is not None:
            lo, hi = (float(v) for v in self.growth_penalty_range)  # a TOML list is fine
            if not (math.isfinite(hi) and 0 <= lo <= hi):
                raise ValueError(
                    "growth_penalty_range must be (lo, hi) with 0 <= lo <= hi finite, "
                    f"got {self.growth_penalty_range!r}"
                )
            object.__setattr__(self, "growth_penalty_range", (lo, hi))
        ranges = {}
        for name, bounds in dict(self.host_ranges).items():
            try:
                lo, hi = bounds
                ok = int(lo) == lo and int(hi) == hi and 1 <= lo <= hi
            except (TypeError, ValueError):
                ok = False
            if not ok:
                raise ValueError(
                    f"host_ranges[{name!r}] must be (lo, hi) integers with 1 <= lo <= hi, "
                    f"got {bounds!r}"
                )
            ranges[str(name)] = (int(lo), int(hi))
        object.__setattr__(self, "host_ranges", ranges)


class EpisodeOverError(RuntimeError):
    """`step` was called after the episode ended."""


class MorphogenesisEnv(gym.Env):
    metadata: ClassVar[dict[str, Any]] = {"render_modes": []}

    def __init__(
        self,
        config: EnvConfig | None = None,
        *,
        seed: int | None = None,
        data: TaskData | None = None,
        **options: Any,
    ) -> None:
        """``MorphogenesisEnv(EnvConfig(...))`` or ``MorphogenesisEnv(task=..., ...)``.

        ``seed`` seeds the first `reset` that gets none; ``data`` shares an already
        loaded `TaskData` between envs (the vector runner does), else it is loaded here.
        """
        super().__init__()
        if config is not None and options:
            raise TypeError(f"pass either config or keyword options, not both: {sorted(options)}")
        self.config = cfg = config if config is not None else EnvConfig(**options)
        self.reward_config = RewardConfig(
            mode=cfg.reward_mode,
            growth_penalty=cfg.growth_penalty,
            contribution_weight=cfg.contribution_weight,
        )
        task_options = dict(cfg.task_options)
        if cfg.batches_per_step is not None:
            task_options["batches_per_step"] = cfg.batches_per_step
        self.task = get_task(cfg.task, **task_options)
        self.train_config = self.task.hparams
        self.max_epochs = cfg.max_epochs or self.train_config.max_epochs
        if data is None:
            data = self.task.make_data(seed=cfg.data_seed, root=cfg.data_root)
        self.data = data
        self.lifecycle = cfg.lifecycle if cfg.lifecycle is not None else LifecycleConfig()
        self.device = torch.device(cfg.device)
        # Slot config and blueprints come from a throwaway host: they fix the spaces. (Each
        # episode's blueprint costs come from its own model: `GrowthStepper.costs`.)
        probe = MorphogeneticModel(self.task.make_host(self.data), self._slots(), self.lifecycle)
        # The curriculum's tasks, one per drawn option set (built lazily, then cached);
        # every corner of the ranges is probed now, so a host without the env's slots
        # fails here, not mid-run.
        self._host_tasks: dict[tuple[tuple[str, int], ...], Any] = {}
        names = sorted(cfg.host_ranges)
        for corner in itertools.product(*(cfg.host_ranges[n] for n in names)):
            drawn = tuple(zip(names, corner, strict=True))
            try:
                MorphogeneticModel(self._task_for(drawn).make_host(self.data), self._slots())
            except Exception as err:  # re-raised with the drawn options
                raise ValueError(
                    f"host_ranges: the host with {dict(drawn)} cannot hold the env's slots "
                    f"{list(self._slots())}: {err}"
                ) from err
        self.slot_config: SlotConfig = probe.slot_config
        self.topology = probe.topology
        self.action_spec = ActionSpace(self.slot_config, blueprints_for(self.topology))
        self.host_params = probe.param_counts().host
        num_slots = self.slot_config.num_slots
        self.observation_space = gym.spaces.Dict(
            {
                "global": gym.spaces.Box(-1.0, 1.0, (GLOBAL_DIM,), np.float32),
                "slots": gym.spaces.Box(-1.0, 1.0, (num_slots, SLOT_DIM), np.float32),
            }
        )
        self.action_space = gym.spaces.MultiDiscrete(np.array(self.action_spec.head_sizes))
        self._initial_seed = seed
        self.model: MorphogeneticModel | None = None
        self.trainer: Trainer | None = None
        self.twin_trainer: Trainer | None = None  # reward_mode="twin": the static twin
        self.growth_penalty = cfg.growth_penalty  # this episode's λ
        self.episode_seed: int | None = None
        self.host_options: dict[str, int] = {}  # this episode's draw from host_ranges
        self.illegal_actions = 0
        self.growth: GrowthStepper | None = None  # this episode's (esper.env.growth_step)

    def _task_for(self, drawn: tuple[tuple[str, int], ...]):
        if not drawn:
            return self.task
        if drawn not in self._host_tasks:
            options = dict(self.config.task_options)
            if self.config.batches_per_step is not None:
                options["batches_per_step"] = self.config.batches_per_step
            self._host_tasks[drawn] = get_task(self.config.task, **{**options, **dict(drawn)})
        return self._host_tasks[drawn]

    def _draw_host_options(self) -> tuple[tuple[str, int], ...]:
        """This episode's host options: from the episode seed alone (a generator of
        its own, like λ's)."""
        ranges = self.config.host_ranges
        if not ranges:
            return ()
        rng = np.random.default_rng((self.episode_seed, 0x2C4D))
        return tuple((n, int(rng.integers(ranges[n][0], ranges[n][1] + 1))) for n in sorted(ranges))

    def _slots(self) -> tuple[str, ...]:
        return (
            tuple(self.config.slots) if self.config.slots is not None else self.task.default_slots
        )

    # -- Gymnasium API ---------------------------------------------------------------
    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        if options:
            raise ValueError(
                f"MorphogenesisEnv.reset takes no options, got {sorted(options)}; "
                "configure the env through its constructor (EnvConfig fields)"
            )
        if seed is None and self._initial_seed is not None:
            seed, self._initial_seed = self._initial_seed, None
        super().reset(seed=seed)
        self.episode_seed = int(self.np_random.integers(2**31 - 1))
        # Module initialisation draws from torch's global generator: fork it so that an
        # env's host and seeds depend on its own seeds only (not on other envs or calls).
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.episode_seed)
            self.host_options = dict(self._draw_host_options())
            host = self._task_for(tuple(sorted(self.host_options.items()))).make_host(self.data)
        twin_host = copy.deepcopy(host) if self.config.reward_mode == "twin" else None
        self.model = model = MorphogeneticModel(host, self.slot_config, self.lifecycle)
        self.trainer = Trainer(
            model, self.data, self.train_config, seed=self.episode_seed, device=self.device
        )
        result = self.trainer.validate(with_counterfactuals=False)
        self.illegal_actions = 0
        self.growth_penalty = self._draw_growth_penalty()
        self._twin_quality = float(result.quality)
        self.twin_trainer = None
        if twin_host is not None:
            twin = MorphogeneticModel(twin_host, self.slot_config, self.lifecycle)
            self.twin_trainer = Trainer(
                twin, self.data, self.train_config, seed=self.episode_seed, device=self.device
            )
            self._twin_quality = float(self.twin_trainer.validate(False).quality)
        space = self.action_spec
        self.growth = GrowthStepper(
            model,
            space,
            lambda: blueprint_cost_table(
                self.slot_config, space.blueprints, blends=space.blends, model=model
            ),
            max_steps=self.max_epochs,
            rewards=replace(self.reward_config, growth_penalty=self.growth_penalty),
            max_growth=self.config.max_growth,
            plateau_tolerance=self.train_config.plateau_tolerance,
            history=self.train_config.history,
            seed=self.episode_seed,  # germinated seeds' initialisation
        )
        # No training yet: the train-side features show the validation values.
        reading = Reading(
            result.val_loss, result.val_acc, result.val_loss, result.val_acc, result.quality,
            baseline=self._twin_quality,
        )  # fmt: skip
        obs = self.growth.start(reading)
        return _numpy(obs), self._info(self.growth.quality)

    def step(self, action):
        """One env step: `begin_step` (apply the action), `train_phase` (one step of host
        training, validation, credit, governor, lifecycle gates), `end_step` (reward and
        observation). A lockstep runner calls the three phases itself."""
        begun = self.begin_step(action)
        return self.end_step(begun, self.train_phase())

    # -- the phases of a step ----------------------------------------------------------
    def begin_step(self, action) -> BegunStep:
        """Parse and check ``action``, then apply it (an illegal one runs as WAIT)."""
        if self.trainer is None or self.growth is None:
            raise EpisodeOverError("call reset() before step()")
        if self.epoch >= self.max_epochs:
            raise EpisodeOverError(
                f"the episode ended after {self.max_epochs} steps; call reset() to start a new one"
            )
        chosen = self.parse_action(action)
        illegal = not self.conditional_masks().allows(chosen)
        if illegal:
            self.illegal_actions += 1
            chosen = FactoredAction.wait()
        changes = self.growth.apply(chosen, illegal=illegal)
        if chosen.op == LifecycleOp.GERMINATE:
            self.trainer.on_germinate(changes[0].slot_id)
        elif chosen.op == LifecycleOp.PRUNE:
            self.trainer.on_prune(changes[0].slot_id)
        elif chosen.op == LifecycleOp.FOSSILIZE and self._folds(changes[0].slot_id):
            # The fossil becomes part of the host's layers now (docs/ARCHITECTURE.md, The
            # growth core): later width seeds read its units, the slot can grow again,
            # and the masks see the wider layers (the stepper's cost table follows the
            # structure key).
            changes.append(self.trainer.fold(changes[0].slot_id).stage_change)
        return BegunStep(self.epoch, chosen, illegal, tuple(changes))

    def _folds(self, slot_id: str) -> bool:
        """Fold the seed ``slot_id`` just fossilized: asked for, and a width seed."""
        slot = self.model.slots[slot_id]  # type: ignore[union-attr]
        return (
            self.lifecycle.fold_on_fossilize
            and slot.holds_width
            and slot.stage == SeedStage.FOSSILIZED
        )

    def train_phase(
        self,
        trained: tuple[EvalTotals, dict[str, float], int] | None = None,
        validated: CounterfactualResult | None = None,
    ) -> StepResult:
        """`Trainer.train_step`; ``trained`` / ``validated``: its training phase and its
        validation already run for several envs at once (`esper.env.lockstep`)."""
        if self.trainer is None:
            raise EpisodeOverError("call reset() before step()")
        return self.trainer.train_step(trained=trained, validated=validated)

    def end_step(self, begun: BegunStep, result: StepResult):
        """The static twin's step, then reward, observation and info: the Gymnasium
        ``(obs, reward, terminated, truncated, info)`` of the step ``begun`` started."""
        if begun.epoch != self.epoch:
            raise ValueError(
                f"end_step got the step begun at epoch {begun.epoch}; this env is at "
                f"epoch {self.epoch}"
            )
        if self.twin_trainer is not None:
            twin_quality = float(self.twin_trainer.train_step().quality)
            if math.isfinite(twin_quality):  # else: no baseline change this step
                self._twin_quality = twin_quality
        reading = Reading(
            result.train_loss,
            result.train_acc,
            result.val_loss,
            result.val_acc,
            result.quality,
            grad_norms=result.seed_grad_norms,
            penalty=result.penalty,
            rollback=result.governor_event is not None,
            baseline=self._twin_quality,
        )
        observed = self.growth.observe(reading)  # type: ignore[union-attr]
        changes = begun.changes + result.stage_changes
        info = self._info(observed.quality)
        info.update(
            illegal_action=begun.illegal,
            executed_action=begun.action.as_tuple(),
            events=[_event(c.slot_id, c.source.name, c.target.name, c.reason) for c in changes],
            governor_event=None if result.governor_event is None else result.governor_event.reason,
            reward_parts=asdict(observed.reward),
            train_loss=float(result.train_loss),
            val_loss=float(result.val_loss),
            # This step's seed credit (what the lifecycle gates read): paired
            # validation-loss contributions, their standard errors, which are prospective.
            contributions=dict(result.contributions),
            contribution_se=dict(result.contribution_se),
            prospective=sorted(result.prospective),
        )
        reward = float(observed.reward.total)
        return _numpy(observed.observation), reward, False, bool(observed.last), info

    def action_masks(self) -> np.ndarray:
        """Flat per-head masks ``[4 + S + B + L]`` (bool), each head with >= 1 True."""
        return flat_masks(self.conditional_masks()).numpy()

    def conditional_masks(self) -> ActionMasks:
        """Exact conditional masks of the current state (what our own agent reads)."""
        if self.growth is None:
            raise EpisodeOverError("call reset() before asking for masks")
        return self.growth.masks()

    # -- helpers ---------------------------------------------------------------------
    @property
    def epoch(self) -> int:
        """Steps taken in this episode."""
        return 0 if self.growth is None else self.growth.steps

    @property
    def blueprint_costs(self) -> torch.Tensor:
        """This env's blueprint cost table ``[S, B]`` (rebuilt after structural changes)."""
        if self.growth is None:
            raise EpisodeOverError("call reset() before asking for costs")
        return self.growth.costs

    def parse_action(self, action) -> FactoredAction:
        """A `FactoredAction` from a MultiDiscrete sample, a 4-sequence or itself."""
        if isinstance(action, FactoredAction):
            values = action.as_tuple()
        else:
            array = np.asarray(action)
            if array.shape != (4,) or not np.issubdtype(array.dtype, np.integer):
                raise ActionIndexError(
                    f"action must be 4 integers (op, slot, blueprint, blend) within "
                    f"{list(self.action_spec.head_sizes)}, got {action!r}"
                )
            values = tuple(int(v) for v in array)
        return FactoredAction.from_indices(*values, space=self.action_spec)

    def budget_left(self) -> float:
        if self.growth is None:
            raise EpisodeOverError("call reset() before asking for the budget")
        return self.growth.budget_left()

    def _draw_growth_penalty(self) -> float:
        """This episode's λ: from the episode seed alone (a generator of its own, so the
        host, seeds and data order do not change when a range is set)."""
        bounds = self.config.growth_penalty_range
        if bounds is None:
            return self.config.growth_penalty
        rng = np.random.default_rng((self.episode_seed, 0x1A3B))
        return float(rng.uniform(bounds[0], bounds[1]))

    def _info(self, quality: float) -> dict[str, Any]:
        model, rewards = self.model, self.growth.rewards  # type: ignore[union-attr]
        return {
            "epoch": self.epoch,
            "quality": float(quality),
            "growth": model.growth_ratio(),
            "objective": rewards.objective(quality, model.growth_ratio()),
            "initial_objective": rewards.initial_objective,
            "growth_penalty": self.growth_penalty,
            # The static twin's quality (reward_mode="twin"; None otherwise).
            "twin_quality": self._twin_quality if self.twin_trainer is not None else None,
            "stages": {s.slot_id: s.stage.name for s in model.slot_states()},
            "illegal_actions": self.illegal_actions,
            "episode_seed": self.episode_seed,
            "host_options": dict(self.host_options),
            # Cumulative compute of this episode (esper.training.flops): training forward +
            # backward, and validation + counterfactual passes (the reset's one included).
            "flops": self.trainer.flops.total,
            "flops_train": self.trainer.flops.train,
            "flops_eval": self.trainer.flops.eval,
        }


@dataclass(frozen=True)
class BegunStep:
    """What `MorphogenesisEnv.begin_step` did: the action executed (WAIT for an illegal
    one) and its stage change."""

    epoch: int  # the env's epoch when the step began
    action: FactoredAction
    illegal: bool
    changes: tuple[StageChange, ...]


def _numpy(obs: Mapping[str, torch.Tensor]) -> dict[str, np.ndarray]:
    return {key: value.numpy() for key, value in obs.items()}


def _event(slot_id: str, source: str, target: str, reason: str) -> dict[str, str]:
    return {"slot_id": slot_id, "source": source, "target": target, "reason": reason}
