"""Provenance: what produced a run, so a result can be traced and reproduced.

Each session of a run (the first start and every ``--resume``) appends one record to
``provenance.json`` in the run folder and carries the same record in its
``run_started`` event.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from esper import __version__


def _git(*args: str) -> str | None:
    """``git args`` in the folder holding the esper package; None outside a checkout."""
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(
            ["git", "-C", str(here), *args], capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def git_state() -> dict[str, Any]:
    """Commit and dirtiness of the checkout esper runs from (empty when installed)."""
    commit = _git("rev-parse", "HEAD")
    if not commit:
        return {}
    status = _git("status", "--porcelain", "--untracked-files=no")
    return {"git_commit": commit, "git_dirty": bool(status)}


def collect(
    device: str, env_devices: list[str] | None = None, command: list[str] | None = None
) -> dict[str, Any]:
    """Versions, machine, threads and command line of this process, now."""
    record: dict[str, Any] = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "esper": __version__,
        **git_state(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "device": device,
        "env_devices": list(env_devices) if env_devices else None,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "command": list(command) if command is not None else list(sys.argv),
        "cwd": os.getcwd(),
    }
    return record


def append(run_dir: str | Path, record: dict[str, Any]) -> None:
    """Add one session's record to ``run_dir/provenance.json``."""
    from esper.checkpointing import atomic_write_text

    path = Path(run_dir) / "provenance.json"
    sessions: list[dict[str, Any]] = []
    if path.is_file():
        try:
            sessions = list(json.loads(path.read_text(encoding="utf-8")).get("sessions", []))
        except (json.JSONDecodeError, AttributeError):
            sessions = []  # a damaged file must not stop a resume; the events keep a copy
    sessions.append(record)
    atomic_write_text(path, json.dumps({"sessions": sessions}, indent=2) + "\n")
