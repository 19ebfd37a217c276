"""The task registry: a task is data + host factory + default slots + hyperparameters.

``get_task("digits")`` returns a `Task`; options tune it (``get_task("synthetic",
shape=(3, 32, 32), n_train=4096)``). Loss and metric follow from `Task.kind` (see
`esper.training.objective`). Hosts are imported inside the factories, so importing this
module builds nothing.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from esper.training import datasets
from esper.training.config import TrainConfig
from esper.training.data import TaskData, TaskKind

if TYPE_CHECKING:
    from torch import nn


class TaskError(ValueError):
    """Unknown task name or option."""


# Blocks (= slots) a task host may have. DESIGN asks for 1 .. 64+ slots; measured on one
# thread of a 2-core CPU (digits, default width), one env step takes 2.8 s at 64 blocks,
# 4.7 s at 256 and 38 s at 1,024 (a 20-step episode: 13 min per env), and building such
# hosts is what left `--set task.depth=100000` sitting at "starting" for minutes.
MAX_DEPTH = 256


def _check_blocks(name: str, value: object) -> None:
    """``name`` (depth, n_layers) must be an int in 1 .. MAX_DEPTH: checked before any
    host exists, so an absurd value is refused at once instead of built."""
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_DEPTH:
        raise TaskError(
            f"{name} must be an int in 1..{MAX_DEPTH} (blocks, one slot each), got {value!r}"
        )


@dataclass(frozen=True)
class Task:
    name: str
    kind: TaskKind
    # seed picks the realisation of the data set (split, synthetic draws), not the data
    # order: every env of a run uses the same value; the order comes from the env seed.
    make_data: Callable[..., TaskData]  # (seed: int = 0, root: str | Path | None = None)
    make_host: Callable[[TaskData], nn.Module]
    default_slots: tuple[str, ...]
    hparams: TrainConfig
    description: str = ""
    # One input's shape, e.g. (1, 8, 8) or (seq_len,) token ids for "lm": what
    # `esper.training.sizing` feeds a meta-device host to estimate memory before any
    # data is read or any host is built.
    sample_shape: tuple[int, ...] = ()
    # Classes of that size probe; for "lm" the vocabulary comes from the file, so the
    # probe assumes 256 characters (the embedding is a small part of the host).
    probe_classes: int = 10


# Images at least this many pixels a side get NHWC convolutions under
# ``channels_last="auto"`` (`resolve_channels_last`). NCHW time over NHWC time per
# training batch, one thread, median of 8 interleaved pairs on the 2-core machine at
# load ~3 (`python bench/bench_host_layout.py --rule`): 3x32x32 width 8 batch 512
# (pool after every block) 1.57x; 1x28x28 width 4 batch 128 (fashion-mnist's shape)
# 1.34x; 1x16x16 width 4 batch 128 1.25x; 1x8x8 width 2 batch 64 (digits) 0.92x.
CHANNELS_LAST_MIN_SIZE = 16


def resolve_channels_last(setting: bool | str, image_size: int) -> bool:
    """The layout ``channels_last = setting`` ("auto", true or false) gives a CNN host of
    ``image_size`` pixels a side."""
    if setting == "auto":
        return image_size >= CHANNELS_LAST_MIN_SIZE
    if not isinstance(setting, bool):
        raise TaskError(f'channels_last must be true, false or "auto", got {setting!r}')
    return setting


def _cnn(
    in_channels: int,
    width: int,
    depth: int,
    image_size: int,
    pool_at: tuple[int, ...] | list[int] | None,
    channels_last: bool | str,
    num_classes: int = 10,
) -> tuple[Callable[[TaskData], nn.Module], bool]:
    """Host factory of the CNN tasks, with their shared options checked up front, and
    whether its host is channels_last.

    ``pool_at``: the blocks followed by a 2x2 max-pool (None: the host's default, from
    the second block on); e.g. ``[0, 1, 2]`` pools after every block, a quarter of the
    activations from the first block on. ``channels_last``: NHWC weights, so the
    convolutions run in that layout (1.4-1.6x per batch for a width-8 host on 32x32
    images, `bench/bench_host_layout.py`; no change on 8x8 digits); "auto" decides by
    image size (`resolve_channels_last`).
    """
    _check_blocks("depth", depth)
    if pool_at is not None:
        if isinstance(pool_at, (str, bytes)) or not all(
            isinstance(i, int) and not isinstance(i, bool) for i in pool_at
        ):
            raise TaskError(f"pool_at must be a list of block indices, got {pool_at!r}")
        bad = [i for i in pool_at if not 0 <= i < depth]
        if bad:
            raise TaskError(f"pool_at index {bad[0]} out of range: blocks are 0..{depth - 1}")
        pool_at = tuple(sorted(set(pool_at)))
    nhwc = resolve_channels_last(channels_last, image_size)

    def make_host(data: TaskData) -> nn.Module:
        import torch

        from esper.model import CNNHost

        host = CNNHost(
            in_channels, num_classes, width, depth, image_size=image_size, pool_at=pool_at
        )
        return host.to(memory_format=torch.channels_last) if nhwc else host

    return make_host, nhwc


def _images_in_layout(data: TaskData, channels_last: bool) -> TaskData:
    """``data`` with its images stored channels_last when the host is: every batch is then
    gathered in the layout the first convolution reads, instead of converted per batch."""
    if not channels_last or data.train_x.dim() != 4:
        return data
    import torch

    nhwc = torch.channels_last
    return replace(
        data,
        train_x=data.train_x.contiguous(memory_format=nhwc),
        val_x=data.val_x.contiguous(memory_format=nhwc),
    )


def _digits(
    width: int = 2,
    depth: int = 3,
    val_fraction: float = 0.2,
    pool_at: list[int] | None = None,
    channels_last: bool | str = "auto",
    **hp: Any,
) -> Task:
    make_host, nhwc = _cnn(1, width, depth, 8, pool_at, channels_last)

    def make_data(seed: int = 0, root: str | Path | None = None) -> TaskData:
        data = datasets.load_digits_data(val_fraction=val_fraction, split_seed=seed)
        return _images_in_layout(data, nhwc)

    return Task(
        "digits",
        "classification",
        make_data,
        make_host,
        tuple(f"r0c{i}" for i in range(depth)),
        TrainConfig(**{"optimizer": "sgd", "lr": 0.05, "momentum": 0.9, "batch_size": 64, **hp}),
        "scikit-learn's 8x8 digits, narrow CNN host (w=2 leaves ~9 points for seeds)",
        sample_shape=(1, 8, 8),
    )


def _fashion_mnist(
    width: int = 4,
    depth: int = 3,
    max_train: int | None = None,
    max_val: int | None = None,
    pool_at: list[int] | None = None,
    channels_last: bool | str = "auto",
    **hp: Any,
) -> Task:
    make_host, nhwc = _cnn(1, width, depth, 28, pool_at, channels_last)

    def make_data(seed: int = 0, root: str | Path | None = None) -> TaskData:
        data = datasets.load_fashion_mnist(root, max_train=max_train, max_val=max_val)
        return _images_in_layout(data, nhwc)

    defaults = {"optimizer": "sgd", "lr": 0.05, "momentum": 0.9, "batch_size": 128}
    return Task(
        "fashion-mnist",
        "classification",
        make_data,
        make_host,
        tuple(f"r0c{i}" for i in range(depth)),
        TrainConfig(**{**defaults, "batches_per_step": 100, **hp}),
        f"Fashion-MNIST IDX files (default {datasets.FASHION_MNIST_ROOT})",
        sample_shape=(1, 28, 28),
    )


def _cifar10(
    width: int = 8,
    depth: int = 4,
    max_train: int | None = None,
    max_val: int | None = None,
    pool_at: list[int] | None = None,
    channels_last: bool | str = "auto",
    **hp: Any,
) -> Task:
    make_host, nhwc = _cnn(3, width, depth, 32, pool_at, channels_last)

    def make_data(seed: int = 0, root: str | Path | None = None) -> TaskData:
        data = datasets.load_cifar10(root, max_train=max_train, max_val=max_val)
        return _images_in_layout(data, nhwc)

    defaults = {"optimizer": "sgd", "lr": 0.05, "momentum": 0.9, "batch_size": 128}
    return Task(
        "cifar10",
        "classification",
        make_data,
        make_host,
        tuple(f"r0c{i}" for i in range(depth)),
        TrainConfig(**{**defaults, "batches_per_step": 100, **hp}),
        "CIFAR-10 python batches from a local folder (root=...)",
        sample_shape=(3, 32, 32),
    )


def _text(
    path: str | Path | None = None,
    seq_len: int = 64,
    max_chars: int | None = 1_000_000,
    max_val_sequences: int | None = 512,
    d_model: int = 64,
    n_heads: int = 4,
    n_layers: int = 2,
    **hp: Any,
) -> Task:
    def make_data(seed: int = 0, root: str | Path | None = None) -> TaskData:
        return datasets.load_text(
            root if root is not None else path,
            seq_len=seq_len,
            max_chars=max_chars,
            max_val_sequences=max_val_sequences,
        )

    def make_host(data: TaskData) -> nn.Module:
        from esper.model import TransformerHost

        return TransformerHost(
            vocab_size=data.num_classes,
            d_model=d_model,
            n_heads=n_heads,
            n_layers=n_layers,
            max_seq_len=seq_len,
        )

    _check_blocks("n_layers", n_layers)
    defaults = {"optimizer": "adamw", "lr": 3e-3, "batch_size": 32, "batches_per_step": 50}
    return Task(
        "text",
        "lm",
        make_data,
        make_host,
        tuple(f"r0c{i}" for i in range(n_layers)),
        TrainConfig(**{**defaults, **hp}),
        "character-level language model on a UTF-8 file (path=...); quality = -val loss",
        sample_shape=(seq_len,),
        probe_classes=256,
    )


def _synthetic(
    shape: tuple[int, ...] = (3, 32, 32),
    n_train: int = 4096,
    n_val: int = 1024,
    num_classes: int = 10,
    noise: float = 1.0,
    width: int = 2,
    depth: int = 3,
    pool_at: list[int] | None = None,
    channels_last: bool | str = "auto",
    **hp: Any,
) -> Task:
    shape = tuple(int(s) for s in shape)
    _check_blocks("depth", depth)
    cnn = len(shape) == 3 and shape[1] == shape[2]
    if not cnn and (pool_at is not None or channels_last not in ("auto", False)):
        raise TaskError(f"pool_at and channels_last need an image shape (C, S, S), got {shape}")
    make_cnn, nhwc = (
        _cnn(shape[0], width, depth, shape[-1], pool_at, channels_last, num_classes)
        if cnn
        else (None, False)
    )

    def make_data(seed: int = 0, root: str | Path | None = None) -> TaskData:
        data = datasets.make_synthetic(shape, n_train, n_val, num_classes, noise, seed)
        return _images_in_layout(data, nhwc)

    def make_host(data: TaskData) -> nn.Module:
        if len(shape) == 1:
            from esper.model import MLPHost

            return MLPHost(shape[0], num_classes, hidden=8 * width, depth=depth)
        if make_cnn is None:
            raise TaskError(f"synthetic host needs shape (F,) or (C, S, S), got {shape}")
        return make_cnn(data)

    return Task(
        "synthetic",
        "classification",
        make_data,
        make_host,
        tuple(f"r0c{i}" for i in range(depth)),
        TrainConfig(**{"optimizer": "sgd", "lr": 0.05, "momentum": 0.9, **hp}),
        "class-conditional random images of any shape, for tests and throughput",
        sample_shape=shape,
        probe_classes=num_classes,
    )


TASKS: Mapping[str, Callable[..., Task]] = MappingProxyType(
    {
        "digits": _digits,
        "fashion-mnist": _fashion_mnist,
        "cifar10": _cifar10,
        "text": _text,
        "synthetic": _synthetic,
    }
)


def list_tasks() -> tuple[str, ...]:
    return tuple(TASKS)


def task_options(name: str) -> tuple[str, ...]:
    """Options a task takes besides the `TrainConfig` fields (which override its hparams)."""
    params = inspect.signature(_factory(name)).parameters.values()
    return tuple(p.name for p in params if p.kind is not inspect.Parameter.VAR_KEYWORD)


# What each task option does (`esper tasks` prints these beside each option's default).
OPTION_HELP: Mapping[str, str] = MappingProxyType(
    {
        "width": "host width: CNN blocks have w, 2w, 4w, 8w, 8w, ... channels (MLP: 8w units)",
        "depth": f"host blocks, one slot each (r0c0, r0c1, ...; 1..{MAX_DEPTH})",
        "val_fraction": "share of the images held out for validation",
        "pool_at": "blocks followed by a 2x2 max-pool, e.g. [0, 1, 2] (unset: from block 1 on)",
        "channels_last": 'NHWC convolutions: true, false or "auto" (on for images >= 16 px)',
        "max_train": "use the first N training images (unset: all)",
        "max_val": "use the first N validation images (unset: all)",
        "path": "UTF-8 text file (or --set env.data_root=FILE)",
        "seq_len": "characters per sequence",
        "max_chars": "characters read from the file",
        "max_val_sequences": "validation sequences kept",
        "d_model": "transformer width",
        "n_heads": "attention heads (must divide d_model)",
        "n_layers": f"transformer blocks, one slot each (1..{MAX_DEPTH})",
        "shape": "input shape: [F] (MLP host) or [C, S, S] (CNN host)",
        "n_train": "training examples drawn",
        "n_val": "validation examples drawn",
        "num_classes": "classes",
        "noise": "noise around each class's mean image",
    }
)


def describe_options(name: str) -> list[tuple[str, Any, str]]:
    """``(option, default, what it does)`` for each option of task ``name``."""
    params = inspect.signature(_factory(name)).parameters.values()
    return [
        (p.name, p.default, OPTION_HELP.get(p.name, ""))
        for p in params
        if p.kind is not inspect.Parameter.VAR_KEYWORD
    ]


def _factory(name: str) -> Callable[..., Task]:
    try:
        return TASKS[name]
    except KeyError:
        raise TaskError(f"unknown task {name!r}; available: {', '.join(TASKS)}") from None


def get_task(name: str, **options: Any) -> Task:
    """The task ``name``; options are task options or `TrainConfig` field overrides."""
    factory = _factory(name)
    config_fields = set(TrainConfig.__dataclass_fields__)
    allowed = set(task_options(name)) | config_fields
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise TaskError(
            f"task {name!r} has no option {unknown[0]!r}; task options: "
            f"{', '.join(task_options(name))}; training options: {', '.join(sorted(config_fields))}"
        )
    return factory(**options)


def with_hparams(task: Task, **overrides: Any) -> Task:
    """The same task with some `TrainConfig` fields replaced."""
    return replace(task, hparams=replace(task.hparams, **overrides))
