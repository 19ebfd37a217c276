"""The task registry: every task builds its host, runs on its data, and rejects typos."""

from __future__ import annotations

import pytest
import torch

from esper.model import MorphogeneticModel
from esper.training import TaskError, TrainConfigError, get_task, list_tasks, task_options


def test_registry_lists_the_documented_tasks():
    assert set(list_tasks()) == {"digits", "fashion-mnist", "cifar10", "text", "synthetic"}
    assert "shape" in task_options("synthetic") and "path" in task_options("text")


def test_unknown_task_and_option_are_named_with_the_allowed_ones():
    with pytest.raises(TaskError, match=r"unknown task 'mnist'.*digits"):
        get_task("mnist")
    with pytest.raises(TaskError, match=r"no option 'widht'.*width"):
        get_task("digits", widht=4)
    with pytest.raises(TrainConfigError, match="optimizer 'lbfgs'"):
        get_task("digits", optimizer="lbfgs")


def test_digits_defaults_follow_the_design():
    task = get_task("digits")
    assert task.kind == "classification" and task.default_slots == ("r0c0", "r0c1", "r0c2")
    hp = task.hparams
    assert (hp.optimizer, hp.lr, hp.momentum, hp.batch_size) == ("sgd", 0.05, 0.9, 64)
    host = task.make_host(task.make_data())
    assert sum(p.numel() for p in host.parameters()) == 496  # DESIGN: w=2 has 496 params


@pytest.mark.parametrize(
    ("options", "in_shape"),
    [({"shape": (3, 32, 32)}, (3, 32, 32)), ({"shape": (20,)}, (20,))],
)
def test_synthetic_hosts_fit_their_data(options, in_shape):
    task = get_task("synthetic", n_train=16, n_val=8, **options)
    data = task.make_data()
    model = MorphogeneticModel(task.make_host(data), task.default_slots).eval()
    assert data.input_shape == in_shape
    assert model(data.val_x).shape == (8, 10)


def test_text_host_predicts_every_next_character(tmp_path):
    (tmp_path / "t.txt").write_text("to be or not to be " * 50, encoding="utf-8")
    task = get_task("text", path=tmp_path / "t.txt", seq_len=8, d_model=16, n_heads=2)
    data = task.make_data()
    model = MorphogeneticModel(task.make_host(data), task.default_slots).eval()
    with torch.no_grad():
        assert model(data.val_x[:3]).shape == (3, 8, data.num_classes)
    assert task.kind == "lm" and task.hparams.optimizer == "adamw"
