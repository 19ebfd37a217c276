"""PPOAgent: slot-id checks, checkpoints (atomic, portable across slot counts, safe to load)."""

import pickle
from pathlib import Path

import pytest
import torch

from esper.actions import FactoredAction
from esper.rl import CheckpointError, PPOAgent, PPOConfig
from esper.rl.synthetic import GLOBAL_DIM, SLOT_DIM, CueRecallEnv
from esper.slots import SlotConfig, SlotMismatchError

CFG = PPOConfig(hidden=32, embed=16)


def trained_agent(num_slots: int = 3) -> tuple[PPOAgent, CueRecallEnv]:
    env = CueRecallEnv(8, num_slots=num_slots, seed=5)
    agent = PPOAgent(env.slot_config, GLOBAL_DIM, SLOT_DIM, env.blueprints, CFG)
    obs, masks = env.reset()
    hidden = agent.initial_hidden(8)
    for _ in range(env.length):
        step = agent.act(obs, masks, hidden)
        out = env.step(step.actions)
        agent.record(step, out.rewards, out.terminated, out.truncated)
        hidden, obs, masks = step.hidden, out.obs, out.masks
    agent.update()
    return agent, env


def run_episode(agent: PPOAgent, env: CueRecallEnv, deterministic: bool) -> torch.Tensor:
    """Play one episode, asserting legality; returns the actions [T, N, 4]."""
    obs, masks = env.reset()
    hidden = agent.initial_hidden(env.num_envs)
    actions = []
    for _ in range(env.length):
        step = agent.act(obs, masks, hidden, deterministic, slot_ids=env.slot_config.slot_ids)
        for i in range(env.num_envs):
            assert masks[i].allows(FactoredAction(*step.actions[i].tolist()))
        actions.append(step.actions)
        out = env.step(step.actions)
        hidden, obs, masks = step.hidden, out.obs, out.masks
    return torch.stack(actions)


def test_round_trip_restores_behaviour_statistics_optimiser_and_counters(tmp_path):
    agent, env = trained_agent()
    path = agent.save(tmp_path / "agent.pt")
    assert [p.name for p in tmp_path.iterdir()] == ["agent.pt"]  # no temp file left behind
    loaded = PPOAgent.load(path)
    assert loaded.slot_config == agent.slot_config and loaded.config == agent.config
    assert loaded.counters == agent.counters
    torch.testing.assert_close(
        loaded.obs_normalizer.slot_stats.var, agent.obs_normalizer.slot_stats.var
    )
    torch.testing.assert_close(loaded.return_normalizer.mean, agent.return_normalizer.mean)
    assert (
        loaded.optimizer.state_dict()["state"].keys()
        == agent.optimizer.state_dict()["state"].keys()
    )
    env.generator.manual_seed(1)
    a = run_episode(agent, env, deterministic=True)
    env.generator.manual_seed(1)
    assert torch.equal(a, run_episode(loaded, env, deterministic=True))


@pytest.mark.parametrize("num_slots", [5, 8])
def test_checkpoint_saved_with_three_slots_acts_legally_with_more(tmp_path, num_slots):
    agent, _ = trained_agent(3)
    path = agent.save(tmp_path / "n3.pt")
    bigger = CueRecallEnv(8, num_slots=num_slots, seed=6)
    loaded = PPOAgent.load(path, slot_config=bigger.slot_config)
    assert loaded.slot_config.num_slots == num_slots
    run_episode(loaded, bigger, deterministic=True)
    run_episode(loaded, bigger, deterministic=False)
    with pytest.raises(SlotMismatchError, match="r0c0"):
        obs, masks = bigger.reset()
        loaded.act(obs, masks, loaded.initial_hidden(8), slot_ids=("r0c0", "r0c1", "r0c2"))


def test_different_observation_schema_is_refused(tmp_path):
    agent, _ = trained_agent()
    path = agent.save(tmp_path / "a.pt")
    with pytest.raises(CheckpointError, match=r"a\.pt.*global_dim"):
        PPOAgent.load(path, global_dim=GLOBAL_DIM + 1)
    with pytest.raises(CheckpointError, match="slot_dim"):
        PPOAgent.load(path, slot_dim=SLOT_DIM + 2)
    with pytest.raises(CheckpointError, match="blueprints"):
        PPOAgent.load(path, blueprints=("bp0", "other"))
    payload = torch.load(path, weights_only=True)
    payload["schema_version"] = 99
    torch.save(payload, tmp_path / "future.pt")
    with pytest.raises(CheckpointError, match=r"future\.pt.*schema version 99"):
        PPOAgent.load(tmp_path / "future.pt")


def test_corrupt_truncated_foreign_and_missing_files_fail_clearly(tmp_path):
    agent, _ = trained_agent()
    data = agent.save(tmp_path / "ok.pt").read_bytes()
    (tmp_path / "trunc.pt").write_bytes(data[: len(data) // 2])
    (tmp_path / "noise.pt").write_bytes(bytes(range(256)) * 16)
    (tmp_path / "empty.pt").write_bytes(b"")
    torch.save({"weights": torch.zeros(3)}, tmp_path / "foreign.pt")
    for name in ("trunc.pt", "noise.pt", "empty.pt"):
        with pytest.raises(CheckpointError, match=rf"{name}.*(corrupt|unreadable)"):
            PPOAgent.load(tmp_path / name)
    with pytest.raises(CheckpointError, match="not an Esper PPO agent checkpoint"):
        PPOAgent.load(tmp_path / "foreign.pt")
    with pytest.raises(CheckpointError, match="does not exist"):
        PPOAgent.load(tmp_path / "missing.pt")


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_a_pickle_carrying_code_is_refused_and_never_run(tmp_path):
    marker = tmp_path / "executed"
    with open(tmp_path / "evil.pkl", "wb") as f:
        pickle.dump({"format": "esper.ppo_agent", "x": _Payload(marker)}, f)
    torch.save({"format": "esper.ppo_agent", "x": _Payload(marker)}, tmp_path / "evil.pt")
    for name in ("evil.pkl", "evil.pt"):
        with pytest.raises(CheckpointError, match="refused"):
            PPOAgent.load(tmp_path / name)
    assert not marker.exists()


def test_a_failed_save_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    agent, _ = trained_agent()
    path = agent.save(tmp_path / "a.pt")
    before = path.read_bytes()

    def broken_save(obj, f, *args, **kwargs):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        agent.save(path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["a.pt"]


def test_agent_rejects_a_non_slot_config():
    with pytest.raises(TypeError, match="SlotConfig"):
        PPOAgent(("r0c0",), GLOBAL_DIM, SLOT_DIM, ("bp0",))  # type: ignore[arg-type]
    assert SlotConfig.for_grid(1, 2).num_slots == 2
