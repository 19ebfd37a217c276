"""Slot transfer: a policy trained with 3 slots, evaluated on deeper hosts (5 and 8 slots).

The host is the digits CNN of the growth benchmark (width 1) made deeper with
``task.depth``; every block is a slot. At each evaluation depth the same evaluation
episodes are played by

  ppo-3          the 3-slot policy (trained once, shared with bench_growth.py)
  ppo-in-dist    a policy trained at that slot count with the same PPO budget
                 (both also "sampled": actions drawn from the policy, as in training)
  heuristic      the hand-written controller
  static         the host alone (reference for "gain retained")

Transfer ratio = objective(ppo-3) / objective(ppo-in-dist) (goal >= 90%). Because the
objective is dominated by the host's own accuracy, the script also reports
gain retained = (ppo-3 − static) / (ppo-in-dist − static), where ppo-in-dist gains.

    OMP_NUM_THREADS=1 python bench/bench_transfer.py               # depths 5 and 8
    python bench/bench_transfer.py --quick                         # seconds (test suite)
"""

from __future__ import annotations

import argparse
import time

import benchlib
from bench_growth import TaskSetup, cli_command, make_config, setups


def deeper(setup: TaskSetup, depth: int) -> TaskSetup:
    if depth == 3:  # the task's default depth: keep the options identical so the
        return setup  # 3-slot policy of bench_growth.py is reused, not retrained
    return TaskSetup(setup.task, {**setup.task_options, "depth": depth}, setup.env, setup.updates)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depths", default="5,8", help="evaluation slot counts")
    parser.add_argument("--envs", type=int, default=4)
    parser.add_argument("--updates", type=int, default=None, help="PPO updates per policy")
    parser.add_argument("--eval", type=int, default=5, help="evaluation episodes (seeds)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--tag", default="bench", help="name of the cached PPO runs")
    parser.add_argument("--quick", action="store_true", help="2 -> 3 slots, tiny episodes")
    args = parser.parse_args(argv)
    benchlib.set_threads(args.threads)
    base = setups(args.quick, args.updates)["digits"]
    train_depth = 3
    if args.quick:
        args.depths, args.envs, args.eval, args.tag, train_depth = "3", 2, 2, "quick", 2
    depths = [int(d) for d in args.depths.split(",")]
    print(f"machine: {benchlib.machine()}", flush=True)

    def policy(depth: int):
        setup = deeper(base, depth)
        config = make_config(setup, args.envs)
        name = f"digits-w{setup.task_options['width']}-ppo-{args.tag}"
        if depth != 3:
            name += f"-d{depth}"
        checkpoint, seconds = benchlib.train_ppo(config, name)
        return checkpoint, seconds, cli_command(setup, config)

    targets = {depth: policy(depth) for depth in depths}
    source, source_seconds, source_cmd = policy(train_depth)
    rows, commands = [], [f"{train_depth} slots: `{source_cmd}` ({source_seconds:.0f} s)"]
    for depth in depths:
        target, target_seconds, target_cmd = targets[depth]
        if depth != train_depth:
            commands.append(f"{depth} slots: `{target_cmd}` ({target_seconds:.0f} s)")
        config = make_config(deeper(base, depth), args.envs)
        src = f"ppo-{train_depth}"
        results, seconds = {}, {}
        for label, controller, checkpoint, deterministic in (
            (src, "ppo", source, True),
            ("ppo-in-dist", "ppo", target, True),
            (f"{src} sampled", "ppo", source, False),
            ("ppo-in-dist sampled", "ppo", target, False),
            ("heuristic", "heuristic", None, True),
            ("static", "static", None, True),
        ):
            start = time.perf_counter()
            results[label] = benchlib.evaluate_on_seeds(
                config, args.eval, controller, checkpoint, deterministic=deterministic
            )
            seconds[label] = time.perf_counter() - start
        mean = {k: benchlib.mean_std([r.objective for r in v])[0] for k, v in results.items()}
        for label, records in results.items():
            reference = "ppo-in-dist sampled" if label.endswith("sampled") else "ppo-in-dist"
            rows.append(
                {
                    "slots": depth,
                    "controller": label,
                    "val accuracy": benchlib.pm([r.quality for r in records]),
                    "params added": benchlib.pm([r.params_added for r in records], 1),
                    "objective": benchlib.pm([r.objective for r in records]),
                    "vs in-dist": f"{mean[label] / mean[reference]:.1%}",
                    "s/episode": f"{seconds[label] / len(records):.2f}",
                }
            )
        for suffix in ("", " sampled"):
            rows.append(
                {
                    "slots": depth,
                    "controller": f"→ transfer{suffix}",
                    "objective": f"ratio {mean[src + suffix] / mean['ppo-in-dist' + suffix]:.1%}",
                    "vs in-dist": "gain retained "
                    + _retained(mean[src + suffix], mean["ppo-in-dist" + suffix], mean["static"]),
                }
            )
    plot(rows, f"transfer{'_quick' if args.quick else ''}")
    note = (
        f"{args.eval} evaluation episodes per row (same seeds for every controller); "
        "policies trained with the same budget:\n" + "\n".join(f"- {c}" for c in commands)
    )
    benchlib.report(
        f"transfer{'_quick' if args.quick else ''}",
        f"Slot transfer: policy trained with {train_depth} slots",
        rows,
        note=note,
    )


def plot(rows: list[dict], name: str) -> None:
    plt = benchlib.pyplot()
    rows = [r for r in rows if not r["controller"].startswith("→")]
    depths = sorted({r["slots"] for r in rows})
    fig, axes = plt.subplots(1, len(depths), figsize=(4 * len(depths), 2.8), squeeze=False)
    for ax, depth in zip(axes[0], depths, strict=True):
        mine = [r for r in rows if r["slots"] == depth]
        means = [float(r["objective"].split(" ± ")[0]) for r in mine]
        stds = [float(r["objective"].split(" ± ")[1]) for r in mine]
        ax.bar([r["controller"] for r in mine], means, yerr=stds, capsize=3)
        ax.set_ylim(max(0.0, min(m - s for m, s in zip(means, stds, strict=True)) - 0.05), None)
        ax.set_title(f"{depth} slots: objective (mean ± std)", fontsize=9)
        ax.tick_params(labelsize=7, axis="x", labelrotation=30)
    benchlib.save_figure(fig, name)
    plt.close(fig)


def _retained(transfer: float, in_dist: float, static: float) -> str:
    """(transfer − static) / (in-dist − static); undefined unless in-dist gains."""
    gain = in_dist - static
    if gain < 1e-3:
        return "n/a (in-dist does not beat static)"
    return f"{(transfer - static) / gain:.0%}"


if __name__ == "__main__":
    main()
