"""Width seeds on a too-narrow host: fan-in initialisation and TRAINING-stage learning.

Arms: ``split`` (Net2Wider copy + noise) and ``random`` (fresh init, the default) fan-in,
both learning in TRAINING from their own pass (``own_seed_pass``, the default); and
``split-st``: the split init learning straight-through inside the host's forward.

Digits, the too-narrow width-1 CNN host (issue 12). Per seed: train the host alone for
``--grow-at`` steps, germinate ``wide_x1`` (double the layer) in every slot with the
same host state for both arms, then train to ``--epochs`` through the real lifecycle
(TRAINING -> BLENDING -> HOLDING by the model's gates; FOSSILIZE as soon as legal, as
the heuristic does). Arms share the seed, so differences are paired.

``--lifecycle forced`` sets every gate threshold to -inf, so each seed is blended and
fossilized on schedule whatever its measured contribution: that compares how well the
two initialisations *train*, without the lifecycle's keep/prune decisions.

``--heuristic`` instead plays whole env episodes (digits, width 1, 20 steps) with the
heuristic controller for each initialisation and with the static controller, and
reports the paired objective difference to static (q - 0.05 * growth - q_static).

    OMP_NUM_THREADS=1 python bench/bench_width_init.py --seeds 8 --lifecycle forced
    OMP_NUM_THREADS=1 python bench/bench_width_init.py --seeds 8
    OMP_NUM_THREADS=1 python bench/bench_width_init.py --seeds 8 --heuristic
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics
import time
from collections import Counter

import torch

from esper.lifecycle import SeedStage
from esper.model import LifecycleConfig, MorphogeneticModel
from esper.training import Trainer
from esper.training.tasks import get_task

ARMS = {"split": ("split", True), "random": ("random", True), "split-st": ("split", False)}
PAIRS = (("split", "random"), ("split", "split-st"))
FORCED = LifecycleConfig(
    blend_threshold=-math.inf, fossilize_threshold=-math.inf, prune_threshold=-math.inf
)


def run(
    seed: int, grow_at: int, epochs: int, blueprint: str, lifecycle: LifecycleConfig | None
) -> dict[str, dict[str, float]]:
    task = get_task("digits", width=1)
    data = task.make_data(seed=0)
    torch.manual_seed(seed)
    model = MorphogeneticModel(task.make_host(data), task.default_slots, lifecycle)
    trainer = Trainer(model, data, task.hparams, seed=seed)
    for _ in range(grow_at):
        trainer.train_step()
    out = {}
    for arm, (init, own_pass) in ARMS.items():
        t = copy.deepcopy(trainer)
        t.model.width_init, t.model.own_seed_pass = init, own_pass
        torch.manual_seed(1000 + seed)
        for sid in t.model.slot_config.slot_ids:
            t.model.germinate(sid, blueprint)
        t.on_germinate("")
        result, prunes = None, Counter()
        for _ in range(epochs - grow_at):
            result = t.train_step()
            prunes.update(c.reason for c in result.stage_changes if c.target == SeedStage.PRUNED)
            for sid in t.model.slot_config.slot_ids:
                if t.model.can_fossilize(sid):
                    t.model.fossilize(sid)
        stages = [s.stage for s in t.model.slot_states()]
        out[arm] = {
            "val_acc": result.val_acc,
            "val_loss": result.val_loss,
            "fossils": sum(s == SeedStage.FOSSILIZED for s in stages),
            "params": t.model.param_counts().total,
            "prunes": prunes,
        }
    return out


def heuristic_episodes(seeds: int) -> None:
    from esper.env import MorphogenesisEnv
    from esper.policy import HeuristicController, StaticController

    env = MorphogenesisEnv(task_options={"width": 1})
    lam = env.config.growth_penalty
    rows: dict[str, list[tuple[float, float, int]]] = {}
    for arm in ("static", "split", "random"):
        rows[arm] = []
        for seed in range(seeds):
            controller = StaticController() if arm == "static" else HeuristicController()
            obs, info = env.reset(seed=seed)
            env.model.width_init = "random" if arm == "static" else arm
            state, done, fossils = controller.initial_state(), False, 0
            while not done:
                action, state = controller.act(obs, env.conditional_masks(), state)
                obs, _, _, done, info = env.step(action)
                fossils += sum(e["target"] == "FOSSILIZED" for e in info["events"])
            rows[arm].append((info["quality"], info["growth"], fossils))
    print(f"digits width-1 host, heuristic vs static, {seeds} seeds, lambda {lam}")
    print("| arm | val acc | growth | fossils | objective - static (paired, se) |")
    print("|---|---|---|---|---|")
    for arm, vals in rows.items():
        diff = [q - lam * g - s for (q, g, _), (s, _, _) in zip(vals, rows["static"], strict=True)]
        se = statistics.stdev(diff) / math.sqrt(len(diff)) if len(diff) > 1 else 0.0
        print(
            f"| {arm} | {summary([v[0] for v in vals])} | "
            f"{statistics.fmean(v[1] for v in vals):.3f} | "
            f"{statistics.fmean(v[2] for v in vals):.2f} | "
            f"{statistics.fmean(diff):+.4f} ({se:.4f}) |"
        )


def summary(values: list[float]) -> str:
    mean = statistics.fmean(values)
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:.4f} ± {sd:.4f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=6)
    parser.add_argument("--grow-at", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--blueprint", default="wide_x1")
    parser.add_argument("--lifecycle", choices=("default", "forced"), default="default")
    parser.add_argument("--heuristic", action="store_true")
    parser.add_argument("--quick", action="store_true", help="2 seeds x 5 steps (smoke run)")
    args = parser.parse_args()
    if args.quick:
        args.seeds, args.epochs, args.grow_at = 2, 5, 1
    if args.heuristic:
        heuristic_episodes(args.seeds)
        return
    start = time.perf_counter()
    lifecycle = FORCED if args.lifecycle == "forced" else None
    rows = [run(s, args.grow_at, args.epochs, args.blueprint, lifecycle) for s in range(args.seeds)]
    print(
        f"digits width-1 host, {args.blueprint} in every slot at step {args.grow_at}, "
        f"{args.epochs} steps, {args.lifecycle} lifecycle, {args.seeds} seeds "
        f"({time.perf_counter() - start:.0f} s)"
    )
    print("| arm | val acc | val loss | fossils (of 3) | final params |")
    print("|---|---|---|---|---|")
    for arm in ARMS:
        col = {k: [r[arm][k] for r in rows] for k in rows[0][arm] if k != "prunes"}
        print(
            f"| {arm} | {summary(col['val_acc'])} | {summary(col['val_loss'])} | "
            f"{statistics.fmean(col['fossils']):.2f} | {statistics.fmean(col['params']):.0f} |"
        )
    for arm in ARMS:
        print(f"{arm} prunes by reason: {dict(sum((r[arm]['prunes'] for r in rows), Counter()))}")
    for a, b in PAIRS:
        for key in ("val_acc", "val_loss"):
            diffs = [r[a][key] - r[b][key] for r in rows]
            se = statistics.stdev(diffs) / math.sqrt(len(diffs)) if len(diffs) > 1 else 0.0
            print(
                f"paired {a} - {b} {key}: {statistics.fmean(diffs):+.4f} (se {se:.4f}); "
                f"per seed {[round(d, 4) for d in diffs]}"
            )


if __name__ == "__main__":
    main()
