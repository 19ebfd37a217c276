"""Hand-written and baseline controllers.

Every controller has one interface, for one env::

    state = controller.initial_state()
    action, state = controller.act(observation, masks, state)

``observation`` is the env's ``{"global": [G], "slots": [S, F]}`` (NumPy arrays or
tensors, schema `esper.env.observations.DEFAULT_SCHEMA`), ``masks`` the env's
conditional `ActionMasks` (``env.conditional_masks()``), ``state`` whatever the
controller carries between steps (a frozen dataclass, or None). Start a new episode
with a fresh ``initial_state()``. The returned `FactoredAction` is always legal under
``masks``. Controllers read only the observation and the masks, so they drive any env
that produces them (single env, vector runner, an outside harness).

`PolicyController` is the one adapter from a trained policy (a batched `PPOAgent`) to
this interface; `esper.policies`, `esper.grow.Grower` and ``esper train shipped`` use it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any, Protocol

import numpy as np
import torch

from esper.actions import ActionMasks, ActionSpace, FactoredAction, LifecycleOp
from esper.env.observations import COUNTER_SCALE, DEFAULT_SCHEMA, DELTA_GAIN
from esper.env.observations import LAMBDA_SCALE as LAMBDA_SCALE_FOR_CONTROLLERS
from esper.lifecycle import LIVE_STAGES, SeedStage
from esper.model import blueprints_for
from esper.slots import TOPOLOGIES

Observation = Mapping[str, "np.ndarray | torch.Tensor"]


class Controller(Protocol):
    def initial_state(self) -> Any: ...

    def act(
        self, observation: Observation, masks: ActionMasks, state: Any
    ) -> tuple[FactoredAction, Any]: ...


def _legal(mask: torch.Tensor) -> list[int]:
    return torch.nonzero(mask.reshape(-1)).reshape(-1).tolist()


class PolicyController:
    """A trained agent (`esper.rl.PPOAgent`, or anything with its ``act`` /
    ``initial_hidden`` / ``slot_config`` / ``blueprints`` / ``blends``) as a one-env
    controller: its recurrent state is the controller's state. Argmax actions by
    default (sampled with ``deterministic=False``); the agent's observation statistics
    are never updated, so acting does not change the policy."""

    def __init__(self, agent: Any, deterministic: bool = True) -> None:
        self.agent, self.deterministic = agent, deterministic
        self.space = ActionSpace(agent.slot_config, agent.blueprints, agent.blends)

    def initial_state(self) -> Any:
        return self.agent.initial_hidden(1)

    def act(
        self, observation: Observation, masks: ActionMasks, state: Any
    ) -> tuple[FactoredAction, Any]:
        obs = {
            k: torch.as_tensor(observation[k], dtype=torch.float32).unsqueeze(0)
            for k in ("global", "slots")
        }
        step = self.agent.act(
            obs,
            ActionMasks.stack([masks]),
            state,
            self.deterministic,
            slot_ids=self.space.slot_config.slot_ids,
            update_normalizer=False,
        )
        indices = (int(v) for v in step.actions[0])
        return FactoredAction.from_indices(*indices, space=self.space), step.hidden


class ControllerBatch:
    """Per-env `Controller`s acting on lockstep batches: a vector env's ``[E, ...]``
    observation and per-env masks in, ``[E, 4]`` action indices out, each controller with
    its own state. The one adapter from controllers to a batched policy (scripted runs,
    the behaviour-cloning teacher). ``make(i)`` builds env i's controller."""

    def __init__(self, make: Callable[[int], Controller], num_envs: int) -> None:
        self.controllers = [make(i) for i in range(num_envs)]
        self.states = [c.initial_state() for c in self.controllers]

    def act(self, obs: Mapping[str, torch.Tensor], masks: Any) -> torch.Tensor:
        actions = []
        for i, controller in enumerate(self.controllers):
            single = {k: v[i] for k, v in obs.items()}
            action, self.states[i] = controller.act(single, masks[i], self.states[i])
            actions.append(action.as_tuple())
        return torch.tensor(actions, dtype=torch.long)


