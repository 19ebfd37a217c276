"""Data sets load offline from files in their real formats; batch order is per env."""

from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from esper.training import BatchStream, DataError, get_task
from esper.training.datasets import FASHION_MNIST_ROOT, read_cifar_batch, read_idx


def write_idx(path: Path, array: np.ndarray, compress: bool) -> None:
    """IDX as specified on yann.lecun.com/exdb/mnist: 0 0 type ndim, big-endian dims."""
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + array.astype(np.uint8).tobytes()
    if compress:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(payload))
    else:
        path.write_bytes(payload)


def write_fashion(root: Path, n_train: int, n_val: int, compress: bool = True) -> dict:
    rng = np.random.default_rng(0)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28)),
        "train-labels-idx1-ubyte": rng.integers(0, 10, n_train),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_val, 28, 28)),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_val),
    }
    for name, a in arrays.items():
        write_idx(root / name, a, compress)
    return arrays


def test_digits_split_is_fixed_stratified_and_scaled():
    a, b = (get_task("digits").make_data() for _ in range(2))
    assert torch.equal(a.train_x, b.train_x) and torch.equal(a.val_y, b.val_y)
    assert a.input_shape == (1, 8, 8) and a.n_train + a.n_val == 1797
    assert float(a.train_x.min()) >= 0.0 and float(a.train_x.max()) == 1.0
    train_share = torch.bincount(a.train_y, minlength=10) / a.n_train
    val_share = torch.bincount(a.val_y, minlength=10) / a.n_val
    assert torch.allclose(train_share, val_share, atol=0.01)


@pytest.mark.parametrize("compress", [True, False])
def test_fashion_mnist_reads_idx_files(tmp_path, compress):
    arrays = write_fashion(tmp_path, 12, 5, compress)
    data = get_task("fashion-mnist").make_data(root=tmp_path)
    assert data.train_x.shape == (12, 1, 28, 28) and data.val_x.shape == (5, 1, 28, 28)
    expect = torch.tensor(arrays["t10k-images-idx3-ubyte"][3], dtype=torch.float32) / 255
    assert torch.equal(data.val_x[3, 0], expect)
    assert data.train_y.tolist() == arrays["train-labels-idx1-ubyte"].tolist()


def test_fashion_mnist_missing_files_say_how_to_get_them(tmp_path):
    with pytest.raises(DataError, match="dataset-fashion-mnist"):
        get_task("fashion-mnist").make_data(root=tmp_path)


def test_idx_reader_rejects_truncated_and_foreign_files(tmp_path):
    write_idx(tmp_path / "x", np.zeros((4, 3)), compress=False)
    raw = (tmp_path / "x").read_bytes()
    (tmp_path / "cut").write_bytes(raw[:-1])
    (tmp_path / "foreign").write_bytes(b"PK\x03\x04" + raw[4:])
    assert read_idx(tmp_path / "x").shape == (4, 3)
    with pytest.raises(DataError, match="header says shape"):
        read_idx(tmp_path / "cut")
    with pytest.raises(DataError, match="not an IDX file"):
        read_idx(tmp_path / "foreign")


@pytest.mark.skipif(
    not (FASHION_MNIST_ROOT / "t10k-labels-idx1-ubyte.gz").is_file(),
    reason="Debian dataset-fashion-mnist is not installed",
)
def test_debian_fashion_mnist_files():
    data = get_task("fashion-mnist", max_train=256, max_val=10_000).make_data()
    assert data.n_val == 10_000 and data.n_train == 256
    assert torch.bincount(data.val_y).tolist() == [1000] * 10  # the official test split


def write_cifar_batch(path: Path, n: int, seed: int) -> tuple[np.ndarray, list[int]]:
    """The layout of cifar-10-batches-py: a protocol-2 pickled dict with bytes keys."""
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
    labels = rng.integers(0, 10, n).tolist()
    batch = {
        b"batch_label": b"training batch 1 of 5",
        b"labels": labels,
        b"data": data,
        b"filenames": [f"img_{i}.png".encode() for i in range(n)],
    }
    path.write_bytes(pickle.dumps(batch, protocol=2))
    return data, labels


