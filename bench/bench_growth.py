"""Growth quality: does a controller grow a better network per parameter than fixed hosts?

For each task, on a deliberately narrow CNN host, every controller plays the same
evaluation episodes (same host inits and data orders, seeds disjoint from training):

  static         the narrow host, never grown
  wide=ppo       a static CNN widened to the host's params + the mean params PPO added
  wide=heur      ... + the mean params the heuristic added. Their objective charges the
                 extra params as growth, like a grown host's. A widened host that
                 rounds to the narrow one (scale 1.00) is the static host, init included,
                 so its rows are the static rows.
  random         uniform over legal actions
  heuristic      the hand-written controller
  ppo            trained here on training seeds, evaluated deterministically (argmax)
  ppo-sampled    the same policy sampling its actions (as during training)

Columns: final validation accuracy, params added, objective = accuracy − λ·growth
(growth = added / host params), all mean ± std over the evaluation episodes.

    OMP_NUM_THREADS=1 python bench/bench_growth.py                 # digits + fashion-mnist
    OMP_NUM_THREADS=1 python bench/bench_growth.py --tasks digits --updates 16 --eval 5
    python bench/bench_growth.py --quick                          # seconds (test suite)
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass

import torch
from torch import nn

import benchlib
from esper.env import MorphogenesisEnv
from esper.experiment import episode_seed
from esper.model import CNNHost, MorphogeneticModel
from esper.run_config import RunConfig
from esper.training import Trainer

CONTROLLERS = ("static", "wide=heur", "wide=ppo", "random", "heuristic", "ppo", "ppo-sampled")


@dataclass(frozen=True)
class TaskSetup:
    """One task's host and episode settings (all also valid `esper train` --set keys)."""

    task: str
    task_options: dict
    env: dict
    updates: int  # PPO updates of `envs` episodes each


def setups(quick: bool, updates: int | None) -> dict[str, TaskSetup]:
    if quick:
        env = {"max_epochs": 3, "batches_per_step": 2}
        return {"digits": TaskSetup("digits", {"width": 1}, env, updates or 1)}
    return {
        # Full epochs, as `esper train` runs digits by default; only the width is narrowed.
        "digits": TaskSetup("digits", {"width": 1}, {}, updates or 16),
        # A 3,000-image subset and 10 batches of 128 per step keep an episode ~6 s here.
        "fashion-mnist": TaskSetup(
            "fashion-mnist",
            {"width": 4, "max_train": 3000, "max_val": 500},
            {"max_epochs": 12, "batches_per_step": 10},
            updates or 8,
        ),
    }


def make_config(setup: TaskSetup, envs: int, seed: int = 0) -> RunConfig:
    return benchlib.run_config(
        setup.task,
        task_options=setup.task_options,
        env=setup.env,
        envs=envs,
        episodes=envs * setup.updates,
        seed=seed,
    )


def cli_command(setup: TaskSetup, config: RunConfig) -> str:
    """The `esper train` command that trains the same PPO policy."""
    sets = [f"--set task.{k}={v}" for k, v in setup.task_options.items()]
    sets += [f"--set env.{k}={v}" for k, v in setup.env.items()]
    return (
        f"esper train ppo --task {setup.task} --envs {config.run.envs} "
        f"--episodes {config.run.episodes} --seed {config.run.seed} {' '.join(sets)}"
    )


# -- the widened static host ----------------------------------------------------------


def scaled_cnn(base: CNNHost, scale: float, num_classes: int) -> CNNHost:
    """``base`` with every block ``scale`` times wider (same depth and pooling).

    `CNNHost` creates its layers in the same order at any widths, so at scale 1 the
    weights drawn from the same seed equal those of the narrow host (a test checks it)."""
    widths = [max(1, round(w * scale)) for w in base.widths]
    return CNNHost(base.in_channels, num_classes, 1, len(widths), base.image_size,
                   pool_at=base.pool_at, widths=widths)  # fmt: skip


