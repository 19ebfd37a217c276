"""Slot ids, injection specs and `SlotConfig`, the one source of truth for slot order.

A slot id is ``r{row}c{col}``: row is the parallel lane (0 for a sequential host),
column the depth position. Everything that carries per-slot data (observations,
masks, buffers, checkpoints) is ordered by a `SlotConfig` and checked against it by
ids, not by counts.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal, get_args

Topology = Literal["cnn", "transformer", "mlp"]
TOPOLOGIES: tuple[str, ...] = get_args(Topology)

# No leading zeros, so that format(parse(s)) == s for every accepted id.
_SLOT_ID = re.compile(r"r(0|[1-9][0-9]*)c(0|[1-9][0-9]*)")


class SlotIdError(ValueError):
    """A slot id is malformed, duplicated, or not offered where it was asked for."""


class SlotMismatchError(ValueError):
    """Two places that must agree on the ordered slot ids do not."""


def parse_slot_id(slot_id: str) -> tuple[int, int]:
    """Return ``(row, col)`` of a canonical id such as ``"r0c2"``."""
    match = _SLOT_ID.fullmatch(slot_id) if isinstance(slot_id, str) else None
    if match is None:
        raise SlotIdError(
            f"invalid slot id {slot_id!r}: expected 'r{{row}}c{{col}}' with non-negative "
            "integers without leading zeros, e.g. 'r0c0', 'r0c1', 'r1c0'"
        )
    return int(match.group(1)), int(match.group(2))


def format_slot_id(row: int, col: int) -> str:
    if not (isinstance(row, int) and isinstance(col, int)) or row < 0 or col < 0:
        raise SlotIdError(
            f"slot row and column must be integers >= 0, got row={row!r}, col={col!r}"
        )
    return f"r{row}c{col}"


def slot_sort_key(slot_id: str) -> tuple[int, int]:
    return parse_slot_id(slot_id)


def sort_slot_ids(slot_ids: Iterable[str]) -> tuple[str, ...]:
    """Canonical order: by (row, col). Stable, validates every id."""
    return tuple(sorted(slot_ids, key=slot_sort_key))


def _check_unique(slot_ids: Sequence[str]) -> None:
    seen: set[str] = set()
    for sid in slot_ids:
        if sid in seen:
            raise SlotIdError(f"duplicate slot id {sid!r} in {list(slot_ids)}")
        seen.add(sid)


@dataclass(frozen=True)
class InjectionSpec:
    """What a host offers at one slot."""

    slot_id: str
    channels: int
    topology: Topology
    position: float  # depth in [0, 1]: 0 = right after the input, 1 = just before the head

    def __post_init__(self) -> None:
        parse_slot_id(self.slot_id)
        if not isinstance(self.channels, int) or self.channels <= 0:
            raise ValueError(
                f"InjectionSpec {self.slot_id}: channels must be a positive int, "
                f"got {self.channels!r}"
            )
        if self.topology not in TOPOLOGIES:
            raise ValueError(
                f"InjectionSpec {self.slot_id}: unknown topology {self.topology!r}, "
                f"allowed: {', '.join(TOPOLOGIES)}"
            )
        if not 0.0 <= float(self.position) <= 1.0:
            raise ValueError(
                f"InjectionSpec {self.slot_id}: position must be in [0, 1], got {self.position!r}"
            )


@dataclass(frozen=True, eq=False)
class SlotConfig:
    """Ordered slot ids (canonical order), optionally with the host's spec for each.

    Two configs are equal when their ordered ids are equal; specs do not take part.
    """

    slot_ids: tuple[str, ...]
    specs: tuple[InjectionSpec, ...] = field(default=(), repr=False)

    def __post_init__(self) -> None:
        ids = tuple(self.slot_ids)
        object.__setattr__(self, "slot_ids", ids)
        if not ids:
            raise SlotIdError("a SlotConfig needs at least one slot id, got none")
        for sid in ids:
            parse_slot_id(sid)
        _check_unique(ids)
        if ids != sort_slot_ids(ids):
            raise SlotIdError(
                f"slot ids must be in canonical (row, col) order: got {list(ids)}, "
                f"expected {list(sort_slot_ids(ids))} (SlotConfig.from_ids sorts for you)"
            )
        specs = tuple(self.specs)
        object.__setattr__(self, "specs", specs)
        if specs and tuple(s.slot_id for s in specs) != ids:
            raise SlotMismatchError(
                f"specs {[s.slot_id for s in specs]} do not match slot ids {list(ids)}"
            )
        object.__setattr__(self, "_index", {sid: i for i, sid in enumerate(ids)})

    # -- construction -------------------------------------------------------------
    @classmethod
    def from_ids(cls, slot_ids: Iterable[str]) -> SlotConfig:
        ids = list(slot_ids)
        for sid in ids:
            parse_slot_id(sid)
        _check_unique(ids)
        return cls(sort_slot_ids(ids))

    @classmethod
    def for_grid(cls, rows: int, cols: int) -> SlotConfig:
        if not (isinstance(rows, int) and isinstance(cols, int)) or rows < 1 or cols < 1:
            raise SlotIdError(f"grid must have rows >= 1 and cols >= 1, got {rows!r}x{cols!r}")
        return cls(tuple(format_slot_id(r, c) for r in range(rows) for c in range(cols)))

    @classmethod
    def from_specs(
        cls, specs: Iterable[InjectionSpec], enabled: Iterable[str] | None = None
    ) -> SlotConfig:
        """The host's slots, or the subset ``enabled``, in canonical order."""
        specs = list(specs)
        if not specs:
            raise SlotIdError("the host offers no injection points")
        _check_unique([s.slot_id for s in specs])
        by_id = {s.slot_id: s for s in specs}
        offered = sort_slot_ids(by_id)
        if enabled is None:
            chosen = offered
        else:
            wanted = list(enabled)
            for sid in wanted:
                parse_slot_id(sid)
            _check_unique(wanted)
            unknown = [sid for sid in wanted if sid not in by_id]
            if unknown:
                raise SlotIdError(
                    f"slot {unknown[0]!r} is not offered by this host; "
                    f"available slots: {', '.join(offered)}"
                )
            chosen = sort_slot_ids(wanted)
        return cls(chosen, tuple(by_id[sid] for sid in chosen))

    # -- queries ------------------------------------------------------------------
    @property
    def num_slots(self) -> int:
        return len(self.slot_ids)

    def __len__(self) -> int:
        return len(self.slot_ids)

    def __iter__(self):
        return iter(self.slot_ids)

    def __contains__(self, slot_id: object) -> bool:
        return slot_id in self._index  # type: ignore[attr-defined]

    def index_of(self, slot_id: str) -> int:
        try:
            return self._index[slot_id]  # type: ignore[attr-defined]
        except KeyError:
            parse_slot_id(slot_id)
            raise SlotIdError(
                f"unknown slot {slot_id!r}; this config has: {', '.join(self.slot_ids)}"
            ) from None

    def slot_id_for_index(self, index: int) -> str:
        if not isinstance(index, int) or not 0 <= index < self.num_slots:
            raise IndexError(
                f"slot index {index!r} out of range: valid indices are 0..{self.num_slots - 1}"
            )
        return self.slot_ids[index]

    def spec_for(self, slot_id: str) -> InjectionSpec:
        i = self.index_of(slot_id)
        if not self.specs:
            raise ValueError(
                f"this SlotConfig carries no injection specs (built from ids only); "
                f"build it with SlotConfig.from_specs to ask about {slot_id!r}"
            )
        return self.specs[i]

    def channels_for(self, slot_id: str) -> int:
        return self.spec_for(slot_id).channels

    def check_matches(self, other: SlotConfig | Sequence[str], *, what: str = "other") -> None:
        """Raise `SlotMismatchError` naming both sides unless ``other`` has our ids in order."""
        other_ids = tuple(other.slot_ids if isinstance(other, SlotConfig) else other)
        if other_ids != self.slot_ids:
            raise SlotMismatchError(
                f"slot ids differ: expected {list(self.slot_ids)}, {what} has {list(other_ids)}"
            )

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, SlotConfig):
            return NotImplemented
        return self.slot_ids == other.slot_ids

    def __hash__(self) -> int:
        return hash(self.slot_ids)
