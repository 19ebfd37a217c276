"""`Grower`: runs a controller from inside the user's own training loop.

::

    slotted = attach(model, ["layer1", "layer2"], sample)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    grower = Grower(slotted, optimizer, val_data=val_batches)
    for epoch in range(epochs):
        train_one_epoch(slotted, optimizer)          # the user's code, unchanged
        grower.step(train_loss=..., val_loss=...)    # once per epoch (or any cadence)

Each ``step`` is one environment step of `esper.env.MorphogenesisEnv`, cut where the
user's loop hands over: measure every seed's contribution on the user's validation
batches (one pass per seed, its alpha overridden for that call only), record them,
advance the lifecycle, build the same observation and masks as the env, ask the
controller, apply its action. It emits the typed events of ``esper train``.
Contributions are paired per-sample validation-loss differences (> 0: the seed helps)
with a standard error that the lifecycle gates read (``LifecycleConfig.gate_z``): on a
few hundred samples one sample moves accuracy more than a young seed does. The seeds'
gradient norms in the observation are those the user's last backward left. There is no
governor here: rollbacks on a loss spike are the user's loop's business.

Seed parameters join **the user's optimiser**, one param group per seed (tagged
``esper_slot``), added on germination and removed with their state on prune. Chosen over
Esper's own per-seed optimisers because then the user's ``zero_grad``, ``GradScaler``
(unscale and inf-skip), accumulation and optimiser checkpoint all cover the seeds with
no extra call in the loop, and AMP stays correct (clipping covers them when it is given
``slotted.parameters()``). The price:
LR schedulers that store one base lr per group at construction (``LambdaLR``,
``OneCycleLR``) fail once a group is added; schedulers that update each group's current
lr (``StepLR``, ``ExponentialLR``, ``CosineAnnealingLR``) work.
"""

from __future__ import annotations

import dataclasses
import math
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from esper.actions import ActionMasks, ActionSpace, FactoredAction, LifecycleOp
from esper.env.masks import blueprint_cost_table, compute_action_masks
from esper.env.observations import TrainingProgress, build_observation
from esper.env.rewards import RewardConfig, RewardTracker
from esper.grow.attach import SlottedModel
from esper.grow.choices import make_controller, offered_blueprints, residual_cost
from esper.model import StageChange
from esper.telemetry import EpisodeEnded, EpisodeStep, RunStarted, Telemetry, seed_event
from esper.telemetry.events import SeedFossilized, SeedGerminated, SeedPruned, seed_event_class
from esper.training.counterfactual import PairedDiff, variants_to_measure
from esper.training.objective import EvalTotals, quality
from esper.training.signals import TrainingSignals

_KINDS = ("classification", "lm")


@dataclass(frozen=True)
class GrowerConfig:
    kind: str = "classification"  # quality = val accuracy; "lm": quality = -val loss (nats)
    max_steps: int = 20  # how many times you will call step(): a policy reads the fraction
    max_growth: float | None = None  # seed params <= max_growth * host params; None = no cap
    growth_penalty: float = 0.05  # λ of the objective q - λ·growth (rewards in telemetry)
    seed_lr: float | None = None  # lr of seed param groups; None = the first group's lr
    measure_fossils: bool = True  # also measure fossils' contributions (one pass each)
    deterministic: bool = True  # a PPO policy acts greedily (False: samples)
    seed: int = 0  # seeds the initialisation of germinated seeds
    plateau_tolerance: float = 1e-3  # quality gain below this counts as a plateau step
    # Blueprints offered (names of residual blueprints); None = all that fit the slots.
    blueprints: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.kind not in _KINDS:
            raise ValueError(f"unknown kind {self.kind!r}; allowed: {', '.join(_KINDS)}")
        if self.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1, got {self.max_steps}")
        if self.max_growth is not None and not self.max_growth >= 0:
            raise ValueError(f"max_growth must be >= 0 or None, got {self.max_growth}")


@dataclass(frozen=True)
class GrowthStep:
    """What one `Grower.step` measured and did."""

    step: int
    action: str  # e.g. "WAIT", "GERMINATE r0c1 conv_light linear"
    quality: float  # live validation quality on the grower's batches
    val_loss: float
    growth: float
    reward: float
    contributions: dict[str, float] = field(default_factory=dict)  # mean val loss, > 0 helps
    changes: tuple[StageChange, ...] = ()  # lifecycle moves, then the action's own


