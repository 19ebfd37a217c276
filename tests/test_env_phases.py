"""`MorphogenesisEnv.step` as three phases, and the lockstep runner that calls them."""

import threading

import numpy as np
import pytest

from esper.actions import FactoredAction, LifecycleOp
from esper.env import EnvConfig, MorphogenesisEnv, VectorMorphogenesisEnv


def test_batched_lockstep_calls_the_phases_without_worker_threads():
    vec = VectorMorphogenesisEnv(
        3, EnvConfig(task="digits", max_epochs=3, batches_per_step=1), batched=True
    )
    vec.reset(seed=0)
    threads = threading.active_count()
    for _ in range(2):
        vec.step([FactoredAction.wait()] * 3)
        assert vec.last_step_batched
    assert threading.active_count() == threads  # the old runner parked one thread per env
    vec.close()


def test_phases_compose_to_step_and_refuse_a_step_begun_elsewhere():
    env, whole = (MorphogenesisEnv(task="digits", max_epochs=3, batches_per_step=1) for _ in "ab")
    env.reset(seed=1)
    whole.reset(seed=1)
    germinate = FactoredAction(LifecycleOp.GERMINATE, 1, 3, 0)
    begun = env.begin_step(germinate)
    obs, reward, terminated, truncated, info = env.end_step(begun, env.train_phase())
    expected = whole.step(germinate)
    for key in ("global", "slots"):
        assert np.array_equal(obs[key], expected[0][key])
    assert (reward, terminated, truncated) == expected[1:4] and env.epoch == 1
    assert info["events"] == expected[4]["events"] and info["events"]
    with pytest.raises(ValueError, match="begun at epoch 0; this env is at epoch 1"):
        env.end_step(begun, env.train_phase())
