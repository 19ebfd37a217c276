"""Readers for the data sets Esper trains on. Nothing is downloaded at run time.

- digits: scikit-learn's bundled 8x8 digits (always available).
- Fashion-MNIST: IDX files (``.gz`` or plain), e.g. from Debian's ``dataset-fashion-mnist``.
- CIFAR-10: the "python version" pickle batches, read with a restricted unpickler that
  only rebuilds numpy arrays (a data file can never run code), so torchvision is not needed.
- text: any UTF-8 file, cut into next-character prediction sequences.
- synthetic: class-conditional random images of any shape, for tests and throughput runs.
"""

from __future__ import annotations

import gzip
import io
import pickle
from pathlib import Path

import numpy as np
import torch

from esper.training.data import DataError, TaskData, stratified_split

FASHION_MNIST_ROOT = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_FILES = {
    "train_x": "train-images-idx3-ubyte",
    "train_y": "train-labels-idx1-ubyte",
    "val_x": "t10k-images-idx3-ubyte",
    "val_y": "t10k-labels-idx1-ubyte",
}
CIFAR10_TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR10_TEST_FILE = "test_batch"

# IDX type codes (http://yann.lecun.com/exdb/mnist/): code -> big-endian numpy dtype.
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def load_digits_data(val_fraction: float = 0.2, split_seed: int = 0) -> TaskData:
    """1x8x8 images in [0, 1]; the stratified split depends only on ``split_seed``."""
    from sklearn.datasets import load_digits  # lazy: sklearn import is slow

    bunch = load_digits()
    x = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(bunch.target, dtype=torch.long)
    tr, va = stratified_split(y, val_fraction, split_seed)
    return TaskData("classification", x[tr], y[tr], x[va], y[va], num_classes=10, name="digits")


def read_idx(path: str | Path) -> np.ndarray:
    """Read one IDX file (gzip-compressed or not) into an array of its stored shape."""
    path = Path(path)
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise DataError(
            f"{path} is not an IDX file: expected magic 00 00 <type> <ndim> with type in "
            f"{sorted(hex(k) for k in _IDX_DTYPES)}, got {raw[:4].hex(' ')}"
        )
    dtype, ndim = np.dtype(_IDX_DTYPES[raw[2]]), raw[3]
    header = 4 + 4 * ndim
    dims = tuple(int(d) for d in np.frombuffer(raw[4:header], dtype=">u4"))
    expected = header + int(np.prod(dims)) * dtype.itemsize
    if len(raw) != expected:
        raise DataError(f"{path}: header says shape {dims} ({expected} bytes), file has {len(raw)}")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims)


def _find_idx(root: Path, stem: str) -> Path:
    for name in (f"{stem}.gz", stem):
        if (root / name).is_file():
            return root / name
    raise DataError(
        f"Fashion-MNIST file {stem}[.gz] not found in {root}. Install the Debian package "
        f"(apt-get install dataset-fashion-mnist, files go to {FASHION_MNIST_ROOT}) or copy "
        "the four IDX files from https://github.com/zalandoresearch/fashion-mnist "
        "(data/fashion) into a folder and pass it as root"
    )


def _cap(n: int, limit: int | None) -> int:
    return n if limit is None else min(n, int(limit))


def load_fashion_mnist(
    root: str | Path | None = None, max_train: int | None = None, max_val: int | None = None
) -> TaskData:
    """1x28x28 images in [0, 1]; the official 60k/10k split, optionally cut to the first N."""
    root = Path(root) if root is not None else FASHION_MNIST_ROOT
    arrays = {key: read_idx(_find_idx(root, stem)) for key, stem in FASHION_MNIST_FILES.items()}
    n_tr, n_va = _cap(len(arrays["train_y"]), max_train), _cap(len(arrays["val_y"]), max_val)

    def images(a: np.ndarray, n: int) -> torch.Tensor:
        if a.ndim != 3:
            raise DataError(f"Fashion-MNIST images must be [N, H, W], got shape {a.shape}")
        return torch.tensor(a[:n], dtype=torch.float32).unsqueeze(1) / 255.0

    return TaskData(
        "classification",
        images(arrays["train_x"], n_tr),
        torch.tensor(arrays["train_y"][:n_tr].astype(np.int64)),
        images(arrays["val_x"], n_va),
        torch.tensor(arrays["val_y"][:n_va].astype(np.int64)),
        num_classes=10,
        name="fashion-mnist",
    )


