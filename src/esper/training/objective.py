"""Loss and quality per task kind, in one place so training, validation and the
counterfactual passes can never disagree on what "quality" means.

quality = validation accuracy (classification) or -validation loss in nats (lm).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from esper.training.data import TaskKind


def flat_logits(logits: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """``[N, C]`` / ``[N]`` for classification, ``[N*T, V]`` / ``[N*T]`` for lm."""
    return logits.reshape(-1, logits.shape[-1]), targets.reshape(-1)


def task_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean cross-entropy per prediction (per image, or per character)."""
    return F.cross_entropy(*flat_logits(logits, targets))


def sample_losses(logits: Tensor, targets: Tensor) -> Tensor:
    """Cross-entropy of each prediction, shaped like ``targets`` (`task_loss` is their
    mean)."""
    return F.cross_entropy(*flat_logits(logits, targets), reduction="none").view(targets.shape)


def env_rows(values: Tensor) -> Tensor:
    """``[B, E, ...]`` (E envs' values stacked on dim 1) as ``[E, B·...]``: a row per env."""
    return values.transpose(0, 1).reshape(values.shape[1], -1)


@dataclass
class EvalTotals:
    """Running sums over the predictions of one pass; no device sync until read."""

    loss_sum: Tensor | float = 0.0
    correct: Tensor | float = 0.0
    count: int = 0

    def add(self, logits: Tensor, targets: Tensor) -> Tensor:
        """Add one batch; returns its per-sample losses ``[N]``: per image, or the mean
        over a sequence's characters (sequences are the independent units for error bars)."""
        flat, tgt = flat_logits(logits, targets)
        losses = F.cross_entropy(flat, tgt, reduction="none").detach()
        self.loss_sum = self.loss_sum + losses.sum()
        self.correct = self.correct + (flat.argmax(dim=-1) == tgt).sum()
        self.count += int(tgt.numel())
        return losses.view(targets.shape[0], -1).mean(dim=1)

    @property
    def loss(self) -> float:
        return float(self.loss_sum) / max(self.count, 1)

    @property
    def accuracy(self) -> float:
        return float(self.correct) / max(self.count, 1)


class StackedTotals:
    """`EvalTotals` of E envs whose predictions come stacked on dim 1 (logits
    ``[B, E, ..., K]``, targets ``[B, E, ...]``); no device sync until `split`."""

    def __init__(self) -> None:
        self.loss_sum: Tensor | float = 0.0  # [E], in the logits' dtype as EvalTotals sums
        self.correct: Tensor | float = 0.0  # [E]
        self.count = 0  # predictions per env

    def add(self, logits: Tensor, targets: Tensor) -> Tensor:
        """Add one batch; returns each env's per-prediction losses ``[E, n]`` (not
        detached: their row means are each env's task loss)."""
        losses = env_rows(sample_losses(logits, targets))
        with torch.no_grad():
            # Row sums of [E, n]: the same reduction as EvalTotals' sum of one env's [n].
            self.loss_sum = self.loss_sum + losses.detach().sum(1)
            self.correct = self.correct + env_rows(logits.argmax(dim=-1) == targets).sum(1)
        self.count += losses.shape[1]
        return losses

    def split(self) -> list[EvalTotals]:
        """One `EvalTotals` per env."""
        if not isinstance(self.loss_sum, Tensor) or not isinstance(self.correct, Tensor):
            raise ValueError("StackedTotals.split before any batch was added")
        return [
            EvalTotals(loss_sum=loss, correct=correct, count=self.count)
            for loss, correct in zip(self.loss_sum.unbind(), self.correct.unbind(), strict=True)
        ]


def quality(kind: TaskKind, loss: float, accuracy: float) -> float:
    """Higher is better. A non-finite loss gives -inf quality for lm tasks."""
    if kind == "lm":
        return -loss if math.isfinite(loss) else -math.inf
    return accuracy


def bits_per_char(loss_nats: float) -> float:
    return loss_nats / math.log(2.0)


@torch.no_grad()
def evaluate(
    model: torch.nn.Module, x: Tensor, y: Tensor, batch_size: int, **forward_kw
) -> EvalTotals:
    """One plain pass over ``(x, y)`` in eval mode (the caller restores train mode)."""
    totals = EvalTotals()
    for start in range(0, x.shape[0], batch_size):
        totals.add(
            model(x[start : start + batch_size], **forward_kw), y[start : start + batch_size]
        )
    return totals
