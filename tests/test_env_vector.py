"""Lockstep vector runner: batched tensors, masks, autoreset, independence from E."""

import torch

from esper.actions import ActionMasks, FactoredAction, LifecycleOp
from esper.env import DEFAULT_SCHEMA, GLOBAL_DIM, SLOT_DIM, VectorMorphogenesisEnv

TINY = {"batches_per_step": 1, "max_epochs": 2}
SCRIPT = [
    FactoredAction(LifecycleOp.GERMINATE, 2, 1, 0),
    FactoredAction.wait(),
    FactoredAction(LifecycleOp.PRUNE, 2),
]


def test_env_zero_does_not_depend_on_how_many_envs_run():
    runs = []
    for num_envs in (1, 3):
        vec = VectorMorphogenesisEnv(num_envs, seed=7, batches_per_step=2, max_epochs=5)
        obs, _masks, _ = vec.reset()
        trace = [obs["slots"][0].clone()]
        for action in SCRIPT:
            step = vec.step([action] * num_envs)
            trace += [step.obs["global"][0].clone(), step.obs["slots"][0].clone(), step.rewards[:1]]
        runs.append(trace)
    for a, b in zip(*runs, strict=True):
        assert torch.equal(a, b)


def test_batched_outputs_masks_and_same_step_autoreset():
    vec = VectorMorphogenesisEnv(3, seed=0, **TINY)
    obs, masks, _infos = vec.reset()
    assert obs["global"].shape == (3, GLOBAL_DIM) and obs["slots"].shape == (3, 3, SLOT_DIM)
    assert masks.op.shape == (3, 4) and masks.slot.shape == (3, 4, 3)
    actions = torch.tensor([[1, 0, 0, 0], [0, 0, 0, 0], [1, 2, 4, 2]])
    step = vec.step(actions)
    per_env = ActionMasks.stack([env.conditional_masks() for env in vec.envs])
    for name, tensor in step.masks.as_dict().items():
        assert torch.equal(tensor, per_env.as_dict()[name]), name
    assert step.rewards.shape == (3,) and step.rewards.dtype == torch.float32
    assert not step.dones.any()
    assert torch.equal(step.obs["slots"], step.final_obs["slots"])
    assert [i["stages"]["r0c0"] for i in step.infos] == ["TRAINING", "DORMANT", "DORMANT"]

    step = vec.step(torch.zeros(3, 4, dtype=torch.long))
    epoch = DEFAULT_SCHEMA.global_index("epoch_fraction")
    assert step.truncated.all() and not step.terminated.any()
    assert torch.all(step.final_obs["global"][:, epoch] == 1.0)
    assert torch.all(step.obs["global"][:, epoch] == 0.0)  # already the next episode
    assert all("reset_info" in info for info in step.infos)
    assert not step.masks.slot[:, LifecycleOp.PRUNE].any()  # fresh hosts, no seeds
    seeds = [env.episode_seed for env in vec.envs]
    assert len(set(seeds)) == 3
