"""Observation schema and builder (docs/ARCHITECTURE.md, Observation).

An observation is a global block ``[G]`` plus one row per slot ``[S, F]`` of the same
schema; ``F`` does not depend on ``S``, so one policy reads hosts with any slot count.
Every feature is scaled into [-1, 1] here (bounded maps such as ``x / (1 + x)`` and
``tanh``), so values are O(1) before any running normaliser and the Gymnasium space
can be a bounded Box.

The schema (feature names + version) is stored in agent checkpoints; a checkpoint whose
schema differs from the running code's is rejected by `ObservationSchema.check_matches`.
Bump `SCHEMA_VERSION` whenever a feature's meaning or scaling changes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from esper.actions import BLEND_ALGORITHMS, NUM_OPS, LifecycleOp
from esper.lifecycle import LIVE_STAGES, SeedStage
from esper.slots import TOPOLOGIES

SCHEMA_VERSION = 3
# v3 adds the trade-off the policy is asked to make: λ (growth_penalty) and the
# parameter budget (max_growth), so one checkpoint serves every trade-off.
# λ is read as λ / (λ + LAMBDA_SCALE): the default 0.05 maps to 0.5, 0 to 0.
LAMBDA_SCALE = 0.05
# max_growth is read as g / (1 + g); no budget (None) is an infinite budget, read as
# its limit 1.0 (the documented sentinel; every finite budget maps below 1).
NO_BUDGET_FEATURE = 1.0
# Blueprint one-hot width: fixed so that F does not change with the task's blueprint list.
# v2: 12 (was 8) to hold the width and depth-capacity blueprints.
MAX_BLUEPRINTS = 12
# Counters (epochs in stage, plateau) saturate here after scaling to [0, 1].
COUNTER_SCALE = 10.0
# Accuracy / contribution changes of a few points matter: tanh(10 * delta).
DELTA_GAIN = 10.0

GLOBAL_FEATURES: tuple[str, ...] = (
    "epoch_fraction",
    "train_loss",
    "val_loss",
    "train_accuracy",
    "val_accuracy",
    "quality_delta",
    "val_loss_delta",
    "gap_to_best_quality",
    "plateau_epochs",
    "growth",
    "budget_left",
    "growth_penalty",
    "max_growth",
    "live_fraction",
    "fossil_fraction",
    "dormant_fraction",
    "governor_rollback",
    *(f"last_op_{op.name.lower()}" for op in LifecycleOp),
    "last_action_illegal",
)

SLOT_FEATURES: tuple[str, ...] = (
    *(f"stage_{stage.name.lower()}" for stage in SeedStage),
    "alpha",
    "epochs_in_stage",
    "contribution",
    "contribution_known",
    "seed_params",
    "embargo_left",
    *(f"blueprint_{i}" for i in range(MAX_BLUEPRINTS)),
    *(f"blend_{name}" for name in BLEND_ALGORITHMS),
    *(f"topology_{name}" for name in TOPOLOGIES),
    "channels",
    "position",
    "grad_norm",
)

GLOBAL_DIM = len(GLOBAL_FEATURES)
SLOT_DIM = len(SLOT_FEATURES)


class SchemaMismatchError(ValueError):
    """A stored observation schema differs from the one this code builds."""


@dataclass(frozen=True)
class ObservationSchema:
    """Names and version of the observation features (what checkpoints store)."""

    version: int = SCHEMA_VERSION
    global_features: tuple[str, ...] = GLOBAL_FEATURES
    slot_features: tuple[str, ...] = SLOT_FEATURES

    @property
    def global_dim(self) -> int:
        return len(self.global_features)

    @property
    def slot_dim(self) -> int:
        return len(self.slot_features)

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "global_features": list(self.global_features),
            "slot_features": list(self.slot_features),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ObservationSchema:
        try:
            return cls(
                int(data["version"]),
                tuple(data["global_features"]),
                tuple(data["slot_features"]),
            )
        except (KeyError, TypeError, ValueError) as err:
            raise SchemaMismatchError(
                f"not an observation schema (needs version, global_features, slot_features): {err}"
            ) from None

    def check_matches(self, other: ObservationSchema, *, what: str = "checkpoint") -> None:
        """Raise `SchemaMismatchError` naming the first difference."""
        if other.version != self.version:
            hint = ""
            if other.version < 3 <= self.version:
                hint = (
                    " (v3 added the growth-penalty λ and parameter-budget inputs; rebuild "
                    "or retrain the policy)"
                )
            raise SchemaMismatchError(
                f"observation schema version differs: this code builds v{self.version}, "
                f"{what} has v{other.version}{hint}"
            )
        for block in ("global_features", "slot_features"):
            mine, theirs = getattr(self, block), getattr(other, block)
            if mine != theirs:
                raise SchemaMismatchError(
                    f"observation {block} differ: this code has {list(mine)}, "
                    f"{what} has {list(theirs)}"
                )

    def global_index(self, name: str) -> int:
        return _index(self.global_features, name, "global")

    def slot_index(self, name: str) -> int:
        return _index(self.slot_features, name, "slot")


def _index(names: tuple[str, ...], name: str, block: str) -> int:
    try:
        return names.index(name)
    except ValueError:
        raise KeyError(f"unknown {block} feature {name!r}; known: {', '.join(names)}") from None


DEFAULT_SCHEMA = ObservationSchema()


@dataclass(frozen=True)
class TrainingProgress:
    """Env-level facts the global block reads (raw values; the builder scales them)."""

    epoch: int
    max_epochs: int
    train_loss: float
    val_loss: float
    train_accuracy: float
    val_accuracy: float
    quality_delta: float = 0.0
    val_loss_delta: float = 0.0
    gap_to_best_quality: float = 0.0
    plateau_epochs: int = 0
    growth: float = 0.0
    budget_left_fraction: float = 1.0
    governor_rollback: bool = False
    last_op: int | None = None
    last_action_illegal: bool = False
    growth_penalty: float = 0.05  # λ of this episode's objective q − λ·g
    max_growth: float | None = None  # the parameter budget as a growth ratio; None = none


class SlotView(Protocol):
    """What a slot row reads (``esper.model.SlotState`` satisfies it)."""

    stage: SeedStage
    alpha: float
    epochs_in_stage: int
    blueprint: str | None
    blend: str | None
    seed_params: int
    contribution: float | None
    embargo_left: int
    topology: str
    channels: int
    position: float


def _ratio(x: float) -> float:
    """Non-negative quantity into [0, 1): x / (1 + x); NaN/inf saturate."""
    if not math.isfinite(x):
        return 1.0
    x = max(x, 0.0)
    return x / (1.0 + x)


def _squash(x: float, gain: float = 1.0) -> float:
    if math.isnan(x):
        return 0.0
    return math.tanh(gain * x)


def _counter(n: float) -> float:
    return min(max(n, 0.0), COUNTER_SCALE) / COUNTER_SCALE


def _clip01(x: float) -> float:
    return 0.0 if math.isnan(x) else min(max(x, 0.0), 1.0)


def global_features(progress: TrainingProgress, slots: Sequence[SlotView]) -> torch.Tensor:
    """The global block ``[GLOBAL_DIM]`` (float32, every value in [-1, 1])."""
    n = max(len(slots), 1)
    stages = [SeedStage(s.stage) for s in slots]
    last_op = [0.0] * NUM_OPS
    if progress.last_op is not None:
        last_op[int(progress.last_op)] = 1.0
    values = [
        _clip01(progress.epoch / max(progress.max_epochs, 1)),
        _ratio(progress.train_loss),
        _ratio(progress.val_loss),
        _clip01(progress.train_accuracy),
        _clip01(progress.val_accuracy),
        _squash(progress.quality_delta, DELTA_GAIN),
        _squash(progress.val_loss_delta),
        _squash(progress.gap_to_best_quality, DELTA_GAIN),
        _counter(progress.plateau_epochs),
        _ratio(progress.growth),
        _clip01(progress.budget_left_fraction),
        _ratio(progress.growth_penalty / LAMBDA_SCALE),
        NO_BUDGET_FEATURE if progress.max_growth is None else _ratio(progress.max_growth),
        sum(s in LIVE_STAGES for s in stages) / n,
        sum(s == SeedStage.FOSSILIZED for s in stages) / n,
        sum(s == SeedStage.DORMANT for s in stages) / n,
        float(progress.governor_rollback),
        *last_op,
        float(progress.last_action_illegal),
    ]
    return torch.tensor(values, dtype=torch.float32)


def slot_features(
    slots: Sequence[SlotView],
    *,
    host_params: int,
    blueprints: Sequence[str],
    grad_norms: Sequence[float] | None = None,
) -> torch.Tensor:
    """Per-slot rows ``[S, SLOT_DIM]`` (float32, every value in [-1, 1]).

    ``blueprints`` is the action space's ordered blueprint list (the one-hot follows its
    order); ``grad_norms`` the seeds' gradient norms from the last step (0 where none).
    """
    if len(blueprints) > MAX_BLUEPRINTS:
        raise ValueError(
            f"{len(blueprints)} blueprints exceed the observation's one-hot width "
            f"MAX_BLUEPRINTS={MAX_BLUEPRINTS}: {list(blueprints)}"
        )
    if grad_norms is not None and len(grad_norms) != len(slots):
        raise ValueError(f"got {len(grad_norms)} grad norms for {len(slots)} slots")
    rows = torch.zeros(len(slots), SLOT_DIM, dtype=torch.float32)
    bp_index = {name: i for i, name in enumerate(blueprints)}
    base = {
        "alpha": DEFAULT_SCHEMA.slot_index("alpha"),
        "blueprint": DEFAULT_SCHEMA.slot_index("blueprint_0"),
        "blend": DEFAULT_SCHEMA.slot_index(f"blend_{BLEND_ALGORITHMS[0]}"),
        "topology": DEFAULT_SCHEMA.slot_index(f"topology_{TOPOLOGIES[0]}"),
        "channels": DEFAULT_SCHEMA.slot_index("channels"),
    }
    # Column blocks follow SLOT_FEATURES: stage one-hot first (column = stage code), then
    # six scalars from "alpha", the one-hots, then channels / position / grad_norm.
    for i, s in enumerate(slots):
        row = rows[i]
        row[int(s.stage)] = 1.0
        known = s.contribution is not None and math.isfinite(float(s.contribution))
        row[base["alpha"] : base["alpha"] + 6] = torch.tensor(
            [
                _clip01(float(s.alpha)),
                _counter(s.epochs_in_stage),
                _squash(float(s.contribution), DELTA_GAIN) if known else 0.0,
                float(known),
                _ratio(s.seed_params / max(host_params, 1)),
                _counter(s.embargo_left),
            ]
        )
        if s.blueprint is not None and s.blueprint in bp_index:
            row[base["blueprint"] + bp_index[s.blueprint]] = 1.0
        if s.blend is not None and str(s.blend) in BLEND_ALGORITHMS:
            row[base["blend"] + BLEND_ALGORITHMS.index(str(s.blend))] = 1.0
        row[base["topology"] + TOPOLOGIES.index(s.topology)] = 1.0
        grad = grad_norms[i] if grad_norms is not None else 0.0
        # Channels: log2 scale, 2**10 = 1024 channels map to 1.
        row[base["channels"] : base["channels"] + 3] = torch.tensor(
            [_clip01(math.log2(max(s.channels, 1)) / 10.0), _clip01(s.position), _ratio(grad)]
        )
    return rows


def build_observation(
    progress: TrainingProgress,
    slots: Sequence[SlotView],
    *,
    host_params: int,
    blueprints: Sequence[str],
    grad_norms: Sequence[float] | None = None,
) -> dict[str, torch.Tensor]:
    """``{"global": [G], "slots": [S, F]}`` float32 tensors."""
    return {
        "global": global_features(progress, slots),
        "slots": slot_features(
            slots, host_params=host_params, blueprints=blueprints, grad_norms=grad_norms
        ),
    }
