"""λ and the parameter budget as policy inputs (schema v3); per-episode λ draws; old
checkpoints without these inputs are refused with one clear line."""

import math

import pytest
import torch

from esper.actions import FactoredAction
from esper.checkpointing import CheckpointError
from esper.cli import main
from esper.env import EnvConfig, MorphogenesisEnv
from esper.env.observations import (
    DEFAULT_SCHEMA,
    GLOBAL_DIM,
    LAMBDA_SCALE,
    NO_BUDGET_FEATURE,
    SCHEMA_VERSION,
    SLOT_DIM,
)
from esper.rl import PPOAgent

TINY = {"task_options": {"width": 1}, "max_epochs": 3, "batches_per_step": 2}
LAM = DEFAULT_SCHEMA.global_index("growth_penalty")
BUDGET = DEFAULT_SCHEMA.global_index("max_growth")


def test_lambda_and_budget_are_observed_scaled():
    env = MorphogenesisEnv(**TINY, growth_penalty=0.1, max_growth=0.5)
    obs, info = env.reset(seed=1)
    assert SCHEMA_VERSION >= 3 and info["growth_penalty"] == 0.1
    assert obs["global"][LAM] == pytest.approx(0.1 / (0.1 + LAMBDA_SCALE))
    assert obs["global"][BUDGET] == pytest.approx(0.5 / 1.5)
    obs, *_ = env.step(FactoredAction.wait())
    assert obs["global"][LAM] == pytest.approx(2 / 3)
    free, _ = MorphogenesisEnv(**TINY, growth_penalty=0.0).reset(seed=1)
    assert free["global"][LAM] == 0.0 and free["global"][BUDGET] == NO_BUDGET_FEATURE == 1.0


def test_lambda_drawn_per_episode_from_the_seed_only():
    fixed = MorphogenesisEnv(**TINY)
    drawn = MorphogenesisEnv(**TINY, growth_penalty_range=[0.0, 0.2])  # a TOML list is fine
    assert drawn.config.growth_penalty_range == (0.0, 0.2)
    lams = []
    for seed in range(6):
        obs_d, info_d = drawn.reset(seed=seed)
        lam = info_d["growth_penalty"]
        assert 0.0 <= lam <= 0.2 and drawn.reset(seed=seed)[1]["growth_penalty"] == lam
        assert obs_d["global"][LAM] == pytest.approx(lam / (lam + LAMBDA_SCALE), abs=1e-6)
        lams.append(lam)
        fixed.reset(seed=seed)
        # Only the λ feature differs: same host, same data order.
        other = [i for i in range(GLOBAL_DIM) if i != LAM]
        step_d = drawn.step(FactoredAction.wait())
        step_f = fixed.step(FactoredAction.wait())
        assert torch.equal(torch.as_tensor(step_d[0]["slots"]), torch.as_tensor(step_f[0]["slots"]))
        assert step_d[0]["global"][other].tolist() == step_f[0]["global"][other].tolist()
        assert step_d[4]["objective"] == step_f[4]["objective"]  # no growth: λ irrelevant
    assert len(set(lams)) == 6
    for bad in ((0.2, 0.1), (-0.1, 0.1), (0.0, math.inf)):
        with pytest.raises(ValueError, match="growth_penalty_range"):
            EnvConfig(growth_penalty_range=bad)


def _old_checkpoint(tmp_path):
    """An agent file as written before v3: two fewer global inputs, schema v2."""
    env = MorphogenesisEnv(**TINY)
    old_globals = [
        f for f in DEFAULT_SCHEMA.global_features if f not in ("growth_penalty", "max_growth")
    ]
    agent = PPOAgent(env.slot_config, len(old_globals), SLOT_DIM, env.action_spec.blueprints)
    state = agent.state_dict()
    state["observation_schema"] = {
        "version": 2,
        "global_features": old_globals,
        "slot_features": list(DEFAULT_SCHEMA.slot_features),
    }
    from esper.rl.checkpoint import save_checkpoint

    return save_checkpoint(state, tmp_path / "old.pt")


def test_checkpoint_without_lambda_inputs_is_refused(tmp_path, capsys):
    path = _old_checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match=r"old\.pt.*builds v3.*has v2.*λ"):
        PPOAgent.load(path)
    code = main(["eval", str(path), "--task", "digits", "--max-epochs", "1", "--episodes", "1"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "v3" in err and "v2" in err and "old.pt" in err
    # No schema stored at all (a bare agent file of the old width): refused too.
    payload = torch.load(path, weights_only=True)
    del payload["observation_schema"]
    torch.save(payload, tmp_path / "bare.pt")
    with pytest.raises(CheckpointError, match=r"no schema version.*v3"):
        PPOAgent.load(tmp_path / "bare.pt", global_dim=GLOBAL_DIM)


def test_current_agent_files_store_and_pass_the_schema(tmp_path):
    env = MorphogenesisEnv(**TINY)
    agent = PPOAgent(env.slot_config, GLOBAL_DIM, SLOT_DIM, env.action_spec.blueprints)
    path = agent.save(tmp_path / "new.pt")
    assert torch.load(path, weights_only=True)["observation_schema"]["version"] == SCHEMA_VERSION
    PPOAgent.load(path, global_dim=GLOBAL_DIM, slot_dim=SLOT_DIM)
