"""Reward telescoping for both modes (unit level; the env test repeats it end to end)."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from esper.env.rewards import RewardConfig, RewardTracker, contribution_potential
from esper.lifecycle import SeedStage

step_st = st.tuples(
    st.floats(0, 1),  # quality
    st.floats(0, 5),  # growth
    st.sampled_from([0.0, 0.0, 0.0, 0.5]),  # governor penalty (rollback)
    st.floats(-2, 2),  # potential of the new state
)


@settings(max_examples=200, deadline=None)
@given(
    st.sampled_from(["objective", "contribution"]),
    st.floats(0, 1),
    st.floats(0, 1),
    st.floats(0, 5),
    st.lists(step_st, min_size=1, max_size=30),
)
def test_episode_sum_telescopes(mode, lam, q0, g0, steps):
    tracker = RewardTracker(RewardConfig(mode=mode, growth_penalty=lam))
    tracker.reset(q0, g0)
    total = 0.0
    for t, (q, g, penalty, phi) in enumerate(steps):
        last = t == len(steps) - 1
        total += tracker.step(q, g, penalty=penalty, potential=phi, last=last).total
    q_t, g_t = steps[-1][0], steps[-1][1]
    penalties = sum(s[2] for s in steps)
    expected = (q_t - lam * g_t) - (q0 - lam * g0) - penalties
    assert total == pytest.approx(expected, abs=1e-9)


def test_contribution_mode_credits_early_and_returns_it():
    tracker = RewardTracker(RewardConfig(mode="contribution", growth_penalty=0.0))
    tracker.reset(0.5, 0.0)
    first = tracker.step(0.5, 0.0, potential=0.1)
    assert first.shaping == pytest.approx(0.1) and first.total == pytest.approx(0.1)
    last = tracker.step(0.6, 0.0, potential=0.1, last=True)
    assert last.shaping == pytest.approx(-0.1) and last.quality_delta == pytest.approx(0.1)


def test_potential_counts_live_seeds_only():
    stages = [SeedStage.HOLDING, SeedStage.FOSSILIZED, SeedStage.TRAINING, SeedStage.BLENDING]
    assert contribution_potential(stages, [0.2, 0.5, None, 3.0], 2.0) == pytest.approx(2.4)


def test_bad_config_names_the_value():
    with pytest.raises(ValueError, match="unknown reward mode 'pbrs'"):
        RewardConfig(mode="pbrs")
    with pytest.raises(ValueError, match="growth_penalty must be .* got -1"):
        RewardConfig(growth_penalty=-1)
