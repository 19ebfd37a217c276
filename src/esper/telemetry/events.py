"""Typed telemetry events. Each is a dataclass; its ``kind`` names it in ``events.jsonl``,
where every line also carries ``time`` (Unix seconds, written by the sink)."""

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
    episodes: int = 0  # the run's target (total over all envs)
    provenance: dict[str, Any] = field(default_factory=dict)  # see telemetry.provenance


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
class BaselineEpisodeEnded(EpisodeEnded):
    """An episode of the static host (no controller) on the seeds of round ``episode``:
    the learning curve's baseline. Not a training episode, so not in ``metrics.csv``."""

    kind: ClassVar[str] = "baseline_episode_ended"


@dataclass(frozen=True)
class RoundEnded(Event):
    """Timing of one round (one episode of every env; one PPO update for PPO)."""

    kind: ClassVar[str] = "round_ended"
    round: int
    episodes: int  # finished over the run so far
    env_steps: int  # in this round, over all envs
    wall_s: float  # rollout, update and checkpoint
    env_steps_per_s: float


@dataclass(frozen=True)
class RunFinished(Event):
    """The end of one session (a run resumed twice has three)."""

    kind: ClassVar[str] = "run_finished"
    rounds: int  # done over the run
    episodes: int
    rounds_this_session: int
    wall_s: float  # this session, start to end
    # training env steps of this session / the summed wall time of its rounds (the one
    # throughput definition: summary.md and the progress lines use it too)
    env_steps_per_s: float
    interrupted: bool = False


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
