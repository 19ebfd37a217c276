"""Final quality of the heuristic, random and static controllers on the env.

    python bench/bench_controllers.py                 # digits, default episode, seeds 0-2
    python bench/bench_controllers.py --seeds 5
    python bench/bench_controllers.py --quick         # 1 seed, 6 short steps (seconds)

Per controller: mean final validation quality, growth ratio, fossils, episode return
(= objective change minus governor penalties, what PPO maximises), the penalties
and wall time per episode.
"""

from __future__ import annotations

import argparse
import statistics
import time

from esper.env import MorphogenesisEnv
from esper.policy.controllers import HeuristicController, RandomController, StaticController


def run_episode(env: MorphogenesisEnv, controller, seed: int) -> dict[str, float]:
    start = time.perf_counter()
    obs, info = env.reset(seed=seed)
    state = controller.initial_state()
    total, penalty, fossils, done = 0.0, 0.0, 0, False
    while not done:
        action, state = controller.act(obs, env.conditional_masks(), state)
        obs, reward, _, done, info = env.step(action)
        total += reward
        penalty += info["reward_parts"]["penalty"]
        fossils += sum(e["target"] == "FOSSILIZED" for e in info["events"])
    return {
        "quality": info["quality"],
        "growth": info["growth"],
        "fossils": fossils,
        "return": total,
        "penalty": penalty,
        "seconds": time.perf_counter() - start,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="digits")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="1 seed, 6 steps of 2 batches")
    args = parser.parse_args(argv)
    options = {"batches_per_step": 2, "max_epochs": 6} if args.quick else {}
    seeds = range(1 if args.quick else args.seeds)
    env = MorphogenesisEnv(task=args.task, **options)
    print(
        f"task={args.task} slots={list(env.slot_config.slot_ids)} steps={env.max_epochs} "
        f"seeds={list(seeds)}"
    )
    print(
        f"{'controller':<10} {'quality':>8} {'growth':>7} {'fossils':>8} {'return':>8} "
        f"{'penalty':>8} {'s/ep':>6}"
    )
    controllers = {
        "heuristic": HeuristicController,
        "random": lambda: RandomController(seed=0),
        "static": StaticController,
    }
    for name, make in controllers.items():
        runs = [run_episode(env, make(), seed) for seed in seeds]
        mean = {key: statistics.fmean(r[key] for r in runs) for key in runs[0]}
        print(
            f"{name:<10} {mean['quality']:>8.4f} {mean['growth']:>7.3f} {mean['fossils']:>8.2f} "
            f"{mean['return']:>8.4f} {mean['penalty']:>8.3f} {mean['seconds']:>6.2f}"
        )


if __name__ == "__main__":
    main()
