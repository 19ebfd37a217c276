"""Device placement: envs round-robin over devices, CUDA streams, AMP host training.

Every path runs on CPU (streams and loss scaling are no-ops there); the CUDA paths are
covered by `gpu`-marked tests that skip without a GPU.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from esper.env import EnvConfig
from esper.env.vector import VectorMorphogenesisEnv
from esper.run_config import load_config
from esper.training.config import TrainConfig, TrainConfigError

ENV = EnvConfig(task="digits", max_epochs=2, batches_per_step=2)
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def play(vec: VectorMorphogenesisEnv) -> torch.Tensor:
    vec.reset(seeds=list(range(10, 10 + vec.num_envs)))
    rewards = []
    for _ in range(vec.max_epochs):
        rewards.append(vec.step(torch.zeros(vec.num_envs, 4, dtype=torch.long)).rewards)
    vec.synchronize()
    return torch.stack(rewards)


def test_env_devices_round_robin_on_cpu_changes_nothing():
    plain = VectorMorphogenesisEnv(3, ENV)
    placed = VectorMorphogenesisEnv(3, ENV, env_devices=["cpu", "cpu"])
    assert placed.devices == [torch.device("cpu")] * 3
    assert all(stream is None for stream in placed._streams)
    torch.testing.assert_close(play(placed), play(plain), rtol=0, atol=0)


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_amp_host_training_runs_on_cpu(amp):
    vec = VectorMorphogenesisEnv(2, replace(ENV, task_options={"amp": amp}))
    rewards = play(vec)
    assert torch.isfinite(rewards).all()
    assert vec.envs[0].trainer.amp_dtype in (torch.bfloat16, torch.float16)
    assert not vec.envs[0].trainer.scaler.is_enabled()  # loss scaling is CUDA-only


def test_bad_amp_mode_and_bad_device_are_named():
    with pytest.raises(TrainConfigError, match="amp 'fp8' unknown; allowed: off, bf16, fp16"):
        TrainConfig(amp="fp8")
    with pytest.raises(ValueError, match="device 'gpu7' unknown"):
        load_config(None, {"run": {"env_devices": ["cpu", "gpu7"]}})


@pytest.mark.gpu
@cuda
def test_cuda_envs_step_on_their_own_streams():
    vec = VectorMorphogenesisEnv(4, ENV, env_devices=["cuda:0"])
    streams = vec._streams
    assert all(s is not None for s in streams) and len({id(s) for s in streams}) == 4
    rewards = play(vec)
    assert torch.isfinite(rewards).all()
    for env in vec.envs:
        assert next(env.model.parameters()).device.type == "cuda"
        assert env.trainer.data.train_x.device.type == "cuda"
    # Same seeds on CPU: the same episodes up to GPU float differences.
    torch.testing.assert_close(rewards, play(VectorMorphogenesisEnv(4, ENV)), atol=0.05, rtol=0)


@pytest.mark.gpu
@cuda
def test_cuda_fp16_training_uses_loss_scaling():
    config = replace(ENV, task_options={"amp": "fp16"})
    vec = VectorMorphogenesisEnv(2, config, env_devices=["cuda:0"])
    assert torch.isfinite(play(vec)).all()
    assert vec.envs[0].trainer.scaler.is_enabled()
