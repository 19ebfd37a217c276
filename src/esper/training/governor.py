"""The safety governor: detect a diverging env and roll it back to its last good state.

After every healthy step the governor keeps a snapshot of the whole model
(`state_dict`, seeds and lifecycle included). A non-finite loss at once, or
``consecutive`` bad steps in a row (see `GovernorConfig`: a loss above a ceiling of
``divergence_factor`` times the chance-level loss, or a spike on a robust scale that is
not excused by a recent change of the model), restores that snapshot (whatever was
germinated, fossilized or pruned since is rebuilt from the snapshot's ids), prunes
every live seed (a seed that was growing when things went wrong is not trusted), and
reports a `GovernorEvent` with a penalty. Nothing in here raises: a rollback that
cannot restore reports ``restored=False`` instead.

The snapshot outlives structural changes: after a fold (layers physically wider, a
fossil gone into the host) a rollback restores the snapshot's structure too
(`esper.model.restore.restore_state`: the same modules and Parameter objects, resized),
so it returns to exactly the model that was snapshotted. A fold does not take a new
snapshot: rolling back then undoes the fossilize and the fold together, as it undoes a
fossilize that was not folded, so folding never changes what a rollback does. The
snapshot belongs to the model it was taken of; another model is refused.

Measured with ``bench/bench_governor.py --gates`` (digits widths 1 and 2, heuristic and
random controllers, 80 healthy episodes of 20 steps): the earlier mean + 3σ rule caught a
real divergence (lr = 50) in 1 of 5 episodes, because its history filled with the
diverged losses of the first steps, which then looked normal; this rule catches 5 of 5,
with 0 false rollbacks on the healthy episodes (the earlier rule: 0 on the same code,
1 of 80 before width seeds, a val-loss rise 0.52 -> 0.94 after a fossilize and a
germination). A NaN weight is rolled back in 5 of 5 episodes by both.
"""

from __future__ import annotations

import copy
import math
import statistics
import weakref
from collections import deque
from dataclasses import dataclass
from typing import Literal

from esper.lifecycle import is_live
from esper.training.config import GovernorConfig

Verdict = Literal["ok", "suspect", "non_finite", "spike", "diverged"]
Reason = Literal["non_finite", "spike", "diverged"]
ROLLBACK_VERDICTS: frozenset[str] = frozenset({"non_finite", "spike", "diverged"})
_MAD_TO_SIGMA = 1.4826  # MAD of a normal distribution times this is its sigma


@dataclass(frozen=True)
class GovernorEvent:
    epoch: int  # the env step at which the rollback happened
    reason: Reason
    value: float  # the monitored loss that triggered it
    threshold: float  # the spike threshold or divergence ceiling (inf for non_finite)
    snapshot_epoch: int  # the step whose end state was restored
    pruned: tuple[str, ...]  # live seeds pruned after the restore
    penalty: float
    restored: bool = True
    error: str | None = None  # why restoring failed, when it did


class Governor:
    """Watches one env's loss; owns that env's last good snapshot."""

    def __init__(self, config: GovernorConfig | None = None, chance_loss: float | None = None):
        """``chance_loss``: the loss of a uniform guess (ln of the number of classes or
        of the vocabulary); None: no divergence ceiling, spikes and NaN only."""
        self.config = config if config is not None else GovernorConfig()
        if chance_loss is not None and not (math.isfinite(chance_loss) and chance_loss > 0):
            raise ValueError(f"chance_loss must be a finite number > 0, got {chance_loss!r}")
        self.chance_loss = chance_loss
        self.history: deque[float] = deque(maxlen=self.config.window)
        self.spike_count = 0
        self.grace_left = 0
        self.rollbacks = 0
        self._snapshot: dict | None = None
        self._snapshot_of: weakref.ref | None = None  # the model the snapshot is of
        self.snapshot_epoch = -1

    # -- detection -------------------------------------------------------------------
    def threshold(self) -> float:
        """Loss above which a step counts as a spike (inf until there is enough history)."""
        cfg = self.config
        if len(self.history) < cfg.min_history:
            return math.inf
        median = statistics.median(self.history)
        mad = statistics.median(abs(v - median) for v in self.history)
        robust = median + cfg.k_sigma * _MAD_TO_SIGMA * mad
        return max(robust, median + cfg.min_rise * abs(median), median + 1e-8)

    def ceiling(self) -> float:
        """Loss above which a step counts as divergence, whatever the history."""
        if self.chance_loss is None:
            return math.inf
        return self.config.divergence_factor * self.chance_loss

    def model_changed(self) -> None:
        """The model's function changed since the last judged step (growth, pruning, an
        alpha step): spikes in the next ``grace_steps`` judged steps do not count."""
        self.grace_left = self.config.grace_steps

    def observe(self, value: float) -> Verdict:
        """Judge one step's monitored loss; only healthy values enter the history."""
        if not self.config.enabled:
            return "ok"
        if not math.isfinite(value):
            return "non_finite"
        graced, self.grace_left = self.grace_left > 0, max(self.grace_left - 1, 0)
        diverged = value > self.ceiling()
        if diverged or value > self.threshold():
            if graced and not diverged:
                return "suspect"  # expected after growth: neither counted nor learned from
            self.spike_count += 1
            if self.spike_count < self.config.consecutive:
                return "suspect"
            return "diverged" if diverged else "spike"
        self.spike_count = 0
        self.history.append(value)
        return "ok"

    # -- snapshots -------------------------------------------------------------------
    def snapshot(self, model, epoch: int) -> None:
        """Keep a copy of the model's current state as the last good one."""
        self._snapshot = copy.deepcopy(model.state_dict())
        self._snapshot_of = weakref.ref(model)
        self.snapshot_epoch = epoch

    @property
    def has_snapshot(self) -> bool:
        return self._snapshot is not None

    def rollback(self, model, epoch: int, reason: Reason, value: float) -> GovernorEvent:
        """Restore the snapshot, prune live seeds; report what happened. Never raises."""
        threshold = {"non_finite": math.inf, "diverged": self.ceiling()}.get(
            reason, self.threshold()
        )
        from esper.model.restore import restore_state  # lazy: esper.model imports are not free

        restored, error = False, None
        if self._snapshot is None:
            error = "no snapshot taken yet"
        elif self._snapshot_of is None or self._snapshot_of() is not model:
            # Restoring would turn this model into another one (structure included).
            error = "the snapshot was taken of another model: it does not match this one"
        else:
            try:
                # A copy, so a second rollback to the same snapshot starts from clean tensors.
                restore_state(model, copy.deepcopy(self._snapshot))
                restored = True
            except Exception as err:  # the governor must never crash training
                error = f"{type(err).__name__}: {err}"
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
        self.grace_left = 0
        self._snapshot = None
        self._snapshot_of = None
        self.snapshot_epoch = -1
