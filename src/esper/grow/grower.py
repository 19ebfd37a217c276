"""`Grower`: runs a controller from inside the user's own training loop.

::

    slotted = attach(model, ["layer1", "layer2"], sample)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    grower = Grower(slotted, optimizer, val_data=val_batches)
    for epoch in range(epochs):
        train_one_epoch(slotted, optimizer)          # the user's code, unchanged
        grower.step(train_loss=..., val_loss=...)    # once per epoch (or any cadence)

Each ``step`` is one step of the growth step `MorphogenesisEnv` runs
(`esper.env.growth_step`), cut where the user's loop hands over: measure every seed's
contribution on the user's validation batches (one pass per seed, its alpha overridden
for that call only), record them, advance the lifecycle, build the env's observation
(λ = ``growth_penalty`` and the budget ``max_growth`` included) and masks, ask the
controller, apply its action. It emits the typed events of ``esper train``.
Contributions are paired per-sample validation-loss differences (> 0: the seed helps)
with a standard error that the lifecycle gates read (``LifecycleConfig.gate_z``): on a
few hundred samples one sample moves accuracy more than a young seed does; a NaN reading
holds the seed where it is. The seeds' gradient-norm feature is the env's: the mean over
the optimiser steps since the last growth step of each seed's gradient norm as the
optimiser applies it (read by a hook on the user's optimiser, after unscaling and
clipping). There is no governor here: rollbacks on a loss spike are the user's loop's
business.

Seed parameters join **the user's optimiser**, one param group per seed (tagged
``esper_slot``), added on germination and removed with their state on prune. A width
seed is folded into the model's own layers the step it is fossilized
(``GrowerConfig.fold``; `esper.model.fold`), the optimiser's state carried into the
widened tensors (`esper.training.surgery.carry_optimizer_state`) and its group dropped. Chosen over
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
import weakref
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from torch import Tensor

from esper.actions import ActionMasks, ActionSpace, FactoredAction
from esper.env.growth_step import GrowthStepper, Reading, seed_grad_norm
from esper.env.rewards import RewardConfig
from esper.grow.choices import cost_table, make_controller, offered_blueprints
from esper.lifecycle import SeedStage
from esper.model import GrowableModel, StageChange
from esper.telemetry import EpisodeEnded, EpisodeStep, RunStarted, Telemetry, seed_event
from esper.telemetry.events import SeedFossilized, SeedGerminated, SeedPruned, seed_event_class
from esper.training.counterfactual import PairedDiff, loss_contribution, variants_to_measure
from esper.training.objective import EvalTotals, quality
from esper.training.surgery import carry_optimizer_state

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
    # Blueprints offered (residual ones at depth points, wide_* at width sites); None =
    # all that fit the slots.
    blueprints: tuple[str, ...] | None = None
    # Fold a width seed into the model's own layers when it is fossilized (the layers
    # become physically wider; your optimiser's state is carried through the fold).
    fold: bool = True

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
    """Grows a model with seed slots at the points of the user's loop where ``step`` is
    called: the `SlottedModel` of `esper.grow.attach`, or an Esper `MorphogeneticModel`
    (whose TRAINING seeds learn only from ``seed_forward``'s loss, which the loop adds).

    ``val_data``: a re-iterable of ``(inputs, targets)`` batches (a list, a DataLoader);
    inputs may be a tensor or a tuple of positional arguments; the model's output must
    be logits ``[N, C]`` or ``[N, T, V]``. ``controller``: "heuristic" (default), "random",
    "static", a PPO checkpoint path, a `PPOAgent`, or any `Controller`. ``autocast``: a
    dtype to run the validation passes under ``torch.autocast`` (as your loop does).

    Construction validates the model once on ``val_data``: the baseline of the first
    step's deltas and reward, as the env's reset validation is. The env asks its agent
    for a decision at reset, before any training; here the first decision comes after
    your first epoch, so the one before it counts as a WAIT.
    """

    def __init__(
        self,
        model: GrowableModel,
        optimizer: torch.optim.Optimizer | None,
        val_data: Iterable[Any],
        controller: Any = "heuristic",
        config: GrowerConfig | None = None,
        telemetry: Telemetry | None = None,
        autocast: torch.dtype | None = None,
        run_name: str = "grow",
    ) -> None:
        if not isinstance(model, GrowableModel):
            raise TypeError(
                f"Grower needs a model with seed slots: the SlottedModel returned by "
                f"esper.grow.attach (or an Esper MorphogeneticModel), got {type(model).__name__}"
            )
        self.model, self.optimizer, self.val_data = model, optimizer, val_data
        self.config = cfg = config if config is not None else GrowerConfig()
        self.telemetry, self.autocast, self.run_name = telemetry, autocast, run_name
        self.controller, self.controller_name, agent = make_controller(
            controller, model, cfg.seed, cfg.deterministic
        )
        blueprints = offered_blueprints(model, cfg.blueprints)
        space = ActionSpace(model.slot_config, blueprints)
        if agent is not None:  # the policy's head order
            space = ActionSpace(model.slot_config, agent.blueprints, agent.blends)
        self.action_space = space
        self.growth = GrowthStepper(
            model,
            space,
            partial(cost_table, model, space.blueprints, space.blends),
            max_steps=cfg.max_steps,
            rewards=RewardConfig(growth_penalty=cfg.growth_penalty),
            max_growth=cfg.max_growth,
            plateau_tolerance=cfg.plateau_tolerance,
            seed=cfg.seed,  # germinated seeds' initialisation
        )
        self.state = self.controller.initial_state()
        self.counts = dict.fromkeys(("germinated", "fossilized", "pruned"), 0)
        self.episode_return = 0.0
        self._resumed = False
        # The gradient-norm feature (esper.env.growth_step): seeds' gradient norms summed
        # before each step of the user's optimiser, averaged at the next growth step.
        self._grad_sums: dict[str, Tensor] = {}
        self._optimizer_steps = 0
        if optimizer is not None:
            ref = weakref.ref(self)  # the hook must not keep a discarded Grower alive

            def before_optimizer_step(_opt: Any, _args: Any, _kwargs: Any) -> None:
                grower = ref()
                if grower is not None:
                    grower._add_seed_gradients()

            optimizer.register_step_pre_hook(before_optimizer_step)
        self._sync_param_groups()  # seeds of a loaded model join the optimiser at once
        live, _, _ = self.measure(credit=False)
        q = quality(cfg.kind, live.loss, live.accuracy)
        # Nothing trained yet: the train-side features show the validation values.
        self.growth.start(Reading(live.loss, live.accuracy, live.loss, live.accuracy, q))
        self.growth.apply(FactoredAction.wait())  # the decision before the first epoch

    @property
    def steps(self) -> int:
        """How many times `step` has run."""
        return self.growth.steps

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
            if group is not None and (
                not params or [id(p) for p in group["params"]] != [id(p) for p in params]
            ):
                for p in group["params"]:
                    opt.state.pop(p, None)
                opt.param_groups[:] = [g for g in opt.param_groups if g is not group]
                group = None
            if params and group is None:
                lr = self.config.seed_lr
                lr = opt.param_groups[0]["lr"] if lr is None else lr
                opt.add_param_group({"params": params, "lr": lr, "esper_slot": sid})

    def _fold_fossils(self, changes: list[StageChange]) -> list[StageChange]:
        """Fold each width seed fossilized just now into the model's layers, carrying the
        user's optimiser through it (`esper.training.surgery`): the fossil's param
        group's state moves into the widened host tensors, its group empties."""
        fold = getattr(self.model, "fold_in_place", None)
        if not self.config.fold or fold is None:
            return []
        out = []
        for change in changes:
            slot = self.model.slots[change.slot_id]
            if change.target == SeedStage.FOSSILIZED and slot.holds_width:
                plan = fold(change.slot_id)
                if self.optimizer is not None:
                    carry_optimizer_state(self.optimizer, plan)
                out.append(plan.stage_change)
        return out

    def _add_seed_gradients(self) -> None:
        self._optimizer_steps += 1
        for sid in self.model.slot_config:
            norm = seed_grad_norm(self.model.seed_parameters(sid))
            if norm is not None:
                total = self._grad_sums.get(sid)
                self._grad_sums[sid] = norm if total is None else total + norm

    def _take_grad_norms(self) -> dict[str, float]:
        """Each seed's mean gradient norm over the optimiser steps since the last growth
        step (none without an optimiser: its steps cannot be seen)."""
        n, sums = self._optimizer_steps, self._grad_sums
        self._grad_sums, self._optimizer_steps = {}, 0
        return {sid: float(total) / n for sid, total in sums.items()} if n else {}

    # -- measuring -------------------------------------------------------------------
    def _device(self) -> torch.device:
        anchor = next(iter(self.model.parameters()), None)
        return anchor.device if anchor is not None else torch.device("cpu")

    @torch.no_grad()
    def measure(self, credit: bool = True) -> tuple[EvalTotals, dict[str, float], dict[str, float]]:
        """Live validation totals and (with ``credit``) each measured seed's contribution,
        on the mean validation loss (> 0: the seed helps): ``loss(seed off) - loss(live)``
        for seeds with alpha > 0, ``loss(live) - loss(seed on)`` for seeds still TRAINING,
        paired per sample, with its standard error (as `esper.training.counterfactual`).
        A pass that produced NaN gives 0.0 with a NaN error, which holds the seed."""
        variants = variants_to_measure(self.model, self.config.measure_fossils) if credit else {}
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
            # The env's reading rule: a NaN reading is 0.0 with a NaN error (held by every
            # gate), a diverging variant is worth "a lot" (clipped), not an inf.
            contributions[sid], stderrs[sid] = loss_contribution(paired[sid], alpha)
        return live, contributions, stderrs

    # -- the step --------------------------------------------------------------------
    def budget_left(self) -> float:
        return self.growth.budget_left()

    def masks(self) -> ActionMasks:
        return self.growth.masks()

    def step(
        self,
        *,
        train_loss: float | None = None,
        train_metric: float | None = None,
        val_loss: float | None = None,
        val_metric: float | None = None,
    ) -> GrowthStep:
        """Measure, record, advance the lifecycle, observe, let the controller act (the
        growth step of `esper.env.growth_step`). Values you pass feed the controller's
        observation; the contributions always use ``val_data``."""
        if self.steps == 0 or self._resumed:
            self._emit(
                RunStarted(
                    self.run_name, self.controller_name, "user_model",
                    list(self.model.slot_config.slot_ids), 1, self.config.seed, self._resumed,
                )
            )  # fmt: skip
            self._resumed = False
        live, contributions, stderrs = self.measure()
        changes = self.growth.settle(contributions, stderrs)
        self._sync_param_groups()
        q = quality(self.config.kind, live.loss, live.accuracy)
        vl = live.loss if val_loss is None else float(val_loss)
        vm = live.accuracy if val_metric is None else float(val_metric)
        reading = Reading(
            vl if train_loss is None else float(train_loss),
            vm if train_metric is None else float(train_metric),
            vl,
            vm,
            q,
            grad_norms=self._take_grad_norms(),
        )
        observed = self.growth.observe(reading)
        action = self._decide(observed.observation)
        changes += self.growth.apply(action)
        changes += self._fold_fossils(changes)
        self._sync_param_groups()
        reward = float(observed.reward.total)
        self.episode_return += reward
        result = GrowthStep(
            self.steps - 1, action.describe(self.action_space), observed.quality, live.loss,
            self.model.growth_ratio(), reward, contributions, tuple(changes),
        )  # fmt: skip
        self._record(result, action)
        return result

    def _decide(self, observation: dict[str, Tensor]) -> FactoredAction:
        masks = self.growth.masks()
        action, self.state = self.controller.act(observation, masks, self.state)
        if not masks.allows(action):
            raise ValueError(
                f"controller {self.controller_name} chose an illegal action "
                f"{action.as_tuple()} (op, slot, blueprint, blend)"
            )
        return action

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
        Save it with the model's and the optimiser's state, right after a `step`, to
        resume growth later."""
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
            "episode_return": self.episode_return,
            "counts": dict(self.counts),
            "growth": self.growth.state_dict(),
            "controller": packed,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from `state_dict` (a Grower built on the reloaded model and optimiser)."""
        missing = [
            k for k in ("episode_return", "counts", "growth", "controller") if k not in state
        ]
        if missing:
            raise ValueError(
                f"not a Grower state of this Esper version: missing {missing}, has {sorted(state)}"
            )
        self.episode_return = float(state["episode_return"])
        self.counts = {k: int(v) for k, v in state["counts"].items()}
        self.growth.load_state_dict(state["growth"])
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
        q = self.growth.signals.quality
        event = EpisodeEnded(
            0, 0, self.episode_return, q, self.model.growth_ratio(),
            self.growth.rewards.objective(q, self.model.growth_ratio()),
            counts.live_seeds + counts.fossils, illegal=0, rollbacks=0, **self.counts,
        )  # fmt: skip
        self._emit(event)
        if self.telemetry is not None:
            self.telemetry.flush()
        return event
