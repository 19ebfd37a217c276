"""The PPO update benchmark runs in quick mode and prints a throughput figure."""

import importlib.util
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench" / "bench_ppo_update.py"


def test_bench_ppo_update_quick(capsys):
    spec = importlib.util.spec_from_file_location("bench_ppo_update", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(["--quick"])
    out = capsys.readouterr().out
    assert "esper masked recurrent PPO" in out and "samples/s" in out
    assert "RecurrentPPO" in out  # either a figure or "not installed"
