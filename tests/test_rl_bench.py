"""The PPO update and sb3 comparison benchmarks run in quick mode and print their figures."""

import importlib
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.fixture
def bench(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    return importlib.import_module


def test_bench_ppo_update_quick(bench, capsys):
    rates = bench("bench_ppo_update").main(["--quick"])
    out = capsys.readouterr().out
    assert "esper masked recurrent PPO" in out and "samples/s" in out
    assert set(rates) == {"end", "mid", "never"} and all(r > 0 for r in rates.values())


def test_bench_sb3_quick(bench, capsys):
    results = bench("bench_sb3").main(["--quick", "--episodes=mid"])
    out = capsys.readouterr().out
    assert "masked heads vs unmasked twin" in out
    assert "RecurrentPPO" in out or "sb3 samples/s" in out  # a figure or "not installed"
    if "sb3 samples/s" in out:
        assert results["update/mid"] > 0 and results["act/sb3_over_esper"] > 0