class StaticController:
    """Never grows the host: always WAIT (the no-growth baseline)."""

    def initial_state(self) -> None:
        return None

    def act(
        self, observation: Observation, masks: ActionMasks, state: None
    ) -> tuple[FactoredAction, None]:
        return FactoredAction.wait(), state


class RandomController:
    """Uniform at each head over what the conditional masks allow.

    The op is drawn uniformly among legal ops, then the slot among the slots legal for
    it, then blueprint and blend for that slot. (Uniform over the joint combinations
    would pick GERMINATE almost always, since it has S·B·L variants.)
    """

    def __init__(self, seed: int = 0) -> None:
        self._generator = torch.Generator().manual_seed(seed)

    def initial_state(self) -> None:
        return None

    def _pick(self, mask: torch.Tensor) -> int:
        options = _legal(mask)
        if not options:
            raise ValueError("RandomController got a mask row that allows nothing")
        return options[int(torch.randint(len(options), (1,), generator=self._generator))]

    def act(
        self, observation: Observation, masks: ActionMasks, state: None
    ) -> tuple[FactoredAction, None]:
        op = self._pick(masks.op)
        if op == LifecycleOp.WAIT:
            return FactoredAction.wait(), state
        slot = self._pick(masks.slot[op])
        if op != LifecycleOp.GERMINATE:
            return FactoredAction(LifecycleOp(op), slot), state
        blueprint = self._pick(masks.blueprint[slot])
        blend = self._pick(masks.blend)
        return FactoredAction(LifecycleOp.GERMINATE, slot, blueprint, blend), state


@dataclass(frozen=True)
class AlwaysGrowState:
    steps: int = 0


class AlwaysGrowController:
    """A fixed schedule that grows whenever it may (the growth baseline of issue 12).

    Each step, from step ``start`` on: FOSSILIZE the first slot where that is legal;
    else GERMINATE ``blueprint`` (an index of the blueprint head) with blend ``blend``
    into the first free slot where the masks allow it (shallowest first, deepest first
    with ``deep=True``); else WAIT. It never prunes; the lifecycle's own gates may.
    """

    def __init__(self, blueprint: int, start: int = 0, blend: int = 0, deep: bool = False):
        if min(blueprint, start, blend) < 0:
            raise ValueError(
                f"blueprint, start and blend must be >= 0, got {blueprint}, {start}, {blend}"
            )
        self.blueprint, self.start, self.blend, self.deep = blueprint, start, blend, deep

    def initial_state(self) -> AlwaysGrowState:
        return AlwaysGrowState()

    def act(
        self, observation: Observation, masks: ActionMasks, state: AlwaysGrowState
    ) -> tuple[FactoredAction, AlwaysGrowState]:
        step, state = state.steps, replace(state, steps=state.steps + 1)
        fossilizable = _legal(masks.slot[LifecycleOp.FOSSILIZE])
        if bool(masks.op[LifecycleOp.FOSSILIZE]) and fossilizable:
            return FactoredAction(LifecycleOp.FOSSILIZE, fossilizable[0]), state
        if step >= self.start and bool(masks.op[LifecycleOp.GERMINATE]):
            free = _legal(masks.slot[LifecycleOp.GERMINATE])
            for slot in reversed(free) if self.deep else free:
                if bool(masks.blueprint[slot][self.blueprint]) and bool(masks.blend[self.blend]):
                    action = FactoredAction(LifecycleOp.GERMINATE, slot, self.blueprint, self.blend)
                    return action, state
        return FactoredAction.wait(), state


