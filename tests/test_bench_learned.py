"""bench_learned (issue 13): quick mode end to end, paired tables and slot transfer."""

import csv
import importlib
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench"


def test_quick_run_compares_the_shipped_policy_paired(monkeypatch, tmp_path, capsys):
    out = tmp_path / "out"
    monkeypatch.setenv("ESPER_BENCH_OUT", str(out))
    monkeypatch.syspath_prepend(str(BENCH))
    bench = importlib.import_module("bench_learned")
    bench.main(["--quick", "--transfer", "5"])
    text = capsys.readouterr().out
    assert "policy − heuristic" in text and "| digits_v1 " in text
    assert "Slot transfer" in text
    with (out / "learned_digits_quick_episodes.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    arms = {(r["arm"], r["depth"]) for r in rows}
    for arm in (("static", "3"), ("heuristic", "3"), ("always-grow", "3"), ("digits_v1", "5")):
        assert arm in arms
    bench.main(["--quick", "--reuse-baselines"])  # baselines read back, not replayed
    assert "  static" not in capsys.readouterr().out
