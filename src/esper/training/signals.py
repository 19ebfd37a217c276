"""Per-env training signals read by observations and the heuristic controller."""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field


@dataclass
class TrainingSignals:
    """What an env has seen so far in its episode.

    Deltas are "this step minus the previous step" (0 on the first step). The plateau
    counter counts steps in a row whose quality did not beat the best so far by more
    than ``plateau_tolerance``.
    """

    history: int = 20
    plateau_tolerance: float = 1e-3
    epoch: int = 0
    train_loss: float = math.nan
    train_acc: float = math.nan
    val_loss: float = math.nan
    val_acc: float = math.nan
    quality: float = math.nan
    best_quality: float = -math.inf
    plateau_epochs: int = 0
    delta_train_loss: float = 0.0
    delta_val_loss: float = 0.0
    delta_train_acc: float = 0.0
    delta_val_acc: float = 0.0
    delta_quality: float = 0.0
    train_loss_history: deque[float] = field(default_factory=deque)
    val_loss_history: deque[float] = field(default_factory=deque)
    quality_history: deque[float] = field(default_factory=deque)

    def __post_init__(self) -> None:
        if self.history < 1:
            raise ValueError(f"history must be >= 1, got {self.history}")
        for name in ("train_loss_history", "val_loss_history", "quality_history"):
            setattr(self, name, deque(getattr(self, name), maxlen=self.history))

    def update(
        self, train_loss: float, train_acc: float, val_loss: float, val_acc: float, quality: float
    ) -> None:
        first = self.epoch == 0

        def delta(new: float, old: float) -> float:
            # A NaN from a diverged step must not poison every later observation.
            d = 0.0 if first else new - old
            return d if math.isfinite(d) else 0.0

        self.delta_train_loss = delta(train_loss, self.train_loss)
        self.delta_val_loss = delta(val_loss, self.val_loss)
        self.delta_train_acc = delta(train_acc, self.train_acc)
        self.delta_val_acc = delta(val_acc, self.val_acc)
        self.delta_quality = delta(quality, self.quality)
        self.train_loss, self.train_acc = train_loss, train_acc
        self.val_loss, self.val_acc, self.quality = val_loss, val_acc, quality
        if quality > self.best_quality + self.plateau_tolerance:
            self.plateau_epochs = 0
        else:
            self.plateau_epochs += 1
        if math.isfinite(quality):
            self.best_quality = max(self.best_quality, quality)
        self.train_loss_history.append(train_loss)
        self.val_loss_history.append(val_loss)
        self.quality_history.append(quality)
        self.epoch += 1

    def reset(self) -> None:
        """Back to the state of a fresh episode, keeping the settings."""
        fresh = TrainingSignals(history=self.history, plateau_tolerance=self.plateau_tolerance)
        self.__dict__.update(fresh.__dict__)
