"""Agent checkpoints: atomic writes, safe reads, and errors that name the file and the problem.

A checkpoint is a dict of tensors and primitives (no pickled classes), read back with
``torch.load(weights_only=True)``: a file that would need arbitrary objects — for
instance a pickle carrying code — is refused, never executed.

This module knows the file format only; `PPOAgent.load` rebuilds an agent from what it
reads, so the agent imports this module and never the other way round.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from esper.checkpointing import CheckpointError, atomic_torch_save, safe_torch_load

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
    return check_envelope(safe_torch_load(path), path)


def check_envelope(payload: object, path: str | Path) -> dict[str, Any]:
    """``payload`` (a loaded file) as a PPO agent checkpoint this Esper can read."""
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        found = payload.get("format") if isinstance(payload, dict) else None
        what = f"its format is {found!r}" if found else "it has no Esper format tag"
        raise CheckpointError(
            f"checkpoint {path}: not an Esper PPO agent checkpoint ({what}; expected "
            f"{CHECKPOINT_FORMAT!r})"
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


def check_compatible(
    payload: Mapping[str, Any], path: str | Path, expected: Mapping[str, Any]
) -> None:
    """Refuse a checkpoint whose observation or action schema differs from ``expected``
    (``global_dim``, ``slot_dim``, ``blueprints``; None = not checked)."""
    _check_observation_schema(payload, path, expected.get("global_dim"))
    for key, want in expected.items():
        have = payload[key]
        if want is not None and (list(want) if key == "blueprints" else want) != have:
            raise CheckpointError(
                f"checkpoint {path}: observation/action schema differs: {key} is {have!r} in "
                f"the checkpoint, expected {list(want) if key == 'blueprints' else want!r}"
            )


def saved_config(payload: Mapping[str, Any]) -> dict[str, Any]:
    """The checkpoint's `PPOConfig` fields; options added later keep, for older
    checkpoints, the behaviour they ran with."""
    return {"obs_normalizer_sync": "step", "group_by_length": False, **payload["config"]}


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
