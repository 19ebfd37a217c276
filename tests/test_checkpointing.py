import os
import subprocess
import sys

import pytest
import torch

from esper.checkpointing import CheckpointError, atomic_torch_save, safe_torch_load


def test_round_trip(tmp_path):
    path = tmp_path / "ck.pt"
    atomic_torch_save({"w": torch.arange(3), "n": 2, "ids": ["r0c0"]}, path)
    out = safe_torch_load(path)
    assert out["n"] == 2 and out["ids"] == ["r0c0"] and torch.equal(out["w"], torch.arange(3))
    assert [p.name for p in tmp_path.iterdir()] == ["ck.pt"]  # no temp file left


def test_missing_corrupt_truncated_and_code(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        safe_torch_load(tmp_path / "none.pt")
    good = tmp_path / "good.pt"
    atomic_torch_save({"w": torch.randn(100)}, good)
    truncated = tmp_path / "trunc.pt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        safe_torch_load(truncated)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="garbage.pt"):
        safe_torch_load(garbage)
    evil = tmp_path / "evil.pt"
    torch.save({"x": os.getcwd}, evil)  # a global a weights-only load refuses
    with pytest.raises(CheckpointError, match="refused"):
        safe_torch_load(evil)


def test_killed_writer_leaves_previous_checkpoint(tmp_path):
    path = tmp_path / "ck.pt"
    atomic_torch_save({"version": 1}, path)
    script = f"""
import os, torch
import esper.checkpointing as c
real_fsync = os.fsync
def die(fd):
    os._exit(9)  # killed after writing, before the rename
os.fsync = die
c.atomic_torch_save({{"version": 2, "big": torch.zeros(100000)}}, {str(path)!r})
"""
    proc = subprocess.run([sys.executable, "-c", script], timeout=120)
    assert proc.returncode == 9
    assert safe_torch_load(path) == {"version": 1}