@dataclass(frozen=True)
class HeuristicConfig:
    # Germinate once validation quality has not improved for this many steps.
    plateau_patience: int = 1
    # No germination in the first steps: the host's own early progress is not a plateau.
    warmup_steps: int = 1
    # At most this many seeds alive at once, so each seed's effect can be read cleanly.
    max_live_seeds: int = 1
    # Prune a live seed whose contribution is below this (validation-loss nats the seed
    # saves; negative = it hurts)...
    prune_below: float = -0.01
    # ...once it has spent this many steps in BLENDING/HOLDING (early estimates are noisy)
    prune_min_epochs: int = 1
    # ...or this many in TRAINING, where the contribution is only prospective and the
    # model's own blend gate gets the first say.
    training_patience: int = 4
    # Which free slot to germinate first: "deep" (most channels) or "shallow".
    slot_preference: str = "deep"
    # Steps without germinating after a prune (the heuristic's own embargo).
    embargo_steps: int = 2
    # Blend algorithm index used for every germination.
    blend: int = 0
    # Blueprints to germinate, best first: the first one the masks allow in the chosen
    # slot wins; names a host does not offer are skipped. Width seeds by default: a host
    # too narrow for its task gains most from more units (issue 12: growing digits
    # width 1 to width 2 is worth ~+0.09 objective). Empty, or none legal: rotate through
    # every blueprint.
    blueprint_preference: tuple[str, ...] = ("wide_x1", "wide_half", "wide_x2")
    # Underfitting rush (issue 12: growth one seed per plateau arrives too late to pay).
    # While the host underfits -- training accuracy below ``underfit_accuracy`` and not
    # ahead of validation accuracy by ``overfit_gap`` or more (no generalisation gap, so
    # more units, not regularisation, is what it lacks) -- germinate a width seed into
    # every free slot, one per step from the first step, ignoring the plateau trigger,
    # ``warmup_steps`` and ``max_live_seeds``. Width seeds preserve the function at birth
    # and the usual prune gate removes the harmful ones, so trying them in parallel is
    # cheap. ``underfit_accuracy = 0`` (the default) switches the rush off: plateau
    # growth only. 0.9 is the value measured (BENCHMARKS.md, issue 12): on digits width 1
    # it put the grown network on the static front and paid (+0.051 objective, SE
    # 0.020), on fashion-mnist it did worse than plateau growth (+0.009 vs +0.022);
    # paired against plateau growth neither difference is outside the noise, and it
    # costs 1.07-1.11x the from-scratch FLOPs, so it is not the default.
    underfit_accuracy: float = 0.0
    overfit_gap: float = 0.02
    # Width seeds the rush plants, best first (the first the masks allow in the slot);
    # a host offering none of them gets no rush, only plateau growth.
    underfit_blueprints: tuple[str, ...] = ("wide_x1", "wide_half", "wide_x2")
    # Which free slot the rush widens first. "shallow": on digits width 1 (8 training,
    # not evaluation, seeds) shallow-first ended at 0.928 accuracy, deep-first at 0.864
    # with more prunes, for the same final size.
    underfit_slot_preference: str = "shallow"

    def __post_init__(self) -> None:
        for name in ("slot_preference", "underfit_slot_preference"):
            if getattr(self, name) not in ("deep", "shallow"):
                raise ValueError(f"{name} must be 'deep' or 'shallow', got {getattr(self, name)!r}")
        names = (
            "plateau_patience",
            "warmup_steps",
            "prune_min_epochs",
            "training_patience",
            "embargo_steps",
        )
        for name in names:
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.max_live_seeds < 1:
            raise ValueError(f"max_live_seeds must be >= 1, got {self.max_live_seeds}")
        if not 0.0 <= self.underfit_accuracy <= 1.0:
            raise ValueError(f"underfit_accuracy must be in [0, 1], got {self.underfit_accuracy}")
        if not 0.0 <= self.overfit_gap <= 1.0:
            raise ValueError(f"overfit_gap must be in [0, 1], got {self.overfit_gap}")


@dataclass(frozen=True)
class HeuristicState:
    steps: int = 0
    cooldown: int = 0
    blueprint_cursor: int = 0  # next blueprint of the rotation


