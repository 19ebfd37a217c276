"""Live progress on stderr for long commands (`esper train`, `esper eval`).

On a terminal one line is rewritten in place; in a log file a line is printed every few
seconds within a round and one per finished round. A heartbeat thread keeps the line
moving while one lockstep step runs (on fashion-mnist a step of 4 envs takes ~20 s), so
a user never waits more than a few seconds for a sign of life.
"""

from __future__ import annotations

import sys
import threading
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from esper.experiment import Progress


def clock(seconds: float) -> str:
    """``1h05m``, ``4m07s`` or ``?`` (no estimate yet)."""
    if seconds == float("inf") or seconds != seconds:
        return "?"
    seconds = round(seconds)
    h, rest = divmod(seconds, 3600)
    return f"{h}h{rest // 60:02d}m" if h else f"{rest // 60}m{rest % 60:02d}s"


class Console:
    """Pass ``live`` and ``round_done`` to `esper.run.train` (``live`` to `evaluate`);
    use as a context manager to run the heartbeat."""

    EVERY_S = 3.0  # at most this long between lines within a round (log files)
    HEARTBEAT_S = 5.0  # a step still running after this long gets a line of its own

    def __init__(self, stream: Any = None) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.tty = self.stream.isatty()
        self.created = self.p_time = time.monotonic()
        self.last_print = 0.0  # the first step always prints
        self.last_round = ""
        self.p: Progress | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> Console:
        self._thread = threading.Thread(target=self._heartbeat, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2)
        if self.tty:
            self._print("", end="")  # leave the terminal on a fresh line

    def _print(self, line: str, end: str = "\n") -> None:
        with self._lock:
            prefix = "\x1b[2K\r" if self.tty else ""
            print(f"{prefix}{line}", end=end, file=self.stream, flush=True)
            self.last_print = time.monotonic()

    @staticmethod
    def _where(p: Progress, extra_s: float = 0.0) -> str:
        elapsed = p.elapsed_s + extra_s
        rate = p.env_steps / elapsed if elapsed > 0 else 0.0
        eta = (p.env_steps_total - p.env_steps) / rate if rate > 0 else float("inf")
        return (
            f"env steps {p.env_steps}/{p.env_steps_total} | {rate:.2f} steps/s | "
            f"elapsed {clock(elapsed)} eta {clock(eta)}"
        )

    def _line(self, p: Progress, extra_s: float = 0.0) -> str:
        line = f"{p.phase} round {p.round + 1}/{p.rounds} step {p.step}/{p.steps} | "
        line += self._where(p, extra_s)
        if self.last_round and p.phase == "train":
            line += f" | {self.last_round}"
        return line

    def live(self, p: Progress) -> None:
        self.p, self.p_time = p, time.monotonic()
        end_of_round = p.step == p.steps
        if not self.tty:
            if end_of_round and p.phase == "train":
                return  # round_done prints this round's line with its results
            if not end_of_round and self.p_time - self.last_print < self.EVERY_S:
                return
        last = end_of_round and p.round + 1 == p.rounds and p.phase != "train"
        if last and p.phase == "eval":
            self.p = None  # finished: the heartbeat has nothing left to report
        self._print(self._line(p), end="\n" if last or not self.tty else "")

    def round_done(self, done: int, total: int, last: dict[str, float]) -> None:
        self.last_round = (
            f"last round: quality {last['quality']:.4f} objective {last['objective']:.4f} "
            f"return {last['episode_return']:+.4f}"
        )
        where = f" | {self._where(self.p)}" if self.p is not None else ""
        if done == total:
            self.p = None  # finished: the heartbeat has nothing left to report
        self._print(f"round {done}/{total} done{where} | {self.last_round}", end="\n")

    def _heartbeat(self) -> None:
        while not self._stop.wait(1.0):
            p, now = self.p, time.monotonic()
            if p is None:
                quiet = now - max(self.last_print, self.created)
                if self.p_time == self.created and quiet >= self.HEARTBEAT_S:
                    self._print(f"starting: data, envs, first step ({clock(now - self.created)})")
                continue
            running = now - self.p_time
            if self.tty:  # the clock of the line in place keeps ticking
                if p.step < p.steps or p.phase == "train":
                    self._print(self._line(p, running) + f" | step {clock(running)}", end="")
            elif now - self.last_print >= self.HEARTBEAT_S:
                following = (
                    f"step {p.step + 1}/{p.steps}"
                    if p.step < p.steps
                    else ("update and next round" if p.phase == "train" else "next phase")
                )
                self._print(
                    f"{p.phase} round {p.round + 1}/{p.rounds}: {following} running for "
                    f"{clock(running)} | {self._where(p, running)}"
                )
