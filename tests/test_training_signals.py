"""TrainingSignals: deltas, best quality, plateau counter, bounded history."""

from __future__ import annotations

import math

from hypothesis import given, settings
from hypothesis import strategies as st

from esper.training import TrainingSignals


@settings(max_examples=60, deadline=None)
@given(qualities=st.lists(st.floats(0.0, 1.0), min_size=1, max_size=30))
def test_best_plateau_and_deltas_match_their_definitions(qualities):
    tol = 0.01
    sig = TrainingSignals(history=5, plateau_tolerance=tol)
    best, plateau = -math.inf, 0
    for i, q in enumerate(qualities):
        sig.update(train_loss=1.0 - q, train_acc=q, val_loss=2.0 - q, val_acc=q, quality=q)
        plateau = 0 if q > best + tol else plateau + 1
        best = max(best, q)
        assert sig.best_quality == best and sig.plateau_epochs == plateau
        expected_delta = 0.0 if i == 0 else q - qualities[i - 1]
        assert math.isclose(sig.delta_quality, expected_delta, abs_tol=1e-12)
        assert math.isclose(sig.delta_val_loss, -expected_delta, abs_tol=1e-12)
    assert list(sig.quality_history) == qualities[-5:]
    assert sig.epoch == len(qualities)


def test_non_finite_losses_do_not_poison_deltas_and_reset_starts_over():
    sig = TrainingSignals()
    sig.update(1.0, 0.5, 1.0, 0.5, 0.5)
    sig.update(math.nan, 0.1, math.nan, 0.1, 0.1)
    assert sig.delta_val_loss == 0.0 and sig.delta_quality == -0.4
    sig.update(0.8, 0.6, 0.9, 0.6, 0.6)
    assert sig.delta_val_loss == 0.0  # nan -> finite is not a measurable change either
    sig.reset()
    assert sig.epoch == 0 and sig.best_quality == -math.inf and len(sig.val_loss_history) == 0
