"""One growth step, shared by `MorphogenesisEnv` and `esper.grow.Grower`.

Both run the same cycle on a model with seed slots (an Esper host's
`MorphogeneticModel` or a user's `SlottedModel`)::

    measure -> record -> gates -> observe -> decide -> apply

* **measure** is the pluggable part. The env's `Trainer` trains one step and validates
  on its validation split; the `Grower` validates on the user's batches after the
  user's own training. Either turns what it saw into a `Reading`.
* **record + gates**: each seed's credit is recorded on the model and the lifecycle
  gates run (``model.step_epoch()``). The `Grower` calls `GrowthStepper.settle`; the
  env's `Trainer` does the same inside ``train_step``, because its governor decides
  between measuring and recording whether the step counts at all. Both read credit
  the same way (`esper.training.counterfactual`) and hold a seed whose reading is
  unknown: a NaN error gives NaN bounds, which pass no gate and trigger no prune.
* **observe**: `GrowthStepper.observe` turns the reading into the reward and the
  observation, from one `TrainingProgress` definition: λ and the budget, the step
  fraction, deltas against the previous step (the episode's baseline validation for
  the first), plateau and best quality, growth, budget left, the last op.
* **decide**: the env returns the observation and `GrowthStepper.masks` to its agent;
  the `Grower` asks its controller.
* **apply**: `GrowthStepper.apply` germinates (seed weights drawn under a forked RNG
  from the stepper's own generator), fossilizes or prunes, and returns the
  `StageChange`. Whoever owns the optimisers then syncs them.

Gradient-norm feature (one definition): the mean, over the optimiser steps since the
last observation, of the seed's gradient norm as the optimiser applies it (after
unscaling and clipping), ``||(||g_p||)_p||`` over the seed's parameters (`seed_grad_norm`);
0 for a seed that got no gradient. The `Trainer` reports it per training step; the
`Grower` reads it from a hook on the user's optimiser.

The blueprint cost table is the stepper's own (one per env) and is rebuilt whenever the
model's structure changes (`esper.training.flops.structure_key`: parameter shapes, each
slot's stage), so the masks stay exact after any germinate, prune, fossilize or fold.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from esper.actions import ActionMasks, ActionSpace, FactoredAction, LifecycleOp
from esper.env.masks import compute_action_masks
from esper.env.observations import TrainingProgress, build_observation
from esper.env.rewards import (
    RewardBreakdown,
    RewardConfig,
    RewardTracker,
    contribution_potential,
)
from esper.model import GrowableModel, SlotState, StageChange
from esper.training.flops import structure_key
from esper.training.signals import TrainingSignals
from esper.training.step import grad_norm


@dataclass(frozen=True)
class Reading:
    """What one measurement saw: everything the reward and the observation read besides
    the model's slot states."""

    train_loss: float
    train_accuracy: float
    val_loss: float
    val_accuracy: float
    quality: float  # val accuracy or -val loss; a non-finite one holds the last finite one
    grad_norms: Mapping[str, float] = field(default_factory=dict)  # slot id -> feature
    penalty: float = 0.0  # governor rollback penalty (subtracted from the reward)
    rollback: bool = False  # the governor rolled the model back this step
    baseline: float = 0.0  # the static twin's quality (reward mode "twin")


@dataclass(frozen=True)
class Observed:
    """What `GrowthStepper.observe` made of a reading."""

    observation: dict[str, Tensor]  # {"global": [G], "slots": [S, F]} float32
    reward: RewardBreakdown
    quality: float  # the quality the reward used (the last finite one)
    last: bool  # the step reached ``max_steps``


def seed_grad_norm(params: Iterable[torch.nn.Parameter]) -> Tensor | None:
    """Norm of a seed's gradients, ``||(||g_p||)_p||`` (None when it has none). Kept as a
    tensor so that summing it over steps needs no device sync."""
    grads = [p.grad for p in params if p.grad is not None]
    return grad_norm(grads) if grads else None  # the Trainer's feature, one formula


