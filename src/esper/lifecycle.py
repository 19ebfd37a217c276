"""Seed lifecycle stages and the legal transitions between them (docs/ARCHITECTURE.md, Lifecycle).

DORMANT → GERMINATED → TRAINING → BLENDING → HOLDING → FOSSILIZED
   ↑                      │           │          │
   └── EMBARGOED ← PRUNED ←───────────┴──────────┘
"""

from __future__ import annotations

from enum import IntEnum


class SeedStage(IntEnum):
    DORMANT = 0
    GERMINATED = 1
    TRAINING = 2
    BLENDING = 3
    HOLDING = 4
    FOSSILIZED = 5
    PRUNED = 6
    EMBARGOED = 7


NUM_STAGES = len(SeedStage)

TRANSITIONS: dict[SeedStage, frozenset[SeedStage]] = {
    SeedStage.DORMANT: frozenset({SeedStage.GERMINATED}),
    SeedStage.GERMINATED: frozenset({SeedStage.TRAINING, SeedStage.PRUNED}),
    SeedStage.TRAINING: frozenset({SeedStage.BLENDING, SeedStage.PRUNED}),
    SeedStage.BLENDING: frozenset({SeedStage.HOLDING, SeedStage.PRUNED}),
    SeedStage.HOLDING: frozenset({SeedStage.FOSSILIZED, SeedStage.PRUNED}),
    SeedStage.FOSSILIZED: frozenset(),
    SeedStage.PRUNED: frozenset({SeedStage.EMBARGOED}),
    SeedStage.EMBARGOED: frozenset({SeedStage.DORMANT}),
}

# Stages in which a seed module exists and can still be pruned.
LIVE_STAGES = frozenset(
    {SeedStage.GERMINATED, SeedStage.TRAINING, SeedStage.BLENDING, SeedStage.HOLDING}
)


class IllegalTransitionError(ValueError):
    """A seed was asked to move between two stages that the lifecycle does not connect."""

    def __init__(self, source: SeedStage, target: SeedStage, slot_id: str | None = None):
        self.source, self.target, self.slot_id = SeedStage(source), SeedStage(target), slot_id
        allowed = ", ".join(s.name for s in sorted(TRANSITIONS[self.source])) or "none (terminal)"
        where = f"slot {slot_id}: " if slot_id else ""
        super().__init__(
            f"{where}illegal transition {self.source.name} → {self.target.name}; "
            f"from {self.source.name} the allowed targets are: {allowed}"
        )


def can_transition(source: SeedStage, target: SeedStage) -> bool:
    return SeedStage(target) in TRANSITIONS[SeedStage(source)]


def check_transition(source: SeedStage, target: SeedStage, slot_id: str | None = None) -> None:
    if not can_transition(source, target):
        raise IllegalTransitionError(source, target, slot_id)


def is_live(stage: SeedStage) -> bool:
    """A seed module exists in the slot and its fate is still open."""
    return SeedStage(stage) in LIVE_STAGES


def is_terminal(stage: SeedStage) -> bool:
    return not TRANSITIONS[SeedStage(stage)]


def is_available(stage: SeedStage) -> bool:
    """The slot can take a new seed now."""
    return SeedStage(stage) == SeedStage.DORMANT
