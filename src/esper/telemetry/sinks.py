"""Where telemetry goes: an object passed in, never a process-wide singleton.

`Telemetry` fans events out to sinks: a JSONL event log, a CSV of finished episodes
(``metrics.csv``), optionally TensorBoard, and in-memory counters that tests and the
console read.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import time
from collections import Counter
from pathlib import Path
from typing import Any

from esper.telemetry.events import EpisodeEnded, Event, PPOUpdate

METRIC_COLUMNS = [f.name for f in dataclasses.fields(EpisodeEnded)]


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


class Telemetry:
    """Collects events; writes them under ``run_dir`` when one is given."""

    def __init__(self, run_dir: str | Path | None = None, tensorboard: bool = False):
        self.counts: Counter[str] = Counter()
        self.episodes: list[EpisodeEnded] = []
        self._events = self._metrics = self._csv = self._tb = None
        if run_dir is not None:
            run_dir = Path(run_dir)
            run_dir.mkdir(parents=True, exist_ok=True)
            self._events = (run_dir / "events.jsonl").open("a", encoding="utf-8")
            metrics_path = run_dir / "metrics.csv"
            new = not metrics_path.exists() or metrics_path.stat().st_size == 0
            self._metrics = metrics_path.open("a", newline="", encoding="utf-8")
            # "\n" as everywhere else in the run folder: a resumed run stays byte-identical.
            self._csv = csv.DictWriter(
                self._metrics, fieldnames=METRIC_COLUMNS, lineterminator="\n"
            )
            if new:
                self._csv.writeheader()
            if tensorboard:
                self._tb = tensorboard_writer(run_dir / "tensorboard")

    def emit(self, event: Event) -> None:
        self.counts[event.kind] += 1
        if self._events is not None:
            record = {"kind": event.kind, "time": round(time.time(), 3), **event.to_record()}
            self._events.write(json.dumps(_jsonable(record)) + "\n")
        if type(event) is EpisodeEnded:  # not its baseline subclass
            self.episodes.append(event)
            if self._csv is not None:
                self._csv.writerow({k: getattr(event, k) for k in METRIC_COLUMNS})
            if self._tb is not None:
                n = len(self.episodes)
                self._tb.add_scalar("episode/return", event.episode_return, n)
                self._tb.add_scalar("episode/quality", event.quality, n)
                self._tb.add_scalar("episode/objective", event.objective, n)
        elif isinstance(event, PPOUpdate) and self._tb is not None:
            for key, value in event.diagnostics.items():
                self._tb.add_scalar(f"ppo/{key}", value, event.update)

    def flush(self) -> None:
        for f in (self._events, self._metrics):
            if f is not None:
                f.flush()
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        self.flush()
        for f in (self._events, self._metrics):
            if f is not None:
                f.close()
        if self._tb is not None:
            self._tb.close()
        self._events = self._metrics = self._csv = self._tb = None

    def __enter__(self) -> Telemetry:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


TENSORBOARD_HINT = (
    "run.tensorboard = true needs the tensorboard package, which is not installed: "
    "pip install tensorboard (or, in a source checkout, pip install -e '.[tensorboard]')"
)


def tensorboard_writer(log_dir: str | Path | None = None):
    """A ``SummaryWriter`` (``log_dir=None``: only check that TensorBoard is installed)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ValueError(TENSORBOARD_HINT) from None
    return SummaryWriter(log_dir=str(log_dir)) if log_dir is not None else None


def read_events(path: str | Path) -> list[dict[str, Any]]:
    """Events of a run; a torn last line (killed process) is skipped."""
    records = []
    with Path(path).open(encoding="utf-8") as f:
        for line in f:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records


def truncate_telemetry(run_dir: Path, keep_rounds: int) -> None:
    """Drop what rounds ``>= keep_rounds`` wrote (a partial round after the last
    checkpoint), so a resumed run repeats nothing; session records are kept."""
    from esper.checkpointing import atomic_write_text

    events = run_dir / "events.jsonl"
    if events.exists():
        kept = []
        for line in events.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            round_index = record.get("episode", record.get("update", record.get("round")))
            if record.get("kind") in ("run_started", "run_finished") or (
                round_index is not None and round_index < keep_rounds
            ):
                kept.append(line)
        atomic_write_text(events, "".join(f"{line}\n" for line in kept))
    metrics = run_dir / "metrics.csv"
    if metrics.exists():
        lines = metrics.read_text(encoding="utf-8").splitlines()
        rows = [ln for ln in lines[1:] if ln and int(ln.split(",", 1)[0]) < keep_rounds]
        atomic_write_text(metrics, "".join(f"{ln}\n" for ln in lines[:1] + rows))