def test_cifar10_reads_python_batches(tmp_path):
    data, labels = write_cifar_batch(tmp_path / "data_batch_1", 6, 0)
    write_cifar_batch(tmp_path / "test_batch", 4, 1)
    task_data = get_task("cifar10").make_data(root=tmp_path)
    assert task_data.train_x.shape == (6, 3, 32, 32) and task_data.n_val == 4
    assert task_data.train_y.tolist() == labels
    # Row layout: 1024 red, then green, then blue values, each row-major 32x32.
    assert task_data.train_x[2, 1, 0, 5] == pytest.approx(data[2, 1024 + 5] / 255)


def test_cifar_reader_refuses_code_in_pickles(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    (tmp_path / "evil").write_bytes(pickle.dumps({b"data": Evil(), b"labels": []}, protocol=2))
    with pytest.raises(DataError, match=r"print, which is not allowed"):
        read_cifar_batch(tmp_path / "evil")


def test_text_task_reads_utf8_and_shifts_targets(tmp_path):
    text = "héllo wörld, the quick brown fox. " * 40
    (tmp_path / "c.txt").write_text(text, encoding="utf-8")
    data = get_task("text", seq_len=16).make_data(root=tmp_path / "c.txt")
    assert data.kind == "lm" and data.num_classes == len(set(text))
    assert torch.equal(data.train_x[0, 1:], data.train_y[0, :-1])
    decoded = "".join(data.vocab[i] for i in data.train_x[0].tolist())
    assert decoded == text[:16]


def test_text_task_explains_missing_or_compressed_corpus(tmp_path):
    with pytest.raises(DataError, match="bible -f"):
        get_task("text").make_data()
    (tmp_path / "bible.data").write_bytes(b"EC02Compressed Data File" + bytes(64))
    with pytest.raises(DataError, match="compressed"):
        get_task("text", path=tmp_path / "bible.data").make_data()


def test_synthetic_any_shape_is_deterministic_and_class_conditional():
    task = get_task("synthetic", shape=(3, 16, 16), n_train=200, n_val=50, noise=0.5)
    a, b = task.make_data(seed=1), task.make_data(seed=1)
    assert a.train_x.shape == (200, 3, 16, 16) and torch.equal(a.train_x, b.train_x)
    # Nearest class mean classifies clean-ish data: the labels carry the signal.
    means = torch.stack([a.train_x[a.train_y == c].mean(0) for c in range(10)])
    dists = torch.cdist(a.val_x.flatten(1), means.flatten(1))
    assert (dists.argmin(1) == a.val_y).float().mean() > 0.9


@settings(max_examples=30, deadline=None)
@given(
    n=st.integers(1, 50),
    batch=st.integers(1, 20),
    per_step=st.one_of(st.none(), st.integers(1, 7)),
    seed=st.integers(0, 2**31),
)
def test_batch_stream_covers_each_epoch_exactly_once(n, batch, per_step, seed):
    stream = BatchStream(n, batch, seed)
    seen = torch.cat([i for _ in range(4) for i in stream.step_batches(per_step)])
    full = (seen.numel() // n) * n
    for e in range(full // n):  # every complete epoch is a permutation
        assert sorted(seen[e * n : (e + 1) * n].tolist()) == list(range(n))
    if per_step is None:
        assert seen.numel() == 4 * n


def test_env_batch_order_does_not_depend_on_other_envs():
    def env0_batches(num_envs: int) -> list[list[int]]:
        streams = [BatchStream(100, 16, seed=1000 + i) for i in range(num_envs)]
        out = []
        for _ in range(5):
            for i, s in enumerate(streams):  # lockstep, as the vector env runs them
                batches = s.step_batches(3)
                if i == 0:
                    out.extend(b.tolist() for b in batches)
        return out

    assert env0_batches(1) == env0_batches(4)
    other = BatchStream(100, 16, seed=1001).step_batches(3)
    assert [b.tolist() for b in other] != env0_batches(1)[:3]  # envs do differ


def test_stream_state_round_trips():
    a = BatchStream(30, 7, seed=3)
    a.step_batches(2)
    b = BatchStream(30, 7, seed=99)
    b.load_state_dict(a.state_dict())
    assert [x.tolist() for x in a.step_batches(9)] == [x.tolist() for x in b.step_batches(9)]
