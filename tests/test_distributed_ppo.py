"""DD-PPO on torch.distributed (gloo, CPU): ranks stay identical, match one process, fail fast.

Workers are real processes joined through `esper.distributed.init_distributed` with the
variables torchrun would set. Settings where a one-process run is the exact reference:
``n_epochs=1, num_minibatches=1, target_kl=None`` (one optimiser step over the whole
batch, so the minibatch order and the early stop cannot differ), 4 envs in total.
"""

from __future__ import annotations

import csv
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from hypothesis import given, settings
from hypothesis import strategies as st

from esper.distributed import (
    DistContext,
    DistributedSetupError,
    env_shard,
    init_distributed,
    parameter_checksum,
    shutdown,
)
from esper.env import GLOBAL_DIM, SLOT_DIM, EnvConfig
from esper.env.vector import VectorMorphogenesisEnv
from esper.experiment import run_round
from esper.policy.distributions import MaskedCategorical
from esper.rl import PPOAgent, PPOConfig
from esper.telemetry import read_events

TOTAL_ENVS = 4
PPO = PPOConfig(hidden=16, embed=8, n_epochs=1, num_minibatches=1, target_kl=None, seed=3)
ENV = EnvConfig(task="digits", max_epochs=2, batches_per_step=2)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_env(rank: int, world: int, port: int) -> dict[str, str]:
    return {
        "RANK": str(rank),
        "WORLD_SIZE": str(world),
        "LOCAL_RANK": str(rank),
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
    }


def worker(rank: int, world: int, port: int, rounds: int, out: str, die_after: int = -1) -> None:
    """One rank: its shard of the envs, `rounds` PPO updates, results saved to ``out``."""
    torch.set_num_threads(1)
    environ = launch_env(rank, world, port) if world > 1 else {}
    ctx = init_distributed("cpu", timeout_s=30, environ=environ)
    shard = env_shard(TOTAL_ENVS, ctx)
    vec = VectorMorphogenesisEnv(shard.count, ENV)
    agent = PPOAgent(vec.slot_config, GLOBAL_DIM, SLOT_DIM, vec.action_spec.blueprints, PPO)
    agent.distribute(ctx, shard, verify_sync=True)  # raises if the ranks ever diverge
    checksums, returns, diagnostics = [], [], []
    for k in range(rounds):
        records = run_round(vec, k, 7, agent=agent, learn=True, env_offset=shard.offset)
        returns += [(r.env, r.episode_return) for r in records]
        diagnostics.append(agent.update())
        checksums.append(parameter_checksum(agent.network))
        if k == 0:
            first = {n: p.detach().clone() for n, p in agent.network.named_parameters()}
        if k == die_after:
            os._exit(0)  # vanish without a goodbye, like a killed process
    torch.save(
        {
            "checksums": checksums,
            "returns": returns,
            "diagnostics": diagnostics,
            "first": first,
            "obs_mean": agent.obs_normalizer.global_stats.mean,
            "counters": dict(agent.counters),
        },
        Path(out) / f"rank{rank}_of{world}.pt",
    )
    shutdown(ctx)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """One 2-process run (2 updates) and the one-process reference (1 update)."""
    out = tmp_path_factory.mktemp("ddppo")
    mp.spawn(worker, args=(2, free_port(), 2, str(out)), nprocs=2, join=True)
    worker(0, 1, 0, 1, str(out))
    return out


def test_two_ranks_hold_identical_weights_after_every_update(runs):
    r0, r1 = (torch.load(runs / f"rank{r}_of2.pt") for r in (0, 1))
    assert len(r0["checksums"]) == 2
    for a, b in zip(r0["checksums"], r1["checksums"], strict=True):
        assert torch.equal(a, b)
    assert not torch.equal(r0["checksums"][0], r0["checksums"][1])  # the update moved them
    torch.testing.assert_close(r0["obs_mean"], r1["obs_mean"], rtol=0, atol=0)
    # Counters count every rank's envs: 2 rounds x 4 envs x 2 steps.
    assert r0["counters"]["env_steps"] == r1["counters"]["env_steps"] == 2 * TOTAL_ENVS * 2
    assert r0["counters"]["episodes"] == 2 * TOTAL_ENVS


def test_first_update_matches_one_process_with_the_same_total_envs(runs):
    r0, r1 = (torch.load(runs / f"rank{r}_of2.pt") for r in (0, 1))
    single = torch.load(runs / "rank0_of1.pt")
    # Same global env index -> same seeds and sampling noise -> the same episodes.
    split = sorted(r0["returns"][:2] + r1["returns"][:2])
    assert [env for env, _ in split] == [0, 1, 2, 3]
    assert split == sorted(single["returns"])
    for name, value in single["first"].items():
        torch.testing.assert_close(r0["first"][name], value, rtol=1e-5, atol=1e-6, msg=name)
    for key in ("policy_loss", "value_loss", "approx_kl", "grad_norm", "entropy/op"):
        expected = single["diagnostics"][0][key]  # approx_kl is ~1e-8 (ratio 1): abs tolerance
        assert r0["diagnostics"][0][key] == pytest.approx(expected, rel=1e-4, abs=1e-6), key


