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


def _grads(params: Sequence[Tensor]) -> list[Tensor]:
    return [p.grad for p in params if p.grad is not None]


@dataclass(frozen=True)
class ClipSet:
    """Parameters whose gradient is clipped as one vector (one optimiser's), or, with
    ``envs`` > 1, parameters that stack E envs along their first dimension, each env's
    share clipped on its own (E hosts trained as one grouped network)."""

    params: tuple[Tensor, ...]
    envs: int = 1

    def clip_(self, max_norm: float) -> None:
        """Scale the gradients in place by min(1, max_norm / (norm + 1e-6))."""
        grads = _grads(self.params)
        if not grads:
            return
        if self.envs == 1:
            # The operations of `torch.nn.utils.clip_grad_norm_`: one env's trajectory
            # is bit for bit what that function gives.
            total = torch.nn.utils.get_total_norm(grads)
        else:
            grads = [g.view(self.envs, -1) for g in grads]
            per_tensor = torch.stack([torch.linalg.vector_norm(g, dim=1) for g in grads], 1)
            total = torch.linalg.vector_norm(per_tensor, dim=1)[:, None]  # [E, 1]
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
    clip_sets: Sequence[ClipSet],
    seed_params: Mapping[K, Sequence[Tensor]],
    grad_clip: float | None,
    scaler: torch.amp.GradScaler | None = None,
) -> dict[K, float]:
    """``batches`` optimiser steps; ``batch_loss(k)`` runs batch k's forward passes and
    returns the loss to minimise (recording whatever totals the caller keeps). Returns,
    per key of ``seed_params``, the mean over batches of that seed's gradient norm
    (after clipping). ``scaler``: fp16 loss scaling (None or disabled: plain steps)."""
    grad_sum: dict[K, Tensor | float] = dict.fromkeys(seed_params, 0.0)
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
            for clip_set in clip_sets:
                clip_set.clip_(grad_clip)
        for key, params in seed_params.items():
            grads = _grads(params)
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