class Grower:
    """Grows a `SlottedModel` at the points of the user's loop where ``step`` is called.

    ``val_data``: a re-iterable of ``(inputs, targets)`` batches (a list, a DataLoader);
    inputs may be a tensor or a tuple of positional arguments; the model's output must
    be logits ``[N, C]`` or ``[N, T, V]``. ``controller``: "heuristic" (default), "random",
    "static", a PPO checkpoint path, a `PPOAgent`, or any `Controller`. ``autocast``: a
    dtype to run the validation passes under ``torch.autocast`` (as your loop does).
    """

    def __init__(
        self,
        model: SlottedModel,
        optimizer: torch.optim.Optimizer | None,
        val_data: Iterable[Any],
        controller: Any = "heuristic",
        config: GrowerConfig | None = None,
        telemetry: Telemetry | None = None,
        autocast: torch.dtype | None = None,
        run_name: str = "grow",
    ) -> None:
        if not isinstance(model, SlottedModel):
            raise TypeError(
                f"Grower needs the SlottedModel returned by esper.grow.attach, got "
                f"{type(model).__name__}"
            )
        self.model, self.optimizer, self.val_data = model, optimizer, val_data
        self.config = cfg = config if config is not None else GrowerConfig()
        self.telemetry, self.autocast, self.run_name = telemetry, autocast, run_name
        self.controller, self.controller_name, agent = make_controller(
            controller, model, cfg.seed, cfg.deterministic
        )
        blueprints = offered_blueprints(model, cfg.blueprints)
        if agent is not None:
            blueprints = tuple(agent.blueprints)  # the policy's head order
        self.action_space = ActionSpace(model.slot_config, blueprints)
        self.costs = blueprint_cost_table(model.slot_config, blueprints, residual_cost)
        self.host_params = model.param_counts().host
        self.param_budget = (
            math.inf if cfg.max_growth is None else cfg.max_growth * self.host_params
        )
        self.signals = TrainingSignals(plateau_tolerance=cfg.plateau_tolerance)
        self.rewards = RewardTracker(RewardConfig(growth_penalty=cfg.growth_penalty))
        self.state = self.controller.initial_state()
        self.steps = 0
        self.counts = dict.fromkeys(("germinated", "fossilized", "pruned"), 0)
        self.episode_return = 0.0
        self._last_op: int | None = None
        self._rng = np.random.default_rng(cfg.seed)
        self._resumed = False
        self._sync_param_groups()  # seeds of a loaded model join the optimiser at once

    # -- optimiser -------------------------------------------------------------------
    def _sync_param_groups(self) -> None:
        """One param group per seed module that exists; a gone seed's group is removed."""
        opt = self.optimizer
        if opt is None:
            return
        for sid in self.model.slot_config:
            params = [p for p in self.model.seed_parameters(sid) if p.requires_grad]
            # Found by tag each time: optimizer.load_state_dict replaces the group dicts.
            group = next((g for g in opt.param_groups if g.get("esper_slot") == sid), None)
            if group is not None and [id(p) for p in group["params"]] != [id(p) for p in params]:
                for p in group["params"]:
                    opt.state.pop(p, None)
                opt.param_groups[:] = [g for g in opt.param_groups if g is not group]
                group = None
            if params and group is None:
                lr = self.config.seed_lr
                lr = opt.param_groups[0]["lr"] if lr is None else lr
                opt.add_param_group({"params": params, "lr": lr, "esper_slot": sid})

    # -- measuring -------------------------------------------------------------------
    def _device(self) -> torch.device:
        anchor = next(iter(self.model.parameters()), None)
        return anchor.device if anchor is not None else torch.device("cpu")

    @torch.no_grad()
    def measure(self) -> tuple[EvalTotals, dict[str, float], dict[str, float]]:
        """Live validation totals and each measured seed's contribution, on the mean
        validation loss (> 0: the seed helps): ``loss(seed off) - loss(live)`` for seeds
        with alpha > 0, ``loss(live) - loss(seed on)`` for seeds still TRAINING, paired
        per sample, with its standard error (as `esper.training.counterfactual`)."""
        variants = variants_to_measure(self.model, self.config.measure_fossils)
        totals = {name: EvalTotals() for name in (None, *variants)}
        paired = {name: PairedDiff() for name in variants}
        device, was_training = self._device(), self.model.training
        self.model.eval()
        try:
            for batch in self.val_data:
                inputs, targets = batch
                args = inputs if isinstance(inputs, tuple) else (inputs,)
                args = tuple(a.to(device) if isinstance(a, Tensor) else a for a in args)
                targets = targets.to(device)
                live_losses = None
                for name in totals:  # live first
                    override = None if name is None else {name: variants[name]}
                    with torch.autocast(
                        device.type, dtype=self.autocast, enabled=self.autocast is not None
                    ):
                        out = self.model(*args, alpha_override=override)
                    if not isinstance(out, Tensor):
                        raise TypeError(
                            f"the model returned a {type(out).__name__}; the Grower reads "
                            "logits [N, C] or [N, T, V]"
                        )
                    losses = totals[name].add(out.float(), targets)
                    if name is None:
                        live_losses = losses
                    else:
                        paired[name].add(losses, live_losses)
        finally:
            self.model.train(was_training)
        live = totals[None]
        if live.count == 0:
            raise ValueError("val_data gave no batches (a one-shot generator? pass a list)")
        contributions, stderrs = {}, {}
        for sid, alpha in variants.items():
            mean, se = paired[sid].mean_and_se()
            c = mean if alpha == 0.0 else -mean
            contributions[sid] = 0.0 if math.isnan(c) else max(-1e6, min(1e6, c))
            stderrs[sid] = se if math.isfinite(se) else 1e6
        return live, contributions, stderrs

    def _grad_norms(self) -> list[float]:
        """Seeds' gradient norms left by the user's last backward (0 where none)."""
        norms = []
        for sid in self.model.slot_config:
            grads = [p.grad for p in self.model.seed_parameters(sid) if p.grad is not None]
            norms.append(
                float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])))
                if grads
                else 0.0
            )
        return norms

    # -- the step --------------------------------------------------------------------
    def budget_left(self) -> float:
        counts = self.model.param_counts()
        return self.param_budget - (counts.live_seeds + counts.fossils)

    def masks(self) -> ActionMasks:
        return compute_action_masks(
            self.model.slot_states(),
            self.model.slot_config,
            self.costs,
            budget_left=self.budget_left(),
            fossilize_threshold=self.model.lifecycle.fossilize_threshold,
            num_blends=len(self.action_space.blends),
        )

    def step(
        self,
        *,
        train_loss: float | None = None,
        train_metric: float | None = None,
        val_loss: float | None = None,
        val_metric: float | None = None,
    ) -> GrowthStep:
        """Measure, advance the lifecycle, let the controller act. Values you pass feed
        the controller's observation; the contributions always use ``val_data``."""
        if self.steps == 0 or self._resumed:
            self._emit(
                RunStarted(
                    self.run_name, self.controller_name, "user_model",
                    list(self.model.slot_config.slot_ids), 1, self.config.seed, self._resumed,
                )
            )  # fmt: skip
            self._resumed = False
        live, contributions, stderrs = self.measure()
        for sid, value in contributions.items():
            self.model.record_contribution(sid, value, stderrs[sid])
        changes = self.model.step_epoch()
        self._sync_param_groups()
        q = quality(self.config.kind, live.loss, live.accuracy)
        vl = live.loss if val_loss is None else float(val_loss)
        vm = live.accuracy if val_metric is None else float(val_metric)
        self.signals.update(
            vl if train_loss is None else float(train_loss),
            vm if train_metric is None else float(train_metric),
            vl,
            vm,
            q,
        )
        growth = self.model.growth_ratio()
        if self.steps == 0:
            self.rewards.reset(q, growth)
        reward = self.rewards.step(q, growth).total if math.isfinite(q) else 0.0
        action = self._decide(growth)
        changes += self._apply(action)
        self._sync_param_groups()
        self.episode_return += reward
        result = GrowthStep(
            self.steps, action.describe(self.action_space), q, live.loss,
            self.model.growth_ratio(), reward, contributions, tuple(changes),
        )  # fmt: skip
        self._record(result, action)
        self.steps += 1
        self._last_op = int(action.op)
        return result

    def _decide(self, growth: float) -> FactoredAction:
        s = self.signals
        progress = TrainingProgress(
            self.steps + 1,
            self.config.max_steps,
            s.train_loss,
            s.val_loss,
            s.train_acc,
            s.val_acc,
            quality_delta=s.delta_quality,
            val_loss_delta=s.delta_val_loss,
            gap_to_best_quality=max(s.best_quality - s.quality, 0.0),
            plateau_epochs=s.plateau_epochs,
            growth=growth,
            budget_left_fraction=(
                1.0
                if math.isinf(self.param_budget)
                else max(self.budget_left(), 0.0) / max(self.param_budget, 1.0)
            ),
            last_op=self._last_op,
        )
        obs = build_observation(
            progress,
            self.model.slot_states(),
            host_params=self.host_params,
            blueprints=self.action_space.blueprints,
            grad_norms=self._grad_norms(),
        )
        masks = self.masks()
        action, self.state = self.controller.act(obs, masks, self.state)
        if not masks.allows(action):
            raise ValueError(
                f"controller {self.controller_name} chose an illegal action "
                f"{action.as_tuple()} (op, slot, blueprint, blend)"
            )
        return action

    def _apply(self, action: FactoredAction) -> list[StageChange]:
        if action.op == LifecycleOp.WAIT:
            return []
        model = self.model
        sid = model.slot_config.slot_id_for_index(action.slot)
        before = model.slot_state(sid).stage
        if action.op == LifecycleOp.GERMINATE:
            # The seed's initial weights depend on the grower's seed only.
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(int(self._rng.integers(2**31 - 1)))
                model.germinate(
                    sid,
                    self.action_space.blueprints[action.blueprint],
                    self.action_space.blends[action.blend],
                )
        elif action.op == LifecycleOp.FOSSILIZE:
            model.fossilize(sid)
        else:
            model.prune(sid, reason="policy")
        after = model.slot_state(sid).stage
        return [StageChange(sid, before, after, f"policy_{action.op.name.lower()}")]

    # -- telemetry -------------------------------------------------------------------
    def _emit(self, event: Any) -> None:
        if self.telemetry is not None:
            self.telemetry.emit(event)

    def _record(self, result: GrowthStep, action: FactoredAction) -> None:
        kinds = {SeedGerminated: "germinated", SeedFossilized: "fossilized", SeedPruned: "pruned"}
        for c in result.changes:
            kind = kinds.get(seed_event_class(c.source.name, c.target.name))
            if kind is not None:
                self.counts[kind] += 1
        if self.telemetry is None:
            return
        stages = [s.stage.name for s in self.model.slot_states()]
        self._emit(
            EpisodeStep(
                0, 0, result.step, result.action, action.op.name, result.reward,
                result.quality, result.growth, stages,
            )
        )  # fmt: skip
        for c in result.changes:
            self._emit(
                seed_event(
                    episode=0, env=0, step=result.step, slot_id=c.slot_id,
                    source=c.source.name, target=c.target.name, reason=c.reason,
                    blueprint=self.model.slot_state(c.slot_id).blueprint,
                )
            )  # fmt: skip

    # -- resuming --------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Where growth stands, as tensors and primitives (``weights_only`` loads it).
        Save it with the model's and the optimiser's state to resume growth later."""
        signals = {k: list(v) if isinstance(v, deque) else v for k, v in vars(self.signals).items()}
        state = self.state
        if dataclasses.is_dataclass(state):
            packed: Any = {"dataclass": dataclasses.asdict(state)}
        elif isinstance(state, tuple) and all(isinstance(t, Tensor) for t in state):
            packed = {"tensors": list(state)}
        elif state is None:
            packed = None
        else:
            raise TypeError(
                f"cannot save controller state of type {type(state).__name__}; supported: "
                "a dataclass, a tuple of tensors, or None"
            )
        return {
            "steps": self.steps,
            "episode_return": self.episode_return,
            "counts": dict(self.counts),
            "last_op": self._last_op,
            "rng": self._rng.bit_generator.state,
            "signals": signals,
            "rewards": {k: v for k, v in vars(self.rewards).items() if k != "config"},
            "controller": packed,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from `state_dict` (a Grower built on the reloaded model and optimiser)."""
        self.steps, self.episode_return = int(state["steps"]), float(state["episode_return"])
        self.counts = {k: int(v) for k, v in state["counts"].items()}
        self._last_op = state["last_op"]
        self._rng.bit_generator.state = state["rng"]
        for key, value in state["signals"].items():
            old = getattr(self.signals, key)
            setattr(
                self.signals,
                key,
                deque(value, maxlen=old.maxlen) if isinstance(old, deque) else value,
            )
        vars(self.rewards).update(state["rewards"])
        packed, initial = state["controller"], self.controller.initial_state()
        if packed is None:
            self.state = initial
        elif "dataclass" in packed:
            self.state = type(initial)(**packed["dataclass"])
        else:
            self.state = tuple(packed["tensors"])
        self._resumed = True

    def finish(self) -> EpisodeEnded:
        """The growth run's summary (also emitted, so ``metrics.csv`` gets a row)."""
        counts = self.model.param_counts()
        q = self.signals.quality
        event = EpisodeEnded(
            0, 0, self.episode_return, q, self.model.growth_ratio(),
            self.rewards.objective(q, self.model.growth_ratio()),
            counts.live_seeds + counts.fossils, illegal=0, rollbacks=0, **self.counts,
        )  # fmt: skip
        self._emit(event)
        if self.telemetry is not None:
            self.telemetry.flush()
        return event
