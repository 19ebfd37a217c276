"""In-memory data sets and the per-env batch order.

A `TaskData` holds the whole train and validation split as tensors, so that an env on
a GPU never waits for a loader: it is moved to the device once and batches are index
gathers. Each env draws its batch order from its own `torch.Generator` (a
`BatchStream`), so what env 0 sees does not depend on how many envs run beside it.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Literal

import torch
from torch import Tensor

TaskKind = Literal["classification", "lm"]
TASK_KINDS: tuple[str, ...] = ("classification", "lm")


class DataError(ValueError):
    """A data set is missing, malformed, or asked for with impossible options."""


@dataclass(frozen=True)
class TaskData:
    """Train and validation tensors of one task.

    Classification: ``x`` is ``[N, C, H, W]`` float (or ``[N, F]``), ``y`` is ``[N]`` long.
    Language modelling: ``x`` and ``y`` are ``[N, T]`` long, ``y`` is ``x`` shifted by one.
    """

    kind: TaskKind
    train_x: Tensor
    train_y: Tensor
    val_x: Tensor
    val_y: Tensor
    num_classes: int  # classes, or vocabulary size for "lm"
    name: str = "data"
    vocab: str | None = field(default=None, repr=False)  # index -> character for "lm"

    def __post_init__(self) -> None:
        if self.kind not in TASK_KINDS:
            raise DataError(f"unknown task kind {self.kind!r}; allowed: {', '.join(TASK_KINDS)}")
        for split, x, y in (("train", self.train_x, self.train_y), ("val", self.val_x, self.val_y)):
            if x.shape[0] != y.shape[0]:
                raise DataError(
                    f"{self.name} {split}: {x.shape[0]} inputs but {y.shape[0]} targets"
                )
            if x.shape[0] == 0:
                raise DataError(f"{self.name} {split} split is empty")
        if self.num_classes < 2:
            raise DataError(f"{self.name}: num_classes must be >= 2, got {self.num_classes}")

    @property
    def n_train(self) -> int:
        return int(self.train_x.shape[0])

    @property
    def n_val(self) -> int:
        return int(self.val_x.shape[0])

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.train_x.shape[1:])

    @property
    def device(self) -> torch.device:
        return self.train_x.device

    def to(self, device: torch.device | str) -> TaskData:
        """A copy on ``device``; tensors already there are shared, not copied. Host to GPU
        copies go through pinned memory (asynchronous DMA instead of a staged copy)."""
        device = torch.device(device)

        def move(t: torch.Tensor) -> torch.Tensor:
            if device.type == "cuda" and t.device.type == "cpu":
                return t.pin_memory().to(device, non_blocking=True)
            return t.to(device)

        return replace(
            self,
            train_x=move(self.train_x),
            train_y=move(self.train_y),
            val_x=move(self.val_x),
            val_y=move(self.val_y),
        )


class BatchStream:
    """Mini-batch indices for one env, drawn from that env's own generator.

    The permutation persists across calls: a step of ``batches_per_step`` batches picks
    up where the last one stopped, and a new permutation starts only when the current
    one is used up. The last, smaller batch of a permutation is kept (no sample is
    skipped in an epoch).
    """

    def __init__(self, n: int, batch_size: int, seed: int) -> None:
        if n < 1:
            raise DataError(f"BatchStream needs at least one sample, got n={n}")
        if batch_size < 1:
            raise DataError(f"batch_size must be >= 1, got {batch_size}")
        self.n, self.batch_size = int(n), int(batch_size)
        # CPU generator: the same order on every device, and no device sync per draw.
        self.generator = torch.Generator().manual_seed(int(seed))
        self._perm = torch.randperm(self.n, generator=self.generator)
        self._pos = 0
        self.epochs_started = 1

    @property
    def position(self) -> int:
        """Samples of the current permutation already drawn."""
        return self._pos

    @property
    def batches_per_epoch(self) -> int:
        return -(-self.n // self.batch_size)

    def _refill_if_used_up(self) -> None:
        if self._pos >= self.n:
            self._perm = torch.randperm(self.n, generator=self.generator)
            self._pos = 0
            self.epochs_started += 1

    def next_batch(self) -> Tensor:
        self._refill_if_used_up()
        idx = self._perm[self._pos : self._pos + self.batch_size]
        self._pos += idx.numel()
        return idx

    def step_batches(self, batches_per_step: int | None) -> list[Tensor]:
        """Indices for one env step: the rest of the epoch, or ``batches_per_step`` batches.

        With ``None`` a step is one epoch: it finishes the current permutation, or runs a
        whole new one when the current one is used up.
        """
        if batches_per_step is None:
            self._refill_if_used_up()
            out = []
            while self._pos < self.n:
                out.append(self.next_batch())
            return out
        if batches_per_step < 1:
            raise DataError(f"batches_per_step must be >= 1 or None, got {batches_per_step}")
        return [self.next_batch() for _ in range(batches_per_step)]

    def state_dict(self) -> dict:
        return {
            "generator": self.generator.get_state(),
            "perm": self._perm.clone(),
            "pos": self._pos,
            "epochs_started": self.epochs_started,
        }

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        self._perm = state["perm"].clone()
        self._pos = int(state["pos"])
        self.epochs_started = int(state["epochs_started"])


def stratified_split(labels: Tensor, val_fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    """Train and validation indices with each class split in the same proportion."""
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"val_fraction must be in (0, 1), got {val_fraction}")
    gen = torch.Generator().manual_seed(int(seed))
    train, val = [], []
    for c in torch.unique(labels).tolist():
        idx = torch.nonzero(labels == c).flatten()
        idx = idx[torch.randperm(idx.numel(), generator=gen)]
        n_val = max(1, round(idx.numel() * val_fraction)) if idx.numel() > 1 else 0
        val.append(idx[:n_val])
        train.append(idx[n_val:])
    return torch.sort(torch.cat(train)).values, torch.sort(torch.cat(val)).values
