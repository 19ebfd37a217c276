"""The benchmark entry point lists every script and rejects unknown names."""

import importlib
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.fixture
def run_all(monkeypatch, tmp_path):
    monkeypatch.setenv("ESPER_BENCH_OUT", str(tmp_path))
    monkeypatch.syspath_prepend(str(BENCH))
    return importlib.import_module("run_all")


def test_every_bench_script_is_registered(run_all, capsys):
    assert run_all.main(["--list"]) == 0
    out = capsys.readouterr().out
    scripts = sorted(p.name for p in BENCH.glob("bench_*.py"))
    registered = sorted(script for script, _ in run_all.BENCHMARKS.values())
    assert registered == scripts
    for name in run_all.BENCHMARKS:
        assert name in out


def test_unknown_benchmark_is_an_error_naming_the_allowed_ones(run_all, capsys):
    with pytest.raises(SystemExit):
        run_all.main(["--only", "nope"])
    assert "unknown benchmark 'nope'" in capsys.readouterr().err


def test_quick_run_of_one_script_succeeds_and_keeps_a_log(run_all, tmp_path):
    assert run_all.main(["--quick", "--only", "slot_scaling"]) == 0
    log = (tmp_path / "logs" / "slot_scaling_quick.txt").read_text()
    assert "Per-step cost vs number of slots" in log
