"""Scale-out benchmark: DD-PPO throughput with 1 vs 2 processes (gloo, CPU).

    python bench/bench_distributed.py [--quick] [--envs 8] [--rounds 3]

Both runs step the same total number of envs (split over the ranks) for the same rounds
(one round = one episode per env + one PPO update). Printed per process count: env steps
per second, the share of time in the policy (act), in the PPO update and in the host
envs; then the 2-vs-1 ratio, the gradient all-reduce size in bytes and the time of one
all-reduce of that size, which is what each extra rank adds per optimiser step.
``--obs-sync step`` restores the per-env-step normaliser merge (a collective per step).
"""

from __future__ import annotations

import argparse
import socket
import tempfile
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

from esper.actions import ActionMasks
from esper.distributed import (
    all_reduce_gradients,
    env_shard,
    init_distributed,
    shutdown,
)
from esper.env import GLOBAL_DIM, SLOT_DIM, EnvConfig
from esper.env.vector import VectorMorphogenesisEnv
from esper.experiment import run_round
from esper.rl import PPOAgent, PPOConfig


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _TimedAgent(PPOAgent):
    """Accumulates the wall time of act() so the policy's share can be reported."""

    act_time = 0.0

    def act(self, *args, **kwargs):
        start = time.perf_counter()
        try:
            return super().act(*args, **kwargs)
        finally:
            self.act_time += time.perf_counter() - start


def _worker(rank: int, world: int, port: int, args: argparse.Namespace, out: str) -> None:
    torch.set_num_threads(1)
    environ = {
        "RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
        "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
    } if world > 1 else {}  # fmt: skip
    ctx = init_distributed("cpu", timeout_s=120, environ=environ)
    shard = env_shard(args.envs, ctx)
    env_cfg = EnvConfig(task="digits", max_epochs=args.max_epochs, batches_per_step=args.batches)
    vec = VectorMorphogenesisEnv(shard.count, env_cfg)
    ppo = PPOConfig(
        hidden=args.hidden,
        embed=32,
        n_epochs=2,
        num_minibatches=2,
        seed=1,
        obs_normalizer_sync=args.obs_sync,
    )
    agent = _TimedAgent(vec.slot_config, GLOBAL_DIM, SLOT_DIM, vec.action_spec.blueprints, ppo)
    agent.distribute(ctx, shard)
    run_round(vec, 0, 0, agent=agent, learn=True, env_offset=shard.offset)  # warm-up
    agent.update()
    agent.act_time = 0.0
    update_time = 0.0
    start = time.perf_counter()
    for k in range(1, args.rounds + 1):
        run_round(vec, k, 0, agent=agent, learn=True, env_offset=shard.offset)
        t = time.perf_counter()
        agent.update()
        update_time += time.perf_counter() - t
    elapsed = time.perf_counter() - start
    grad_bytes = sum(p.numel() * p.element_size() for p in agent.network.parameters())
    reduce_ms = float("nan")
    if ctx.active:  # one gradient-sized all-reduce, as in every optimiser step
        for p in agent.network.parameters():
            p.grad = torch.ones_like(p)
        all_reduce_gradients(agent.network.parameters(), ctx)
        t = time.perf_counter()
        for _ in range(20):
            all_reduce_gradients(agent.network.parameters(), ctx)
        reduce_ms = (time.perf_counter() - t) / 20 * 1e3
    if ctx.is_main:
        steps = args.rounds * args.envs * args.max_epochs
        torch.save(
            {
                "steps_per_s": steps / elapsed,
                "act": agent.act_time / elapsed,
                "update": update_time / elapsed,
                "grad_bytes": grad_bytes,
                "reduce_ms": reduce_ms,
            },
            Path(out) / f"world{world}.pt",
        )
    shutdown(ctx)


def measure(world: int, args: argparse.Namespace) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as out:
        if world == 1:
            _worker(0, 1, 0, args, out)
        else:
            mp.spawn(_worker, args=(world, _free_port(), args, out), nprocs=world, join=True)
        return torch.load(Path(out) / f"world{world}.pt")


def policy_step_ms(num_envs: int, hidden: int, repeats: int = 20) -> float:
    """Mean time of one agent.act() for ``num_envs`` envs (3 slots, digits schema)."""
    torch.set_num_threads(1)
    vec = VectorMorphogenesisEnv(1, EnvConfig(task="digits", max_epochs=2, batches_per_step=1))
    obs, masks, _ = vec.reset(seeds=[0])
    obs = {k: v.expand(num_envs, *v.shape[1:]).clone() for k, v in obs.items()}
    masks = ActionMasks.stack([masks[0]] * num_envs)
    ppo = PPOConfig(hidden=hidden, embed=32)
    agent = PPOAgent(vec.slot_config, GLOBAL_DIM, SLOT_DIM, vec.action_spec.blueprints, ppo)
    hidden_state = agent.initial_hidden(num_envs)
    agent.act(obs, masks, hidden_state)
    start = time.perf_counter()
    for _ in range(repeats):
        agent.act(obs, masks, hidden_state)
    return (time.perf_counter() - start) / repeats * 1e3


def main(argv: list[str] | None = None) -> dict[int, dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes (a few seconds)")
    parser.add_argument("--envs", type=int, default=8, help="total envs (split over ranks)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-epochs", type=int, default=5)
    parser.add_argument("--batches", type=int, default=4, help="host batches per env step")
    parser.add_argument("--hidden", type=int, default=128, help="policy LSTM size")
    parser.add_argument(
        "--obs-sync",
        choices=("update", "step"),
        default="update",
        help="normaliser merge once per update (default) or at every env step (old)",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.envs, args.rounds, args.max_epochs, args.batches, args.hidden = 2, 1, 2, 2, 16
    results = {world: measure(world, args) for world in (1, 2)}
    print(
        f"DD-PPO on digits, {args.envs} envs total, {args.max_epochs} steps/episode, "
        f"{args.batches} batches/step, LSTM {args.hidden}, {args.rounds} rounds (gloo, CPU), "
        f"normaliser merged every {args.obs_sync}"
    )
    print(f"{'procs':>5} {'env steps/s':>12} {'act share':>10} {'update share':>13}")
    for world, r in results.items():
        print(f"{world:>5} {r['steps_per_s']:>12.1f} {r['act']:>10.1%} {r['update']:>13.1%}")
    ratio = results[2]["steps_per_s"] / results[1]["steps_per_s"]
    print(f"2 procs / 1 proc throughput: {ratio:.2f}x")
    print(
        f"gradient all-reduce: {results[2]['grad_bytes']:,} bytes per optimiser step, "
        f"{results[2]['reduce_ms']:.2f} ms per all-reduce (2 ranks, gloo, loopback)"
    )
    sizes = (8, 64) if args.quick else (8, 64, 512)
    steps = "  ".join(f"E={e}: {policy_step_ms(e, args.hidden):.2f} ms" for e in sizes)
    print(f"policy step (agent.act, 1 thread, LSTM {args.hidden}): {steps}")
    return results


if __name__ == "__main__":
    main()