def worker_command(rank: int, port: int, out: Path, die_after: int) -> list[str]:
    code = (
        f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
        "import test_distributed_ppo as t; "
        f"t.worker({rank}, 2, {port}, 3, {str(out)!r}, {die_after})"
    )
    return [sys.executable, "-c", code]


def test_killed_rank_makes_the_other_exit_with_a_clear_error(tmp_path):
    """Rank 1 vanishes after the first update; rank 0 must fail fast, not hang."""
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen(
            worker_command(rank, port, tmp_path, die_after=0 if rank == 1 else -1),
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in (0, 1)
    ]
    start = time.monotonic()
    _, err = procs[0].communicate(timeout=90)
    procs[1].communicate(timeout=30)
    assert time.monotonic() - start < 90
    assert procs[0].returncode != 0
    assert "PeerLostError" in err and "another rank died or stopped responding" in err, err
    assert not (tmp_path / "rank0_of2.pt").exists()


def test_env_split_must_divide_and_names_both_numbers():
    with pytest.raises(DistributedSetupError, match="--envs 6 .* 4 processes"):
        env_shard(6, DistContext(rank=1, world_size=4))
    shard = env_shard(8, DistContext(rank=3, world_size=4))
    assert (shard.offset, shard.count, shard.total) == (6, 2, 8)


def test_single_process_without_torchrun_variables():
    ctx = init_distributed(environ={})
    assert not ctx.active and ctx.is_main and ctx.world_size == 1
    with pytest.raises(DistributedSetupError, match="MASTER_ADDR"):
        init_distributed(environ={"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0"})


@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.floats(-5, 5), min_size=2, max_size=6),
    st.lists(st.booleans(), min_size=2, max_size=6),
    st.floats(0.0, 1.0, exclude_max=True),
)
def test_inverse_cdf_sampling_is_always_legal(logits, allowed, u):
    """The per-env noise path never draws a masked action, whatever the uniform number."""
    k = min(len(logits), len(allowed))
    mask = torch.tensor(allowed[:k])
    if not mask.any():
        mask[k - 1] = True
    dist = MaskedCategorical(torch.tensor(logits[:k]).unsqueeze(0), mask.unsqueeze(0))
    draw = int(dist.sample(uniform=torch.tensor([u]))[0])
    assert mask[draw]


def test_inverse_cdf_sampling_follows_the_probabilities():
    probs = torch.tensor([0.1, 0.0, 0.6, 0.3])
    dist = MaskedCategorical(
        probs.log().unsqueeze(0).expand(20000, 4), (probs > 0).expand(20000, 4)
    )
    uniform = torch.rand(20000, generator=torch.Generator().manual_seed(0))
    freq = torch.bincount(dist.sample(uniform=uniform), minlength=4).float() / 20000
    torch.testing.assert_close(freq, probs, atol=0.015, rtol=0)


