"""Growth that finds the right size (issue 20): oracle capture on the Pareto protocol.

For each start width (the narrow host) and each λ, the *hindsight oracle* is the static
width (of the front, no narrower than the start) with the best mean objective
``accuracy − λ·(params − start params) / start params``. A grown arm starts from the
narrow host with the env's λ set to that λ (a λ-aware controller observes it) and is
scored on the same evaluation seeds (paired):

- grown − narrow and grown − oracle objective (mean, SE over seeds);
- oracle capture = (grown − narrow) / (oracle − narrow), a ratio of means with a
  delta-method SE (`paretolib.capture`); undefined where the oracle's gain over the
  narrow host is under 2 SE (then grown − start ≥ −1 SE is the goal);
- on the front: accuracy ≥ the static front at its params − 1 std (linear in log
  params between the static widths);
- training FLOPs (counterfactual passes included) against the oracle width trained
  from scratch for the same steps (the static arm's own count).

Arms: ``rightsize`` (`RightSizeController`, width seeds joint from birth, fold at
fossilize), ``rightsize-isolated`` (same controller, today's isolated TRAINING →
BLENDING path shortened to 1 + 1 epochs, fold at fossilize), ``rightsize-nofold``
(joint, no fold), ``heuristic`` (today's default heuristic and lifecycle; it does not
read λ, so one run per start is scored at every λ). ``--full-arms`` run at every λ and
start; the others at ``--ablation-lambda`` from width 1.

    OMP_NUM_THREADS=1 python bench/bench_pareto.py --tasks digits --seeds 16 --static-only
    OMP_NUM_THREADS=1 python bench/bench_rightsize.py --seeds 16 --static bench/out
    OMP_NUM_THREADS=1 python bench/bench_rightsize.py --calibrate   # nats_per_accuracy

Per-episode rows go to ``bench/out/rightsize_<task>_episodes.csv`` as they finish (a run
cut short keeps them; ``--resume`` skips rows already there); the table to
``bench/out/rightsize_<task>.md``.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import statistics
import time
from pathlib import Path

import benchlib
from bench_pareto import ImageSetup, env_config, image_setups, load_static
from esper.env import MorphogenesisEnv
from esper.experiment import episode_seed
from esper.model import LifecycleConfig
from esper.policy import (
    HeuristicController,
    RightSizeConfig,
    RightSizeController,
    StaticController,
)
from paretolib import (
    capture,
    hindsight_oracle,
    interp_log,
    objective_at,
    paired,
    play,
)

JOINT = LifecycleConfig(width_joint=True, fold_on_fossilize=True)
ARMS: dict[str, tuple[str, LifecycleConfig | None]] = {
    "rightsize": ("rightsize", JOINT),
    "rightsize-isolated": (
        "rightsize",
        LifecycleConfig(min_train_epochs=1, blend_epochs=1, fold_on_fossilize=True),
    ),
    "rightsize-nofold": ("rightsize", LifecycleConfig(width_joint=True)),
    # Seeds planted in the first half, kept or pruned only from the middle on (they wait
    # live: max_hold_epochs 20), isolated lifecycle, fold at fossilize.
    "rightsize-settle": (
        "rightsize-settle",
        LifecycleConfig(
            min_train_epochs=1, blend_epochs=1, max_hold_epochs=20, fold_on_fossilize=True
        ),
    ),
    "heuristic": ("heuristic", None),
}
FIELDS = ("arm", "start", "lam", "seed_index", "quality", "val_loss", "params", "train_flops",
          "scratch_flops", "germinated", "fossilized", "pruned", "rollbacks",
          "fossil_steps")  # fmt: skip


def run_episodes(setup: ImageSetup, arm: str, start: int, lam: float, seeds, data, out, done):
    kind, lifecycle = ARMS[arm]
    env_fields = {**setup.env, "growth_penalty": lam}
    if lifecycle is not None:
        env_fields["lifecycle"] = lifecycle
    config = env_config(dataclasses.replace(setup, env=env_fields), start, None)
    env = MorphogenesisEnv(config, data=data)
    rows = []
    t0 = time.perf_counter()
    for i, seed in enumerate(seeds):
        key = (arm, str(start), f"{lam:g}", str(i))
        if key in done:
            rows.append(done[key])
            continue
        if kind == "rightsize":
            controller = RightSizeController()
        elif kind == "rightsize-settle":
            controller = RightSizeController(RightSizeConfig(settle_from=0.5))
        else:
            controller = HeuristicController()
        row = play(env, controller, seed)
        row = {"arm": arm, "start": start, "lam": f"{lam:g}", "seed_index": i,
               **{k: row[k] for k in FIELDS if k in row}}  # fmt: skip
        with out.open("a", newline="", encoding="utf-8") as handle:
            csv.DictWriter(handle, FIELDS).writerow(row)
        rows.append(row)
    print(f"  {arm:<19} start {start} λ {lam:g}: acc "
          f"{benchlib.pm([float(r['quality']) for r in rows])}, params "
          f"{benchlib.pm([float(r['params']) for r in rows], 0)} "
          f"({(time.perf_counter() - t0) / len(seeds):.1f} s/ep)", flush=True)  # fmt: skip
    return rows


def summarise(static, grown_rows, start: int, lam: float) -> dict:
    widths = {w: rows for w, rows in static.items() if w >= start}
    start_params = float(widths[start][0]["params"])
    oracle = hindsight_oracle(widths, lam, start_params)

    def objectives(rows):
        return [objective_at(r, lam, start_params) for r in rows]

    narrow, best, grown = (
        objectives(widths[start]),
        objectives(widths[oracle]),
        objectives(grown_rows),
    )
    xs = [statistics.fmean(float(r["params"]) for r in rows) for rows in static.values()]
    accs = [[float(r["quality"]) for r in rows] for rows in static.values()]
    params = statistics.fmean(float(r["params"]) for r in grown_rows)
    acc = statistics.fmean(float(r["quality"]) for r in grown_rows)
    front, _ = interp_log(xs, [statistics.fmean(a) for a in accs], params)
    front_std, _ = interp_log(xs, [statistics.stdev(a) for a in accs], params)
    flops = statistics.fmean(float(r["train_flops"]) for r in grown_rows)
    oracle_flops = statistics.fmean(float(r["train_flops"]) for r in widths[oracle])
    return {
        "oracle": oracle,
        "oracle_gain": paired(best, narrow),
        "vs_narrow": paired(grown, narrow),
        "vs_oracle": paired(grown, best),
        "capture": capture(grown, narrow, best),
        "params": params,
        "accuracy": acc,
        "front": front,
        "front_std": front_std,
        "on_front": acc >= front - front_std,
        "flops_ratio": flops / oracle_flops,
        "fossilized": statistics.fmean(float(r["fossilized"]) for r in grown_rows),
        "n": len(grown_rows),
    }


def fmt(d: dict) -> str:
    return f"{d['mean']:+.3f} ({d['se']:.3f})"


def write_table(task: str, results: list[tuple[str, int, float, dict]], seeds: int) -> str:
    """The results table (markdown), also written to bench/out/rightsize_<task>.md."""
    lines = [
        f"{seeds} paired evaluation seeds; objective = accuracy − λ·(params − start)/start.",
        "",
        "| start | λ | arm | oracle w (gain, SE) | grown − narrow (SE) | grown − oracle (SE) "
        "| capture ± SE | params | acc | front − 1 std | on front | FLOPs / oracle scratch "
        "| fossils/ep |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for arm, start, lam, s in results:
        c = s["capture"]
        cap = f"{100 * c['ratio']:.0f} % ± {100 * c['se']:.0f}" if c["defined"] else "undefined"
        lines.append(
            f"| {start} | {lam:g} | {arm} | {s['oracle']} ({fmt(s['oracle_gain'])}) | "
            f"{fmt(s['vs_narrow'])} | {fmt(s['vs_oracle'])} | {cap} | {s['params']:.0f} | "
            f"{s['accuracy']:.3f} | {s['front'] - s['front_std']:.3f} | "
            f"{'yes' if s['on_front'] else 'no'} | {s['flops_ratio']:.2f} | "
            f"{s['fossilized']:.1f} |"
        )
    text = "\n".join(lines) + "\n"
    (benchlib.out_dir() / f"rightsize_{task}.md").write_text(text, encoding="utf-8")
    return text


def calibrate(setup: ImageSetup, seeds: int) -> None:
    """nats_per_accuracy from static hosts of widths 1 and 2 on *training* seeds: the
    final validation-loss gap over the final accuracy gap (paired means)."""
    train_seeds = [episode_seed(0, i, 0, evaluation=False) for i in range(seeds)]
    rows = {}
    for w in (1, 2):
        env = MorphogenesisEnv(env_config(setup, w, None))
        rows[w] = [play(env, StaticController(), s) for s in train_seeds]
    pairs = list(zip(rows[1], rows[2], strict=True))
    dl = statistics.fmean(a["val_loss"] - b["val_loss"] for a, b in pairs)
    da = statistics.fmean(b["quality"] - a["quality"] for a, b in pairs)
    print(f"{seeds} training seeds: Δ val loss {dl:.3f} nats, Δ accuracy {da:.3f}: "
          f"nats_per_accuracy = {dl / da:.2f}", flush=True)  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="digits")
    parser.add_argument("--seeds", type=int, default=16)
    parser.add_argument("--lambdas", default="0.02,0.05,0.1")
    parser.add_argument("--starts", default="1,2")
    parser.add_argument("--arms", default=",".join(ARMS))
    parser.add_argument("--ablation-lambda", type=float, default=0.05,
                        help="λ of the arms other than rightsize (start 1 only)")  # fmt: skip
    parser.add_argument(
        "--static",
        default="bench/out",
        metavar="DIR",
        help="DIR/pareto_<task>_episodes.csv from bench_pareto --static-only",
    )
    parser.add_argument(
        "--full-arms",
        default="rightsize,rightsize-isolated",
        help="arms run at every λ and start (the others: --ablation-lambda, start 1)",
    )
    parser.add_argument("--calibrate", action="store_true")
    parser.add_argument("--quick", action="store_true", help="tiny settings, 2 seeds (tests)")
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args(argv)
    benchlib.set_threads(1)
    if args.quick:
        args.seeds, args.lambdas, args.starts = 2, "0.05", "1"
    setup = image_setups(args.quick)[args.task]
    print(f"machine: {benchlib.machine()}", flush=True)
    if args.calibrate:
        calibrate(setup, 4)
        return
    seeds = [episode_seed(0, i, 0, evaluation=True) for i in range(args.seeds)]
    if args.quick:  # the front of the quick setup, trained here
        static = {}
        for w in setup.widths:
            env = MorphogenesisEnv(env_config(setup, w, None))
            static[w] = [play(env, StaticController(), s) for s in seeds]
    else:
        path = Path(args.static) / f"pareto_{args.task}_episodes.csv"
        static = {w: arm.rows for w, arm in load_static(path, setup, seeds).items()}
    suffix = "_quick" if args.quick else ""
    out = benchlib.out_dir() / f"rightsize_{args.task}{suffix}_episodes.csv"
    done: dict = {}
    if args.resume and out.is_file():
        with out.open(newline="", encoding="utf-8") as handle:
            for r in csv.DictReader(handle):
                done[(r["arm"], r["start"], r["lam"], r["seed_index"])] = r
    else:
        with out.open("w", newline="", encoding="utf-8") as handle:
            csv.DictWriter(handle, FIELDS).writeheader()
    data = MorphogenesisEnv(env_config(setup, 1, None)).data
    lambdas = [float(v) for v in args.lambdas.split(",")]
    results = []
    for arm in args.arms.split(","):
        for start in (int(v) for v in args.starts.split(",")):
            full = arm in args.full_arms.split(",")
            if not full and start != 1:
                continue
            if arm == "heuristic":  # does not read λ: one run, scored at every λ
                rows = run_episodes(setup, arm, start, 0.05, seeds, data, out, done)
                results += [(arm, start, lam, summarise(static, rows, start, lam))
                            for lam in lambdas]  # fmt: skip
                continue
            for lam in lambdas if full else [args.ablation_lambda]:
                rows = run_episodes(setup, arm, start, lam, seeds, data, out, done)
                results.append((arm, start, lam, summarise(static, rows, start, lam)))
            print(write_table(args.task + suffix, results, len(seeds)), flush=True)
    print(write_table(args.task + suffix, results, len(seeds)), flush=True)


if __name__ == "__main__":
    main()