def params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def widest_match(base: CNNHost, target: int, num_classes: int) -> float:
    """The width scale (in steps of 0.05) whose param count is nearest ``target``."""
    scales = [1.0 + 0.05 * k for k in range(121)]
    return min(scales, key=lambda s: abs(params(scaled_cnn(base, s, num_classes)) - target))


def static_wide(
    config: RunConfig, episodes: int, target_params: int, static_rows: list[dict]
) -> tuple[list, dict]:
    """The widened host's evaluation rows (``static_rows`` when it rounds to the host)."""
    env = MorphogenesisEnv(config.env_config())
    base = env.task.make_host(env.data)
    scale = widest_match(base, target_params, env.data.num_classes)
    widths = scaled_cnn(base, scale, env.data.num_classes).widths
    info = {"scale": scale, "widths": widths, "is_static": widths == base.widths}
    if info["is_static"]:
        return static_rows, info
    return train_static(config, episodes, scale), info


def train_static(config: RunConfig, episodes: int, scale: float) -> list[dict]:
    """Train the host widened by ``scale`` with no controller on the evaluation seeds.

    The env is reset with each evaluation seed only to get that episode's host-init and
    data-order seed; the widened host then trains with the same `Trainer` and settings
    (at scale 1 this reproduces the static controller's episodes exactly)."""
    env = MorphogenesisEnv(config.env_config())
    base = env.task.make_host(env.data)
    rows = []
    for i in range(episodes):
        env.reset(seed=episode_seed(config.run.seed, i, 0, evaluation=True))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(env.episode_seed)
            host = scaled_cnn(base, scale, env.data.num_classes)
        model = MorphogeneticModel(host, env.slot_config.slot_ids, env.lifecycle)
        trainer = Trainer(model, env.data, env.train_config, env.episode_seed, env.device)
        for _ in range(env.max_epochs):
            result = trainer.train_step()
        added = params(host) - env.host_params
        quality = float(result.quality)
        objective = quality - config.env.growth_penalty * added / env.host_params
        rows.append({"quality": quality, "params_added": added, "objective": objective})
    return rows


# -- main -----------------------------------------------------------------------------


def run_task(name: str, setup: TaskSetup, args) -> list[dict]:
    train_config = make_config(setup, args.envs)
    eval_config = train_config
    rows_by: dict[str, list[dict]] = {}
    seconds: dict[str, float] = {}
    checkpoint, train_seconds = None, 0.0
    if not args.skip_ppo:
        checkpoint, train_seconds = benchlib.train_ppo(
            train_config, f"{name}-w{setup.task_options['width']}-ppo-{args.tag}"
        )
    for label in ("static", "random", "heuristic", "ppo", "ppo-sampled"):
        controller = label.removesuffix("-sampled")
        if controller == "ppo" and checkpoint is None:
            continue
        start = time.perf_counter()
        records = benchlib.evaluate_on_seeds(
            eval_config, args.eval, controller, checkpoint, deterministic=label == "ppo"
        )
        seconds[label] = time.perf_counter() - start
        rows_by[label] = [
            {"quality": r.quality, "params_added": r.params_added, "objective": r.objective,
             "fossilized": r.counts["fossilized"], "germinated": r.counts["germinated"]}
            for r in records
        ]  # fmt: skip
    env = MorphogenesisEnv(eval_config.env_config())
    wide_notes = []
    for reference, label in (("heuristic", "wide=heur"), ("ppo", "wide=ppo")):
        if reference not in rows_by:
            continue
        added = benchlib.mean_std([r["params_added"] for r in rows_by[reference]])[0]
        start = time.perf_counter()
        rows_by[label], wide = static_wide(
            eval_config, args.eval, round(env.host_params + added), rows_by["static"]
        )
        seconds[label] = time.perf_counter() - start
        if wide["is_static"]:
            seconds[label] = seconds["static"]
        wide_notes.append(
            f"{label}: widths {wide['widths']} for {reference}'s {added:.1f} added params"
            + (" (= the static host)" if wide["is_static"] else "")
        )
    table, static = [], rows_by["static"]
    for controller in CONTROLLERS:
        if controller not in rows_by:
            continue
        rows = rows_by[controller]
        table.append(
            {
                "controller": controller,
                "val accuracy": benchlib.pm([r["quality"] for r in rows]),
                "params added": benchlib.pm([r["params_added"] for r in rows], 1),
                "objective": benchlib.pm([r["objective"] for r in rows]),
                # Same seeds for every controller: the paired difference removes the
                # seed-to-seed spread of the host itself.
                "Δ objective vs static": benchlib.pm(
                    [r["objective"] - b["objective"] for r, b in zip(rows, static, strict=True)]
                ),
                "germinated/ep": benchlib.pm([r.get("germinated", 0) for r in rows], 1),
                "fossils/ep": benchlib.pm([r.get("fossilized", 0) for r in rows], 1),
                "s/episode": f"{seconds[controller] / len(rows):.2f}",
            }
        )
    note = (
        f"Host: {type(env.task.make_host(env.data)).__name__} width "
        f"{setup.task_options['width']}, {env.host_params} params; {env.max_epochs} steps/episode; "
        f"λ = {eval_config.env.growth_penalty}; {args.eval} evaluation episodes (seeds disjoint "
        f"from training). {'; '.join(wide_notes)}. "
    )
    if checkpoint is not None:
        note += (
            f"PPO: {train_config.run.envs} envs x {train_config.run.updates} updates "
            f"({train_config.run.episodes} training episodes, {train_seconds:.0f} s), "
            f"= `{cli_command(setup, train_config)}`."
        )
    benchlib.report(
        f"growth_{name}{'_quick' if args.quick else ''}",
        f"Growth quality: {name}",
        table,
        note=note,
    )
    flat = [
        {"task": name, "controller": c, "episode": i, **r}
        for c, rows in rows_by.items()
        for i, r in enumerate(rows)
    ]
    benchlib.write_csv(benchlib.out_dir() / f"growth_{name}_episodes.csv", flat)
    plot(name, rows_by)
    return flat


