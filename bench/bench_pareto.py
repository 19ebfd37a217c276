"""Growth that pays (issue 12): the Pareto protocol.

Image tasks (digits, fashion-mnist). Static CNN hosts at several widths, trained with
no controller, form the static front: accuracy vs parameters and accuracy vs training
FLOPs. Grown networks start from the narrowest static host under three controllers:

  heuristic     the hand-written controller (`esper.policy.HeuristicController`)
  always-grow   a fixed schedule: germinate one blueprint into every free slot as soon
                as allowed, fossilize whenever allowed, never prune
  random        uniform over legal actions (seeded per episode)

Every arm plays the same evaluation seeds (host init and data order from
``episode_seed(0, i, 0, evaluation=True)``), so arms are compared paired. For each grown
arm: final params, accuracy, objective = accuracy − λ·growth (λ = EnvConfig's default),
the paired objective difference to the narrow static host (mean, standard error, 95 %
t interval), the static front's accuracy interpolated at the grown parameter count
(linear in log params), and its training FLOPs against training its final architecture
from scratch for the same steps.

Text: see `pareto_text.py` (a 2-block transformer grown to 4 blocks against static 2-
and 4-block models at equal steps and equal FLOPs).

    OMP_NUM_THREADS=1 python bench/bench_pareto.py                   # all three tasks
    OMP_NUM_THREADS=1 python bench/bench_pareto.py --tasks digits --seeds 8
    python bench/bench_pareto.py --quick                              # seconds (tests)

Tables go to ``bench/out/pareto_<task>.md``/``.csv`` (per-episode rows in
``pareto_<task>_episodes.csv``); plots to ``bench/out/pareto_<task>.png`` and, in a full
run, also ``docs/bench/``.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import benchlib
import pareto_text
from esper.env import EnvConfig, MorphogenesisEnv
from esper.experiment import episode_seed
from esper.model import LifecycleConfig
from esper.policy import (
    AlwaysGrowController,
    HeuristicConfig,
    HeuristicController,
    RandomController,
    StaticController,
)
from esper.training import datasets
from paretolib import (
    NUMERIC,
    blueprint_index,
    first_fossil,
    heuristic_overrides,
    interp_log,
    lifecycle_overrides,
    number,
    paired,
    play,
)

DOCS = Path(__file__).resolve().parents[1] / "docs" / "bench"
ARMS = ("heuristic", "always-grow", "random")
# Blueprints the always-grow schedule plants, in order of preference (the first one the
# host's topology offers): the width seed that doubles a layer where it exists (one per
# slot grows a width-w CNN into a width-2w one), else the largest depth seed.
ALWAYS_GROW_BLUEPRINTS = ("wide_x1", "conv_heavy", "mlp")


@dataclass(frozen=True)
class ImageSetup:
    task: str
    options: dict  # task options besides the width (TrainConfig overrides included)
    env: dict  # EnvConfig fields
    widths: tuple[int, ...]  # the static front; the first is the host growth starts from
    note: str = ""
    heuristic: HeuristicConfig | None = None  # the heuristic arm's config (None: defaults)
    data_hint: str = ""


def image_setups(quick: bool) -> dict[str, ImageSetup]:
    if quick:
        env = {"max_epochs": 4, "batches_per_step": 2}
        return {"digits": ImageSetup("digits", {}, env, (1, 2))}
    return {
        # `esper train`'s digits defaults (20 full epochs, SGD 0.05); only the width varies.
        "digits": ImageSetup("digits", {}, {}, (1, 2, 3, 4, 6)),
        # A 10k / 2k subset and 20 batches of 128 per step (~5 epochs of the subset in
        # an episode) keep a width-4 episode near 15 s on this machine. SGD lr 0.01, not
        # the task's 0.05: at 0.05 the final accuracy of these tiny hosts jumps by up to
        # 0.3 between steps (std 0.11-0.16 over 8 seeds, 5 governor rollbacks in 32
        # static episodes); at 0.01 std ~0.05 and no rollback (4 seeds, widths 1 and 4).
        # Chosen on static hosts only, before any grown arm ran on this task.
        "fashion-mnist": ImageSetup(
            "fashion-mnist",
            {"max_train": 10_000, "max_val": 2_000, "lr": 0.01},
            {"max_epochs": 20, "batches_per_step": 20},
            (1, 2, 3, 4),
            note="first 10,000 training / 2,000 test images of the Debian files",
            data_hint=(
                "fashion-mnist IDX files not found in "
                f"{datasets.FASHION_MNIST_ROOT}: install them with "
                "`sudo apt-get install dataset-fashion-mnist` (Debian/Ubuntu) or pass "
                "--fashion-root <folder with train-images-idx3-ubyte.gz ...>"
            ),
        ),
    }


@dataclass
class ArmResult:
    arm: str
    width: int
    rows: list[dict] = field(default_factory=list)  # one per seed, seed order
    seconds: float = 0.0


def env_config(setup: ImageSetup, width: int, data_root: str | None) -> EnvConfig:
    return EnvConfig(
        task=setup.task,
        task_options={**setup.options, "width": width},
        data_root=data_root,
        **setup.env,
    )


def make_controller(
    arm: str, env: MorphogenesisEnv, seed: int, heuristic: HeuristicConfig | None = None
):
    if arm == "static":
        return StaticController()
    if arm == "heuristic":
        return HeuristicController(heuristic)
    if arm == "random":
        return RandomController(seed=seed)
    if arm == "always-grow":
        blueprint = blueprint_index(env.action_spec.blueprints, ALWAYS_GROW_BLUEPRINTS)
        return AlwaysGrowController(blueprint=blueprint)
    raise ValueError(f"unknown arm {arm!r}; allowed: static, {', '.join(ARMS)}")


def run_arm(setup, arm, width, seeds, data, data_root, log) -> ArmResult:
    config = env_config(setup, width, data_root)
    env = MorphogenesisEnv(config, data=data)
    result = ArmResult(arm, width)
    start = time.perf_counter()
    for i, seed in enumerate(seeds):
        row = play(env, make_controller(arm, env, seed, setup.heuristic), seed)
        result.rows.append({"arm": arm, "width": width, "seed_index": i, **row})
    result.seconds = time.perf_counter() - start
    log(
        f"  {arm:<12} width {width}: acc {benchlib.pm([r['quality'] for r in result.rows])}, "
        f"params {benchlib.pm([r['params'] for r in result.rows], 0)} "
        f"({result.seconds / len(seeds):.1f} s/episode)"
    )
    return result


def output_suffix(args) -> str:
    """Quick and override runs never overwrite the main results."""
    return (
        ("_quick" if args.quick else "")
        + ("_lifecycle" if args.lifecycle else "")
        + ("_heuristic" if args.heuristic else "")
    )


def run_image_task(name: str, setup: ImageSetup, args) -> dict:
    if args.lifecycle:
        lifecycle = LifecycleConfig(**lifecycle_overrides(args.lifecycle))
        setup = dataclasses.replace(setup, env={**setup.env, "lifecycle": lifecycle})
    if args.heuristic:
        heuristic = HeuristicConfig(**heuristic_overrides(args.heuristic))
        setup = dataclasses.replace(setup, heuristic=heuristic)
    data_root = args.fashion_root if setup.task == "fashion-mnist" else None
    try:
        data = MorphogenesisEnv(env_config(setup, setup.widths[0], data_root)).data
    except datasets.DataError as err:
        print(f"skipping {name}: {setup.data_hint or err}", flush=True)
        return {}
    seeds = [episode_seed(0, i, 0, evaluation=True) for i in range(args.seeds)]
    print(f"== {name}: static widths {setup.widths}, arms {ARMS}, {len(seeds)} seeds", flush=True)
    if args.reuse_static is not None:
        suffix = "_quick" if args.quick else ""  # the front has no lifecycle
        path = Path(args.reuse_static) / f"pareto_{name}{suffix}_episodes.csv"
        static = load_static(path, setup, seeds)
    else:
        static = {
            w: run_arm(setup, "static", w, seeds, data, data_root, print) for w in setup.widths
        }
    if args.static_only:
        write_static(name, static, args)
        return {}
    grown = {a: run_arm(setup, a, setup.widths[0], seeds, data, data_root, print) for a in ARMS}
    lam = EnvConfig().growth_penalty
    summary = summarise(static, grown, setup.widths[0], lam)
    write_tables(name, setup, summary, static, grown, args, lam)
    plot_image(name, static, grown, args)
    return summary


def write_static(name: str, static: dict[int, ArmResult], args) -> None:
    rows = [{k: v for k, v in r.items() if k != "curve"} for s in static.values() for r in s.rows]
    suffix = output_suffix(args)
    benchlib.write_csv(benchlib.out_dir() / f"pareto_{name}{suffix}_episodes.csv", rows)


def load_static(path: Path, setup: ImageSetup, seeds: list[int]) -> dict[int, ArmResult]:
    """Static rows of an earlier run (`--reuse-static`): a static host trains the same
    whatever the controllers and lifecycle gates do, as long as the governor never
    rolled it back (checked), so the front need not be retrained for every change."""
    if not path.is_file():
        raise SystemExit(f"--reuse-static: {path} not found (run with --static-only first)")
    with path.open(newline="", encoding="utf-8") as handle:
        rows = [r for r in csv.DictReader(handle) if r["arm"] == "static"]
    static = {}
    for w in setup.widths:
        arm = ArmResult("static", w)
        for r in sorted(
            (r for r in rows if int(r["width"]) == w), key=lambda r: int(r["seed_index"])
        ):
            arm.rows.append({**r, "width": w, "seed_index": int(r["seed_index"]),
                             **{k: number(r[k]) for k in NUMERIC if k in r}})  # fmt: skip
        if len(arm.rows) != len(seeds):
            raise SystemExit(f"--reuse-static: {path} has {len(arm.rows)} static width-{w} "
                             f"rows, need {len(seeds)} (one per seed)")  # fmt: skip
        if any(r["rollbacks"] for r in arm.rows):
            raise SystemExit(f"--reuse-static: static width {w} had governor rollbacks in "
                             f"{path}; retrain the front")  # fmt: skip
        static[w] = arm
    print(f"  static front reused from {path}", flush=True)
    return static


def summarise(static: dict[int, ArmResult], grown: dict[str, ArmResult], narrow: int, lam):
    """Per-arm figures against the static front and the narrow static host."""
    front = [
        (
            benchlib.mean_std([r["params"] for r in s.rows])[0],
            *benchlib.mean_std([r["quality"] for r in s.rows]),
            benchlib.mean_std([r["train_flops"] for r in s.rows])[0],
        )
        for s in static.values()
    ]
    xs = [f[0] for f in front]
    base = static[narrow].rows
    start = base[0]["params"]

    def objective(row: dict) -> float:
        # Growth is charged against the narrow host for every row: a wider static host
        # pays for its extra parameters as if grown to that size at once. For grown
        # arms this is the env's own objective.
        return row["quality"] - lam * (row["params"] - start) / start

    arms = {}
    for label, res in {**{f"static w={w}": s for w, s in static.items()}, **grown}.items():
        rows = res.rows
        params = benchlib.mean_std([r["params"] for r in rows])[0]
        acc, acc_std = benchlib.mean_std([r["quality"] for r in rows])
        front_acc, clipped = interp_log(xs, [f[1] for f in front], params)
        front_std, _ = interp_log(xs, [f[2] for f in front], params)
        objectives = [objective(r) for r in rows]
        diff = paired(objectives, [objective(r) for r in base])
        flops = benchlib.mean_std([r["train_flops"] for r in rows])[0]
        scratch = benchlib.mean_std([r["scratch_flops"] for r in rows])[0]
        arms[label] = {
            "arm": label,
            "params": params,
            "accuracy": acc,
            "accuracy_std": acc_std,
            "objective": benchlib.mean_std(objectives),
            "diff": diff,
            "front_acc": front_acc,
            "front_std": front_std,
            "front_clipped": clipped,
            "on_front": acc >= front_acc - front_std,
            "pays": diff["lo"] > 0.0,
            "train_flops": flops,
            "scratch_flops": scratch,
            "flops_ratio": flops / scratch,
            "front_flops": interp_log(xs, [f[3] for f in front], params)[0],
            "germinated": benchlib.mean_std([r["germinated"] for r in rows])[0],
            "fossilized": benchlib.mean_std([r["fossilized"] for r in rows])[0],
            "rollbacks": sum(r["rollbacks"] for r in rows),
            "first_fossil": first_fossil(rows),
            "lambda": lam,
        }
    return arms


def write_tables(name, setup, summary, static, grown, args, lam) -> None:
    table = []
    for s in summary.values():
        d = s["diff"]
        table.append(
            {
                "arm": s["arm"],
                "params": f"{s['params']:.0f}",
                "val accuracy": f"{s['accuracy']:.3f} ± {s['accuracy_std']:.3f}",
                "front acc at params": f"{s['front_acc']:.3f} ± {s['front_std']:.3f}"
                + (" (edge)" if s["front_clipped"] else ""),
                "on front (≥ front − 1 std)": "yes" if s["on_front"] else "no",
                "objective": f"{s['objective'][0]:.3f} ± {s['objective'][1]:.3f}",
                "Δ obj vs narrow (SE) [95 % CI]": (
                    f"{d['mean']:+.3f} ({d['se']:.3f}) [{d['lo']:+.3f}, {d['hi']:+.3f}]"
                ),
                "train GFLOPs": f"{s['train_flops'] / 1e9:.3f}",
                "from scratch GFLOPs": f"{s['scratch_flops'] / 1e9:.3f}",
                "grown / scratch": f"{s['flops_ratio']:.2f}",
                "germ/fossil per ep": f"{s['germinated']:.1f}/{s['fossilized']:.1f}",
                "rollbacks": s["rollbacks"],
                "1st fossil step": s["first_fossil"],
            }
        )
    env = MorphogenesisEnv(env_config(setup, setup.widths[0], None))
    note = (
        f"{args.seeds} evaluation seeds (paired: same host-init and data-order seeds in "
        f"every row); {env.max_epochs} steps of "
        + (
            f"{setup.env['batches_per_step']} batches"
            if "batches_per_step" in setup.env
            else "one epoch"
        )
        + f"; narrow host = width {setup.widths[0]} ({env.host_params} params); "
        f"λ = {lam}; objective = accuracy − λ·(params − narrow params) / narrow params for "
        f"every row (a wider static host is charged for its extra params). Front values "
        f"are interpolated linearly in log(params) between the static widths "
        f"{setup.widths} ('edge': outside them, clamped). FLOPs: the env's "
        "counter (esper.training.flops: forward + backward on training samples, validation "
        "and counterfactual passes); 'from scratch' = the final architecture trained "
        "statically for the same steps. "
        + (f"Data: {setup.note}. " if setup.note else "")
        + (f"Lifecycle: {setup.env['lifecycle']}. " if "lifecycle" in setup.env else "")
        + (f"Heuristic: {setup.heuristic}. " if setup.heuristic is not None else "")
        + f"Machine: {benchlib.machine()}."
    )
    suffix = output_suffix(args)
    benchlib.report(f"pareto_{name}{suffix}", f"Growth that pays: {name}", table, note=note)
    flat = [
        {k: v for k, v in row.items() if k != "curve"}
        for res in [*static.values(), *grown.values()]
        for row in res.rows
    ]
    benchlib.write_csv(benchlib.out_dir() / f"pareto_{name}{suffix}_episodes.csv", flat)


def plot_image(name, static, grown, args) -> None:
    plt = benchlib.pyplot()
    from matplotlib.ticker import NullFormatter

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, xlabel, unit in (
        (axes[0], "params", "parameters (log scale)", 1.0),
        (axes[1], "train_flops", "training GFLOPs per episode (log scale)", 1e9),
    ):
        pts = [
            (
                *benchlib.mean_std([r[key] / unit for r in s.rows]),
                *benchlib.mean_std([r["quality"] for r in s.rows]),
            )
            for s in static.values()
        ]
        ax.errorbar(
            [p[0] for p in pts], [p[2] for p in pts], yerr=[p[3] for p in pts],
            fmt="-o", color="black", capsize=3, label="static hosts (mean ± std)",
        )  # fmt: skip
        for (w, _), p in zip(static.items(), pts, strict=True):
            ax.annotate(f"w={w}", (p[0], p[2]), textcoords="offset points", xytext=(4, -12),
                        fontsize=8)  # fmt: skip
        for arm, marker in zip(ARMS, ("s", "^", "v"), strict=True):
            rows = grown[arm].rows
            x, xs = benchlib.mean_std([r[key] / unit for r in rows])
            y, ys = benchlib.mean_std([r["quality"] for r in rows])
            ax.errorbar([x], [y], xerr=[xs], yerr=[ys], fmt=marker, capsize=3, markersize=7,
                        label=f"grown from w={grown[arm].width}: {arm}")  # fmt: skip
        ax.set_xscale("log")
        ax.margins(x=0.12)
        # Ticks at the static hosts themselves, not at log decades (which crowd).
        ax.set_xticks([p[0] for p in pts], [f"{p[0]:.0f}" if p[0] >= 100 else f"{p[0]:.3g}"
                                            for p in pts])  # fmt: skip
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel(xlabel, fontsize=9)
        ax.set_ylabel("final validation accuracy", fontsize=9)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8, loc="lower right")
    fig.suptitle(
        f"{name}: grown networks vs static hosts, mean ± std over {args.seeds} paired seeds",
        fontsize=10,
    )
    fig.tight_layout()
    path = benchlib.out_dir() / f"pareto_{name}{output_suffix(args)}.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    publish(path, args)


def publish(path: Path, args) -> None:
    """Full runs also copy their plots into docs/bench (the results page shows them)."""
    if not args.quick:
        DOCS.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, DOCS / path.name)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default="digits,fashion-mnist,text")
    parser.add_argument("--seeds", type=int, default=8, help="evaluation seeds per arm")
    parser.add_argument("--text-seeds", type=int, default=3)
    parser.add_argument("--text-path", default=None, help="UTF-8 text (default: KJV export)")
    parser.add_argument("--fashion-root", default=None, help="folder of the IDX .gz files")
    parser.add_argument("--static-only", action="store_true", help="train the front only")
    parser.add_argument(
        "--reuse-static",
        default=None,
        metavar="DIR",
        help="read the static front from DIR/pareto_<task>_episodes.csv",
    )
    parser.add_argument(
        "--lifecycle",
        default=None,
        metavar="K=V,...",
        help="LifecycleConfig overrides for the image tasks' grown arms, "
        "e.g. min_train_epochs=1,blend_epochs=1",
    )
    parser.add_argument(
        "--heuristic",
        default=None,
        metavar="K=V,...",
        help="HeuristicConfig overrides for the heuristic arm, e.g. underfit_accuracy=0.9",
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="tiny settings, 2 seeds")
    args = parser.parse_args(argv)
    benchlib.set_threads(args.threads)
    if args.quick:
        args.seeds, args.text_seeds = 2, 1
        if args.tasks == parser.get_default("tasks"):
            args.tasks = "digits,text"
    tasks = args.tasks.split(",")
    image = image_setups(args.quick)
    allowed = [*image, "text"]
    unknown = [t for t in tasks if t not in allowed]
    if unknown:
        raise SystemExit(f"unknown task {unknown[0]!r}; allowed: {', '.join(allowed)}")
    print(f"machine: {benchlib.machine()}", flush=True)
    for name in tasks:
        if name == "text":
            pareto_text.run(args, publish)
        else:
            run_image_task(name, image[name], args)


if __name__ == "__main__":
    main()
