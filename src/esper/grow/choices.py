"""What a `Grower` offers and who decides: blueprints that fit a user model's slots, and
the controller (a named baseline, a PPO checkpoint or agent, or any `Controller`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from esper.actions import ActionMasks, FactoredAction, LifecycleOp
from esper.env.observations import GLOBAL_DIM, MAX_BLUEPRINTS, SLOT_DIM
from esper.grow.attach import SlottedModel
from esper.model import blueprints_for, get_blueprint
from esper.policy.controllers import HeuristicController, RandomController, StaticController

_NAMED = {"heuristic": HeuristicController, "static": StaticController, "random": RandomController}


class AgentController:
    """A `esper.rl.PPOAgent` behind the one-env `Controller` interface (state = hidden)."""

    def __init__(self, agent: Any, slot_ids: tuple[str, ...], deterministic: bool = True):
        self.agent, self.slot_ids, self.deterministic = agent, slot_ids, deterministic

    def initial_state(self) -> Any:
        return self.agent.initial_hidden(1)

    def act(self, observation, masks: ActionMasks, state: Any) -> tuple[FactoredAction, Any]:
        obs = {k: torch.as_tensor(v, dtype=torch.float32)[None] for k, v in observation.items()}
        step = self.agent.act(
            obs,
            ActionMasks.stack([masks]),
            state,
            self.deterministic,
            slot_ids=self.slot_ids,
            update_normalizer=False,
        )
        op, slot, blueprint, blend = (int(v) for v in step.actions[0].tolist())
        return FactoredAction(LifecycleOp(op), slot, blueprint, blend), step.hidden


def make_controller(
    spec: Any, model: SlottedModel, seed: int = 0, deterministic: bool = True
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
        agent_ctl = AgentController(spec, model.slot_config.slot_ids, deterministic)
        return agent_ctl, "ppo", spec
    if hasattr(spec, "act") and hasattr(spec, "initial_state"):
        return spec, type(spec).__name__, None
    raise TypeError(
        f"controller must be {', '.join(_NAMED)}, a PPO checkpoint path, a PPOAgent or an "
        f"object with initial_state() and act(obs, masks, state); got {type(spec).__name__}"
    )


def residual_cost(topology: str, name: str, channels: int) -> int | None:
    """Parameter count of a residual blueprint; None where it does not apply here (other
    topology, or a width blueprint: new units inside a user's layer are not offered)."""
    if name not in blueprints_for(topology):
        return None
    blueprint = get_blueprint(topology, name)
    if blueprint.factory is None or blueprint.param_count is None:
        return None
    return blueprint.param_count(channels)


def offered_blueprints(model: SlottedModel, wanted: tuple[str, ...] | None) -> tuple[str, ...]:
    """Residual blueprints of the slots' topologies, first-seen order (mixed models), or
    the ``wanted`` ones, each checked to fit at least one slot."""
    names: list[str] = []
    for spec in model.slot_config.specs:
        for name in blueprints_for(spec.topology):
            if name not in names and residual_cost(spec.topology, name, 1) is not None:
                names.append(name)
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
