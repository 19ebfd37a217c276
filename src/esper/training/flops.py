"""Training compute in FLOPs (issue 12, item 4).

What is counted, per env and episode:

* training: ``samples x (1 + BACKWARD_FACTOR) x F_train``, where ``F_train`` is the
  forward FLOPs per sample of the live model in *train* mode. Train mode runs every
  seed that trains, TRAINING seeds included (their value is hidden from the host, but
  they run forward and backward all the same), so seeds of any kind (residual or
  width) are covered without knowing how they work. Backward costs about twice the
  forward (gradients of the inputs and of the weights), the usual 6N-per-token rule.
* validation and counterfactual passes: forward only, counted exactly on the real
  call (shared prefixes and stacked variants included).

FLOPs are those `torch.utils.flop_counter.FlopCounterMode` counts: matmuls, convolutions
and attention (2 per multiply-add); element-wise ops (norms, activations) are not counted,
as in the model-growth literature. Counts are cached by the model's structure (parameter
shapes and each slot's stage), so a recount happens only after germinate, prune,
fossilize, a stage change or a fold (`esper.model.fold`: layers change shape), not every
step; a governor rollback to an earlier structure finds that structure's count again.
A fold leaves the count as it was (the fossil's multiply-adds now run inside one wider
layer); a live width seed next to it reads or feeds the folded units and costs more.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import TypeVar

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

BACKWARD_FACTOR = 2  # backward FLOPs per forward FLOP
T = TypeVar("T")


def _rng_devices(device: torch.device) -> list[int]:
    if device.type != "cuda":
        return []
    return [device.index if device.index is not None else torch.cuda.current_device()]


def count_flops(fn: Callable[[], T]) -> tuple[T, int]:
    """Run ``fn()`` under `FlopCounterMode`; returns its result and the FLOPs it used."""
    with FlopCounterMode(display=False) as counter:
        out = fn()
    return out, int(counter.get_total_flops())


def forward_flops(model: nn.Module, x: Tensor, *, train: bool = False, **forward_kw) -> int:
    """FLOPs of one ``model(x, **forward_kw)`` in train or eval mode, without side effects.

    Train mode runs with autograd on (TRAINING seeds only run then). Buffers (BatchNorm
    running statistics) are restored and the random generators forked, so counting never
    changes what training does next.
    """
    was_training = model.training
    saved = [(b, b.detach().clone()) for b in model.buffers()]
    try:
        with torch.random.fork_rng(devices=_rng_devices(x.device)):
            model.train(train)
            with torch.set_grad_enabled(train):
                _, flops = count_flops(lambda: _forward(model, x, train, forward_kw))
    finally:
        model.train(was_training)
        with torch.no_grad():
            for buffer, value in saved:
                buffer.copy_(value)
    return flops


def _forward(model: nn.Module, x: Tensor, train: bool, forward_kw: dict) -> None:
    model(x, **forward_kw)
    # TRAINING seeds' own pass (`MorphogeneticModel.seed_forward`), which the Trainer
    # runs next to every training forward.
    if train and not forward_kw and getattr(model, "own_seed_pass", False):
        model.seed_forward(x)


def structure_key(model: nn.Module) -> tuple[Hashable, ...]:
    """What a forward's FLOPs depend on: parameter shapes and (for a morphogenetic
    model) each slot's stage and whether its alpha is 0."""
    shapes = tuple((name, tuple(p.shape)) for name, p in model.named_parameters())
    states = getattr(model, "slot_states", None)
    stages = (
        () if states is None else tuple((s.slot_id, int(s.stage), s.alpha > 0) for s in states())
    )
    return shapes, stages


@dataclass(frozen=True)
class StepFlops:
    train: int  # forward + backward on the training samples of one step
    eval: int  # validation and counterfactual passes of one step (forward only)

    @property
    def total(self) -> int:
        return self.train + self.eval


class FlopMeter:
    """Cumulative FLOPs of one trainer (one episode): ``train``, ``eval``, ``total``."""

    def __init__(self) -> None:
        self.train = 0
        self.eval = 0
        self._train_cache: dict[Hashable, tuple[int, int]] = {}  # key -> (flops, batch)
        self._eval_cache: dict[Hashable, int] = {}

    @property
    def total(self) -> int:
        return self.train + self.eval

    def train_forward(self, model: nn.Module, sample_x: Tensor) -> tuple[int, int]:
        """``(FLOPs, rows)`` of one train-mode forward on ``sample_x`` (>= 2 rows, so
        BatchNorm can run); cached by the model's structure."""
        key = structure_key(model)
        cached = self._train_cache.get(key)
        if cached is None:
            cached = (forward_flops(model, sample_x, train=True), int(sample_x.shape[0]))
            self._train_cache[key] = cached
        return cached

    def add_training(self, model: nn.Module, sample_x: Tensor, samples: int) -> int:
        """Count forward + backward on ``samples`` training samples; returns the FLOPs."""
        flops, rows = self.train_forward(model, sample_x)
        # FLOPs are linear in the batch size, so this is exact for whole samples.
        step = samples * (1 + BACKWARD_FACTOR) * flops // rows
        self.train += step
        return step

    def has_eval(self, key: Hashable) -> bool:
        """Whether the FLOPs of the eval pass ``key`` are known (counted once)."""
        return key in self._eval_cache

    def measure_eval(self, key: Hashable, fn: Callable[[], T]) -> tuple[T, int]:
        """Run a forward-only pass ``fn``; counts it the first time ``key`` is seen."""
        flops = self._eval_cache.get(key)
        if flops is None:
            out, flops = count_flops(fn)
            self._eval_cache[key] = flops
        else:
            out = fn()
        self.eval += flops
        return out, flops
