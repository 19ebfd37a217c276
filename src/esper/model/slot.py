"""`SeedSlot`: one injection point, the seed living in it, and its lifecycle mechanics.

Forward rule (``h`` is the host activation at the slot, ``f`` the seed module):

- DORMANT / PRUNED / EMBARGOED: ``h``.
- GERMINATED / TRAINING: the seed learns *behind* the host. It reads ``h.detach()``
  and the output is ``h + (f - f.detach())``: the value is exactly ``h`` (so the host's
  function and its gradients are untouched) while the seed receives the task gradient
  as if it were fully switched on (straight-through). Outside autograd training the
  seed is not even run. The straight-through gradient is taken where the seed is off,
  so it never sees its own effect and keeps growing in one direction; with
  ``straight_through = False`` (the models' default, ``own_seed_pass``) the seed is
  hidden here and learns in a pass of its own instead (`esper.model.slotset`).
- BLENDING / HOLDING: ``h + α·f(h.detach())``. The identity path keeps every host layer
  learning; the detached input keeps a seed on probation from reshaping the host
  before it. ``gated`` blends multiply ``α`` by a learned per-channel gate
  ``sigmoid(logit)`` whose logits are seed parameters.
- FOSSILIZED: ``h + α·f(h)`` with ``α = 1``: the seed is part of the host and gradient
  flows through both paths.

A width seed (`esper.model.width`) follows the same rules on its fan-out term ``t``
instead of ``f``: `width_term` reads the block's width input (detached before
FOSSILIZED) and returns ``t - t.detach()`` (TRAINING), ``α·t`` or ``t`` (fossil), or None
where it adds nothing; `MorphogeneticModel` adds it where the host's site says.

An alpha override (a float per call, from the model's ``forward``) replaces the
whole multiplier, gate included: ``0.0`` switches the seed off, ``1.0`` fully on. It is
an argument, never stored, so concurrent evaluations cannot see each other's overrides.

All lifecycle state is kept as Python primitives and serialised through
``get_extra_state``; loading rebuilds the seed module from its blueprint id before the
seed's parameters are read (PyTorch loads a module's extra state before its children).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from esper.actions import BLEND_ALGORITHMS
from esper.lifecycle import SeedStage, check_transition, is_live
from esper.model.blueprints import UnknownBlueprintError, blueprints_for, get_blueprint
from esper.model.width import UnitSite, WidthSeed
from esper.slots import InjectionSpec

GATE_INIT_LOGIT = 2.0  # sigmoid(2) ≈ 0.88: a gated seed starts nearly fully open.
_SIGMOID_STEEPNESS = 10.0
_HAS_MODULE = frozenset(
    {
        SeedStage.GERMINATED,
        SeedStage.TRAINING,
        SeedStage.BLENDING,
        SeedStage.HOLDING,
        SeedStage.FOSSILIZED,
    }
)


class SlotStateError(ValueError):
    """A lifecycle operation is not allowed in the slot's current stage."""


