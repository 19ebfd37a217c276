"""A learned controller that beats the heuristic (issue 13): the shipped policy against
the heuristic, the always-grow schedule and the static host, paired, on seeds disjoint
from its training.

Digits with the too-narrow width-1 host of issue 12 and the task's 20-step episode.
Every arm plays the same evaluation seeds (``episode_seed(0, i, 0, evaluation=True)``;
`esper build-policy` trains on training-side seeds only), so differences are paired.
The policy observes λ and plays once per λ in ``--lambdas``; the static host, the
heuristic and always-grow do not read λ (their actions are the same at every λ), so
they play once and their objective ``q − λ·growth`` is priced at each λ. ``--transfer
5 8`` also plays the
static host and the policy on deeper hosts with 5 and 8 slots (the policy was built at
3) and reports how much of its gain over the static host it keeps.

    OMP_NUM_THREADS=1 python bench/bench_learned.py --seeds 12
    OMP_NUM_THREADS=1 python bench/bench_learned.py --seeds 12 --reuse-baselines
    OMP_NUM_THREADS=1 python bench/bench_learned.py --seeds 8 --transfer 5 8
    python bench/bench_learned.py --quick                      # seconds (tests)

``--reuse-baselines`` takes the static, heuristic and always-grow rows of the last run's
``bench/out/learned_digits_episodes.csv`` (they do not depend on the policy).
Tables go to ``bench/out/learned_digits.md`` / ``.csv``.
"""

from __future__ import annotations

import argparse
import csv
import time
from pathlib import Path

import benchlib
from esper.env import EnvConfig, MorphogenesisEnv
from esper.experiment import episode_seed
from esper.policies import PolicyController, load_policy, policy_path
from esper.policy import AlwaysGrowController, HeuristicController, StaticController
from paretolib import paired

LAMBDAS = (0.02, 0.05, 0.1)
BASELINES = ("static", "heuristic", "always-grow")


def env_config(quick: bool, depth: int | None = None, lam: float = 0.05) -> EnvConfig:
    options = {"width": 1} if depth is None else {"width": 1, "depth": depth}
    short = {"max_epochs": 4, "batches_per_step": 2} if quick else {}
    return EnvConfig(task="digits", task_options=options, growth_penalty=lam, **short)


def play(env: MorphogenesisEnv, controller, seed: int) -> dict:
    obs, info = env.reset(seed=seed)
    state = controller.initial_state()
    counts = {"germinate": 0, "fossilize": 0, "prune": 0}
    for _ in range(env.max_epochs):
        action, state = controller.act(obs, env.conditional_masks(), state)
        name = action.op.name.lower()
        if name in counts:
            counts[name] += 1
        obs, _, _, _, info = env.step(action)
    return {"quality": float(info["quality"]), "growth": float(info["growth"]), **counts}


def run_arm(arm: str, env: MorphogenesisEnv, seeds: list[int], policy: str | None) -> list[dict]:
    start = time.perf_counter()
    rows = []
    agent = None
    if policy is not None:
        agent = load_policy(env.slot_config, env.action_spec.blueprints, policy)
    for i, seed in enumerate(seeds):
        if agent is not None:
            controller = PolicyController(agent)
        elif arm == "always-grow":  # the issue-12 schedule: wide_x1 wherever it may
            controller = AlwaysGrowController(env.action_spec.blueprints.index("wide_x1"))
        else:
            controller = StaticController() if arm == "static" else HeuristicController()
        rows.append({"arm": arm, "seed_index": i, **play(env, controller, seed)})
    lam = env.config.growth_penalty
    print(f"  {arm:<22} λ {lam}: acc {benchlib.pm([r['quality'] for r in rows])}, growth "
          f"{benchlib.pm([r['growth'] for r in rows])} "
          f"({(time.perf_counter() - start) / len(seeds):.1f} s/episode)", flush=True)  # fmt: skip
    return rows


def objective(rows: list[dict], lam: float) -> list[float]:
    return [r["quality"] - lam * r["growth"] for r in rows]


def load_baselines(path: Path, n: int) -> dict[str, list[dict]]:
    if not path.is_file():
        raise SystemExit(f"--reuse-baselines: {path} not found (run without it first)")
    with path.open(newline="", encoding="utf-8") as handle:
        rows = [r for r in csv.DictReader(handle) if r["arm"] in BASELINES and r["depth"] == "3"]
    out = {}
    for arm in BASELINES:
        mine = [r for r in rows if r["arm"] == arm][:n]
        if len(mine) < n:
            raise SystemExit(f"--reuse-baselines: {path} has {len(mine)} {arm} rows, need {n}")
        out[arm] = [
            {"arm": arm, "seed_index": int(r["seed_index"]), "quality": float(r["quality"]),
             "growth": float(r["growth"]), **{k: int(r[k]) for k in ("germinate", "fossilize",
                                                                     "prune")}}
            for r in mine
        ]  # fmt: skip
    return out