def _reconstruct():
    try:
        from numpy._core.multiarray import _reconstruct  # numpy >= 2
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core.multiarray import _reconstruct
    return _reconstruct


class _ArrayOnlyUnpickler(pickle.Unpickler):
    """Rebuilds dicts, lists, bytes and numpy arrays; refuses every other global."""

    def find_class(self, module: str, name: str):
        if name == "_reconstruct" and module in ("numpy.core.multiarray", "numpy._core.multiarray"):
            return _reconstruct()
        if (module, name) == ("numpy", "ndarray"):
            return np.ndarray
        if (module, name) == ("numpy", "dtype"):
            return np.dtype
        if (module, name) == ("_codecs", "encode"):  # bytes pickled by Python 3, protocol 2
            import codecs

            return codecs.encode
        raise pickle.UnpicklingError(f"CIFAR batch refers to {module}.{name}, which is not allowed")


def read_cifar_batch(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR-10 python batch: uint8 images ``[N, 3, 32, 32]`` and int64 labels ``[N]``."""
    path = Path(path)
    try:
        batch = _ArrayOnlyUnpickler(io.BytesIO(path.read_bytes()), encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError) as err:
        raise DataError(f"{path} is not a CIFAR-10 python batch: {err}") from err
    if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
        keys = sorted(batch) if isinstance(batch, dict) else type(batch).__name__
        raise DataError(f"{path}: expected a dict with b'data' and b'labels', got {keys}")
    data = np.asarray(batch[b"data"], dtype=np.uint8)
    labels = np.asarray(batch[b"labels"], dtype=np.int64)
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or data.shape[0] != labels.shape[0]:
        raise DataError(f"{path}: data {data.shape} / labels {labels.shape}, want [N, 3072] / [N]")
    return data.reshape(-1, 3, 32, 32), labels


def load_cifar10(
    root: str | Path | None = None, max_train: int | None = None, max_val: int | None = None
) -> TaskData:
    """3x32x32 images in [0, 1] from the ``cifar-10-batches-py`` folder ``root``.

    Training batches that are absent are skipped (at least one is needed), so a partial
    copy works for quick runs.
    """
    if root is None:
        raise DataError(
            "cifar10 needs root=<folder with data_batch_1..5 and test_batch>; get it from "
            "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz and unpack it"
        )
    root = Path(root)
    present = [root / f for f in CIFAR10_TRAIN_FILES if (root / f).is_file()]
    if not present or not (root / CIFAR10_TEST_FILE).is_file():
        raise DataError(
            f"no CIFAR-10 python batches in {root}: need at least data_batch_1 and "
            f"{CIFAR10_TEST_FILE} (unpack cifar-10-python.tar.gz and point root at "
            "cifar-10-batches-py)"
        )
    parts = [read_cifar_batch(p) for p in present]
    tx = np.concatenate([p[0] for p in parts])
    ty = np.concatenate([p[1] for p in parts])
    vx, vy = read_cifar_batch(root / CIFAR10_TEST_FILE)
    n_tr, n_va = _cap(len(ty), max_train), _cap(len(vy), max_val)
    return TaskData(
        "classification",
        torch.tensor(tx[:n_tr], dtype=torch.float32) / 255.0,
        torch.tensor(ty[:n_tr]),
        torch.tensor(vx[:n_va], dtype=torch.float32) / 255.0,
        torch.tensor(vy[:n_va]),
        num_classes=10,
        name="cifar10",
    )


def load_text(
    path: str | Path | None,
    seq_len: int = 64,
    val_fraction: float = 0.1,
    max_chars: int | None = 1_000_000,
    max_val_sequences: int | None = 512,
) -> TaskData:
    """Next-character prediction on a UTF-8 text file.

    The first ``1 - val_fraction`` of the text trains, the rest validates (no overlap).
    Both are cut into non-overlapping windows of ``seq_len + 1`` characters.
    """
    hint = (
        "pass path=<any UTF-8 text file>. For a real corpus: apt-get install bible-kjv, then "
        "bible -f gen1:1-rev22:21 > kjv.txt (Debian stores the KJV text compressed in "
        "/usr/lib/bible.data, which is not plain text)"
    )
    if path is None:
        raise DataError(f"the text task needs a file: {hint}")
    path = Path(path)
    if not path.is_file():
        raise DataError(f"text file {path} not found: {hint}")
    raw = path.read_bytes()
    if raw.startswith(b"EC02Compressed"):
        raise DataError(f"{path} is the bible program's compressed database: {hint}")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise DataError(f"{path} is not UTF-8 text ({err}): {hint}") from err
    if max_chars is not None:
        text = text[: int(max_chars)]
    if seq_len < 1 or not 0.0 < val_fraction < 1.0:
        raise DataError(
            f"need seq_len >= 1 and 0 < val_fraction < 1, got {seq_len}, {val_fraction}"
        )
    vocab = "".join(sorted(set(text)))
    if len(vocab) < 2:
        raise DataError(f"{path}: need at least 2 distinct characters, got {vocab!r}")
    lookup = {c: i for i, c in enumerate(vocab)}
    ids = torch.tensor([lookup[c] for c in text], dtype=torch.long)
    split = int(len(ids) * (1.0 - val_fraction))

    def windows(seq: torch.Tensor, limit: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        n = (len(seq) - 1) // seq_len
        if limit is not None:
            n = min(n, int(limit))
        if n < 1:
            raise DataError(
                f"{path}: too short for seq_len={seq_len} ({len(text)} characters, "
                f"val_fraction={val_fraction})"
            )
        w = seq[: n * seq_len + 1]
        return w[:-1].view(n, seq_len), w[1:].view(n, seq_len)

    tx, ty = windows(ids[:split], None)
    vx, vy = windows(ids[split:], max_val_sequences)
    return TaskData("lm", tx, ty, vx, vy, len(vocab), name="text", vocab=vocab)


def make_synthetic(
    shape: tuple[int, ...] = (3, 32, 32),
    n_train: int = 4096,
    n_val: int = 1024,
    num_classes: int = 10,
    noise: float = 1.0,
    seed: int = 0,
) -> TaskData:
    """Images drawn around one random prototype per class (unit-variance pixels).

    ``noise`` is the per-pixel standard deviation around the prototype; the more pixels,
    the more noise it takes to make the classes hard to tell apart.
    """
    shape = tuple(int(s) for s in shape)
    if not shape or min(shape) < 1 or n_train < 1 or n_val < 1 or num_classes < 2:
        raise DataError(
            f"synthetic data needs a non-empty positive shape, n_train, n_val >= 1 and "
            f"num_classes >= 2; got shape={shape}, n_train={n_train}, n_val={n_val}, "
            f"num_classes={num_classes}"
        )
    gen = torch.Generator().manual_seed(int(seed))
    protos = torch.randn((num_classes, *shape), generator=gen)

    def draw(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.arange(n) % num_classes
        y = y[torch.randperm(n, generator=gen)]
        return protos[y] + noise * torch.randn((n, *shape), generator=gen), y

    tx, ty = draw(int(n_train))
    vx, vy = draw(int(n_val))
    return TaskData("classification", tx, ty, vx, vy, num_classes, name="synthetic")
