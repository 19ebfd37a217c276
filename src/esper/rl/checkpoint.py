"""Agent checkpoints: atomic writes, safe reads, and errors that name the file and the problem.

A checkpoint is a dict of tensors and primitives (no pickled classes), read back with
``torch.load(weights_only=True)``: a file that would need arbitrary objects — for
instance a pickle carrying code — is refused, never executed.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from esper.checkpointing import CheckpointError, atomic_torch_save, safe_torch_load
from esper.slots import SlotConfig

if TYPE_CHECKING:
    from esper.rl.agent import PPOAgent

CHECKPOINT_FORMAT = "esper.ppo_agent"
CHECKPOINT_VERSION = 1
_REQUIRED = (
    "slot_ids",
    "global_dim",
    "slot_dim",
    "blueprints",
    "blends",
    "config",
    "network",
    "optimizer",
    "obs_normalizer",
    "return_normalizer",
    "counters",
)


def save_checkpoint(state: Mapping[str, Any], path: str | Path) -> Path:
    """Write ``state`` atomically (temp file in the same folder + ``os.replace``)."""
    path = Path(path)
    atomic_torch_save(
        {"format": CHECKPOINT_FORMAT, "schema_version": CHECKPOINT_VERSION, **state}, path
    )
    return path


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load and validate the envelope of a checkpoint; every failure is a `CheckpointError`."""
    payload = safe_torch_load(path)
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"checkpoint {path}: not an Esper PPO agent checkpoint "
            f"(expected format {CHECKPOINT_FORMAT!r})"
        )
    version = payload.get("schema_version")
    if version != CHECKPOINT_VERSION:
        raise CheckpointError(
            f"checkpoint {path}: schema version {version!r}, this Esper reads version "
            f"{CHECKPOINT_VERSION}"
        )
    missing = [k for k in _REQUIRED if k not in payload]
    if missing:
        raise CheckpointError(f"checkpoint {path}: missing entries {missing}")
    return payload


def load_checkpoint(
    cls: type[PPOAgent],
    path: str | Path,
    slot_config: SlotConfig | None,
    device: torch.device | str,
    expected: Mapping[str, Any],
) -> PPOAgent:
    """Rebuild an agent from ``path``, for ``slot_config`` (default: the saved slots)."""
    from esper.rl.ppo import PPOConfig

    payload = read_checkpoint(path)
    _check_observation_schema(payload, path, expected.get("global_dim"))
    for key, want in expected.items():
        have = payload[key]
        if want is not None and (list(want) if key == "blueprints" else want) != have:
            raise CheckpointError(
                f"checkpoint {path}: observation/action schema differs: {key} is {have!r} in "
                f"the checkpoint, expected {list(want) if key == 'blueprints' else want!r}"
            )
    try:
        saved_slots = SlotConfig(tuple(payload["slot_ids"]))
        # Options added later keep, for older checkpoints, the behaviour they ran with.
        saved = {"obs_normalizer_sync": "step", "group_by_length": False, **payload["config"]}
        config = PPOConfig(**saved)
        agent = cls(
            slot_config if slot_config is not None else saved_slots,
            payload["global_dim"],
            payload["slot_dim"],
            payload["blueprints"],
            config=config,
            device=device,
            blends=payload["blends"],
        )
        agent.network.load_state_dict(payload["network"])
        agent.optimizer.load_state_dict(payload["optimizer"])
        agent.obs_normalizer.load_state_dict(payload["obs_normalizer"])
        agent.return_normalizer.load_state_dict(payload["return_normalizer"])
        if "generator" in payload:
            agent.generator.set_state(payload["generator"])
        agent.counters.update({k: int(v) for k, v in payload["counters"].items()})
        if "prior" in payload:  # the frozen clone of PPOConfig.prior_kl_coef
            agent.set_prior()
            agent.prior.load_state_dict(payload["prior"])  # type: ignore[union-attr]
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"checkpoint {path}: inconsistent contents ({first_line})") from None
    return agent


def _check_observation_schema(
    payload: Mapping[str, Any], path: str | Path, global_dim: int | None
) -> None:
    """Refuse a checkpoint whose observations mean something else (one-line errors).

    Agents on Esper's own observations store the schema (`PPOAgent.state_dict`); a file
    without one but with another global width predates the schema's versioning in
    agent files, which came with v3 (the growth-penalty λ and budget inputs)."""
    from esper.env.observations import (
        DEFAULT_SCHEMA,
        SCHEMA_VERSION,
        ObservationSchema,
        SchemaMismatchError,
    )

    stored = payload.get("observation_schema")
    if stored is None:
        if global_dim is not None and payload["global_dim"] != global_dim:
            raise CheckpointError(
                f"checkpoint {path}: observation schema differs: the checkpoint has no "
                f"schema version (written before v{SCHEMA_VERSION}, which added the "
                f"growth-penalty λ and budget inputs) and global_dim {payload['global_dim']}; "
                f"this Esper builds v{SCHEMA_VERSION} with global_dim {global_dim}"
            )
        return
    try:
        DEFAULT_SCHEMA.check_matches(ObservationSchema.from_dict(stored), what=f"checkpoint {path}")
    except SchemaMismatchError as exc:
        raise CheckpointError(
            f"checkpoint {path}: incompatible observation schema: {exc}"
        ) from None
