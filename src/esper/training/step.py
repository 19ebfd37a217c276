"""One definition of a host training step, shared by one env (`Trainer`) and by E envs
trained as one grouped network (`esper.training.batched`).

For every batch of a step's training phase, `train_phase` runs

    zero_grad (every optimiser) -> loss (forward, TRAINING seeds' own pass, task loss)
    -> backward -> unscale -> clip each gradient set on its own -> seed gradient norms
    -> every optimiser's step

The two paths differ only in what they hand in: how a batch's loss is computed (one
model, or the grouped network of E envs), which optimisers step (the host's and each
seed's, or one stacked SGD over E hosts and every env's seed optimisers) and which
gradients are clipped apart (one set per optimiser, so a seed's gradient never rescales
the host's, and with E envs one set per env's host).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple, TypeVar

import torch
from torch import Tensor, nn

from esper.training.config import TrainConfig
from esper.training.objective import EvalTotals

K = TypeVar("K", bound=Hashable)


class TrainPhase(NamedTuple):
    """What the training phase of one env step yields (`Trainer.train_step(trained=)`)."""

    totals: EvalTotals  # training loss and accuracy over the phase's batches
    seed_grad_norms: dict[str, float]  # per seed: mean over batches of its gradient norm
    samples: int  # training samples seen


def make_optimizer(params: Sequence[nn.Parameter], config: TrainConfig, lr: float):
    """The optimiser ``config`` asks for (the host's, or a seed's with ``lr=seed_lr``)."""
    if config.optimizer == "sgd":
        return torch.optim.SGD(
            params, lr=lr, momentum=config.momentum, weight_decay=config.weight_decay
        )
    if config.optimizer == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=config.weight_decay)
    return torch.optim.AdamW(params, lr=lr, weight_decay=config.weight_decay)


def optimizer_settings(optimizer: torch.optim.Optimizer) -> dict:
    """Class and hyperparameters of a one-group optimiser as it stands (a scheduler
    may have moved its lr since construction)."""
    if len(optimizer.param_groups) != 1:
        raise ValueError(f"expected one parameter group, got {len(optimizer.param_groups)}")
    group = optimizer.param_groups[0]
    return {"class": type(optimizer), **{k: group[k] for k in optimizer.defaults}}


def optimizer_like(optimizer: torch.optim.Optimizer, params: Sequence[Tensor]):
    """A fresh optimiser over ``params`` with ``optimizer``'s class and settings."""
    settings = optimizer_settings(optimizer)
    return settings.pop("class")(params, **settings)


def optimizer_params(optimizer: torch.optim.Optimizer) -> tuple[Tensor, ...]:
    return tuple(p for group in optimizer.param_groups for p in group["params"])


@dataclass(frozen=True)
class GradSet:
    """Gradients taken as one vector (for a clip or a norm): those of ``params``, or,
    for parameters that stack ``parts`` envs along their first dimension, env
    ``part``'s share of each."""

    params: tuple[Tensor, ...]
    part: int = 0
    parts: int = 1

    def grads(self) -> list[Tensor]:
        grads = [p.grad for p in self.params if p.grad is not None]
        if self.parts == 1:
            return grads
        return [g.view(self.parts, -1)[self.part] for g in grads]


def clip_grads_(grads: list[Tensor], max_norm: float) -> None:
    """`torch.nn.utils.clip_grad_norm_` on gradient tensors (views included), with the
    same operations, so one env's trajectory is bit for bit what that function gives."""
    if not grads:
        return
    total = torch.nn.utils.get_total_norm(grads)
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    for g in grads:
        g.mul_(coef)


def grad_norm(grads: list[Tensor]) -> Tensor:
    """L2 norm of ``grads`` taken as one vector (the gradient-health feature)."""
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))


def train_phase(
    batches: int,
    batch_loss: Callable[[int], Tensor],
    optimizers: Sequence[torch.optim.Optimizer],
    clip_sets: Sequence[GradSet],
    seed_sets: Mapping[K, GradSet],
    grad_clip: float | None,
    scaler: torch.amp.GradScaler | None = None,
) -> dict[K, float]:
    """``batches`` optimiser steps; ``batch_loss(k)`` runs batch k's forward passes and
    returns the loss to minimise (recording whatever totals the caller keeps). Returns,
    per key of ``seed_sets``, the mean over batches of that seed's gradient norm (after
    clipping). ``scaler``: fp16 loss scaling (None or disabled: plain steps)."""
    grad_sum: dict[K, Tensor | float] = dict.fromkeys(seed_sets, 0.0)
    for k in range(batches):
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
        loss = batch_loss(k)
        if scaler is None:
            loss.backward()
        else:
            scaler.scale(loss).backward()
            for opt in optimizers:  # true gradients for clipping and the norms below
                scaler.unscale_(opt)
        if grad_clip is not None:
            for grad_set in clip_sets:
                clip_grads_(grad_set.grads(), grad_clip)
        for key, grad_set in seed_sets.items():
            grads = grad_set.grads()
            if grads:  # summed on the device: no sync per batch
                grad_sum[key] = grad_sum[key] + grad_norm(grads)
        for opt in optimizers:
            if scaler is None:
                opt.step()
            else:
                scaler.step(opt)
        if scaler is not None:
            scaler.update()
    n = max(batches, 1)
    return {key: float(v) / n for key, v in grad_sum.items()}
