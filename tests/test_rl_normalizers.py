"""Running normalisers: exact streaming statistics, slot statistics independent of N."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from esper.rl import ObservationNormalizer, PPOConfig, RunningMeanStd


@settings(max_examples=30, deadline=None)
@given(chunks=st.lists(st.integers(1, 20), min_size=1, max_size=6), seed=st.integers(0, 999))
def test_streamed_mean_and_variance_match_numpy(chunks, seed):
    rng = np.random.default_rng(seed)
    data = [rng.normal(3.0, 2.0, size=(n, 3)) for n in chunks]
    rms = RunningMeanStd(3, epsilon=1e-12)
    for chunk in data:
        rms.update(torch.from_numpy(chunk))
    full = np.concatenate(data)
    np.testing.assert_allclose(rms.mean.numpy(), full.mean(0), atol=1e-6)
    np.testing.assert_allclose(rms.var.numpy(), full.var(0), atol=1e-6)
    x = torch.from_numpy(full)
    torch.testing.assert_close(rms.denormalize(rms.normalize(x)), x)


def test_slot_statistics_are_shared_across_slots_and_do_not_depend_on_slot_count():
    gen = torch.Generator().manual_seed(0)
    rows = torch.randn(24, 4, generator=gen) * 3 + 1
    few, many = ObservationNormalizer(2, 4), ObservationNormalizer(2, 4)
    few.update({"global": torch.zeros(8, 2), "slots": rows.reshape(8, 3, 4)})
    many.update({"global": torch.zeros(3, 2), "slots": rows.reshape(3, 8, 4)})
    torch.testing.assert_close(few.slot_stats.mean, many.slot_stats.mean)
    torch.testing.assert_close(few.slot_stats.var, many.slot_stats.var)
    out = few.normalize({"global": torch.zeros(1, 2), "slots": torch.full((1, 5, 4), 1e6)})
    assert out["slots"].shape == (1, 5, 4) and float(out["slots"].max()) == few.clip


def test_state_dict_round_trip():
    a = ObservationNormalizer(2, 3)
    a.update({"global": torch.randn(5, 2), "slots": torch.randn(5, 4, 3)})
    b = ObservationNormalizer(2, 3)
    b.load_state_dict(a.state_dict())
    obs = {"global": torch.randn(2, 2), "slots": torch.randn(2, 6, 3)}
    for k, v in a.normalize(obs).items():
        torch.testing.assert_close(v, b.normalize(obs)[k])


def test_deferred_updates_leave_the_statistics_alone_until_commit_then_match_one_update():
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randn(n, 3, generator=gen, dtype=torch.float64) * 5 + 2 for n in (4, 1, 7)]
    deferred, direct = RunningMeanStd(3), RunningMeanStd(3)
    deferred.update(batches[0])
    direct.update(batches[0])
    x = torch.randn(2, 3, generator=gen)
    before = deferred.normalize(x)
    for batch in batches[1:]:
        deferred.accumulate(batch)
    assert deferred.pending_count == 8
    torch.testing.assert_close(deferred.normalize(x), before, rtol=0, atol=0)
    deferred.commit()
    direct.update(torch.cat(batches[1:]))
    assert deferred.pending_count == 0
    for key in ("mean", "var", "count"):
        torch.testing.assert_close(
            deferred.state_dict()[key], direct.state_dict()[key], rtol=1e-12, atol=1e-12
        )
    deferred.commit()  # nothing pending: no change
    torch.testing.assert_close(deferred.state_dict()["mean"], direct.state_dict()["mean"])


def test_ppo_config_refuses_an_unknown_normaliser_sync():
    with pytest.raises(ValueError, match="obs_normalizer_sync must be 'update' or 'step'"):
        PPOConfig(obs_normalizer_sync="round")
