"""The controller-overhead and slot-scaling benchmarks run in quick mode."""

import csv
import importlib
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.fixture
def load(monkeypatch, tmp_path):
    monkeypatch.setenv("ESPER_BENCH_OUT", str(tmp_path))
    monkeypatch.syspath_prepend(str(BENCH))
    return importlib.import_module


def read_rows(path: Path) -> list[dict[str, str]]:
    with path.open() as handle:
        return list(csv.DictReader(handle))


def test_overhead_quick_reports_both_modes(load, tmp_path, capsys):
    load("bench_overhead").main(["--quick"])
    assert "Controller overhead" in capsys.readouterr().out
    assert (tmp_path / "overhead_quick.png").stat().st_size > 0
    rows = read_rows(tmp_path / "overhead_quick.csv")
    assert [(r["mode"], r["envs"]) for r in rows] == [
        ("wait", "1"), ("wait", "4"), ("policy", "1"), ("policy", "4"),
    ]  # fmt: skip
    for row in rows:
        assert float(row["host ms/step"]) > 0 and float(row["policy ms"]) > 0
        assert row["overhead"].endswith("%")


def test_overhead_refuses_more_steps_than_an_episode(load):
    with pytest.raises(ValueError, match="must fit in one episode"):
        load("bench_overhead").measure(1, 5, "wait", {"max_epochs": 3, "batches_per_step": 1})


def test_slot_scaling_quick_reports_each_slot_count(load, tmp_path, capsys):
    load("bench_slot_scaling").main(["--quick"])
    assert "Per-step cost vs number of slots" in capsys.readouterr().out
    assert (tmp_path / "slot_scaling_quick.png").stat().st_size > 0
    rows = read_rows(tmp_path / "slot_scaling_quick.csv")
    assert [r["slots"] for r in rows] == ["1", "8"]
    for row in rows:
        assert float(row["counterfactuals ms"]) > 0 and float(row["validation ms"]) > 0


def test_reference_bench_quick_reports_host_step_and_env_steps(load, tmp_path, capsys):
    load("bench_reference").main(["--quick"])
    out = capsys.readouterr().out
    assert "DERIVED" in out and "reference-shaped" in out
    steps = read_rows(tmp_path / "reference_env_steps_quick.csv")
    assert steps[0]["configuration"] == "defaults (auto)"
    assert all(float(r["env steps/s (median)"]) > 0 for r in steps)
    host = read_rows(tmp_path / "reference_host_step_quick.csv")
    assert len(host) == 5 and all(float(r["best ms"]) > 0 for r in host)