@dataclass(frozen=True)
class LifecycleConfig:
    min_train_epochs: int = 2  # TRAINING epochs before the blend gate is checked
    max_train_epochs: int = 6  # still not passed the gate after this many -> auto prune
    blend_epochs: int = 3  # BLENDING epochs; alpha = k/blend_epochs in the k-th
    max_hold_epochs: int = 5  # HOLDING longer than this without FOSSILIZE -> auto prune
    embargo_epochs: int = 2  # epochs EMBARGOED before the slot is DORMANT again
    # Thresholds are in units of the recorded contribution c (the trainer records the
    # paired validation-loss contribution, nats, > 0 = the seed helps) and each gate
    # allows gate_z standard errors (se) of tolerance, in the direction that keeps a
    # seed from being blended, kept or pruned on noise:
    # - blend gate (TRAINING -> BLENDING): c + z*se >= blend_threshold, i.e. not
    #   significantly harmful. Blending is reversible (auto-prune, PRUNE), so a seed with
    #   no measurable effect yet gets its chance;
    # - FOSSILIZE legal: c - z*se >= fossilize_threshold, i.e. significantly helpful.
    #   A fossil is kept for good and paid for in parameters, so the benefit must be
    #   real; a seed that never shows it times out of HOLDING (max_hold_epochs);
    # - auto-prune (BLENDING/HOLDING): c + z*se < prune_threshold, i.e. significantly
    #   harmful; one noisy reading below the threshold no longer kills a seed.
    blend_threshold: float = 0.0
    fossilize_threshold: float = 0.0
    prune_threshold: float = 0.0
    # z = 2 (bench/bench_governor.py --gates, 615 readings of 161 blended seeds on
    # healthy digits runs): 30 readings would auto-prune and the seed's next reading
    # contradicts 1 of them (z = 0: 76 and 26, z = 1: 45 and 7, z = 3: 19 and 0), while
    # 488 of z = 0's 539 fossilize-legal readings stay legal. About 2.3 % one-sided false
    # alarms per reading for a seed of exactly zero effect.
    gate_z: float = 2.0
    # Fold a width seed into its host's layers as soon as it fossilizes (the env's
    # `Trainer.fold`: physically wider layers, optimiser state carried), so later width
    # seeds read its units and the slot can grow again. Only the owner of the optimisers
    # can fold (the env does; a user's `Grower` ignores this field). Measured in
    # BENCHMARKS.md ("Growth that finds the right size (issue 20)").
    fold_on_fossilize: bool = False
    # A width seed's fan-out is zero at birth, so it cannot change the function: with
    # ``width_joint`` it skips the quarantine, going from GERMINATED through TRAINING and
    # BLENDING to HOLDING (alpha 1) at germination, and trains with the host from its
    # first step (GradMax style). The gates still read its paired contribution: FOSSILIZE
    # is legal only when it is significantly helpful, it is auto-pruned when
    # significantly harmful or after ``max_hold_epochs``. Depth seeds keep the isolated
    # path. Measured in BENCHMARKS.md ("Growth that finds the right size (issue 20)").
    width_joint: bool = False

    def __post_init__(self) -> None:
        for name in ("fold_on_fossilize", "width_joint"):
            value = getattr(self, name)
            if not isinstance(value, bool):
                raise ValueError(f"LifecycleConfig.{name} must be a bool, got {value!r}")
        for name in ("min_train_epochs", "max_train_epochs", "blend_epochs"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"LifecycleConfig.{name} must be an int >= 1, got {value!r}")
        for name in ("max_hold_epochs", "embargo_epochs"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"LifecycleConfig.{name} must be an int >= 0, got {value!r}")
        if not (math.isfinite(self.gate_z) and self.gate_z >= 0):
            raise ValueError(
                f"LifecycleConfig.gate_z must be a finite number >= 0, got {self.gate_z!r}"
            )
        if self.max_train_epochs < self.min_train_epochs:
            raise ValueError(
                f"LifecycleConfig.max_train_epochs={self.max_train_epochs} must be >= "
                f"min_train_epochs={self.min_train_epochs}"
            )


@dataclass(frozen=True)
class StageChange:
    slot_id: str
    source: SeedStage
    target: SeedStage
    reason: str


@dataclass(frozen=True)
class SlotState:
    slot_id: str
    stage: SeedStage
    alpha: float  # schedule alpha (a gated seed is further scaled by its learned gate)
    epochs_in_stage: int
    blueprint: str | None
    blend: str | None
    seed_params: int
    contribution: float | None  # last recorded counterfactual / prospective value
    embargo_left: int  # epochs until DORMANT (0 unless PRUNED/EMBARGOED)
    topology: str
    channels: int
    position: float
    contribution_se: float | None = None  # standard error of `contribution` (None: exact)
    # What FOSSILIZE's gate compares with fossilize_threshold: contribution - gate_z * se.
    contribution_lower: float | None = None

    def __post_init__(self) -> None:
        # An exact contribution (no error) is its own lower bound, whatever gate_z is.
        if self.contribution_lower is None and self.contribution_se is None:
            object.__setattr__(self, "contribution_lower", self.contribution)