class HeuristicController:
    """Germinate on plateau (or widen an underfitting host at once), fossilize, prune.

    Each step, in this order:
    1. FOSSILIZE the first slot where the masks allow it (a HOLDING seed whose
       contribution is above the fossilize threshold).
    2. PRUNE the first live seed whose known contribution is below ``prune_below`` after
       ``prune_min_epochs`` in BLENDING/HOLDING (``training_patience`` in TRAINING); then
       hold germination for ``embargo_steps``.
    3. (Off by default.) GERMINATE a width seed (the first of ``underfit_blueprints``
       the masks allow) into the shallowest (``underfit_slot_preference``) free slot while the host
       underfits (training accuracy < ``underfit_accuracy`` and train − val accuracy
       < ``overfit_gap``) and the cooldown is over, whatever the plateau and the number
       of live seeds.
    4. GERMINATE when quality has plateaued for ``plateau_patience`` steps, fewer than
       ``max_live_seeds`` seeds are alive and the cooldown is over: the deepest (or
       shallowest) legal slot, the first of ``blueprint_preference`` that fits it, else
       the next blueprint of the rotation that fits it.
    5. Otherwise WAIT.

    Blueprint names come from ``blueprints`` (the action space's list) or, by default,
    from ``esper.model.blueprints_for`` of the slot's topology read from the
    observation: the list every Esper env uses.
    """

    def __init__(
        self, config: HeuristicConfig | None = None, blueprints: tuple[str, ...] | None = None
    ) -> None:
        self.config = config or HeuristicConfig()
        self.blueprints = blueprints
        s = DEFAULT_SCHEMA
        self._topology0 = s.slot_index(f"topology_{TOPOLOGIES[0]}")
        self._plateau = s.global_index("plateau_epochs")
        self._train_acc = s.global_index("train_accuracy")
        self._val_acc = s.global_index("val_accuracy")
        self._stage0 = s.slot_index("stage_dormant")
        self._contribution = s.slot_index("contribution")
        self._known = s.slot_index("contribution_known")
        self._epochs = s.slot_index("epochs_in_stage")

    def initial_state(self) -> HeuristicState:
        return HeuristicState()

    def act(
        self, observation: Observation, masks: ActionMasks, state: HeuristicState
    ) -> tuple[FactoredAction, HeuristicState]:
        cfg = self.config
        slots = torch.as_tensor(observation["slots"], dtype=torch.float32)
        glob = torch.as_tensor(observation["global"], dtype=torch.float32)
        stages = slots[:, self._stage0 : self._stage0 + len(SeedStage)].argmax(dim=1)
        state = replace(state, steps=state.steps + 1, cooldown=max(state.cooldown - 1, 0))

        fossilizable = _legal(masks.slot[LifecycleOp.FOSSILIZE])
        if bool(masks.op[LifecycleOp.FOSSILIZE]) and fossilizable:
            return FactoredAction(LifecycleOp.FOSSILIZE, fossilizable[0]), state

        # Contribution is stored as tanh(gain * c); compare on the same scale.
        threshold = math.tanh(DELTA_GAIN * cfg.prune_below)
        patience = torch.where(
            stages == int(SeedStage.TRAINING), cfg.training_patience, cfg.prune_min_epochs
        )
        epochs_needed = patience.clamp(max=COUNTER_SCALE) / COUNTER_SCALE - 1e-6
        harmful = (
            (slots[:, self._known] > 0.5)
            & (slots[:, self._contribution] < threshold)
            & (slots[:, self._epochs] >= epochs_needed)
            & masks.slot[LifecycleOp.PRUNE]
        )
        if bool(harmful.any()):
            slot = _legal(harmful)[0]
            return FactoredAction(LifecycleOp.PRUNE, slot), replace(
                state, cooldown=cfg.embargo_steps
            )

        germinable = _legal(masks.slot[LifecycleOp.GERMINATE])
        if not bool(masks.op[LifecycleOp.GERMINATE]):
            germinable = []
        train_acc, val_acc = float(glob[self._train_acc]), float(glob[self._val_acc])
        underfit = train_acc < cfg.underfit_accuracy and train_acc - val_acc < cfg.overfit_gap
        if underfit and state.cooldown == 0:
            blends = _legal(masks.blend)
            blend = cfg.blend if cfg.blend in blends else blends[0]
            deep_first = cfg.underfit_slot_preference == "deep"
            for slot in germinable[::-1] if deep_first else germinable:
                bp = self._first_named(slot, slots, masks.blueprint[slot], cfg.underfit_blueprints)
                if bp is not None:
                    return FactoredAction(LifecycleOp.GERMINATE, slot, bp, blend), state

        live = sum(SeedStage(s) in LIVE_STAGES for s in stages.tolist())
        plateau_steps = round(float(glob[self._plateau]) * COUNTER_SCALE)
        ready = (
            state.steps > cfg.warmup_steps
            and state.cooldown == 0
            and live < cfg.max_live_seeds
            and plateau_steps >= cfg.plateau_patience
        )
        if ready and germinable:
            slot = germinable[-1] if cfg.slot_preference == "deep" else germinable[0]
            legal_bps = masks.blueprint[slot]
            num_bps = legal_bps.numel()
            preferred = self._first_named(slot, slots, legal_bps, cfg.blueprint_preference)
            cursor = state.blueprint_cursor
            if preferred is not None:
                bp = preferred
            else:
                for k in range(num_bps):
                    bp = (cursor + k) % num_bps
                    if bool(legal_bps[bp]):
                        break
                cursor = (bp + 1) % num_bps
            blends = _legal(masks.blend)
            blend = cfg.blend if cfg.blend in blends else blends[0]
            action = FactoredAction(LifecycleOp.GERMINATE, slot, bp, blend)
            return action, replace(state, blueprint_cursor=cursor)
        return FactoredAction.wait(), state

    def _first_named(
        self, slot: int, slots: torch.Tensor, legal: torch.Tensor, wanted: tuple[str, ...]
    ) -> int | None:
        """Index of the first blueprint of ``wanted`` legal in ``slot`` (None: none is)."""
        names = self.blueprints
        if names is None:
            onehot = slots[slot, self._topology0 : self._topology0 + len(TOPOLOGIES)]
            if not bool(onehot.any()):
                return None
            names = blueprints_for(TOPOLOGIES[int(onehot.argmax())])
        if len(names) != legal.numel():
            return None  # not the action space these names describe: rotate instead
        for name in wanted:
            if name in names and bool(legal[names.index(name)]):
                return names.index(name)
        return None


