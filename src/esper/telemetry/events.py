"""Typed telemetry events. Each is a dataclass; its ``kind`` names it in ``events.jsonl``."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar


@dataclass(frozen=True)
class Event:
    kind: ClassVar[str] = "event"

    def to_record(self) -> dict[str, Any]:
        return {"kind": self.kind, **dataclasses.asdict(self)}


@dataclass(frozen=True)
class RunStarted(Event):
    kind: ClassVar[str] = "run_started"
    run_name: str
    controller: str
    task: str
    slot_ids: list[str]
    num_envs: int
    seed: int
    resumed: bool = False


@dataclass(frozen=True)
class EpisodeStep(Event):
    """One controller decision after one host training step."""

    kind: ClassVar[str] = "episode_step"
    episode: int
    env: int
    step: int
    action: str
    op: str
    reward: float
    quality: float
    growth: float
    stages: list[str]
    illegal: bool = False


@dataclass(frozen=True)
class SeedStageChanged(Event):
    kind: ClassVar[str] = "seed_stage_changed"
    episode: int
    env: int
    step: int
    slot_id: str
    source: str
    target: str
    reason: str
    blueprint: str | None = None


@dataclass(frozen=True)
class SeedGerminated(SeedStageChanged):
    kind: ClassVar[str] = "seed_germinated"


@dataclass(frozen=True)
class SeedFossilized(SeedStageChanged):
    kind: ClassVar[str] = "seed_fossilized"


@dataclass(frozen=True)
class SeedPruned(SeedStageChanged):
    kind: ClassVar[str] = "seed_pruned"


def seed_event_class(source: str, target: str) -> type[SeedStageChanged]:
    """The most specific seed event for a stage change (a germination passes through
    GERMINATED at once, so it is recognised by its source DORMANT)."""
    if source == "DORMANT" or target == "GERMINATED":
        return SeedGerminated
    return {"FOSSILIZED": SeedFossilized, "PRUNED": SeedPruned}.get(target, SeedStageChanged)


def seed_event(**fields: Any) -> SeedStageChanged:
    return seed_event_class(fields["source"], fields["target"])(**fields)


@dataclass(frozen=True)
class GovernorRollback(Event):
    kind: ClassVar[str] = "governor_rollback"
    episode: int
    env: int
    step: int
    reason: str
    penalty: float


@dataclass(frozen=True)
class EpisodeEnded(Event):
    kind: ClassVar[str] = "episode_ended"
    episode: int
    env: int
    episode_return: float
    quality: float
    growth: float
    objective: float
    params_added: int
    germinated: int
    fossilized: int
    pruned: int
    illegal: int
    rollbacks: int
    # Compute spent training this episode's network, in FLOPs (esper.training.flops):
    # forward + backward on training samples, validation and counterfactual passes.
    train_flops: int = 0


@dataclass(frozen=True)
class PPOUpdate(Event):
    kind: ClassVar[str] = "ppo_update"
    update: int
    episodes: int
    diagnostics: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class CheckpointSaved(Event):
    kind: ClassVar[str] = "checkpoint_saved"
    path: str
    update: int
    episodes: int
    best: bool = False