def check_alpha_overrides(
    overrides: Mapping[str, float] | None, check_slot: Callable[[str], object]
) -> dict[str, float]:
    """Slot id -> alpha in [0, 1] for one call; ``check_slot`` raises for an unknown id."""
    checked: dict[str, float] = {}
    for slot_id, value in (overrides or {}).items():
        check_slot(slot_id)
        alpha = float(value)
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha override for {slot_id} must be in [0, 1], got {value!r}")
        checked[slot_id] = alpha
    return checked


def blend_alpha(blend: str, progress: float) -> float:
    """Schedule value in [0, 1] at ``progress`` in [0, 1]; exactly 0 at 0 and 1 at 1."""
    progress = min(max(progress, 0.0), 1.0)
    if blend == "sigmoid":
        k = _SIGMOID_STEEPNESS

        def s(x: float) -> float:
            return 1.0 / (1.0 + math.exp(-k * (x - 0.5)))

        return (s(progress) - s(0.0)) / (s(1.0) - s(0.0))
    return progress  # linear; gated uses the linear ramp times its learned gate


class LearnedGate(nn.Module):
    """Per-channel gate ``sigmoid(logit)``; channels are dim 1 for CNN maps, else last."""

    def __init__(self, channels: int, channel_dim_last: bool) -> None:
        super().__init__()
        self.logit = nn.Parameter(torch.full((channels,), GATE_INIT_LOGIT))
        self.channel_dim_last = channel_dim_last

    def forward(self, f: Tensor) -> Tensor:
        g = torch.sigmoid(self.logit)
        return f * (g if self.channel_dim_last else g.view(-1, 1, 1))