# -- growth that finds the right size (issue 20) ------------------------------------------


def _unratio(r: float) -> float:
    """Inverse of the observation's ``x / (1 + x)``."""
    r = min(max(r, 0.0), 1.0 - 1e-6)
    return r / (1.0 - r)


def _unsquash(v: float, gain: float) -> float:
    """Inverse of the observation's ``tanh(gain * x)`` (saturated values clip)."""
    v = min(max(v, -1.0 + 1e-6), 1.0 - 1e-6)
    return math.atanh(v) / gain


@dataclass(frozen=True)
class RightSizeConfig:
    # Width blueprints to plant, best first (the first the masks allow in the slot).
    blueprints: tuple[str, ...] = ("wide_x1",)
    # Exchange rate between the seed's credit (validation-loss nats it saves) and the
    # objective's accuracy: a seed pays when credit >= nats_per_accuracy * λ * g_seed,
    # g_seed = its params / the host's params as built (its growth charge). 2.6 is the
    # ratio of the validation-loss gap to the accuracy gap between static digits hosts
    # of width 1 and 2 at the end of training, measured on training seeds
    # (bench/bench_rightsize.py --calibrate; BENCHMARKS.md, issue 20).
    nats_per_accuracy: float = 2.6
    # No seed is planted after this fraction of the episode: growth pays early only
    # (issue 20: widening at epoch 1-4 of 20 keeps ~92 % of width 2's gain, at 10 56 %).
    grow_until: float = 0.5
    # Steps a seed with a known credit may stay below its price before it is pruned.
    patience: int = 2
    # No seed is kept before this fraction of the episode: credit read early overstates
    # what a unit is worth at the end (the host catches up), so seeds wait, live, until
    # their credit is read later (give them the LifecycleConfig.max_hold_epochs to wait).
    # 0 = keep a seed as soon as it pays. Measured in BENCHMARKS.md (issue 20).
    settle_from: float = 0.0
    # Which free slot to widen first.
    slot_preference: str = "shallow"

    def __post_init__(self) -> None:
        if not self.blueprints:
            raise ValueError("RightSizeConfig.blueprints must name at least one blueprint")
        if not (math.isfinite(self.nats_per_accuracy) and self.nats_per_accuracy >= 0):
            raise ValueError(
                f"RightSizeConfig.nats_per_accuracy must be a finite number >= 0, got "
                f"{self.nats_per_accuracy!r}"
            )
        if not 0.0 <= self.settle_from <= 1.0:
            raise ValueError(
                f"RightSizeConfig.settle_from must be in [0, 1], got {self.settle_from!r}"
            )
        if not 0.0 <= self.grow_until <= 1.0:
            raise ValueError(
                f"RightSizeConfig.grow_until must be in [0, 1], got {self.grow_until!r}"
            )
        patience = self.patience
        if isinstance(patience, bool) or not isinstance(patience, int) or patience < 0:
            raise ValueError(f"RightSizeConfig.patience must be an int >= 0, got {patience!r}")
        if self.slot_preference not in ("deep", "shallow"):
            raise ValueError(
                f"RightSizeConfig.slot_preference must be 'deep' or 'shallow', got "
                f"{self.slot_preference!r}"
            )


