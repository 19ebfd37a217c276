"""The growth-quality benchmark: quick mode end to end, and the widened static host."""

import csv
import importlib
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.fixture
def growth(monkeypatch, tmp_path_factory):
    # One output folder per session: the transfer test reuses the quick PPO run.
    monkeypatch.setenv("ESPER_BENCH_OUT", str(tmp_path_factory.getbasetemp() / "bench_out"))
    monkeypatch.syspath_prepend(str(BENCH))
    return importlib.import_module("bench_growth")


def test_quick_run_reports_every_controller_on_the_same_seeds(growth, capsys):
    growth.main(["--quick"])
    out = capsys.readouterr().out
    for controller in growth.CONTROLLERS:
        assert f"| {controller} " in out
    assert "esper train ppo --task digits" in out
    root = Path(growth.benchlib.out_dir())
    assert (root / "growth_digits.png").stat().st_size > 0
    with (root / "growth_digits_episodes.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert sorted({r["controller"] for r in rows}) == sorted(growth.CONTROLLERS)
    for row in rows:
        quality, objective = float(row["quality"]), float(row["objective"])
        assert 0.0 <= quality <= 1.0
        assert objective <= quality + 1e-9  # growth is never rewarded
        if row["controller"] in ("static", "wide=ppo", "wide=heur") and row["params_added"] == "0":
            assert int(row["params_added"]) == 0 and objective == pytest.approx(quality)


def test_scaled_cnn_keeps_the_layout_and_grows_with_scale(growth):
    from esper.model import CNNHost

    base = CNNHost(1, 10, width=2, depth=3, image_size=8)
    same = growth.scaled_cnn(base, 1.0, 10)
    assert growth.params(same) == growth.params(base) and same.pool_at == base.pool_at
    counts = [growth.params(growth.scaled_cnn(base, s, 10)) for s in (1.0, 1.5, 2.0, 3.0)]
    assert counts == sorted(counts) and counts[0] < counts[-1]
    wide = growth.scaled_cnn(base, 2.0, 10)
    assert wide(torch.rand(3, 1, 8, 8)).shape == (3, 10)
    target = growth.params(base) + 300
    scale = growth.widest_match(base, target, 10)
    best = abs(growth.params(growth.scaled_cnn(base, scale, 10)) - target)
    for other in (1.0, 1.25, 1.5, 2.0):
        assert best <= abs(growth.params(growth.scaled_cnn(base, other, 10)) - target)


def test_scaled_cnn_at_scale_one_is_the_narrow_host_init_included(growth):
    from esper.model import CNNHost

    torch.manual_seed(7)
    base = CNNHost(1, 10, width=2, depth=3, image_size=8)
    torch.manual_seed(7)
    same = growth.scaled_cnn(base, 1.0, 10)
    for (name, a), (_, b) in zip(base.state_dict().items(), same.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def test_static_training_at_scale_one_replays_the_static_controller(growth):
    setup = growth.setups(True, None)["digits"]
    config = growth.make_config(setup, envs=2)
    static = growth.benchlib.evaluate_on_seeds(config, 2, "static")
    replay = growth.train_static(config, 2, 1.0)
    assert [r["quality"] for r in replay] == [r.quality for r in static]
    wide = growth.train_static(config, 1, 2.0)[0]
    assert wide["params_added"] > 0 and wide["objective"] < wide["quality"]
