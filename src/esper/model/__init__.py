"""Host models, seed blueprints, seed slots and the morphogenetic model (Kasmina)."""

from esper.model.blueprints import (
    BLUEPRINTS,
    Blueprint,
    UnknownBlueprintError,
    blueprints_for,
    get_blueprint,
)
from esper.model.fold import FoldPlan, ParamChange, Piece
from esper.model.hosts import CNNHost, Host, MLPHost, count_parameters
from esper.model.morphogenetic import MorphogeneticModel
from esper.model.restore import restore_state
from esper.model.scores import GrowthScore, growth_scores
from esper.model.slot import (
    LifecycleConfig,
    SeedSlot,
    SlotState,
    SlotStateError,
    StageChange,
    blend_alpha,
)
from esper.model.slotset import GrowableModel, ParamCounts
from esper.model.transformer import TransformerHost
from esper.model.width import DEFAULT_WIDTH_INIT, WIDTH_INITS, UnitSite, WidthSeed

__all__ = [
    "BLUEPRINTS",
    "DEFAULT_WIDTH_INIT",
    "WIDTH_INITS",
    "Blueprint",
    "CNNHost",
    "FoldPlan",
    "GrowableModel",
    "GrowthScore",
    "Host",
    "LifecycleConfig",
    "MLPHost",
    "MorphogeneticModel",
    "ParamChange",
    "ParamCounts",
    "Piece",
    "SeedSlot",
    "SlotState",
    "SlotStateError",
    "StageChange",
    "TransformerHost",
    "UnitSite",
    "UnknownBlueprintError",
    "WidthSeed",
    "blend_alpha",
    "blueprints_for",
    "count_parameters",
    "get_blueprint",
    "growth_scores",
    "restore_state",
]