class GrowthStepper:
    """One episode of the growth step on one model: observation, reward, masks and
    actions. Build a new one per episode (the env does at every reset).

    ``cost_table()`` returns the ``[S, B]`` parameter cost of each blueprint of
    ``space`` in each slot (`esper.env.masks.blueprint_cost_table`); it is called again
    whenever the model's structure changed. ``seed`` seeds the generator that draws each
    germinated seed's initialisation seed.
    """

    def __init__(
        self,
        model: GrowableModel,
        space: ActionSpace,
        cost_table: Callable[[], Tensor],
        *,
        max_steps: int,
        rewards: RewardConfig,
        max_growth: float | None = None,
        plateau_tolerance: float = 1e-3,
        history: int = 20,
        seed: int = 0,
    ) -> None:
        if max_steps < 1:
            raise ValueError(f"max_steps must be >= 1, got {max_steps}")
        if max_growth is not None and not max_growth >= 0:
            raise ValueError(f"max_growth must be >= 0 or None, got {max_growth}")
        model.slot_config.check_matches(space.slot_config.slot_ids, what="the action space")
        self.model, self.space, self.max_steps = model, space, max_steps
        self.max_growth = max_growth
        self.reward_config = rewards
        self.rewards = RewardTracker(rewards)
        self.signals = TrainingSignals(history, plateau_tolerance)
        self.host_params = int(model.param_counts().host)
        self.param_budget = math.inf if max_growth is None else max_growth * self.host_params
        self.rng = np.random.default_rng(seed)
        self._cost_table = cost_table
        self._costs: Tensor | None = None
        self._cost_key: Hashable = None
        self.steps = 0  # observations made since `start`
        self.last_op: int | None = None  # op of the last applied action (None: none yet)
        self.last_illegal = False
        self.quality = math.nan  # last finite quality (the reward's and deltas' reference)
        self.val_loss = math.nan

    # -- budget, costs, masks ----------------------------------------------------------
    @property
    def growth_penalty(self) -> float:
        return self.reward_config.growth_penalty

    def budget_left(self) -> float:
        """Seed parameters that may still be added (``math.inf``: no budget)."""
        counts = self.model.param_counts()
        return self.param_budget - (counts.live_seeds + counts.fossils)

    def budget_left_fraction(self) -> float:
        if math.isinf(self.param_budget):
            return 1.0
        return max(self.budget_left(), 0.0) / max(self.param_budget, 1.0)

    @property
    def costs(self) -> Tensor:
        """This model's blueprint cost table ``[S, B]``, rebuilt after a structural change."""
        key = structure_key(self.model)  # type: ignore[arg-type]
        if self._costs is None or key != self._cost_key:
            self._costs, self._cost_key = self._cost_table(), key
        return self._costs

    def masks(self) -> ActionMasks:
        """Exact conditional masks of the model's current state."""
        return compute_action_masks(
            self.model.slot_states(),
            self.model.slot_config,
            self.costs,
            budget_left=self.budget_left(),
            fossilize_threshold=self.model.lifecycle.fossilize_threshold,
            num_blends=len(self.space.blends),
        )

    # -- the phases --------------------------------------------------------------------
    def start(self, reading: Reading) -> dict[str, Tensor]:
        """The episode's first observation, from a validation of the untrained model
        (``reading``'s train-side values: pass the validation values, nothing trained)."""
        self.quality, self.val_loss = float(reading.quality), float(reading.val_loss)
        growth = self.model.growth_ratio()
        self.rewards.reset(self.quality, growth, reading.baseline)
        progress = TrainingProgress(
            0,
            self.max_steps,
            reading.train_loss,
            reading.val_loss,
            reading.train_accuracy,
            reading.val_accuracy,
            growth=growth,
            budget_left_fraction=self.budget_left_fraction(),
            growth_penalty=self.growth_penalty,
            max_growth=self.max_growth,
        )
        return self._observation(progress, reading.grad_norms)

    def settle(
        self, contributions: Mapping[str, float], stderrs: Mapping[str, float]
    ) -> list[StageChange]:
        """Record each measured seed's credit (a NaN reading is 0.0 with a NaN error, as
        `esper.training.counterfactual` reads it: no gate passes, no prune fires), then
        run the lifecycle gates, as the env's `Trainer` does."""
        for sid, value in contributions.items():
            self.model.record_contribution(sid, value, stderrs.get(sid))
        return self.model.step_epoch()

    def observe(self, reading: Reading) -> Observed:
        """Reward and observation of the step just measured (after record and gates)."""
        self.steps += 1
        last = self.steps >= self.max_steps
        quality = reading.quality if math.isfinite(reading.quality) else self.quality
        states = self.model.slot_states()
        growth = self.model.growth_ratio()
        potential = contribution_potential(
            [s.stage for s in states],
            [s.contribution for s in states],
            self.reward_config.contribution_weight,
        )
        reward = self.rewards.step(
            quality, growth, penalty=reading.penalty, potential=potential, last=last,
            baseline=reading.baseline,
        )  # fmt: skip
        s = self.signals
        s.update(
            reading.train_loss,
            reading.train_accuracy,
            reading.val_loss,
            reading.val_accuracy,
            reading.quality,
        )
        progress = TrainingProgress(
            self.steps,
            self.max_steps,
            reading.train_loss,
            reading.val_loss,
            reading.train_accuracy,
            reading.val_accuracy,
            quality_delta=quality - self.quality,
            val_loss_delta=reading.val_loss - self.val_loss,
            gap_to_best_quality=max(s.best_quality - quality, 0.0),
            plateau_epochs=s.plateau_epochs,
            growth=growth,
            budget_left_fraction=self.budget_left_fraction(),
            governor_rollback=reading.rollback,
            last_op=self.last_op,
            last_action_illegal=self.last_illegal,
            growth_penalty=self.growth_penalty,
            max_growth=self.max_growth,
        )
        self.quality, self.val_loss = quality, float(reading.val_loss)
        observation = self._observation(progress, reading.grad_norms, states)
        return Observed(observation, reward, quality, last)

    def apply(self, action: FactoredAction, *, illegal: bool = False) -> list[StageChange]:
        """Execute a legal decision (``illegal``: it stands in for an illegal one, which
        the next observation reports); returns its stage change."""
        self.last_op, self.last_illegal = int(action.op), illegal
        if action.op == LifecycleOp.WAIT:
            return []
        model = self.model
        sid = model.slot_config.slot_id_for_index(action.slot)
        before = model.slot_state(sid).stage
        if action.op == LifecycleOp.GERMINATE:
            # The seed's initial weights depend on this stepper's generator only, not on
            # other envs or on the caller's use of torch's global generator.
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(int(self.rng.integers(2**31 - 1)))
                model.germinate(
                    sid, self.space.blueprints[action.blueprint], self.space.blends[action.blend]
                )
        elif action.op == LifecycleOp.FOSSILIZE:
            model.fossilize(sid)
        else:
            model.prune(sid, reason="policy")
        after = model.slot_state(sid).stage
        return [StageChange(sid, before, after, f"policy_{action.op.name.lower()}")]

    def _observation(
        self,
        progress: TrainingProgress,
        grad_norms: Mapping[str, float],
        states: Sequence[SlotState] | None = None,
    ) -> dict[str, Tensor]:
        states = self.model.slot_states() if states is None else states
        return build_observation(
            progress,
            states,
            host_params=self.host_params,
            blueprints=self.space.blueprints,
            grad_norms=[grad_norms.get(s.slot_id, 0.0) for s in states],
        )

    # -- resuming (the Grower saves where growth stands) ------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Episode state as primitives (``torch.load(weights_only=True)`` reads it)."""
        signals = {k: list(v) if isinstance(v, deque) else v for k, v in vars(self.signals).items()}
        return {
            "steps": self.steps,
            "last_op": self.last_op,
            "last_illegal": self.last_illegal,
            "quality": self.quality,
            "val_loss": self.val_loss,
            "rng": self.rng.bit_generator.state,
            "signals": signals,
            "rewards": {k: v for k, v in vars(self.rewards).items() if k != "config"},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.steps, self.last_op = int(state["steps"]), state["last_op"]
        self.last_illegal = bool(state["last_illegal"])
        self.quality, self.val_loss = float(state["quality"]), float(state["val_loss"])
        self.rng.bit_generator.state = state["rng"]
        for key, value in state["signals"].items():
            old = getattr(self.signals, key)
            setattr(
                self.signals,
                key,
                deque(value, maxlen=old.maxlen) if isinstance(old, deque) else value,
            )
        vars(self.rewards).update(state["rewards"])
