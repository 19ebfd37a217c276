"""The factored action space: op → slot → blueprint → blend.

See docs/ARCHITECTURE.md, Actions and masks.

Head sizes derive from a `SlotConfig`, the blueprint list of the host's topology and
the blend list; nothing here fixes the number of slots.

Masks are *conditional*: ``slot[op]`` says which slots are legal for that op and
``blueprint[slot]`` which blueprints fit that slot (topology, budget). Rows that belong
to an irrelevant combination (the slot row of WAIT, the blueprint row of an occupied
slot) carry no meaning; consumers only read the rows the sampled op/slot select, and
heads that the op does not use (slot for WAIT, blueprint/blend unless GERMINATE) add no
log-probability and no entropy.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum, StrEnum

import torch

from esper.slots import SlotConfig


class LifecycleOp(IntEnum):
    WAIT = 0
    GERMINATE = 1
    FOSSILIZE = 2
    PRUNE = 3


NUM_OPS = len(LifecycleOp)


class BlendAlgorithm(StrEnum):
    LINEAR = "linear"
    SIGMOID = "sigmoid"
    GATED = "gated"


BLEND_ALGORITHMS: tuple[str, ...] = tuple(b.value for b in BlendAlgorithm)


class ActionIndexError(ValueError):
    """An action index lies outside its head's range."""


def op_uses_slot(op: int) -> bool:
    return op != LifecycleOp.WAIT


def op_uses_blueprint(op: int) -> bool:
    return op == LifecycleOp.GERMINATE


@dataclass(frozen=True)
class ActionSpace:
    """Sizes and names of the four heads."""

    slot_config: SlotConfig
    blueprints: tuple[str, ...]
    blends: tuple[str, ...] = BLEND_ALGORITHMS

    def __post_init__(self) -> None:
        object.__setattr__(self, "blueprints", tuple(self.blueprints))
        object.__setattr__(self, "blends", tuple(self.blends))
        if not self.blueprints:
            raise ValueError("an ActionSpace needs at least one blueprint")
        if len(set(self.blueprints)) != len(self.blueprints):
            raise ValueError(f"duplicate blueprint names in {list(self.blueprints)}")
        bad = [b for b in self.blends if b not in BLEND_ALGORITHMS]
        if bad or not self.blends:
            raise ValueError(
                f"unknown blend algorithm {bad[0] if bad else '(none given)'!r}; "
                f"allowed: {', '.join(BLEND_ALGORITHMS)}"
            )

    @property
    def num_slots(self) -> int:
        return self.slot_config.num_slots

    @property
    def head_sizes(self) -> tuple[int, int, int, int]:
        """(ops, slots, blueprints, blends): the ``nvec`` of a MultiDiscrete space."""
        return (NUM_OPS, self.num_slots, len(self.blueprints), len(self.blends))

    def blueprint_index(self, name: str) -> int:
        try:
            return self.blueprints.index(name)
        except ValueError:
            raise ValueError(
                f"unknown blueprint {name!r}; allowed: {', '.join(self.blueprints)}"
            ) from None

    def blend_index(self, name: str) -> int:
        try:
            return self.blends.index(str(name))
        except ValueError:
            raise ValueError(f"unknown blend {name!r}; allowed: {', '.join(self.blends)}") from None


@dataclass(frozen=True)
class FactoredAction:
    op: LifecycleOp
    slot: int = 0
    blueprint: int = 0
    blend: int = 0

    @classmethod
    def from_indices(
        cls, op: int, slot: int, blueprint: int, blend: int, space: ActionSpace
    ) -> FactoredAction:
        for head, value, size in zip(
            ("op", "slot", "blueprint", "blend"),
            (op, slot, blueprint, blend),
            space.head_sizes,
            strict=True,
        ):
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < size:
                raise ActionIndexError(
                    f"{head} index {value!r} out of range: allowed 0..{size - 1}"
                )
        return cls(LifecycleOp(op), slot, blueprint, blend)

    @classmethod
    def wait(cls) -> FactoredAction:
        return cls(LifecycleOp.WAIT)

    def as_tuple(self) -> tuple[int, int, int, int]:
        return (int(self.op), self.slot, self.blueprint, self.blend)

    def describe(self, space: ActionSpace) -> str:
        op = LifecycleOp(self.op)
        if op == LifecycleOp.WAIT:
            return "WAIT"
        slot_id = space.slot_config.slot_id_for_index(self.slot)
        if op == LifecycleOp.GERMINATE:
            return (
                f"GERMINATE {slot_id} {space.blueprints[self.blueprint]} {space.blends[self.blend]}"
            )
        return f"{op.name} {slot_id}"


@dataclass
class ActionMasks:
    """Conditional masks (bool tensors) for one env, or a batch with a leading dim.

    op:        [..., NUM_OPS]          op is legal somewhere
    slot:      [..., NUM_OPS, S]       slot legal for that op
    blueprint: [..., S, B]             blueprint legal in that slot (GERMINATE only)
    blend:     [..., L]                blend algorithm allowed
    """

    op: torch.Tensor
    slot: torch.Tensor
    blueprint: torch.Tensor
    blend: torch.Tensor

    def allows(self, action: FactoredAction) -> bool:
        """Whether an unbatched action is legal under these masks."""
        op = int(action.op)
        if not bool(self.op[op]):
            return False
        if op_uses_slot(op) and not bool(self.slot[op, action.slot]):
            return False
        if op_uses_blueprint(op):
            return bool(self.blueprint[action.slot, action.blueprint]) and bool(
                self.blend[action.blend]
            )
        return True

    def to(self, device: torch.device | str) -> ActionMasks:
        return ActionMasks(*(t.to(device) for t in self.as_tuple()))

    def as_tuple(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        return (self.op, self.slot, self.blueprint, self.blend)

    def as_dict(self) -> dict[str, torch.Tensor]:
        return dict(zip(("op", "slot", "blueprint", "blend"), self.as_tuple(), strict=True))

    @classmethod
    def stack(cls, masks: list[ActionMasks]) -> ActionMasks:
        return cls(*(torch.stack(ts) for ts in zip(*(m.as_tuple() for m in masks), strict=True)))

    def __getitem__(self, index) -> ActionMasks:
        return ActionMasks(*(t[index] for t in self.as_tuple()))
