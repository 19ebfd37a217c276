"""Configuration of host training and of the safety governor."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

OPTIMIZERS: tuple[str, ...] = ("sgd", "adam", "adamw")
AMP_MODES: tuple[str, ...] = ("off", "bf16", "fp16")


class TrainConfigError(ValueError):
    """A training or governor setting is out of its allowed range."""


@dataclass(frozen=True)
class GovernorConfig:
    """When the governor rolls an env back, and what that costs the controller.

    A step is *bad* when its monitored loss is non-finite (rollback at once), above
    ``divergence_factor`` times the fresh model's loss (worse than not training at all),
    or a *spike*: above ``median + k_sigma * 1.4826 * MAD`` of the last ``window`` good
    steps and at least ``min_rise`` (relative) above their median. ``consecutive`` bad
    steps in a row roll back. Median and MAD are robust: one odd step in the window
    does not move the threshold. A spike in the ``grace_steps`` steps after the model's
    function changed (a seed germinated, pruned, fossilized, or its alpha moved) does
    not count: a bump right after growth is expected, not a fault; divergence beyond
    the ceiling counts even then. Measured with bench/bench_governor.py.
    """

    enabled: bool = True
    # Spike test: the monitored loss is compared with the last `window` good steps; it
    # needs `min_history` of them before spikes are judged, so the steep early part of
    # training is never mistaken for instability.
    window: int = 10
    min_history: int = 3
    k_sigma: float = 3.0
    # A spike must also be this far above the recent median (0.3: 30 % worse): a flat
    # loss history must not turn every small wobble into a "spike".
    min_rise: float = 0.3
    # Ceiling relative to the fresh model's loss (the trainer's first validation): a
    # loss this much worse than an untrained model is divergence, whatever the history.
    divergence_factor: float = 2.0
    grace_steps: int = 1  # steps after a function change whose spikes do not count
    consecutive: int = 2  # bad steps in a row before a rollback; NaN/Inf acts at once
    monitor: Literal["train_loss", "val_loss"] = "val_loss"
    penalty: float = 1.0  # reported in StepResult.penalty; the env subtracts it

    def __post_init__(self) -> None:
        if self.window < 2 or not 2 <= self.min_history <= self.window:
            raise TrainConfigError(
                f"governor needs window >= 2 and 2 <= min_history <= window, got "
                f"window={self.window}, min_history={self.min_history}"
            )
        if self.k_sigma <= 0 or self.consecutive < 1 or self.min_rise < 0:
            raise TrainConfigError(
                f"governor needs k_sigma > 0, consecutive >= 1, min_rise >= 0; got "
                f"{self.k_sigma}, {self.consecutive}, {self.min_rise}"
            )
        if not self.divergence_factor > 1 or self.grace_steps < 0:
            raise TrainConfigError(
                f"governor needs divergence_factor > 1 and grace_steps >= 0; got "
                f"{self.divergence_factor}, {self.grace_steps}"
            )
        if self.monitor not in ("train_loss", "val_loss"):
            raise TrainConfigError(
                f"governor monitor {self.monitor!r} unknown; allowed: train_loss, val_loss"
            )


@dataclass(frozen=True)
class TrainConfig:
    """Host and seed optimisation for one env step (= one epoch or `batches_per_step`)."""

    optimizer: str = "sgd"
    lr: float = 0.05
    momentum: float = 0.9  # SGD only
    weight_decay: float = 0.0
    seed_lr: float | None = None  # seeds' learning rate; None = same as the host
    batch_size: int = 64
    batches_per_step: int | None = None  # None: one env step is one full epoch
    eval_batch_size: int = 1024
    grad_clip: float | None = None  # max grad norm, host and each seed clipped apart
    max_epochs: int = 20  # default episode length for this task (the env reads it)
    measure_fossils: bool = True  # counterfactual credit for fossils too (alpha = 1)
    # Sampled credit (esper.training.counterfactual.sampled_counterfactuals): None
    # measures every seed each step (exact, cost grows with the seeds' depth times their
    # number); m measures m seeds drawn at random from the trainer's own generator, so
    # credit costs at most 1 + m validation passes; exact whenever there are <= m seeds.
    # A seed not drawn keeps its last reading with a NaN standard error, so no
    # lifecycle gate (blend, prune, fossilize) acts on it until it is measured again;
    # the observation and the contribution reward still see that last value.
    credit_samples: int | None = None
    plateau_tolerance: float = 1e-3  # quality gains below this count as a plateau
    history: int = 20  # how many past losses TrainingSignals keeps
    governor: GovernorConfig = field(default_factory=GovernorConfig)
    # Mixed precision for the host's training forward pass: "bf16" or "fp16" (loss scaling
    # on CUDA). Validation and the controller's action distributions stay in float32.
    amp: str = "off"

    def __post_init__(self) -> None:
        if self.amp not in AMP_MODES:
            raise TrainConfigError(f"amp {self.amp!r} unknown; allowed: {', '.join(AMP_MODES)}")
        if self.optimizer not in OPTIMIZERS:
            raise TrainConfigError(
                f"optimizer {self.optimizer!r} unknown; allowed: {', '.join(OPTIMIZERS)}"
            )
        # Each message names the one field at fault: a pair like "got -0.1, None" left
        # the user to guess which value was which.
        if not self.lr > 0:
            raise TrainConfigError(f"lr must be > 0, got {self.lr}")
        if self.seed_lr is not None and not self.seed_lr > 0:
            raise TrainConfigError(
                f"seed_lr must be > 0 or None (the host's lr), got {self.seed_lr}"
            )
        for name in ("batch_size", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise TrainConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.batches_per_step is not None and self.batches_per_step < 1:
            raise TrainConfigError(
                f"batches_per_step must be >= 1 or None (a full epoch), got {self.batches_per_step}"
            )
        if self.credit_samples is not None and self.credit_samples < 1:
            raise TrainConfigError(
                f"credit_samples must be >= 1 or None (exact credit), got {self.credit_samples}"
            )
        if self.grad_clip is not None and self.grad_clip <= 0:
            raise TrainConfigError(f"grad_clip must be > 0 or None, got {self.grad_clip}")
        for name in ("max_epochs", "history"):
            if getattr(self, name) < 1:
                raise TrainConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
