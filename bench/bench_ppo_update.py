"""PPO update throughput of Esper's masked recurrent PPO, and sb3-contrib RecurrentPPO if present.

Both are timed on the update alone (rollout collection excluded), with the same batch shape
(envs x steps), LSTM size, epochs and minibatch count. Throughput counts every transition
once per epoch: samples/s = envs * steps * epochs / seconds.

    python bench/bench_ppo_update.py            # 64 envs x 32 steps, 4 slots, LSTM 128
    python bench/bench_ppo_update.py --quick    # a few seconds
"""

from __future__ import annotations

import argparse
import time

import torch

from esper.rl import PPOAgent, PPOConfig
from esper.rl.synthetic import GLOBAL_DIM, SLOT_DIM, CueRecallEnv


def esper_update_seconds(args: argparse.Namespace) -> list[float]:
    env = CueRecallEnv(args.envs, num_slots=args.slots, length=args.steps, seed=0)
    config = PPOConfig(
        hidden=args.hidden,
        n_epochs=args.epochs,
        num_minibatches=args.minibatches,
        target_kl=None,  # time every minibatch step
    )
    agent = PPOAgent(env.slot_config, GLOBAL_DIM, SLOT_DIM, env.blueprints, config)
    times = []
    for _ in range(args.repeats + 1):  # the first update warms up and is dropped
        obs, masks = env.reset()
        hidden = agent.initial_hidden(args.envs)
        for _ in range(args.steps):
            step = agent.act(obs, masks, hidden)
            out = env.step(step.actions)
            agent.record(step, out.rewards, out.terminated, out.truncated)
            hidden, obs, masks = step.hidden, out.obs, out.masks
        start = time.perf_counter()
        agent.update()
        times.append(time.perf_counter() - start)
    return times[1:]


def sb3_update_seconds(args: argparse.Namespace) -> list[float]:
    import gymnasium as gym
    import numpy as np
    from sb3_contrib import RecurrentPPO
    from stable_baselines3.common.env_util import make_vec_env

    obs_dim = GLOBAL_DIM + args.slots * SLOT_DIM

    class RandomEnv(gym.Env):
        observation_space = gym.spaces.Box(-1.0, 1.0, (obs_dim,), np.float32)
        action_space = gym.spaces.MultiDiscrete([4, args.slots, 2, 3])

        def reset(self, *, seed=None, options=None):
            super().reset(seed=seed)
            self.t = 0
            return self.observation_space.sample(), {}

        def step(self, action):
            self.t += 1
            done = self.t >= args.steps
            return self.observation_space.sample(), float(np.random.rand()), done, False, {}

    vec_env = make_vec_env(RandomEnv, n_envs=args.envs)
    model = RecurrentPPO(
        "MlpLstmPolicy",
        vec_env,
        n_steps=args.steps,
        batch_size=args.envs * args.steps // args.minibatches,
        n_epochs=args.epochs,
        policy_kwargs={
            "lstm_hidden_size": args.hidden,
            "n_lstm_layers": 1,
            "shared_lstm": True,  # one LSTM for actor and critic, as in Esper
            "enable_critic_lstm": False,
        },
        device="cpu",
        verbose=0,
    )
    model.learn(total_timesteps=args.envs * args.steps)  # warm-up: one rollout + one update
    times = []
    for _ in range(args.repeats):
        _, callback = model._setup_learn(args.envs * args.steps, None, False)
        callback.on_training_start(locals(), globals())
        model.collect_rollouts(model.env, callback, model.rollout_buffer, args.steps)
        start = time.perf_counter()
        model.train()
        times.append(time.perf_counter() - start)
    return times


def report(name: str, times: list[float], samples: int) -> float:
    best = min(times)
    print(f"{name:<28} {samples / best:>12,.0f} samples/s  (best of {len(times)}: {best:.3f} s)")
    return samples / best


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--envs", type=int, default=64, help="sequences per update")
    parser.add_argument("--steps", type=int, default=32, help="steps per sequence")
    parser.add_argument("--slots", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=128, help="LSTM size")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--minibatches", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--quick", action="store_true", help="small sizes, a few seconds")
    args = parser.parse_args(argv)
    if args.quick:
        args.envs, args.steps, args.hidden, args.repeats = 8, 8, 32, 1
    if args.threads:
        torch.set_num_threads(args.threads)
    samples = args.envs * args.steps * args.epochs
    print(
        f"batch {args.envs} envs x {args.steps} steps, {args.slots} slots, LSTM {args.hidden}, "
        f"{args.epochs} epochs x {args.minibatches} minibatches, "
        f"{torch.get_num_threads()} threads"
    )
    esper = report("esper masked recurrent PPO", esper_update_seconds(args), samples)
    try:
        import sb3_contrib  # noqa: F401
    except ImportError:
        print("sb3-contrib RecurrentPPO: not installed (pip install 'esper[bench]' to compare)")
        return
    sb3 = report("sb3-contrib RecurrentPPO", sb3_update_seconds(args), samples)
    print(f"speed-up: {esper / sb3:.1f}x")


if __name__ == "__main__":
    main()
