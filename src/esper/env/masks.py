"""Action masks for the conditional factored action space.

See docs/ARCHITECTURE.md, Actions and masks.

Semantics (the rows `esper.actions.ActionMasks` documents):

* ``op[o]``          op ``o`` is legal in at least one slot; WAIT is always legal.
* ``slot[o, s]``     op ``o`` is legal in slot ``s``:
  GERMINATE — the slot is DORMANT and at least one blueprint fits it;
  FOSSILIZE — the seed is HOLDING with a known ``contribution_lower`` (contribution minus
  ``gate_z`` standard errors) >= ``fossilize_threshold`` (``MorphogeneticModel.can_fossilize``);
  PRUNE     — a live seed (GERMINATED, TRAINING, BLENDING or HOLDING).
  The WAIT row is all True: WAIT ignores the slot head, so any value is acceptable.
* ``blueprint[s, b]`` blueprint ``b`` fits slot ``s``'s topology and costs no more
  parameters than the budget left; False for every slot that cannot be germinated.
* ``blend[l]``       the blend algorithm is allowed (all of them by default).

Two builders share these semantics: `compute_action_masks` for one env reads slot states
slot by slot (the readable reference), `compute_batch_masks` builds E envs x S slots
with tensor operations from stage / contribution tensors. A test checks they agree.

`flat_masks` turns conditional masks into the per-head flat vector that SB3-style
maskable agents read for a MultiDiscrete space.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Protocol

import torch

from esper.actions import BLEND_ALGORITHMS, NUM_OPS, ActionMasks, LifecycleOp
from esper.lifecycle import LIVE_STAGES, SeedStage
from esper.model import blueprints_for, get_blueprint
from esper.slots import SlotConfig, SlotMismatchError

_GERMINATE, _FOSSILIZE, _PRUNE = (
    int(LifecycleOp.GERMINATE),
    int(LifecycleOp.FOSSILIZE),
    int(LifecycleOp.PRUNE),
)
_LIVE_CODES = tuple(int(s) for s in sorted(LIVE_STAGES))


class SlotStateLike(Protocol):
    """What the masks read from a slot (``esper.model.SlotState`` satisfies it)."""

    slot_id: str
    stage: SeedStage
    contribution_lower: float | None  # what FOSSILIZE's gate compares with its threshold


class SeedCostModel(Protocol):
    """What the cost table asks a model (``esper.model.MorphogeneticModel`` has it)."""

    def seed_param_count(
        self, slot_id: str, blueprint: str, blend: str | None = None
    ) -> int | None: ...


def blueprint_cost_table(
    slot_config: SlotConfig,
    blueprints: Sequence[str],
    param_count: Callable[[str, str, int], int | None] | None = None,
    *,
    blends: Sequence[str] = BLEND_ALGORITHMS,
    model: SeedCostModel | None = None,
) -> torch.Tensor:
    """Parameter cost of each blueprint in each slot, ``[S, B]`` int64.

    ``-1`` marks a blueprint that does not fit the slot. With ``model`` the costs are
    the model's own exact counts (``model.seed_param_count``), which a width blueprint
    needs: its cost depends on the host's layers around the slot, not only on the
    slot's channels. Without it, ``param_count(topology, blueprint, channels)`` returns
    the seed's parameter count or None where the blueprint does not apply; by default
    it asks ``esper.model``, which knows residual blueprints only. When the gated blend
    is allowed its gate is included, so a germination within budget stays within it
    whatever blend the agent picks. The slot config must carry injection specs
    (``SlotConfig.from_specs``).
    """
    if model is not None and param_count is not None:
        raise ValueError("pass model or param_count, not both")
    count = _model_param_count if param_count is None else param_count
    gate = "gated" in blends
    table = torch.full((slot_config.num_slots, len(blueprints)), -1, dtype=torch.int64)
    for i, slot_id in enumerate(slot_config.slot_ids):
        spec = slot_config.spec_for(slot_id)
        for j, name in enumerate(blueprints):
            if model is not None:
                params = model.seed_param_count(slot_id, name, "gated" if gate else None)
            else:
                params = count(spec.topology, name, spec.channels)
                if params is not None and gate:
                    params = int(params) + spec.channels
            if params is not None:
                table[i, j] = int(params)
    return table


def _model_param_count(topology: str, name: str, channels: int) -> int | None:
    if name not in blueprints_for(topology):
        return None
    blueprint = get_blueprint(topology, name)
    if blueprint.is_width:
        raise ValueError(
            f"width blueprint {name!r}: its cost depends on the host's layers; "
            f"pass model= to blueprint_cost_table"
        )
    return blueprint.param_count(channels)  # type: ignore[misc]


def _check_inputs(costs: torch.Tensor, num_slots: int, num_blends: int) -> None:
    if costs.dim() < 2 or costs.shape[-2] != num_slots:
        raise ValueError(
            f"blueprint_costs must have shape [..., S={num_slots}, B], got {tuple(costs.shape)}"
        )
    if costs.shape[-1] < 1:
        raise ValueError("blueprint_costs needs at least one blueprint column")
    if num_blends < 1:
        raise ValueError(f"num_blends must be >= 1, got {num_blends}")


def compute_action_masks(
    slot_states: Sequence[SlotStateLike],
    slot_config: SlotConfig,
    blueprint_costs: torch.Tensor,
    *,
    budget_left: float = math.inf,
    fossilize_threshold: float = 0.0,
    num_blends: int = 3,
) -> ActionMasks:
    """Masks for one env from its slot states (in ``slot_config`` order).

    ``blueprint_costs`` comes from `blueprint_cost_table`; ``budget_left`` is the number
    of seed parameters the env may still add (``math.inf`` for no budget).
    """
    slot_config.check_matches([s.slot_id for s in slot_states], what="slot_states")
    num_slots = slot_config.num_slots
    costs = torch.as_tensor(blueprint_costs)
    _check_inputs(costs, num_slots, num_blends)
    slot = torch.zeros(NUM_OPS, num_slots, dtype=torch.bool)
    slot[int(LifecycleOp.WAIT)] = True
    blueprint = torch.zeros(num_slots, costs.shape[-1], dtype=torch.bool)
    for i, state in enumerate(slot_states):
        stage = SeedStage(state.stage)
        if stage == SeedStage.DORMANT:
            for j, cost in enumerate(costs[i].tolist()):
                blueprint[i, j] = 0 <= cost <= budget_left
            slot[_GERMINATE, i] = bool(blueprint[i].any())
        if stage == SeedStage.HOLDING and state.contribution_lower is not None:
            slot[_FOSSILIZE, i] = float(state.contribution_lower) >= fossilize_threshold
        slot[_PRUNE, i] = stage in LIVE_STAGES
    op = slot.any(dim=1)
    op[int(LifecycleOp.WAIT)] = True
    return ActionMasks(op, slot, blueprint, torch.ones(num_blends, dtype=torch.bool))


def compute_batch_masks(
    stages: torch.Tensor,
    contributions: torch.Tensor,
    blueprint_costs: torch.Tensor,
    budget_left: torch.Tensor | float = math.inf,
    *,
    fossilize_threshold: float = 0.0,
    num_blends: int = 3,
) -> ActionMasks:
    """Masks for E envs at once, with tensor operations only.

    stages:          [E, S] integer `SeedStage` codes
    contributions:   [E, S] float `contribution_lower`, NaN where none is known yet
    blueprint_costs: [S, B] (shared) or [E, S, B] int, ``-1`` = wrong topology
    budget_left:     [E] or scalar, parameters each env may still add
    Returns `ActionMasks` with a leading E dimension; env i's masks equal
    ``compute_action_masks`` for env i.
    """
    if stages.dim() != 2:
        raise ValueError(f"stages must have shape [E, S], got {tuple(stages.shape)}")
    if contributions.shape != stages.shape:
        raise SlotMismatchError(
            f"contributions shape {tuple(contributions.shape)} differs from stages "
            f"shape {tuple(stages.shape)}"
        )
    num_envs, num_slots = stages.shape
    device = stages.device
    costs = torch.as_tensor(blueprint_costs, device=device)
    _check_inputs(costs, num_slots, num_blends)
    budget = torch.as_tensor(budget_left, dtype=torch.float64, device=device)
    budget = budget.expand(num_envs) if budget.dim() == 0 else budget
    if budget.shape != (num_envs,):
        raise ValueError(
            f"budget_left must be a scalar or shape [{num_envs}], got {tuple(budget.shape)}"
        )

    dormant = stages == int(SeedStage.DORMANT)
    fits = (costs >= 0) & (costs.to(torch.float64) <= budget.view(-1, 1, 1))  # [E, S, B]
    blueprint = fits & dormant.unsqueeze(-1)
    # NaN compares False, so an unknown contribution never allows FOSSILIZE.
    fossilize = (stages == int(SeedStage.HOLDING)) & (contributions >= fossilize_threshold)
    live = torch.isin(stages, torch.tensor(_LIVE_CODES, device=device))

    slot = torch.zeros(num_envs, NUM_OPS, num_slots, dtype=torch.bool, device=device)
    slot[:, int(LifecycleOp.WAIT)] = True
    slot[:, _GERMINATE] = blueprint.any(dim=-1)
    slot[:, _FOSSILIZE] = fossilize
    slot[:, _PRUNE] = live
    op = slot.any(dim=-1)
    blend = torch.ones(num_envs, num_blends, dtype=torch.bool, device=device)
    return ActionMasks(op, slot, blueprint, blend)


def stage_tensors(slot_states: Sequence[SlotStateLike]) -> tuple[torch.Tensor, torch.Tensor]:
    """``([S] stage codes, [S] `contribution_lower` with NaN for unknown)`` of one env."""
    stages = torch.tensor([int(s.stage) for s in slot_states], dtype=torch.int64)
    contributions = torch.tensor(
        [
            math.nan if s.contribution_lower is None else float(s.contribution_lower)
            for s in slot_states
        ],
        # float64: the threshold test must agree with the Python-float comparison exactly.
        dtype=torch.float64,
    )
    return stages, contributions


def flat_masks(masks: ActionMasks) -> torch.Tensor:
    """Per-head masks concatenated, ``[..., 4 + S + B + L]`` (the MaskablePPO layout).

    Each head's flat mask is the union over the conditional rows: a slot is offered if
    some non-WAIT op is legal there, a blueprint if some germinable slot takes it. A head
    with no legal value offers index 0 (every dimension must allow something); the env
    runs any combination that the conditional masks reject as WAIT.
    """
    op = masks.op
    slot = masks.slot[..., 1:, :].any(dim=-2)
    blueprint = masks.blueprint.any(dim=-2)
    heads = [op, slot, blueprint, masks.blend]
    for i, head in enumerate(heads):
        empty = ~head.any(dim=-1, keepdim=True)
        first = torch.zeros_like(head)
        first[..., 0] = True
        heads[i] = head | (empty & first)
    return torch.cat(heads, dim=-1)
