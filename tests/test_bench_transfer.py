"""The slot-transfer benchmark runs in quick mode (policy trained at 2 slots, run at 3)."""

import csv
import importlib
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench"


def test_quick_transfer_reports_ratio_against_in_distribution(
    monkeypatch, tmp_path_factory, capsys
):
    monkeypatch.setenv("ESPER_BENCH_OUT", str(tmp_path_factory.getbasetemp() / "bench_out"))
    monkeypatch.syspath_prepend(str(BENCH))
    transfer = importlib.import_module("bench_transfer")
    transfer.main(["--quick"])
    out = capsys.readouterr().out
    assert "policy trained with 2 slots" in out and "ratio " in out
    assert (Path(transfer.benchlib.out_dir()) / "transfer_quick.png").stat().st_size > 0
    with (Path(transfer.benchlib.out_dir()) / "transfer_quick.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    labels = [r["controller"] for r in rows]
    assert labels == [
        "ppo-2", "ppo-in-dist", "ppo-2 sampled", "ppo-in-dist sampled", "heuristic", "static",
        "→ transfer", "→ transfer sampled",
    ]  # fmt: skip
    assert {r["slots"] for r in rows} == {"3"}
