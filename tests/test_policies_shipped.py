"""The shipped policy (esper.policies): loads at any slot count and acts legally; the
build command works from a fixed seed; users run it with `esper eval`/`esper train`."""

import pytest
import torch

from esper.cli import main
from esper.env import MorphogenesisEnv
from esper.policies import PolicyController, load_policy, policy_path


@pytest.mark.parametrize("slots", [1, 3, 8, 64])
def test_shipped_policy_loads_and_acts_legally_at_any_slot_count(slots):
    env = MorphogenesisEnv(
        task_options={"width": 1, "depth": slots}, max_epochs=3, batches_per_step=1
    )
    assert env.slot_config.num_slots == slots
    agent = load_policy(env.slot_config, env.action_spec.blueprints)
    for controller in (PolicyController(agent), PolicyController(agent, deterministic=False)):
        obs, _ = env.reset(seed=slots)
        state = controller.initial_state()
        for _ in range(env.max_epochs):
            masks = env.conditional_masks()
            action, state = controller.act(obs, masks, state)
            assert masks.allows(action)
            obs, _, _, _, info = env.step(action)
            assert not info["illegal_action"]


def test_shipped_file_is_small_and_records_its_build():
    path = policy_path("shipped")
    assert path.stat().st_size < 1_000_000
    payload = torch.load(path, weights_only=True)
    build = payload["build"]
    assert build["chosen"] in ("clone", "fine_tuned")
    assert build["command"].startswith("esper build-policy")
    assert "prior" not in payload and not payload["optimizer"]["state"]
    with pytest.raises(ValueError, match="unknown shipped policy"):
        policy_path("nope")


def test_build_policy_quick_and_eval_shipped(tmp_path, capsys):
    out = tmp_path / "p.pt"
    clone = tmp_path / "clone.pt"
    argv = ["build-policy", "--out", str(out), "--quick", "--seed", "3", "--clone-out", str(clone)]
    assert main(argv) == 0
    assert torch.load(clone, weights_only=True)["build"]["chosen"] == "clone"
    assert "wrote" in capsys.readouterr().out
    env = MorphogenesisEnv(task_options={"width": 1})
    load_policy(env.slot_config, env.action_spec.blueprints, str(out))
    argv = ["eval", "shipped", "--set", "task.width=1", "--max-epochs", "2", "--episodes", "1"]
    assert main(argv) == 0
    assert "objective" in capsys.readouterr().out
