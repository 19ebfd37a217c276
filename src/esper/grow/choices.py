"""What a `Grower` offers and who decides: blueprints that fit a model's slots, their
costs, and the controller (a named baseline, a PPO checkpoint or agent, or any
`Controller`)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from esper.actions import BLEND_ALGORITHMS
from esper.env.masks import blueprint_cost_table
from esper.env.observations import GLOBAL_DIM, MAX_BLUEPRINTS, SLOT_DIM
from esper.model import blueprints_for, get_blueprint
from esper.policy.controllers import (
    HeuristicController,
    PolicyController,
    RandomController,
    StaticController,
)

_NAMED = {"heuristic": HeuristicController, "static": StaticController, "random": RandomController}


def make_controller(
    spec: Any, model: Any, seed: int = 0, deterministic: bool = True
) -> tuple[Any, str, Any]:
    """(controller, name for telemetry, PPO agent or None)."""
    if isinstance(spec, str) and spec in _NAMED:
        made = _NAMED[spec](seed=seed) if spec == "random" else _NAMED[spec]()
        return made, spec, None
    if isinstance(spec, str | Path):
        if not Path(spec).is_file():
            raise ValueError(
                f"controller {spec!r} is neither one of {', '.join(_NAMED)} nor a PPO checkpoint"
            )
        from esper.rl import PPOAgent  # lazy: only policy users pay for the RL imports

        spec = PPOAgent.load(
            spec, slot_config=model.slot_config, global_dim=GLOBAL_DIM, slot_dim=SLOT_DIM
        )
    if hasattr(spec, "initial_hidden") and hasattr(spec, "blueprints"):
        spec.slot_config.check_matches(model.slot_config.slot_ids, what="the model's slots")
        return PolicyController(spec, deterministic), "ppo", spec
    if hasattr(spec, "act") and hasattr(spec, "initial_state"):
        return spec, type(spec).__name__, None
    raise TypeError(
        f"controller must be {', '.join(_NAMED)}, a PPO checkpoint path, a PPOAgent or an "
        f"object with initial_state() and act(obs, masks, state); got {type(spec).__name__}"
    )


def residual_cost(topology: str, name: str, channels: int) -> int | None:
    """Parameter count of a residual blueprint from a slot's channels; None where it does
    not apply (other topology, or a width blueprint, whose cost depends on the layers)."""
    if name not in blueprints_for(topology):
        return None
    blueprint = get_blueprint(topology, name)
    if blueprint.factory is None or blueprint.param_count is None:
        return None
    return blueprint.param_count(channels)


def cost_table(
    model: Any, blueprints: Sequence[str], blends: Sequence[str] = BLEND_ALGORITHMS
) -> torch.Tensor:
    """``[S, B]`` parameter cost of each blueprint in each slot (-1: does not fit): the
    model's own exact counts where it has them (every `GrowableModel`: width seeds'
    costs depend on the layers, Esper's or a user's), else the residual blueprints'
    counts from each slot's channels."""
    if hasattr(model, "seed_param_count"):
        return blueprint_cost_table(model.slot_config, blueprints, blends=blends, model=model)
    return blueprint_cost_table(model.slot_config, blueprints, residual_cost, blends=blends)


def offered_blueprints(model: Any, wanted: tuple[str, ...] | None) -> tuple[str, ...]:
    """The blueprints of the slots' topologies that fit at least one slot, first-seen
    order (mixed models), or the ``wanted`` ones, each checked to fit a slot."""
    candidates: list[str] = []
    for spec in model.slot_config.specs:
        candidates += [n for n in blueprints_for(spec.topology) if n not in candidates]
    fits = (cost_table(model, candidates) >= 0).any(dim=0).tolist()
    names = [name for name, ok in zip(candidates, fits, strict=True) if ok]
    if wanted is not None:
        unknown = [b for b in wanted if b not in names]
        if unknown or not wanted:
            raise ValueError(
                f"blueprint {unknown[0] if unknown else '(none given)'!r} fits none of this "
                f"model's slots; offered here: {', '.join(names)}"
            )
        names = list(dict.fromkeys(wanted))
    if len(names) > MAX_BLUEPRINTS:
        raise ValueError(
            f"{len(names)} blueprints {names} exceed the observation's {MAX_BLUEPRINTS}; "
            "choose at most that many with GrowerConfig(blueprints=...)"
        )
    return tuple(names)