def plot(name: str, rows_by: dict[str, list[dict]]) -> None:
    plt = benchlib.pyplot()
    names = [c for c in CONTROLLERS if c in rows_by]
    fig, axes = plt.subplots(1, 2, figsize=(8, 2.6))
    for ax, key in zip(axes, ("objective", "params_added"), strict=True):
        stats = [benchlib.mean_std([r[key] for r in rows_by[c]]) for c in names]
        ax.bar(names, [m for m, _ in stats], yerr=[s for _, s in stats], capsize=3)
        ax.set_title(f"{name}: {key.replace('_', ' ')} (mean ± std)", fontsize=9)
        ax.tick_params(labelsize=7, axis="x", labelrotation=30)
        if key == "objective":
            low = min(m - s for m, s in stats)
            ax.set_ylim(max(0.0, low - 0.05), None)
    benchlib.save_figure(fig, f"growth_{name}")
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default="digits,fashion-mnist")
    parser.add_argument("--envs", type=int, default=4, help="PPO training envs per update")
    parser.add_argument("--updates", type=int, default=None, help="PPO updates (per task)")
    parser.add_argument("--eval", type=int, default=5, help="evaluation episodes (seeds)")
    parser.add_argument("--skip-ppo", action="store_true")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--tag", default="bench", help="name of the cached PPO runs")
    parser.add_argument("--quick", action="store_true", help="digits, 3 short steps, 2 seeds")
    args = parser.parse_args(argv)
    benchlib.set_threads(args.threads)
    if args.quick:
        args.tasks, args.envs, args.eval, args.tag = "digits", 2, 2, "quick"
    all_setups = setups(args.quick, args.updates)
    unknown = [t for t in args.tasks.split(",") if t not in all_setups]
    if unknown:
        raise SystemExit(f"unknown task {unknown[0]!r}; allowed: {', '.join(all_setups)}")
    print(f"machine: {benchlib.machine()}", flush=True)
    rows = []
    for name in args.tasks.split(","):
        rows += run_task(name, all_setups[name], args)
    benchlib.write_csv(benchlib.out_dir() / f"growth{'_quick' if args.quick else ''}.csv", rows)


if __name__ == "__main__":
    main()
