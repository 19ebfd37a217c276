"""The morphogenesis environment (Gymnasium): masks, observations, rewards, env, runners.

Importing this package registers ``esper/Morphogenesis-v0`` with Gymnasium, so
``gymnasium.make("esper/Morphogenesis-v0")`` gives the digits default and keywords are
`EnvConfig` fields: ``gymnasium.make("esper/Morphogenesis-v0", slots=["r0c1"],
max_epochs=10, reward_mode="contribution")``. Without importing esper first, use
``gymnasium.make("esper.env:esper/Morphogenesis-v0")``.
"""

import gymnasium

from esper.env.environment import BegunStep, EnvConfig, EpisodeOverError, MorphogenesisEnv
from esper.env.growth_step import GrowthStepper, Observed, Reading, seed_grad_norm
from esper.env.masks import (
    blueprint_cost_table,
    compute_action_masks,
    compute_batch_masks,
    flat_masks,
    stage_tensors,
)
from esper.env.observations import (
    DEFAULT_SCHEMA,
    GLOBAL_DIM,
    SCHEMA_VERSION,
    SLOT_DIM,
    ObservationSchema,
    SchemaMismatchError,
    TrainingProgress,
    build_observation,
)
from esper.env.rewards import REWARD_MODES, RewardBreakdown, RewardConfig, RewardTracker
from esper.env.vector import VectorMorphogenesisEnv, VectorStep
from esper.env.wrappers import JointActionLayout, JointActionWrapper

ENV_ID = "esper/Morphogenesis-v0"


def register_envs() -> None:
    """Register the env with Gymnasium (idempotent; runs on import of this package)."""
    if ENV_ID not in gymnasium.registry:
        gymnasium.register(ENV_ID, entry_point="esper.env.environment:MorphogenesisEnv")


register_envs()

__all__ = [
    "DEFAULT_SCHEMA",
    "ENV_ID",
    "GLOBAL_DIM",
    "REWARD_MODES",
    "SCHEMA_VERSION",
    "SLOT_DIM",
    "BegunStep",
    "EnvConfig",
    "EpisodeOverError",
    "GrowthStepper",
    "JointActionLayout",
    "JointActionWrapper",
    "MorphogenesisEnv",
    "ObservationSchema",
    "Observed",
    "Reading",
    "RewardBreakdown",
    "RewardConfig",
    "RewardTracker",
    "SchemaMismatchError",
    "TrainingProgress",
    "VectorMorphogenesisEnv",
    "VectorStep",
    "blueprint_cost_table",
    "build_observation",
    "compute_action_masks",
    "compute_batch_masks",
    "flat_masks",
    "register_envs",
    "seed_grad_norm",
    "stage_tensors",
]
