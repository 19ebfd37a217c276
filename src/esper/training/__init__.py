"""Host training (Tolaria): tasks and data, the per-env trainer, counterfactual seed
credit, training signals and the safety governor."""

from esper.training.config import GovernorConfig, TrainConfig, TrainConfigError
from esper.training.counterfactual import (
    CounterfactualResult,
    fast_counterfactuals,
    reference_counterfactuals,
    variants_to_measure,
)
from esper.training.data import BatchStream, DataError, TaskData, stratified_split
from esper.training.governor import Governor, GovernorEvent
from esper.training.objective import bits_per_char, quality, task_loss
from esper.training.signals import TrainingSignals
from esper.training.tasks import TASKS, Task, TaskError, get_task, list_tasks, task_options
from esper.training.trainer import StepResult, Trainer

__all__ = [
    "TASKS",
    "BatchStream",
    "CounterfactualResult",
    "DataError",
    "Governor",
    "GovernorConfig",
    "GovernorEvent",
    "StepResult",
    "Task",
    "TaskData",
    "TaskError",
    "TrainConfig",
    "TrainConfigError",
    "Trainer",
    "TrainingSignals",
    "bits_per_char",
    "fast_counterfactuals",
    "get_task",
    "list_tasks",
    "quality",
    "reference_counterfactuals",
    "stratified_split",
    "task_loss",
    "task_options",
    "variants_to_measure",
]
