"""Telemetry: typed events, sinks (JSONL, CSV, TensorBoard) and run reports."""

from esper.telemetry.events import (
    CheckpointSaved,
    EpisodeEnded,
    EpisodeStep,
    Event,
    GovernorRollback,
    PPOUpdate,
    RunStarted,
    SeedFossilized,
    SeedGerminated,
    SeedPruned,
    SeedStageChanged,
    seed_event,
)
from esper.telemetry.sinks import Telemetry, read_events

__all__ = [
    "CheckpointSaved",
    "EpisodeEnded",
    "EpisodeStep",
    "Event",
    "GovernorRollback",
    "PPOUpdate",
    "RunStarted",
    "SeedFossilized",
    "SeedGerminated",
    "SeedPruned",
    "SeedStageChanged",
    "Telemetry",
    "read_events",
    "seed_event",
]