class SeedSlot(nn.Module):
    def __init__(
        self,
        spec: InjectionSpec,
        lifecycle: LifecycleConfig,
        width_site: UnitSite | None = None,
        causal: bool = True,
        residual: bool = True,
    ) -> None:
        super().__init__()
        self.spec, self.lifecycle, self.width_site = spec, lifecycle, width_site
        # False: only width blueprints fit (a user's width site has no module output of
        # its own for a residual seed to transform).
        self.residual = bool(residual)
        # Token-mixing seeds of a sequence slot see only earlier tokens (a decoder's
        # slot: Esper's language host, the default for users' [N, T, D] outputs).
        self.causal = bool(causal)
        self.seed: nn.Module | None = None
        self.gate: LearnedGate | None = None
        # Follows .to(device/dtype) so rebuilt seeds land where the model lives.
        self.register_buffer("_anchor", torch.zeros(0), persistent=False)
        # False: a TRAINING seed is hidden from the forward entirely and learns only in
        # its own pass, `GrowableModel.seed_forward` (set through the model).
        self.straight_through = True
        self._reset(SeedStage.DORMANT)

    @property
    def slot_id(self) -> str:
        return self.spec.slot_id

    def _reset(self, stage: SeedStage) -> None:
        self.stage = stage
        self.alpha = 0.0
        self.epochs_in_stage = 0
        self.blend_step = 0
        self.blueprint: str | None = None
        self.blend: str | None = None
        self.contribution: float | None = None
        self.contribution_se: float | None = None
        self.embargo_left = 0
        self.seed, self.gate = None, None

    # -- forward ---------------------------------------------------------------------
    def forward(self, h: Tensor, alpha: float | None = None) -> Tensor:
        seed, stage = self.seed, self.stage
        if seed is None or stage not in _HAS_MODULE:
            return h
        if isinstance(seed, WidthSeed):
            raise SlotStateError(
                f"slot {self.slot_id} holds a width seed: its term comes from width_term"
            )
        h_in = h if stage == SeedStage.FOSSILIZED else h.detach()
        if alpha is not None:
            return h if alpha == 0.0 else h + alpha * seed(h_in)
        if stage in (SeedStage.GERMINATED, SeedStage.TRAINING):
            if not (self.straight_through and self.training and torch.is_grad_enabled()):
                return h
            f = seed(h_in)
            return h + (f - f.detach())
        f = seed(h_in)
        if self.gate is not None:
            f = self.gate(f)
        return h + self.alpha * f

    @property
    def holds_width(self) -> bool:
        return isinstance(self.seed, WidthSeed)

    def width_term(self, x: Tensor | None, alpha: float | None = None) -> Tensor | None:
        """A width seed's fan-out term from the block's width input ``x`` (see the
        module docstring); None when it adds nothing (no seed, seed off)."""
        seed, stage = self.seed, self.stage
        if not isinstance(seed, WidthSeed) or stage not in _HAS_MODULE or x is None:
            return None
        x_in = x if stage == SeedStage.FOSSILIZED else x.detach()
        if alpha is not None:
            return None if alpha == 0.0 else alpha * seed(x_in)
        if stage in (SeedStage.GERMINATED, SeedStage.TRAINING):
            if not (self.straight_through and self.training and torch.is_grad_enabled()):
                return None
            t = seed(x_in)
            return t - t.detach()
        u = seed.fan_in(x_in)
        if self.gate is not None:
            u = self.gate(u)
        return self.alpha * seed.fan_out(u)

    def unit_scale(self) -> Tensor:
        """Per-unit multiplier of a width seed's fan-out now: alpha times the gate."""
        if not isinstance(self.seed, WidthSeed):
            raise SlotStateError(f"slot {self.slot_id} holds no width seed")
        scale = torch.full((self.seed.units,), float(self.alpha), device=self._anchor.device)
        if self.gate is not None:
            scale = scale * torch.sigmoid(self.gate.logit.detach())
        return scale

    def seed_param_count(self, blueprint: str, blend: str | None = None) -> int | None:
        """Exact parameters of germinating ``blueprint`` here (gate included for the
        gated blend); None where the blueprint does not fit this slot."""
        if blueprint not in blueprints_for(self.spec.topology):
            return None
        bp = get_blueprint(self.spec.topology, blueprint)
        if not bp.is_width and not self.residual:
            return None
        if bp.is_width:
            if self.width_site is None:
                return None
            units = bp.units(self.width_site.units)
            count = self.width_site.param_count(units)
        else:
            units = self.spec.channels
            count = bp.param_count(units)  # type: ignore[misc]
        return count + (units if blend == "gated" else 0)

    # -- queries ---------------------------------------------------------------------
    def num_seed_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def can_germinate(self) -> bool:
        return self.stage == SeedStage.DORMANT

    def can_prune(self) -> bool:
        return is_live(self.stage)

    def contribution_bounds(self) -> tuple[float, float] | None:
        """``(c - z*se, c + z*se)`` with ``z = gate_z``; None while nothing is recorded.
        A NaN error gives NaN bounds: no gate passes and no auto-prune fires."""
        c = self.contribution
        if c is None:
            return None
        se = 0.0 if self.contribution_se is None else self.contribution_se
        margin = self.lifecycle.gate_z * se if self.lifecycle.gate_z > 0 else 0.0
        return c - margin, c + margin

    def can_fossilize(self) -> bool:
        bounds = self.contribution_bounds()
        return (
            self.stage == SeedStage.HOLDING
            and bounds is not None
            and bounds[0] >= self.lifecycle.fossilize_threshold
        )

    def state(self) -> SlotState:
        bounds = self.contribution_bounds()
        return SlotState(
            slot_id=self.slot_id,
            stage=self.stage,
            alpha=self.alpha,
            epochs_in_stage=self.epochs_in_stage,
            blueprint=self.blueprint,
            blend=self.blend,
            seed_params=self.num_seed_params(),
            contribution=self.contribution,
            embargo_left=self.embargo_left,
            topology=self.spec.topology,
            channels=self.spec.channels,
            position=self.spec.position,
            contribution_se=self.contribution_se,
            contribution_lower=None if bounds is None else bounds[0],
        )

    def _error(self, op: str, allowed: str) -> SlotStateError:
        extra = f" ({self.embargo_left} epochs of embargo left)" if self.embargo_left else ""
        return SlotStateError(
            f"cannot {op} slot {self.slot_id}: it is {self.stage.name}{extra}; "
            f"{op} is allowed only {allowed}"
        )

    # -- transitions -----------------------------------------------------------------
    def _move(self, target: SeedStage, reason: str) -> StageChange:
        source = self.stage
        check_transition(source, target, self.slot_id)
        self.stage, self.epochs_in_stage = target, 0
        return StageChange(self.slot_id, source, target, reason)

    def _build(self, blueprint: str, blend: str) -> None:
        bp = get_blueprint(self.spec.topology, blueprint)
        if bp.is_width:
            site = self._width_site(blueprint)
            module: nn.Module = site.build(bp.units(site.units))
            channels, last = module.units, site.unit_dim_last
        else:
            module = bp.build(self.spec.channels, causal=self.causal)
            channels, last = self.spec.channels, self.spec.topology != "cnn"
        gate = None
        if blend == "gated":
            gate = LearnedGate(channels, last)
        like = {"device": self._anchor.device, "dtype": self._anchor.dtype}
        # A new module starts in train mode: follow the slot (BatchNorm in width seeds).
        self.seed = module.to(**like).train(self.training)
        self.gate = gate.to(**like).train(self.training) if gate is not None else None

    def germinate(self, blueprint: str, blend: str = "linear") -> list[StageChange]:
        """DORMANT -> GERMINATED -> TRAINING in one call (GERMINATED is transient)."""
        if not self.can_germinate():
            raise self._error("germinate", "while DORMANT")
        if blend not in BLEND_ALGORITHMS:
            raise ValueError(
                f"unknown blend {blend!r} for slot {self.slot_id}; "
                f"allowed: {', '.join(BLEND_ALGORITHMS)}"
            )
        # Validate before any state changes.
        if get_blueprint(self.spec.topology, blueprint).is_width:
            self._width_site(blueprint)
        elif not self.residual:
            raise UnknownBlueprintError(
                f"residual blueprint {blueprint!r} does not fit slot {self.slot_id}: it is a "
                f"width site (only wide_* blueprints)"
            )
        changes = [self._move(SeedStage.GERMINATED, "germinate")]
        self._build(blueprint, blend)
        self.blueprint, self.blend = blueprint, blend
        changes.append(self._move(SeedStage.TRAINING, "germinated"))
        if self.lifecycle.width_joint and isinstance(self.seed, WidthSeed):
            # Zero fan-out: fully on is still the host's function (LifecycleConfig).
            changes.append(self._move(SeedStage.BLENDING, "joint_at_birth"))
            self._set_blend_step(self.lifecycle.blend_epochs)
            changes.append(self._move(SeedStage.HOLDING, "joint_at_birth"))
            self.alpha = 1.0
        return changes

    def _width_site(self, blueprint: str) -> UnitSite:
        if self.width_site is None:
            raise UnknownBlueprintError(
                f"width blueprint {blueprint!r} does not fit slot {self.slot_id}: its host "
                f"offers no width growth there"
            )
        return self.width_site

    def prune(self, reason: str = "policy") -> StageChange:
        if not self.can_prune():
            raise self._error("prune", "while GERMINATED, TRAINING, BLENDING or HOLDING")
        change = self._move(SeedStage.PRUNED, reason)
        self._reset(SeedStage.PRUNED)
        self.embargo_left = self.lifecycle.embargo_epochs
        return change

    def fossilize(self) -> StageChange:
        if not self.can_fossilize():
            if self.stage != SeedStage.HOLDING:
                raise self._error("fossilize", "while HOLDING")
            raise SlotStateError(
                f"cannot fossilize slot {self.slot_id}: contribution {self.contribution!r} "
                f"(standard error {self.contribution_se!r}, gate_z={self.lifecycle.gate_z}) is "
                f"not significantly above fossilize_threshold="
                f"{self.lifecycle.fossilize_threshold} (or unrecorded)"
            )
        return self._move(SeedStage.FOSSILIZED, "fossilize")

    def step_epoch(self) -> list[StageChange]:
        """Mechanical transitions after one epoch; see `GrowableModel.step_epoch`."""
        cfg, stage = self.lifecycle, self.stage
        bounds = self.contribution_bounds()
        upper = None if bounds is None else bounds[1]  # c + z*se: "not significantly below"
        if stage == SeedStage.DORMANT:
            return []
        if stage == SeedStage.PRUNED:
            changes = [self._move(SeedStage.EMBARGOED, "embargo")]
            self.embargo_left = cfg.embargo_epochs
            if self.embargo_left == 0:
                changes.append(self._move(SeedStage.DORMANT, "embargo_over"))
            return changes
        if stage == SeedStage.EMBARGOED:
            self.embargo_left = max(self.embargo_left - 1, 0)
            if self.embargo_left == 0:
                return [self._move(SeedStage.DORMANT, "embargo_over")]
            self.epochs_in_stage += 1
            return []
        self.epochs_in_stage += 1
        if stage == SeedStage.GERMINATED:
            return [self._move(SeedStage.TRAINING, "germinated")]
        if stage == SeedStage.TRAINING:
            if (
                self.epochs_in_stage >= cfg.min_train_epochs
                and upper is not None
                and upper >= cfg.blend_threshold
            ):
                change = self._move(SeedStage.BLENDING, "blend_gate_passed")
                self._set_blend_step(1)
                return [change]
            if self.epochs_in_stage >= cfg.max_train_epochs:
                return [self.prune("train_timeout")]
            return []
        if stage in (SeedStage.BLENDING, SeedStage.HOLDING):
            if upper is not None and upper < cfg.prune_threshold:
                return [self.prune("negative_contribution")]
            if stage == SeedStage.BLENDING:
                if self.blend_step >= cfg.blend_epochs:
                    change = self._move(SeedStage.HOLDING, "blend_done")
                    self.alpha = 1.0
                    return [change]
                self._set_blend_step(self.blend_step + 1)
                return []
            if self.epochs_in_stage > cfg.max_hold_epochs:
                return [self.prune("hold_timeout")]
        return []  # FOSSILIZED: terminal, only counts epochs

    def _set_blend_step(self, step: int) -> None:
        self.blend_step = step
        self.alpha = blend_alpha(self.blend or "linear", step / self.lifecycle.blend_epochs)

    # -- serialisation ---------------------------------------------------------------
    def get_extra_state(self) -> dict[str, Any]:
        return {
            "slot_id": self.slot_id,
            "topology": self.spec.topology,
            "channels": self.spec.channels,
            "stage": int(self.stage),
            "alpha": float(self.alpha),
            "epochs_in_stage": int(self.epochs_in_stage),
            "blend_step": int(self.blend_step),
            "blueprint": self.blueprint,
            "blend": self.blend,
            "contribution": None if self.contribution is None else float(self.contribution),
            "contribution_se": _opt_float(self.contribution_se),
            "embargo_left": int(self.embargo_left),
        }

    def set_extra_state(self, state: dict[str, Any]) -> None:
        mine = (self.slot_id, self.spec.topology, self.spec.channels)
        theirs = (state.get("slot_id"), state.get("topology"), state.get("channels"))
        if mine != theirs:
            raise SlotStateError(
                f"checkpoint slot (id, topology, channels)={theirs} does not match this "
                f"model's slot {mine}"
            )
        stage = SeedStage(int(state["stage"]))
        self._reset(stage)
        if stage in _HAS_MODULE:
            self._build(state["blueprint"], state["blend"])
            self.blueprint, self.blend = state["blueprint"], state["blend"]
        self.alpha = float(state["alpha"])
        self.epochs_in_stage = int(state["epochs_in_stage"])
        self.blend_step = int(state["blend_step"])
        contribution = state["contribution"]
        self.contribution = None if contribution is None else float(contribution)
        self.contribution_se = _opt_float(state.get("contribution_se"))  # absent: older files
        self.embargo_left = int(state["embargo_left"])


def _opt_float(value: float | None) -> float | None:
    return None if value is None else float(value)
