"""Stepping E envs with their host training batched (``VectorMorphogenesisEnv(batched=True)``).

`MorphogenesisEnv.step` is three phases (`begin_step`, `train_phase`, `end_step`); this
runner calls them for every env so that the training phases can run as one batched
computation (`esper.training.batched`) with no second copy of the per-env logic:

1. every env applies its action (`begin_step`), in env order;
2. the training phase of every env runs as one batched call (`train_batched`) and the
   seedless envs' validation as one grouped pass (`validate_batched`), or, when
   `batched_support` objects, each env trains on its own in step 3 (the per-env path, so
   results never depend on which path ran);
3. every env, in env order, finishes its trainer's step (validation, credit, governor,
   lifecycle: `train_phase` given the batched results) and its own (`end_step`).

The order of all work, random draws included, is that of the per-env loop. A static twin
(``reward_mode="twin"``) still trains on its own inside its env's `end_step`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from esper.env.environment import MorphogenesisEnv
from esper.training.batched import batched_support, train_batched, validate_batched


class LockstepStepper:
    """Steps E envs with their training phases batched where `batched_support` allows."""

    def __init__(self) -> None:
        self.last_batched = False  # whether the last step's training ran batched
        self.last_reason: str | None = None  # why not, when it did not

    def run(self, envs: Sequence[MorphogenesisEnv], actions: Sequence[Any]) -> list[tuple]:
        """``env.step(action)`` of every env; returns their Gymnasium step tuples."""
        begun = [env.begin_step(action) for env, action in zip(envs, actions, strict=True)]
        trainers = [env.trainer for env in envs]
        self.last_reason = batched_support(trainers) if len(trainers) > 1 else "one env"
        self.last_batched = self.last_reason is None
        trained: list = [None] * len(envs)
        validated: list = [None] * len(envs)
        if self.last_batched:
            trained = train_batched(trainers)
            validated = validate_batched(trainers)
        return [
            env.end_step(b, env.train_phase(trained=t, validated=v))
            for env, b, t, v in zip(envs, begun, trained, validated, strict=True)
        ]
