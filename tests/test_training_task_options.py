"""CNN task options: the pooling schedule and channels-last weights, from Python and the CLI."""

import pytest
import torch

from esper.cli import main
from esper.training import get_task
from esper.training.tasks import TaskError


def _host(name, **options):
    task = get_task(name, **options)
    return task.make_host(task.make_data(seed=0)) if name == "synthetic" else task.make_host(None)


@pytest.mark.parametrize(
    ("name", "default", "every"),
    [
        ("digits", (1, 2), [1, 0]),  # 8x8: two pools at most
        ("fashion-mnist", (1, 2), [2, 0, 1]),
        ("synthetic", (1, 2), [2, 0, 1]),
        ("cifar10", (1, 2, 3), [3, 2, 0, 1]),
    ],
)
def test_pool_at_sets_the_schedule_and_defaults_to_the_hosts(name, default, every):
    small = {"n_train": 16, "n_val": 8} if name == "synthetic" else {}
    assert _host(name, **small).pool_at == default
    assert _host(name, pool_at=every, **small).pool_at == tuple(sorted(every))
    assert _host(name, pool_at=[], **small).pool_at == ()


def test_pooling_after_every_block_quarters_the_activations_of_the_later_blocks():
    x = torch.randn(2, 3, 32, 32)
    sizes = {}
    for pools in (None, [0, 1, 2]):
        host = _host("synthetic", width=8, n_train=16, n_val=8, pool_at=pools)
        shapes = sizes[str(pools)] = []
        for block in host.blocks:
            block.register_forward_hook(lambda m, i, o, out=shapes: out.append(o.shape[-1]))
        host(x)
    assert sizes["None"] == [32, 16, 8] and sizes["[0, 1, 2]"] == [16, 8, 4]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"pool_at": [3]}, "out of range"),
        ({"pool_at": "0,1"}, "list of block indices"),
        ({"pool_at": [True]}, "list of block indices"),
        ({"channels_last": "yes"}, 'true, false or "auto"'),
        ({"shape": (16,), "pool_at": [0]}, r"image shape \(C, S, S\)"),
    ],
)
def test_bad_cnn_options_are_refused_when_the_task_is_built(options, message):
    with pytest.raises(TaskError, match=message):
        get_task("synthetic", **options)


def test_channels_last_host_computes_what_the_default_layout_computes():
    x = torch.randn(4, 3, 32, 32)
    torch.manual_seed(0)
    plain = _host("synthetic", width=4, n_train=16, n_val=8, channels_last=False)
    torch.manual_seed(0)
    nhwc = _host("synthetic", width=4, n_train=16, n_val=8, channels_last=True)
    conv = next(m for m in nhwc.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert not conv.weight.is_contiguous()
    torch.testing.assert_close(nhwc(x), plain(x), atol=1e-5, rtol=1e-5)


def test_cli_sets_the_pooling_schedule(tmp_path, capsys):
    common = ["train", "heuristic", "--task", "synthetic", "--envs", "1", "--episodes", "1"]
    small = ["--max-epochs", "1", "--set", "env.batches_per_step=1", "--set", "task.n_train=64"]
    small += ["--set", "task.n_val=32", "--no-report"]
    run_dir = tmp_path / "run"
    argv = [*common, *small, "--set", "task.pool_at=[0,1,2]", "--run-dir", str(run_dir)]
    assert main(argv) == 0
    assert "pool_at = [0, 1, 2]" in (run_dir / "config.toml").read_text()
    bad = [*common, *small, "--set", "task.pool_at=[7]", "--run-dir", str(tmp_path / "bad")]
    assert main(bad) == 2
    assert "pool_at index 7 out of range" in capsys.readouterr().err
