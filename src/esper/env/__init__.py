"""The morphogenesis environment: masks, observations, rewards (and, soon, the Gymnasium env)."""

from esper.env.masks import (
    blueprint_cost_table,
    compute_action_masks,
    compute_batch_masks,
    flat_masks,
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
from esper.env.rewards import RewardBreakdown, RewardConfig, RewardTracker

__all__ = [
    "DEFAULT_SCHEMA",
    "GLOBAL_DIM",
    "SCHEMA_VERSION",
    "SLOT_DIM",
    "ObservationSchema",
    "RewardBreakdown",
    "RewardConfig",
    "RewardTracker",
    "SchemaMismatchError",
    "TrainingProgress",
    "blueprint_cost_table",
    "build_observation",
    "compute_action_masks",
    "compute_batch_masks",
    "flat_masks",
]