def compare(policy_rows: dict[float, list[dict]], base: dict[str, list[dict]], label: str):
    """Summary rows per λ: each arm's objective, and the paired differences."""
    table = []
    for lam, rows in policy_rows.items():
        mine, heur = objective(rows, lam), objective(base["heuristic"], lam)
        static, always = objective(base["static"], lam), objective(base["always-grow"], lam)
        vs_h, vs_s, vs_a = paired(mine, heur), paired(mine, static), paired(mine, always)
        h_s = paired(heur, static)
        table.append({
            "λ": lam, "policy": label,
            "static": benchlib.pm(static), "heuristic": benchlib.pm(heur),
            "policy objective": benchlib.pm(mine),
            "policy growth": benchlib.pm([r["growth"] for r in rows]),
            "policy − heuristic": f"{vs_h['mean']:+.4f} ± {vs_h['se']:.4f}",
            "95 % CI": f"[{vs_h['lo']:+.3f}, {vs_h['hi']:+.3f}]",
            "> 2 SE": "yes" if vs_h["mean"] > 2 * vs_h["se"] else "no",
            "policy − static": f"{vs_s['mean']:+.4f} ± {vs_s['se']:.4f}",
            "heuristic − static": f"{h_s['mean']:+.4f} ± {h_s['se']:.4f}",
            "always-grow": benchlib.pm(always),
            "policy − always-grow": f"{vs_a['mean']:+.4f} ± {vs_a['se']:.4f}",
        })  # fmt: skip
    return table


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=12)
    parser.add_argument("--lambdas", type=float, nargs="+", default=list(LAMBDAS))
    parser.add_argument("--policy", nargs="*", default=["shipped"], help="names or .pt files")
    parser.add_argument("--reuse-baselines", action="store_true")
    parser.add_argument("--transfer", type=int, nargs="*", default=[], metavar="SLOTS")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    benchlib.set_threads(1)
    n = 2 if args.quick else args.seeds
    lambdas = [0.05] if args.quick else args.lambdas
    seeds = [episode_seed(0, i, 0, evaluation=True) for i in range(n)]
    suffix = "_quick" if args.quick else ""
    episodes_csv = benchlib.out_dir() / f"learned_digits{suffix}_episodes.csv"
    print(f"== digits width 1, {n} evaluation seeds, λ {lambdas}; {benchlib.machine()}")
    data = MorphogenesisEnv(env_config(args.quick)).data
    all_rows: list[dict] = []
    if args.reuse_baselines:
        base = load_baselines(episodes_csv, n)
    else:
        env = MorphogenesisEnv(env_config(args.quick), data=data)
        base = {arm: run_arm(arm, env, seeds, None) for arm in BASELINES}
    for arm in BASELINES:
        all_rows += [{**r, "depth": 3, "λ": ""} for r in base[arm]]
    table = []
    for policy in args.policy:
        label = policy_path(policy).stem
        by_lam = {}
        for lam in lambdas:
            env = MorphogenesisEnv(env_config(args.quick, lam=lam), data=data)
            by_lam[lam] = run_arm(f"{label}", env, seeds, policy)
            all_rows += [{**r, "depth": 3, "λ": lam} for r in by_lam[lam]]
        table += compare(by_lam, base, label)
    if not table:  # --policy with no file: the baselines only
        benchlib.write_csv(episodes_csv, all_rows)
        return
    benchlib.report(f"learned_digits{suffix}", "Learned controller vs heuristic and static "
                    "(digits width 1; objective = accuracy − λ·growth, paired over seeds)",
                    table)  # fmt: skip
    if args.transfer:
        transfer_rows = []
        gain3 = statistics_gain(all_rows, 3, args.policy[0], 0.05)
        for depth in args.transfer:
            env = MorphogenesisEnv(env_config(args.quick, depth=depth), data=data)
            label = policy_path(args.policy[0]).stem
            static = run_arm("static", env, seeds, None)
            mine = run_arm(label, env, seeds, args.policy[0])
            all_rows += [{**r, "depth": depth, "λ": 0.05} for r in static + mine]
            gain = paired(objective(mine, 0.05), objective(static, 0.05))
            transfer_rows.append({
                "slots": depth, "gain over static": f"{gain['mean']:+.4f} ± {gain['se']:.4f}",
                "gain at 3 slots": f"{gain3:+.4f}",
                "kept": f"{gain['mean'] / gain3:.0%}" if gain3 > 0 else "n/a (no gain at 3)",
            })  # fmt: skip
        benchlib.report(f"learned_transfer{suffix}", "Slot transfer (built at 3 slots, λ 0.05)",
                        transfer_rows)  # fmt: skip
    benchlib.write_csv(episodes_csv, all_rows)


def statistics_gain(rows: list[dict], depth: int, policy: str, lam: float) -> float:
    """Mean paired objective gain of ``policy`` over static at ``depth`` and λ."""
    label = policy_path(policy).stem
    static = [r for r in rows if r["arm"] == "static" and r["depth"] == depth]
    mine = [r for r in rows if r["arm"] == label and r["depth"] == depth and r["λ"] == lam]
    if not mine:
        return float("nan")
    return paired(objective(mine, lam), objective(static, lam))["mean"]


if __name__ == "__main__":
    main()
