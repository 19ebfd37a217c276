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
