"""Governor: false rollbacks on healthy runs, real ones on broken runs; gate noise.

* healthy: the heuristic and the random controller on digits width 1 and 2 with the
  task's default (stable) settings. Nothing diverges there, so every rollback whose
  loss was finite is a false one (a validation-loss bump after a germination is normal).
* broken: lr = 50 (the loss really diverges) and a NaN written into a host weight
  mid-episode. Every such episode must be rolled back.
* gates (``--gates``): every (contribution, standard error) reading of a blended seed
  on the healthy runs; for z = 0..3, how many readings would auto-prune (c + z·se < 0) or
  allow FOSSILIZE (c − z·se >= 0), and how often the seed's next reading contradicts
  that decision (its point estimate has the other sign): decisions taken on noise.

    OMP_NUM_THREADS=1 python bench/bench_governor.py --gates    # 20 episodes x 20 epochs
    OMP_NUM_THREADS=1 python bench/bench_governor.py --quick    # seconds
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import time
from dataclasses import dataclass, field

import torch

from esper.env import MorphogenesisEnv
from esper.lifecycle import SeedStage
from esper.policy.controllers import HeuristicController, RandomController, StaticController

Z_VALUES = (0.0, 1.0, 2.0, 3.0)


@dataclass
class Tally:
    episodes: int = 0
    steps: int = 0
    false_rollbacks: int = 0  # finite loss, healthy run
    rollbacks: int = 0
    rolled_back_episodes: int = 0
    readings: list[list[tuple[float, float]]] = field(default_factory=list)  # per seed life


def play(
    env: MorphogenesisEnv,
    controller,
    seed: int,
    tally: Tally,
    nan_at: int | None = None,
    verbose: bool = False,
):
    obs, info = env.reset(seed=seed)
    state = controller.initial_state()
    lives: dict[str, list[tuple[float, float]]] = {}
    any_rollback = False
    trace: list[str] = []  # per step: val loss and what happened (for --verbose)
    for t in range(env.max_epochs):
        if nan_at is not None and t == nan_at:
            with torch.no_grad():
                next(env.model.host.parameters()).view(-1)[0] = math.nan
        action, state = controller.act(obs, env.conditional_masks(), state)
        obs, _, _, _, info = env.step(action)
        tally.steps += 1
        moves = ",".join(f"{e['slot_id']}:{e['target'][:4]}" for e in info["events"])
        trace.append(f"{info['val_loss']:.3f}[{moves}]")
        if info["governor_event"] is not None:
            any_rollback = True
            tally.rollbacks += 1
            # Healthy settings: only a non-finite loss is a real fault there.
            tally.false_rollbacks += info["governor_event"] != "non_finite"
            if verbose:
                print(f"  seed {seed} step {t}: {info['governor_event']}: {' '.join(trace[-6:])}")
        for sid, c in info["contributions"].items():
            if sid not in info["prospective"]:
                lives.setdefault(sid, []).append((c, info["contribution_se"][sid]))
        for event in info["events"]:  # a seed's life ends when it leaves the live stages
            ended = event["target"] in (SeedStage.PRUNED.name, SeedStage.FOSSILIZED.name)
            if ended and event["slot_id"] in lives:
                tally.readings.append(lives.pop(event["slot_id"]))
    tally.readings.extend(lives.values())
    tally.episodes += 1
    tally.rolled_back_episodes += any_rollback


def gate_table(readings: list[list[tuple[float, float]]]) -> list[str]:
    rows = [f"{'z':>4} {'prune':>6} {'reversed':>9} {'fossil-ok':>10} {'reversed':>9}"]
    for z in Z_VALUES:
        prune = prune_rev = keep = keep_rev = 0
        for life in readings:
            for (c, se), nxt in zip(life, [*life[1:], None], strict=True):
                if c + z * se < 0:
                    prune += 1
                    prune_rev += nxt is not None and nxt[0] > 0
                if c - z * se >= 0:
                    keep += 1
                    keep_rev += nxt is not None and nxt[0] < 0
        rows.append(f"{z:>4.1f} {prune:>6} {prune_rev:>9} {keep:>10} {keep_rev:>9}")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--episodes", type=int, default=20)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--gates", action="store_true", help="also print the gate table")
    parser.add_argument("--quick", action="store_true", help="2 episodes x 4 steps")
    parser.add_argument("--verbose", action="store_true", help="print each false rollback")
    args = parser.parse_args()
    episodes, epochs = (2, 4) if args.quick else (args.episodes, args.epochs)
    env_kw: dict = {"max_epochs": epochs}
    if args.quick:
        env_kw["batches_per_step"] = 4
    print(f"# {platform.processor() or 'cpu'}, {os.cpu_count()} cores, torch {torch.__version__}")
    print(f"# {episodes} episodes x {epochs} steps per row")
    print(f"{'run':<22} {'episodes':>8} {'steps':>6} {'rollbacks':>9} {'false':>6} {'rate':>7}")
    start = time.perf_counter()
    readings: list[list[tuple[float, float]]] = []
    for width in (1, 2):
        env = MorphogenesisEnv(task="digits", task_options={"width": width}, **env_kw)
        for name in ("heuristic", "random"):
            tally = Tally()
            for e in range(episodes):
                controller = HeuristicController() if name == "heuristic" else RandomController(e)
                play(env, controller, 1000 + e, tally, verbose=args.verbose)
            readings.extend(tally.readings)
            rate = tally.false_rollbacks / max(tally.episodes, 1)
            print(
                f"{f'healthy w={width} {name}':<22} {tally.episodes:>8} {tally.steps:>6} "
                f"{tally.rollbacks:>9} {tally.false_rollbacks:>6} {rate:>7.3f}"
            )
    broken = {
        "broken lr=50": ({"width": 2, "lr": 50.0}, None),
        "broken NaN weight": ({"width": 2}, max(epochs // 2, 1)),
    }
    for label, (options, nan_at) in broken.items():
        env = MorphogenesisEnv(task="digits", task_options=options, **env_kw)
        tally = Tally()
        for e in range(min(episodes, 5)):
            play(env, StaticController(), 2000 + e, tally, nan_at=nan_at)
        caught = tally.rolled_back_episodes / max(tally.episodes, 1)
        print(
            f"{label:<22} {tally.episodes:>8} {tally.steps:>6} {tally.rollbacks:>9} "
            f"{'-':>6} {caught:>7.3f}  (episodes rolled back)"
        )
    if args.gates:
        n = sum(len(life) for life in readings)
        print(f"\n# gates: {n} readings of {len(readings)} blended seeds (healthy runs)")
        print("\n".join(gate_table(readings)))
    print(f"# {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
