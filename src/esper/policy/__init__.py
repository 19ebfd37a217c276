"""The controller: the learned factored recurrent policy (and heuristic controllers)."""

from esper.policy.distributions import InvalidMaskError, MaskedCategorical
from esper.policy.network import (
    HEADS,
    FactoredRecurrentActorCritic,
    Hidden,
    PolicyStep,
    SequenceEvaluation,
)

__all__ = [
    "HEADS",
    "FactoredRecurrentActorCritic",
    "Hidden",
    "InvalidMaskError",
    "MaskedCategorical",
    "PolicyStep",
    "SequenceEvaluation",
]

# Hand-written and baseline controllers (issue 5).
from esper.policy.controllers import (
    AlwaysGrowController,
    AlwaysGrowState,
    Controller,
    ControllerBatch,
    HeuristicConfig,
    HeuristicController,
    HeuristicState,
    PolicyController,
    RandomController,
    RightSizeConfig,
    RightSizeController,
    StaticController,
)

__all__ += [
    "AlwaysGrowController",
    "AlwaysGrowState",
    "Controller",
    "ControllerBatch",
    "HeuristicConfig",
    "HeuristicController",
    "HeuristicState",
    "PolicyController",
    "RandomController",
    "RightSizeConfig",
    "RightSizeController",
    "StaticController",
]
