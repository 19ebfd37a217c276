"""Shipped controllers: trained policy files inside the package, run without training.

    esper eval shipped --set task.width=1          # evaluate the shipped policy
    esper train shipped --set task.width=1         # run it as the controller (no learning)
    esper build-policy --out src/esper/policies/digits_v1.pt --seed 0   # rebuild it

A shipped file is an ordinary `PPOAgent` checkpoint (weights, observation normaliser,
slot-count-free network) plus a ``build`` record of how it was made; docs/policy_card.md
says what it was trained on and what it achieves. `PolicyController` (re-exported from
`esper.policy.controllers`) runs any agent as an `esper.policy.Controller` (one env, the
LSTM state as the controller's state), so it drives the same loops as the heuristic.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from esper.env.observations import GLOBAL_DIM, SLOT_DIM
from esper.policy.controllers import PolicyController
from esper.rl.agent import PPOAgent
from esper.slots import SlotConfig

SHIPPED_POLICIES: dict[str, str] = {"digits_v1": "digits_v1.pt"}
DEFAULT_POLICY = "digits_v1"
SHIPPED_NAME = "shipped"  # what `esper eval` / `esper train` accept for the default


def policy_path(name: str = DEFAULT_POLICY) -> Path:
    """The file of a shipped policy (by name), or ``name`` itself when it is a path."""
    if name == SHIPPED_NAME:
        name = DEFAULT_POLICY
    if name in SHIPPED_POLICIES:
        path = Path(__file__).with_name(SHIPPED_POLICIES[name])
        if not path.is_file():
            raise FileNotFoundError(
                f"shipped policy {name!r} is missing from the package ({path}); rebuild it with "
                f"`esper build-policy --out {path}`"
            )
        return path
    path = Path(name)
    if path.suffix != ".pt":
        raise ValueError(
            f"unknown shipped policy {name!r}; shipped: {', '.join(SHIPPED_POLICIES)} "
            "(or pass a .pt file)"
        )
    return path


def load_policy(
    slot_config: SlotConfig,
    blueprints: Sequence[str],
    name: str = DEFAULT_POLICY,
    device: torch.device | str = "cpu",
) -> PPOAgent:
    """A shipped (or any) policy for ``slot_config`` — any slot count — whose observation
    schema and blueprint list must match this Esper's (else `CheckpointError`)."""
    return PPOAgent.load(
        policy_path(name),
        slot_config,
        device,
        global_dim=GLOBAL_DIM,
        slot_dim=SLOT_DIM,
        blueprints=blueprints,
    )


__all__ = [
    "DEFAULT_POLICY",
    "SHIPPED_NAME",
    "SHIPPED_POLICIES",
    "PolicyController",
    "load_policy",
    "policy_path",
]
