"""`MorphogeneticModel`: a host plus one `SeedSlot` per enabled injection point.

Residual seeds transform a block's output. A width seed at block ``i`` reads the
block's width input and yields a term that is either added to block ``i``'s output or
*pending*: fed into the next block's first linear op (or the logits after the last
block). `run_block` / `apply_slot` / `head` are that walk, one step at a time, so a
caller (the shared counterfactual pass) can split it without host-specific code.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping

import torch
from torch import Tensor, nn

from esper.lifecycle import SeedStage
from esper.model.fold import FoldPlan, fold_slot
from esper.model.hosts import Host
from esper.model.slot import LifecycleConfig, SeedSlot, SlotStateError, StageChange
from esper.model.slotset import GrowableModel, ParamCounts
from esper.model.width import (
    DEFAULT_WIDTH_INIT,
    WIDTH_INITS,
    WIDTH_SPLIT_NOISE,
    copy_units,
)
from esper.slots import SlotConfig

__all__ = ["MorphogeneticModel", "ParamCounts"]  # ParamCounts: its home was this module


def _detach(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.detach()


class MorphogeneticModel(GrowableModel):
    """A host whose blocks are each followed by a seed slot (if that slot is enabled).

    ``slot_config`` selects a subset of the host's injection points (default: all); the
    stored config carries the host's specs. The lifecycle operations, counts and the
    TRAINING-seed rule are `GrowableModel`'s. ``width_init`` is how a width seed's fan-in
    starts (`esper.model.width.WIDTH_INITS`).

    ``own_seed_pass`` (default True): a TRAINING seed is hidden from `forward` and learns
    from the loss of `seed_forward`, which a training loop adds to the task loss (the
    `Trainer` does). False: the straight-through rule of `esper.model.slot` inside
    `forward` (any loop trains the seed, but the gradient is taken where the seed is
    off; seeds whose term feeds a BatchNorm grow without bound: issue 12 measurements).
    """

    def __init__(
        self,
        host: Host,
        slot_config: SlotConfig | Iterable[str] | None = None,
        lifecycle: LifecycleConfig | None = None,
        width_init: str = DEFAULT_WIDTH_INIT,
        own_seed_pass: bool = True,
    ) -> None:
        super().__init__()
        if width_init not in WIDTH_INITS:
            raise ValueError(f"width_init must be one of {WIDTH_INITS}, got {width_init!r}")
        self.width_init = width_init
        specs = host.injection_specs()
        if len(specs) != len(host.blocks):
            raise ValueError(
                f"host offers {len(specs)} injection specs for {len(host.blocks)} blocks"
            )
        enabled = None
        if slot_config is not None:
            enabled = (
                slot_config.slot_ids if isinstance(slot_config, SlotConfig) else list(slot_config)
            )
        self.host = host
        self.slot_config = SlotConfig.from_specs(specs, enabled)
        lifecycle = lifecycle if lifecycle is not None else LifecycleConfig()
        index = {s.slot_id: i for i, s in enumerate(specs)}
        sites = host.sites()
        self._init_slots(
            (SeedSlot(s, lifecycle, sites[index[s.slot_id]]) for s in self.slot_config.specs),
            lifecycle,
            own_seed_pass,
        )
        # (input, block, activation entering it, pending term) of the last training
        # forward, for `seed_forward`; never serialised.
        self._seed_prefix: tuple | None = None
        # Block i feeds the slot with the i-th offered id (None: slot not enabled).
        self._block_slots: tuple[str | None, ...] = tuple(
            s.slot_id if s.slot_id in self.slots else None for s in specs
        )

    @property
    def topology(self) -> str:
        return self.host.topology

    @property
    def num_blocks(self) -> int:
        return len(self.host.blocks)

    # -- forward ---------------------------------------------------------------------
    def forward(
        self,
        x: Tensor,
        alpha_override: Mapping[str, float] | None = None,
        *,
        start_block: int | None = None,
        pending: Tensor | None = None,
    ) -> Tensor:
        """Host forward with seeds. ``alpha_override`` maps slot ids to the alpha used
        for this call only (``0.0`` = seed off, ``1.0`` = fully on). With a
        ``start_block``, ``x`` is the activation entering that block (after `host.embed`
        for block 0) and ``pending`` the width term for it."""
        stop = self.num_blocks
        if start_block is not None:
            h, pending = self.run_blocks(
                x, start_block, stop, alpha_override, pending, with_pending=True
            )
            return self.head(h, pending)
        h = self.host.embed(x)
        first = self._first_training_block() if alpha_override is None else None
        if first is not None:
            # The seeds' own pass starts here: keep what enters this block for it.
            h, pending = self.run_blocks(h, 0, first, None, None, with_pending=True)
            self._seed_prefix = (x, first, h.detach(), _detach(pending))
            h, pending = self.run_blocks(h, first, stop, None, pending, with_pending=True)
        else:
            h, pending = self.run_blocks(h, 0, stop, alpha_override, with_pending=True)
        return self.head(h, pending)

    def _first_training_block(self) -> int | None:
        """Block of the first TRAINING seed when `seed_forward` will follow this forward."""
        if not (self.own_seed_pass and self.training and torch.is_grad_enabled()):
            return None
        blocks = [self.block_index(sid) for sid in self.training_seeds()]
        return min(blocks) if blocks else None

    def forward_features(
        self, x: Tensor, alpha_override: Mapping[str, float] | None = None
    ) -> Tensor:
        """Activations after the last block and its slot, before the head (raises when
        a width seed at the last block feeds the head: use `forward`)."""
        return self.run_blocks(self.host.embed(x), 0, self.num_blocks, alpha_override)

    def run_blocks(
        self,
        h: Tensor,
        start: int,
        stop: int,
        alpha_override: Mapping[str, float] | None = None,
        pending: Tensor | None = None,
        *,
        with_pending: bool = False,
    ) -> Tensor | tuple[Tensor, Tensor | None]:
        """Run ``blocks[start:stop]``, each followed by its slot: lets callers share a
        prefix between several counterfactual passes. ``pending`` is a width term for
        block ``start``; ``with_pending`` returns ``(h, pending for block stop)``, else
        a pending term left at ``stop`` is an error (it would be dropped)."""
        if not 0 <= start <= stop <= self.num_blocks:
            raise ValueError(
                f"block range [{start}, {stop}) invalid: need 0 <= start <= stop <= "
                f"{self.num_blocks}"
            )
        overrides = self._check_overrides(alpha_override)
        for i in range(start, stop):
            out, tap = self.run_block(i, h, pending)
            slot_id = self._block_slots[i]
            alpha = overrides.get(slot_id) if slot_id is not None else None
            h, pending = self.apply_slot(i, out, tap, alpha)
        if with_pending:
            return h, pending
        if pending is not None:
            raise ValueError(
                f"a width seed at block {stop - 1} feeds block {stop}; pass with_pending=True"
            )
        return h

    def run_block(
        self, i: int, h: Tensor, pending: Tensor | None = None
    ) -> tuple[Tensor, Tensor | None]:
        """Host block ``i`` fed the pending term of block ``i-1``: ``(output, width
        input)``, the width input only when slot ``i`` holds a width seed."""
        slot_id = self._block_slots[i]
        tap = slot_id is not None and self.slots[slot_id].holds_width
        return self.host.block_forward(i, h, pending, tap)

    def apply_slot(
        self, i: int, out: Tensor, tap: Tensor | None, alpha: float | None = None
    ) -> tuple[Tensor, Tensor | None]:
        """Slot ``i`` on block ``i``'s output: ``(h, pending term for block i+1)``.
        ``alpha`` overrides the seed's multiplier (None: the seed's own)."""
        slot_id = self._block_slots[i]
        if slot_id is None:
            return out, None
        slot: SeedSlot = self.slots[slot_id]  # type: ignore[assignment]
        if not slot.holds_width:
            return slot(out, alpha), None
        term = slot.width_term(tap, alpha)
        if term is None:
            return out, None
        if slot.width_site is not None and slot.width_site.target == "output":
            return out + term, None
        return out, term

    def head(self, h: Tensor, pending: Tensor | None = None) -> Tensor:
        """The host's head, with the pending width term of the last block."""
        return self.host.head_forward(h, pending)

    def block_index(self, slot_id: str) -> int:
        """Index of the host block whose output the slot transforms."""
        self._slot(slot_id)
        return self._block_slots.index(slot_id)

    # -- the seeds' own pass -----------------------------------------------------------
    def seed_forward(self, x: Tensor) -> Tensor | None:
        """Logits with every TRAINING seed fully on, for those seeds' own loss (None
        when no seed is TRAINING); see `esper.model.slotset` for the rule.

        Blocks before the first TRAINING seed are those of the training `forward` that
        just ran on this very ``x`` (kept by it), so they are not computed twice.
        """
        training = self.training_seeds()
        if not training:
            return None
        state = self.own_pass_state(training)
        kwargs: dict = {"alpha_override": dict.fromkeys(training, 1.0)}
        prefix, self._seed_prefix = self._seed_prefix, None
        first = min(self.block_index(sid) for sid in training)
        if prefix is not None and prefix[0] is x and prefix[1] == first:
            # Blocks before the first TRAINING seed are the forward's, exactly: reuse them.
            x, kwargs = prefix[2], {**kwargs, "start_block": first, "pending": prefix[3]}
        return torch.func.functional_call(self, state, (x,), kwargs)

    # -- lifecycle and parameters (the rest is `GrowableModel`'s) ----------------------
    def germinate(self, slot_id: str, blueprint: str, blend: str = "linear") -> list[StageChange]:
        """Plant a seed; the slot goes DORMANT -> GERMINATED -> TRAINING at once. With
        ``width_init="split"`` a width seed's fan-in starts as a noisy copy of its layer."""
        changes = super().germinate(slot_id, blueprint, blend)
        slot = self._slot(slot_id)
        if slot.holds_width and self.width_init == "split":
            copy_units(slot.width_site.unit_layers, slot.seed, WIDTH_SPLIT_NOISE)  # type: ignore[union-attr,arg-type]
        return changes

    def host_parameters(self) -> list[nn.Parameter]:
        return list(self.host.parameters())

    # -- folding ---------------------------------------------------------------------
    def fold_in_place(self, slot_id: str) -> FoldPlan:
        """Fold the FOSSILIZED width seed of ``slot_id`` into the host's layers, in place
        (`esper.model.fold`): same function and parameter counts, the slot DORMANT.
        Whoever owns an optimiser applies the returned plan to it
        (`esper.training.surgery.carry_optimizer_state`; the `Trainer` does)."""
        plan = fold_slot(self._slot(slot_id), self.slots.values())
        self._seed_prefix = None  # it may hold a pending term the fold moved into the host
        self.refresh_specs()
        return plan

    def refresh_specs(self) -> None:
        """Re-read every slot's injection spec (its channels) from the host's layers,
        after the host changed shape (a fold, a restore)."""
        specs = {s.slot_id: s for s in self.host.injection_specs()}
        for slot_id, slot in self.slots.items():
            if slot.spec != specs[slot_id]:
                slot.spec = specs[slot_id]
        self.slot_config = SlotConfig.from_specs(specs.values(), self.slot_config.slot_ids)

    # -- export ----------------------------------------------------------------------
    def fold_width(self) -> MorphogeneticModel:
        """A copy whose host physically contains every FOSSILIZED width seed (wider
        layers, same function); those slots are DORMANT in the copy, the others keep
        their seeds. Every width seed must be fossilized (or gone) first. The copy is a
        model of its own: its host as built is the wider one."""
        for slot in self.slots.values():
            if slot.holds_width and slot.stage != SeedStage.FOSSILIZED:
                raise SlotStateError(
                    f"cannot fold width seeds: slot {slot.slot_id} holds one that is "
                    f"{slot.stage.name}; fossilize or prune it first"
                )
        out = copy.deepcopy(self)
        for slot_id, slot in out.slots.items():
            if slot.holds_width:
                out.fold_in_place(slot_id)
        out.built_host_params = sum(p.numel() for p in out.host.parameters())
        return out