@dataclass(frozen=True)
class RightSizeState:
    steps: int = 0
    live: frozenset[int] = frozenset()  # slots with a live seed at the last decision
    saturated: frozenset[int] = frozenset()  # slots where a seed did not pay: not retried
    kept: tuple[int, ...] = ()  # seeds kept so far, per slot (rounds of widening)


class RightSizeController:
    """Widen early where a unit pays for its λ-priced cost, stop where nothing does.

    Each step, in this order:
    1. FOSSILIZE the first live seed whose credit pays its price (credit c, the
       validation-loss nats it saves, >= ``nats_per_accuracy`` · λ · g_seed) where the
       masks allow it (the lifecycle's gate: significantly helpful).
    2. PRUNE the first seed whose credit has been known for ``patience`` steps in its
       stage and stays below its price; its slot is *saturated*: not widened again this
       episode. A slot whose seed the lifecycle pruned (timeout, harm) saturates too.
    3. GERMINATE the first width blueprint the masks allow into the free slot that is
       not saturated and has kept the fewest seeds (ties: shallowest first), while the
       episode is in its first ``grow_until``; with fold at fossilize a folded slot is
       free again, so a layer that paid grows another round once the others had theirs,
       each round priced at its own (larger) size.
    4. Otherwise WAIT.

    λ comes from the observation, so one controller serves every trade-off. Measured
    best (BENCHMARKS.md, issue 20) with the isolated lifecycle shortened to
    ``min_train_epochs=1, blend_epochs=1`` and ``fold_on_fossilize``: with
    ``width_joint`` the credit is a lesion of units the host co-adapted with, which
    overstates their worth and makes it overgrow.
    """

    def __init__(
        self, config: RightSizeConfig | None = None, blueprints: tuple[str, ...] | None = None
    ) -> None:
        self.config = config or RightSizeConfig()
        self.blueprints = blueprints
        s = DEFAULT_SCHEMA
        self._topology0 = s.slot_index(f"topology_{TOPOLOGIES[0]}")
        self._stage0 = s.slot_index("stage_dormant")
        self._contribution = s.slot_index("contribution")
        self._known = s.slot_index("contribution_known")
        self._epochs = s.slot_index("epochs_in_stage")
        self._seed_params = s.slot_index("seed_params")
        self._lambda = s.global_index("growth_penalty")
        self._fraction = s.global_index("epoch_fraction")

    def initial_state(self) -> RightSizeState:
        return RightSizeState()

    def act(
        self, observation: Observation, masks: ActionMasks, state: RightSizeState
    ) -> tuple[FactoredAction, RightSizeState]:
        cfg = self.config
        slots = torch.as_tensor(observation["slots"], dtype=torch.float32)
        glob = torch.as_tensor(observation["global"], dtype=torch.float32)
        stages = slots[:, self._stage0 : self._stage0 + len(SeedStage)].argmax(dim=1).tolist()
        live = frozenset(i for i, s in enumerate(stages) if SeedStage(s) in LIVE_STAGES)
        # A seed that was live and is gone without being kept was pruned by the
        # lifecycle: its layer did not pay either.
        lost = frozenset(
            i
            for i in state.live - live
            if SeedStage(stages[i]) in (SeedStage.PRUNED, SeedStage.EMBARGOED)
        )
        state = replace(state, steps=state.steps + 1, live=live, saturated=state.saturated | lost)
        lam = LAMBDA_SCALE_FOR_CONTROLLERS * _unratio(float(glob[self._lambda]))

        def credit(i: int) -> float | None:
            if float(slots[i, self._known]) < 0.5:
                return None
            return _unsquash(float(slots[i, self._contribution]), DELTA_GAIN)

        def price(i: int) -> float:
            return cfg.nats_per_accuracy * lam * _unratio(float(slots[i, self._seed_params]))

        fossilizable = set(_legal(masks.slot[LifecycleOp.FOSSILIZE]))
        if not bool(masks.op[LifecycleOp.FOSSILIZE]):
            fossilizable = set()
        if float(glob[self._fraction]) < cfg.settle_from:
            fossilizable = set()  # too early to read what a unit is worth
        for i in sorted(live):
            c = credit(i)
            if i in fossilizable and c is not None and c >= price(i):
                rounds = list(state.kept) + [0] * (len(stages) - len(state.kept))
                rounds[i] += 1
                kept = replace(state, kept=tuple(rounds), live=live - {i})
                return FactoredAction(LifecycleOp.FOSSILIZE, i), kept

        prunable = (
            set(_legal(masks.slot[LifecycleOp.PRUNE]))
            if bool(masks.op[LifecycleOp.PRUNE])
            else set()
        )
        waited = cfg.patience / COUNTER_SCALE - 1e-6
        for i in sorted(live & prunable):
            c = credit(i)
            if c is not None and c < price(i) and float(slots[i, self._epochs]) >= waited:
                pruned = replace(state, live=live - {i}, saturated=state.saturated | {i})
                return FactoredAction(LifecycleOp.PRUNE, i), pruned

        early = float(glob[self._fraction]) < cfg.grow_until
        if early and bool(masks.op[LifecycleOp.GERMINATE]):
            free = _legal(masks.slot[LifecycleOp.GERMINATE])
            free = [i for i in free if i not in state.saturated]
            if cfg.slot_preference == "deep":
                free = free[::-1]
            # A layer that already grew waits until every other layer had its round:
            # rounds of all-slot widening, the static front's way of getting wider.
            rounds = list(state.kept) + [0] * (len(stages) - len(state.kept))
            free.sort(key=lambda i: rounds[i])  # stable: the preference breaks ties
            blends = _legal(masks.blend)
            for i in free:
                bp = _first_blueprint(
                    self.blueprints, slots[i], self._topology0, masks.blueprint[i], cfg.blueprints
                )
                if bp is not None:
                    return FactoredAction(LifecycleOp.GERMINATE, i, bp, blends[0]), state
        return FactoredAction.wait(), state


def _first_blueprint(
    names: tuple[str, ...] | None,
    row: torch.Tensor,
    topology0: int,
    legal: torch.Tensor,
    wanted: tuple[str, ...],
) -> int | None:
    """Index of the first blueprint of ``wanted`` legal in a slot (None: none is); the
    names come from ``names`` or the slot's topology in its observation row."""
    if names is None:
        onehot = row[topology0 : topology0 + len(TOPOLOGIES)]
        if not bool(onehot.any()):
            return None
        names = blueprints_for(TOPOLOGIES[int(onehot.argmax())])
    if len(names) != legal.numel():
        return None
    for name in wanted:
        if name in names and bool(legal[names.index(name)]):
            return names.index(name)
    return None
