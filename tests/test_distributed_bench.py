"""The scale-out benchmark runs end to end in quick mode (slow: ~40 s of process start-up)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench" / "bench_distributed.py"


@pytest.mark.slow
def test_bench_distributed_quick():
    out = subprocess.run(
        [sys.executable, str(BENCH), "--quick"],
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "2 procs / 1 proc throughput:" in out.stdout
    assert "bytes per optimiser step" in out.stdout and "policy step" in out.stdout
