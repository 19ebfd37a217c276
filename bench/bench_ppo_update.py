"""PPO update throughput and minibatch padding of Esper's masked recurrent PPO.

The update alone is timed (rollout collection excluded) on rollouts of a random masked
env (`bench_sb3.RandomMaskedEnv`) whose episodes end at the rollout end (``end``), at
random points inside it (``mid``: per-env lengths uniform on [1, 2 x steps]) or never
(``never``). Throughput counts every transition once per epoch:
samples/s = envs * steps * epochs / seconds. ``extra rows`` is how many LSTM rows the
minibatches pad per real step (0 = no padding). `bench_sb3.py` compares the same work
with sb3-contrib's RecurrentPPO.

    python bench/bench_ppo_update.py            # 64 envs x 32 steps, 4 slots, LSTM 128
    python bench/bench_ppo_update.py --quick    # a few seconds
    python bench/bench_ppo_update.py --no-group # random minibatches (the old behaviour)
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace

import torch

from bench_sb3 import EPISODES, RandomMaskedEnv
from esper.rl import PPOAgent, PPOConfig


class EsperUpdates:
    """Esper's agent on the random masked env: ``timed()`` collects one rollout (untimed)
    and returns the CPU seconds of the update on it, and the padded LSTM rows per step."""

    def __init__(self, args: argparse.Namespace, episodes: str) -> None:
        self.args = args
        self.env = RandomMaskedEnv(args.envs, args.slots, args.steps, episodes, seed=0)
        config = PPOConfig(
            hidden=args.hidden,
            n_epochs=args.epochs,
            num_minibatches=args.minibatches,
            target_kl=None,  # time every minibatch step
        )
        if getattr(args, "no_group", False):
            config = replace(config, group_by_length=False)
        env = self.env
        self.agent = PPOAgent(env.slot_config, env.global_dim, env.slot_dim, env.blueprints, config)
        self.obs, self.masks = env.reset()
        self.hidden = self.agent.initial_hidden(args.envs)
        self.timed()  # the first update warms up and is dropped

    def timed(self) -> tuple[float, float]:
        agent = self.agent
        for _ in range(self.args.steps):
            step = agent.act(self.obs, self.masks, self.hidden)
            out = self.env.step(step.actions)
            agent.record(step, out.rewards, out.terminated, out.truncated)
            self.hidden = agent.reset_hidden(step.hidden, out.terminated)
            self.obs, self.masks = out.obs, out.masks
        start = time.process_time()
        diag = agent.update(next_obs=self.obs, next_hidden=self.hidden)
        return time.process_time() - start, diag["padded_rows_per_step"]


def esper_update(args: argparse.Namespace, episodes: str) -> tuple[list[float], float]:
    """Best-of update seconds and the mean padded LSTM rows per real step."""
    runner = EsperUpdates(args, episodes)
    timed = [runner.timed() for _ in range(args.repeats)]
    return [t for t, _ in timed], sum(e for _, e in timed) / len(timed)


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--envs", type=int, default=64, help="sequences per update")
    parser.add_argument("--steps", type=int, default=32, help="steps per rollout")
    parser.add_argument("--slots", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=128, help="LSTM size")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--minibatches", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--episodes", default=",".join(EPISODES), help="end,mid,never")
    parser.add_argument("--no-group", action="store_true", help="random minibatches")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--quick", action="store_true", help="small sizes, a few seconds")
    args = parser.parse_args(argv)
    if args.quick:
        args.envs, args.steps, args.hidden, args.repeats = 8, 8, 32, 1
    if args.threads:
        torch.set_num_threads(args.threads)
    samples = args.envs * args.steps * args.epochs
    print(
        f"esper masked recurrent PPO update: {args.envs} envs x {args.steps} steps, "
        f"{args.slots} slots, LSTM {args.hidden}, {args.epochs} epochs x "
        f"{args.minibatches} minibatches, {torch.get_num_threads()} threads, "
        f"{'random' if args.no_group else 'length-grouped'} minibatches"
    )
    print(f"{'episodes end':<14} {'samples/s':>12} {'best s':>8} {'extra rows':>11}")
    rates = {}
    for episodes in args.episodes.split(","):
        times, extra = esper_update(args, episodes)
        rates[episodes] = samples / min(times)
        print(f"{episodes:<14} {rates[episodes]:>12,.0f} {min(times):>8.3f} {extra:>11.2f}")
    return rates


if __name__ == "__main__":
    main()
