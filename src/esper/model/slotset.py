"""`GrowableModel`: the one slot set behind Esper's hosts and users' models.

`esper.model.MorphogeneticModel` (a host built from blocks) and `esper.grow.SlottedModel`
(hooks on a user's own module) differ only in how a forward reaches the slots. What
they hold in common lives here, once: the seed slots by id (``slots``, in
``slot_config`` order), the lifecycle operations and gates, the contribution readings
the gates use, parameter counts and the growth ratio, and the rule for TRAINING seeds.
The trainer, the env and the `Grower` call only what this class defines (plus
``forward(..., alpha_override=...)``), so they work on either wrapper.

The rule for TRAINING seeds (``own_seed_pass``, default True), one for both wrappers: a
TRAINING seed is hidden from the value of ``forward``, from the host's gradients and
from its BatchNorm statistics; it learns from its *own pass*, ``seed_forward``: the
same inputs with every TRAINING seed fully on and the host and every other seed as
constants (parameters detached, the batch statistics that pass would write into their
buffers discarded). A loop that adds ``loss(seed_forward(x))`` to its task loss gives
each TRAINING seed exactly the gradient of the fully-on model. ``own_seed_pass = False``
is the older straight-through rule of `esper.model.slot` inside ``forward``, whose
gradient is taken where the seed is off (seeds feeding a BatchNorm diverge, BENCHMARKS
"TRAINING seeds learn in a pass of their own").
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from esper.lifecycle import SeedStage, is_live
from esper.model.slot import (
    LifecycleConfig,
    SeedSlot,
    SlotState,
    StageChange,
    check_alpha_overrides,
)
from esper.slots import SlotConfig, SlotIdError


@dataclass(frozen=True)
class ParamCounts:
    host: int
    live_seeds: int  # GERMINATED/TRAINING/BLENDING/HOLDING seeds, gates included
    fossils: int

    @property
    def total(self) -> int:
        return self.host + self.live_seeds + self.fossils


_LEARNING_BEHIND = (SeedStage.GERMINATED, SeedStage.TRAINING)


class GrowableModel(nn.Module):
    """A model with seed slots: the protocol the trainer, the env and the `Grower` use.

    A subclass sets ``slot_config`` and calls `_init_slots` in its ``__init__``, and
    defines ``forward(*inputs, alpha_override=None)`` (``alpha_override`` maps slot ids
    to the alpha of that call only: 0.0 = seed off, 1.0 = fully on), `host_parameters`
    and `seed_forward`. Lifecycle operations raise `SlotStateError` for a stage that does
    not allow them, `UnknownBlueprintError` for a blueprint the slot does not offer, and
    `SlotIdError` for an unknown slot id.
    """

    slot_config: SlotConfig
    lifecycle: LifecycleConfig
    slots: nn.ModuleDict  # slot id -> SeedSlot, in slot_config order

    def _init_slots(
        self, slots: Iterable[SeedSlot], lifecycle: LifecycleConfig, own_seed_pass: bool
    ) -> None:
        self.lifecycle = lifecycle
        self.slots = nn.ModuleDict({slot.slot_id: slot for slot in slots})
        if list(self.slots) != list(self.slot_config.slot_ids):
            raise ValueError(
                f"slots {list(self.slots)} are not in slot_config order "
                f"{list(self.slot_config.slot_ids)}"
            )
        self.own_seed_pass = own_seed_pass
        # The host as built: parameters a fold later moves into its layers stay growth.
        self.built_host_params = sum(p.numel() for p in self.host_parameters())

    # -- what each wrapper defines -----------------------------------------------------
    def host_parameters(self) -> list[nn.Parameter]:
        """The parameters of the model the seeds grow on (seeds excluded)."""
        raise NotImplementedError(f"{type(self).__name__} must define host_parameters()")

    def seed_forward(self, *inputs: Any, **kwargs: Any) -> Any:
        """The output with every TRAINING seed fully on, host as constants (None when no
        seed is TRAINING): the seeds' own pass (module docstring)."""
        raise NotImplementedError(f"{type(self).__name__} must define seed_forward()")

    # -- slots -------------------------------------------------------------------------
    def _slot(self, slot_id: str) -> SeedSlot:
        if slot_id not in self.slots:
            raise SlotIdError(
                f"unknown slot {slot_id!r}; this model's slots: {', '.join(self.slot_config)}"
            )
        return self.slots[slot_id]  # type: ignore[return-value]

    def _check_overrides(self, overrides: Mapping[str, float] | None) -> dict[str, float]:
        return check_alpha_overrides(overrides, self._slot)

    # -- seeds learning behind the host ------------------------------------------------
    @property
    def own_seed_pass(self) -> bool:
        """True (the default): TRAINING seeds are hidden from ``forward`` and learn from
        their own pass, `seed_forward`; False: straight-through inside ``forward``."""
        return not all(slot.straight_through for slot in self.slots.values())

    @own_seed_pass.setter
    def own_seed_pass(self, value: bool) -> None:
        if not isinstance(value, bool):
            raise TypeError(f"own_seed_pass must be True or False, got {value!r}")
        for slot in self.slots.values():
            slot.straight_through = not value

    def training_seeds(self) -> list[str]:
        """Slots whose seed is GERMINATED or TRAINING (learning behind the host)."""
        return [
            sid
            for sid, slot in self.slots.items()
            if slot.seed is not None and slot.stage in _LEARNING_BEHIND
        ]

    def own_pass_state(self, training: Iterable[str]) -> dict[str, Tensor]:
        """What `torch.func.functional_call` swaps in for the seeds' own pass: every
        parameter but the ``training`` seeds' detached, every buffer but theirs cloned
        (the pass's BatchNorm statistics land in the clones and are dropped)."""
        own = tuple(f"slots.{sid}." for sid in training)
        state: dict[str, Tensor] = {
            name: p.detach() for name, p in self.named_parameters() if not name.startswith(own)
        }
        state.update(
            (name, b.clone()) for name, b in self.named_buffers() if not name.startswith(own)
        )
        return state

    # -- lifecycle -------------------------------------------------------------------
    def germinate(self, slot_id: str, blueprint: str, blend: str = "linear") -> list[StageChange]:
        """Plant a seed; the slot goes DORMANT -> GERMINATED -> TRAINING at once."""
        return self._slot(slot_id).germinate(blueprint, blend)

    def seed_param_count(
        self, slot_id: str, blueprint: str, blend: str | None = None
    ) -> int | None:
        """Exact parameters ``germinate(slot_id, blueprint, blend)`` would add (the gate
        of the gated blend included); None where the blueprint does not fit the slot."""
        return self._slot(slot_id).seed_param_count(blueprint, blend)

    def prune(self, slot_id: str, reason: str = "policy") -> StageChange:
        return self._slot(slot_id).prune(reason)

    def fossilize(self, slot_id: str) -> StageChange:
        return self._slot(slot_id).fossilize()

    def record_contribution(self, slot_id: str, value: float, stderr: float | None = None) -> None:
        """Latest counterfactual (BLENDING/HOLDING/FOSSILIZED) or prospective (TRAINING)
        contribution (> 0: the seed helps) and its standard error (None: exact); the
        gates of `step_epoch` and `can_fossilize` read both (`LifecycleConfig.gate_z`).
        A NaN (the trainer's marker for a stale reading) passes no gate and triggers no
        prune; a negative standard error is an error."""
        slot = self._slot(slot_id)
        if stderr is not None and float(stderr) < 0:  # NaN compares False: accepted
            raise ValueError(f"stderr of slot {slot_id}'s contribution must be >= 0, got {stderr}")
        slot.contribution = float(value)
        slot.contribution_se = None if stderr is None else float(stderr)

    def step_epoch(self) -> list[StageChange]:
        """Apply the mechanical transitions once per growth step, in slot order.

        TRAINING -> BLENDING after ``min_train_epochs`` if contribution + z*se >=
        ``blend_threshold``, else PRUNED after ``max_train_epochs``; BLENDING ramps alpha
        (k/blend_epochs in its k-th epoch, then HOLDING at alpha 1); BLENDING/HOLDING
        with contribution + z*se < ``prune_threshold`` or HOLDING beyond
        ``max_hold_epochs`` is pruned; PRUNED -> EMBARGOED for ``embargo_epochs`` ->
        DORMANT. (z = ``LifecycleConfig.gate_z``, se = the recorded standard error.)
        """
        return [change for slot in self.slots.values() for change in slot.step_epoch()]

    def can_germinate(self, slot_id: str) -> bool:
        return self._slot(slot_id).can_germinate()

    def can_fossilize(self, slot_id: str) -> bool:
        return self._slot(slot_id).can_fossilize()

    def can_prune(self, slot_id: str) -> bool:
        return self._slot(slot_id).can_prune()

    def slot_state(self, slot_id: str) -> SlotState:
        return self._slot(slot_id).state()

    def slot_states(self) -> list[SlotState]:
        return [slot.state() for slot in self.slots.values()]

    # -- parameters ------------------------------------------------------------------
    def seed_parameters(self, slot_id: str) -> list[nn.Parameter]:
        """The seed's parameters (gate logits included); empty when the slot is empty."""
        return list(self._slot(slot_id).parameters())

    def param_counts(self) -> ParamCounts:
        """``host`` is the host as built; folded fossils count as fossils (a fold moves
        parameters into the host's layers, it does not make them the host's)."""
        live = fossils = 0
        for slot in self.slots.values():
            if is_live(slot.stage):
                live += slot.num_seed_params()
            elif slot.stage == SeedStage.FOSSILIZED:
                fossils += slot.num_seed_params()
        folded = sum(p.numel() for p in self.host_parameters()) - self.built_host_params
        return ParamCounts(self.built_host_params, live_seeds=live, fossils=fossils + folded)

    def growth_ratio(self) -> float:
        """Seed parameters (live and fossilized) per host parameter. A host without
        parameters of its own (a user's model of functional ops) counts as one, so the
        ratio stays finite."""
        counts = self.param_counts()
        return (counts.live_seeds + counts.fossils) / max(counts.host, 1)
