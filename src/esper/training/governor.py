"""The safety governor: detect a diverging env and roll it back to its last good state.

After every healthy step the governor keeps a snapshot of the whole model
(`state_dict`, seeds and lifecycle included). A non-finite loss, or a loss beyond
``mean + k * sigma`` of the recent healthy steps for ``consecutive`` steps in a row,
restores that snapshot (whatever was germinated, fossilized or pruned since is rebuilt
from the snapshot's ids), prunes every live seed (a seed that was growing when things
went wrong is not trusted), and reports a `GovernorEvent` with a penalty. Nothing in
here raises: a rollback that cannot restore reports ``restored=False`` instead.
"""

from __future__ import annotations

import copy
import math
import statistics
from collections import deque
from dataclasses import dataclass
from typing import Literal

from esper.lifecycle import is_live
from esper.training.config import GovernorConfig

Verdict = Literal["ok", "suspect", "non_finite", "spike"]


@dataclass(frozen=True)
class GovernorEvent:
    epoch: int  # the env step at which the rollback happened
    reason: Literal["non_finite", "spike"]
    value: float  # the monitored loss that triggered it
    threshold: float  # mean + k*sigma at that time (inf for non_finite)
    snapshot_epoch: int  # the step whose end state was restored
    pruned: tuple[str, ...]  # live seeds pruned after the restore
    penalty: float
    restored: bool = True
    error: str | None = None  # why restoring failed, when it did


class Governor:
    """Watches one env's loss; owns that env's last good snapshot."""

    def __init__(self, config: GovernorConfig | None = None) -> None:
        self.config = config if config is not None else GovernorConfig()
        self.history: deque[float] = deque(maxlen=self.config.window)
        self.spike_count = 0
        self.rollbacks = 0
        self._snapshot: dict | None = None
        self.snapshot_epoch = -1

    # -- detection -------------------------------------------------------------------
    def threshold(self) -> float:
        """Loss above which a step counts as a spike (inf until there is enough history)."""
        cfg = self.config
        if len(self.history) < cfg.min_history:
            return math.inf
        mean = statistics.fmean(self.history)
        sigma = max(statistics.pstdev(self.history), cfg.min_relative_sigma * abs(mean), 1e-8)
        return mean + cfg.k_sigma * sigma

    def observe(self, value: float) -> Verdict:
        """Judge one step's monitored loss; only healthy values enter the history."""
        if not self.config.enabled:
            return "ok"
        if not math.isfinite(value):
            return "non_finite"
        if value > self.threshold():
            self.spike_count += 1
            return "spike" if self.spike_count >= self.config.consecutive else "suspect"
        self.spike_count = 0
        self.history.append(value)
        return "ok"

    # -- snapshots -------------------------------------------------------------------
    def snapshot(self, model, epoch: int) -> None:
        """Keep a copy of the model's current state as the last good one."""
        self._snapshot = copy.deepcopy(model.state_dict())
        self.snapshot_epoch = epoch

    @property
    def has_snapshot(self) -> bool:
        return self._snapshot is not None

    def rollback(
        self, model, epoch: int, reason: Literal["non_finite", "spike"], value: float
    ) -> GovernorEvent:
        """Restore the snapshot, prune live seeds; report what happened. Never raises."""
        threshold = math.inf if reason == "non_finite" else self.threshold()
        restored, error = False, None
        if self._snapshot is not None:
            try:
                # A copy, so a second rollback to the same snapshot starts from clean tensors.
                model.load_state_dict(copy.deepcopy(self._snapshot))
                restored = True
            except Exception as err:  # the governor must never crash training
                error = f"{type(err).__name__}: {err}"
        else:
            error = "no snapshot taken yet"
        pruned = []
        for state in model.slot_states():
            if is_live(state.stage):
                try:
                    model.prune(state.slot_id, reason="governor")
                    pruned.append(state.slot_id)
                except Exception as err:
                    error = f"{error + '; ' if error else ''}prune {state.slot_id}: {err}"
        self.spike_count = 0
        self.rollbacks += 1
        return GovernorEvent(
            epoch=epoch,
            reason=reason,
            value=float(value),
            threshold=threshold,
            snapshot_epoch=self.snapshot_epoch,
            pruned=tuple(pruned),
            penalty=self.config.penalty,
            restored=restored,
            error=error,
        )

    def reset(self) -> None:
        """Forget history and snapshot (a new episode on a fresh host)."""
        self.history.clear()
        self.spike_count = 0
        self._snapshot = None
        self.snapshot_epoch = -1
