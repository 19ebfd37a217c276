"""bench_credit rebuilds the three reward modes from one set of rollouts."""

import importlib
import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


def test_quick_run_writes_every_mode_with_telescoping_returns(monkeypatch, tmp_path):
    monkeypatch.setenv("ESPER_BENCH_OUT", str(tmp_path))
    monkeypatch.syspath_prepend(str(BENCH))
    bench = importlib.import_module("bench_credit")
    monkeypatch.setattr(sys, "argv", ["bench_credit.py", "--quick", "--policy", "untrained"])
    bench.main()
    rows = json.loads((tmp_path / "credit.json").read_text())["rows"]
    assert set(rows) == {"objective", "twin", "contribution"}
    # the contribution shaping is 0 at reset and on the last step: same episode returns
    assert rows["contribution"]["return_mean"] == pytest.approx(rows["objective"]["return_mean"])
    assert rows["objective"]["var_vs_objective"] == 1.0
    for r in rows.values():
        assert r["var_of_mean_grad"] >= 0 and r["var_se_jackknife"] >= 0
