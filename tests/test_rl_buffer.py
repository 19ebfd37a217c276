"""RolloutBuffer: episode-bounded segments, stored initial states, slot-id checks."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from esper.actions import ActionMasks
from esper.rl import RolloutBuffer
from esper.slots import SlotConfig, SlotMismatchError

N, S, H = 3, 2, 4
CONFIG = SlotConfig.for_grid(1, S)


def add_step(buf: RolloutBuffer, t: int, done: list[bool], truncated: list[bool] | None = None):
    hidden = torch.full((1, N, H), float(t))
    masks = ActionMasks(
        torch.ones(N, 4, dtype=torch.bool),
        torch.ones(N, 4, S, dtype=torch.bool),
        torch.ones(N, S, 2, dtype=torch.bool),
        torch.ones(N, 3, dtype=torch.bool),
    )
    buf.add(
        slot_ids=CONFIG.slot_ids,
        obs={"global": torch.full((N, 2), float(t)), "slots": torch.zeros(N, S, 3)},
        masks=masks,
        actions=torch.zeros(N, 4, dtype=torch.long),
        log_probs=torch.zeros(N, 4),
        values=torch.full((N,), float(t)),
        hidden_in=(hidden, -hidden),
        rewards=torch.arange(N, dtype=torch.float) + 10 * t,
        terminated=torch.tensor(done),
        truncated=torch.tensor(truncated or [False] * N),
        bootstrap_values=torch.full((N,), 100.0),
    )


@settings(max_examples=30, deadline=None)
@given(dones=st.lists(st.lists(st.booleans(), min_size=N, max_size=N), min_size=1, max_size=6))
def test_segments_cover_every_step_once_and_start_at_episode_starts(dones):
    buf = RolloutBuffer(CONFIG, N)
    for t, done in enumerate(dones):
        add_step(buf, t, done)
    assert buf.has_open_segments == (not all(dones[-1]))
    buf.close_open_segments(torch.full((N,), 7.0))
    batch = buf.build()
    assert int(batch.valid.sum()) == N * len(dones)
    rewards = batch.rewards[batch.valid]
    assert sorted(rewards.tolist()) == sorted(
        float(e + 10 * t) for t in range(len(dones)) for e in range(N)
    )
    # Each segment starts right after an episode end (or at step 0) with the state stored then.
    first_t = batch.obs["global"][0, :, 0]
    for j in range(batch.num_sequences):
        t0 = int(first_t[j])
        env = int(batch.rewards[0, j]) - 10 * t0
        assert t0 == 0 or dones[t0 - 1][env]
        assert bool((batch.hidden0[0][0, j] == t0).all()) and bool(
            (batch.hidden0[1][0, j] == -t0).all()
        )
        length = int(batch.valid[:, j].sum())
        last = t0 + length - 1
        ended = dones[last][env]
        expected_boot = 0.0 if ended else 7.0
        assert float(batch.next_values[length - 1, j]) == expected_boot
        if length > 1:
            assert float(batch.next_values[0, j]) == t0 + 1


def test_truncation_needs_a_bootstrap_value_and_slot_ids_must_match():
    buf = RolloutBuffer(CONFIG, N)
    with pytest.raises(SlotMismatchError, match="r0c1"):
        buf.add(
            slot_ids=("r0c0", "r0c2"),
            obs={},
            masks=None,
            actions=None,
            log_probs=None,
            values=None,  # type: ignore[arg-type]
            hidden_in=None,
            rewards=None,
            terminated=None,
            truncated=None,  # type: ignore[arg-type]
        )
    add_step(buf, 0, [False, False, False], truncated=[True, False, False])
    batch = (buf.close_open_segments(torch.zeros(N)), buf.build())[1]
    assert sorted(batch.next_values[0].tolist()) == [0.0, 0.0, 100.0]
    with pytest.raises(ValueError, match="actions must have shape"):
        RolloutBuffer(CONFIG, N).add(
            slot_ids=CONFIG.slot_ids,
            obs={"global": torch.zeros(N, 2), "slots": torch.zeros(N, S, 3)},
            masks=ActionMasks(*(torch.ones(N, 4, S, dtype=torch.bool) for _ in range(4))),
            actions=torch.zeros(N, 3, dtype=torch.long),
            log_probs=torch.zeros(N, 4),
            values=torch.zeros(N),
            hidden_in=(torch.zeros(1, N, H),) * 2,
            rewards=torch.zeros(N),
            terminated=torch.zeros(N, dtype=torch.bool),
            truncated=torch.zeros(N, dtype=torch.bool),
        )


def test_build_refuses_open_segments():
    buf = RolloutBuffer(CONFIG, N)
    add_step(buf, 0, [True, False, False])
    with pytest.raises(RuntimeError, match="close_open_segments"):
        buf.build()