def torchrun(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone"]
    return subprocess.run(
        [*cmd, "-m", "esper", "train", "ppo", *args, "--no-report"],
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_torchrun_cli_run_resumes_and_rank0_writes_every_env(tmp_path):
    run_dir = tmp_path / "run"
    tiny = ["--max-epochs", "2", "--set", "env.batches_per_step=2", "--set", "ppo.hidden=16"]
    first = torchrun("--envs", "4", "--episodes", "4", "--run-dir", str(run_dir), *tiny)
    assert first.returncode == 0, first.stderr[-2000:]
    again = torchrun("--resume", "--episodes", "8", "--run-dir", str(run_dir))
    assert again.returncode == 0, again.stderr[-2000:]
    rows = list(csv.DictReader((run_dir / "metrics.csv").open()))
    assert [(r["episode"], r["env"]) for r in rows] == [
        (str(k), str(i)) for k in (0, 1) for i in range(4)
    ]
    steps = [e for e in read_events(run_dir / "events.jsonl") if e["kind"] == "episode_step"]
    assert {e["env"] for e in steps} == {0, 1, 2, 3}  # rank 1's envs are logged by rank 0
    saved = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    assert saved["counters"]["updates"] == 2 and saved["counters"]["env_steps"] == 2 * 4 * 2
    bad = torchrun("--envs", "3", "--run-dir", str(tmp_path / "bad"))
    assert bad.returncode != 0
    assert "esper: error: --envs 3 cannot be split over 2 processes" in bad.stderr


# -- no collective per env step: what an env sees does not depend on the rank count -----
SPLIT_ENVS, SPLIT_STEPS, SPLIT_ROUNDS = 4, 5, 3


class IndexedEnvs:
    """Envs whose observation depends on their global index, the step and their own last
    action only (never on the other envs), with masks that allow every action."""

    def __init__(self, offset: int, count: int) -> None:
        from esper.slots import SlotConfig

        self.index = torch.arange(offset, offset + count, dtype=torch.float32)
        self.slot_config = SlotConfig.for_grid(1, 3)
        self.last = torch.zeros(count, 4)
        self.t = 0

    def observe(self):
        from esper.actions import ActionMasks

        n, i, t = len(self.index), self.index, float(self.t)
        g = torch.stack([i * 3.0 + t, (i - t) ** 2, *self.last.T], -1)  # [n, 6], large values
        slots = (i[:, None, None] + torch.arange(3.0)[None, :, None] * t) * torch.ones(n, 3, 2)
        masks = ActionMasks(
            torch.ones(n, 4, dtype=torch.bool),
            torch.ones(n, 4, 3, dtype=torch.bool),
            torch.ones(n, 3, 2, dtype=torch.bool),
            torch.ones(n, 3, dtype=torch.bool),
        )
        return {"global": g, "slots": slots}, masks

    def step(self, actions):
        self.last, self.t = actions.float(), self.t + 1
        return (actions[:, 0] == 1).float()


def split_worker(rank: int, world: int, port: int, out: str, sync: str) -> None:
    import esper.distributed as ed

    torch.set_num_threads(1)
    environ = launch_env(rank, world, port) if world > 1 else {}
    ctx = init_distributed("cpu", timeout_s=30, environ=environ)
    shard = env_shard(SPLIT_ENVS, ctx)
    envs = IndexedEnvs(shard.offset, shard.count)
    cfg = PPOConfig(hidden=16, embed=8, n_epochs=1, num_minibatches=1, obs_normalizer_sync=sync)
    agent = PPOAgent(envs.slot_config, 6, 2, ("a", "b"), cfg)
    agent.distribute(ctx, shard)
    calls = {"n": 0}
    inner = ed._collective

    def counting(*args, **kwargs):
        calls["n"] += 1
        return inner(*args, **kwargs)

    ed._collective = counting
    seen, rollout_collectives, stats = [], [], []
    hidden = agent.initial_hidden(shard.count)
    for _ in range(SPLIT_ROUNDS):
        before = calls["n"]
        for _ in range(SPLIT_STEPS):
            obs, masks = envs.observe()
            step = agent.act(obs, masks, hidden)
            seen.append((step.obs["global"].clone(), step.obs["slots"].clone(), step.actions))
            rewards = envs.step(step.actions)
            done = torch.zeros(shard.count, dtype=torch.bool)
            agent.record(step, rewards, done, done)
            hidden = step.hidden
        rollout_collectives.append(calls["n"] - before)
        obs, _ = envs.observe()
        agent.update(next_obs=obs, next_hidden=hidden)
        stats.append(agent.obs_normalizer.state_dict())
    torch.save(
        {"seen": seen, "collectives": rollout_collectives, "stats": stats},
        Path(out) / f"split{rank}_of{world}_{sync}.pt",
    )
    shutdown(ctx)


def test_rank_count_does_not_change_what_an_env_sees_and_statistics_stay_exact(tmp_path):
    mp.spawn(split_worker, args=(2, free_port(), str(tmp_path), "update"), nprocs=2, join=True)
    split_worker(0, 1, 0, str(tmp_path), "update")
    one = torch.load(tmp_path / "split0_of1_update.pt")
    ranks = [torch.load(tmp_path / f"split{r}_of2_update.pt") for r in (0, 1)]
    # No collective while stepping envs: the ranks only meet in update().
    assert ranks[0]["collectives"] == ranks[1]["collectives"] == [0] * SPLIT_ROUNDS
    # Every env (rank 0: envs 0-1, rank 1: envs 2-3) sees the same normalised observations
    # and takes the same actions as in the one-process run, over several updates.
    for t, (g, s, a) in enumerate(one["seen"]):
        parts = [r["seen"][t] for r in ranks]
        assert torch.equal(torch.cat([p[2] for p in parts]), a), t
        torch.testing.assert_close(torch.cat([p[0] for p in parts]), g, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(torch.cat([p[1] for p in parts]), s, rtol=1e-6, atol=1e-6)
    # Exact: after each update both ranks hold bit-identical statistics, equal (to float64
    # rounding) to the moments of every observation of every env, as in one process.
    for k in range(SPLIT_ROUNDS):
        for part in ("global", "slots"):
            a, b = (r["stats"][k][part] for r in ranks)
            for key in ("mean", "var", "count"):
                assert torch.equal(a[key], b[key]), (k, part, key)
                ref = one["stats"][k][part][key]
                torch.testing.assert_close(a[key], ref, rtol=1e-12, atol=1e-12)
    # The statistics are those of the observations seen so far, exactly.
    g_all = torch.cat([g for g, _, _ in one["seen"]])  # normalised: check the count only
    assert float(one["stats"][-1]["global"]["count"]) == pytest.approx(g_all.shape[0], abs=1e-3)


@pytest.mark.slow
def test_per_step_sync_still_meets_every_step(tmp_path):
    mp.spawn(split_worker, args=(2, free_port(), str(tmp_path), "step"), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"split{r}_of2_step.pt") for r in (0, 1)]
    # Two normalisers x three reductions (count, mean, spread) per act.
    assert ranks[0]["collectives"] == [6 * SPLIT_STEPS] * SPLIT_ROUNDS
