"""Controller overhead: what deciding costs per env step, as a fraction of host training.

E envs on the default digits settings (width-2 CNN, 3 slots, one full epoch per step)
are stepped in lockstep with an (untrained) PPO agent, as during training:

  host        `Trainer.train_step` summed over the envs: one epoch of training,
              validation (with seed counterfactuals when seeds are alive), governor,
              lifecycle step. This is what training the host costs with or without
              a controller.
  policy      `PPOAgent.act` (normaliser + network forward + sampling) and
              `PPOAgent.record` (buffer), once per lockstep step for all envs.
  env         the rest of `VectorMorphogenesisEnv.step`: applying actions, reward,
              observation building and the batched masks of all envs.
  masks       one extra `vec.masks()` call, timed on its own (included in env).

overhead = (policy + env) / host. Two modes: ``wait`` executes WAIT whatever the policy
picks (the host is exactly a static host's, so the ratio is the controller's own cost);
``policy`` executes the sampled actions (seeds germinate, and their training and
counterfactuals land in "host", as growth costs).

    OMP_NUM_THREADS=1 python bench/bench_overhead.py                # E in {1, 4, 16}
    python bench/bench_overhead.py --quick
"""

from __future__ import annotations

import argparse
import time

import torch

import benchlib
from esper.env import GLOBAL_DIM, SLOT_DIM, EnvConfig, VectorMorphogenesisEnv
from esper.rl import PPOAgent


def _timed(fn, box: list[float]):
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            box[0] += time.perf_counter() - start

    return wrapper


def measure(num_envs: int, steps: int, mode: str, env_options: dict) -> dict[str, float]:
    vec = VectorMorphogenesisEnv(num_envs, EnvConfig(task="digits", **env_options))
    if steps + 1 > vec.max_epochs:
        raise ValueError(f"steps + 1 = {steps + 1} must fit in one episode ({vec.max_epochs})")
    agent = PPOAgent(vec.slot_config, GLOBAL_DIM, SLOT_DIM, vec.action_spec.blueprints)
    ids = vec.slot_config.slot_ids
    obs, masks, _ = vec.reset(seeds=list(range(num_envs)))
    host = [0.0]
    for env in vec.envs:  # instance attribute: times this episode's trainers only
        env.trainer.train_step = _timed(env.trainer.train_step, host)
    hidden = agent.initial_hidden(num_envs)
    totals = dict.fromkeys(("host", "policy", "env", "masks"), 0.0)
    for t in range(steps + 1):  # step 0 warms up and is not counted
        host[0] = 0.0
        t0 = time.perf_counter()
        step = agent.act(obs, masks, hidden, slot_ids=ids)
        t1 = time.perf_counter()
        actions = step.actions if mode == "policy" else torch.zeros_like(step.actions)
        out = vec.step(actions)
        t2 = time.perf_counter()
        agent.record(step, out.rewards, out.terminated, out.truncated, final_obs=out.final_obs)
        t3 = time.perf_counter()
        vec.masks()
        t4 = time.perf_counter()
        obs, masks, hidden = out.obs, out.masks, step.hidden
        if t == 0:
            continue
        totals["host"] += host[0]
        totals["policy"] += (t1 - t0) + (t3 - t2)
        totals["env"] += (t2 - t1) - host[0]
        totals["masks"] += t4 - t3
    vec.close()
    return {k: v / steps for k, v in totals.items()}


def plot(rows: list[dict], name: str) -> None:
    plt = benchlib.pyplot()
    fig, ax = plt.subplots(figsize=(4, 2.6))
    for mode in ("wait", "policy"):
        mine = [r for r in rows if r["mode"] == mode]
        ax.plot([r["envs"] for r in mine], [float(r["overhead"][:-1]) for r in mine], "o-",
                label=f"executes {mode}")  # fmt: skip
    ax.axhline(5.0, color="grey", linestyle="--", linewidth=1, label="goal 5%")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("envs in lockstep")
    ax.set_ylabel("overhead / host time (%)")
    ax.legend(fontsize=7)
    benchlib.save_figure(fig, name)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--envs", default="1,4,16")
    parser.add_argument("--steps", type=int, default=10, help="timed steps (after 1 warm-up)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="E in {1, 4}, 2 short steps")
    args = parser.parse_args(argv)
    benchlib.set_threads(args.threads)
    env_options: dict = {}
    if args.quick:
        args.envs, args.steps, env_options = "1,4", 2, {"batches_per_step": 2, "max_epochs": 4}
    print(f"machine: {benchlib.machine()}", flush=True)
    rows = []
    for mode in ("wait", "policy"):
        for num_envs in (int(e) for e in args.envs.split(",")):
            ms = {k: 1e3 * v for k, v in measure(num_envs, args.steps, mode, env_options).items()}
            overhead = (ms["policy"] + ms["env"]) / ms["host"]
            rows.append(
                {
                    "mode": mode,
                    "envs": num_envs,
                    "host ms/step": f"{ms['host']:.1f}",
                    "policy ms": f"{ms['policy']:.2f}",
                    "env ms": f"{ms['env']:.2f}",
                    "(masks ms)": f"{ms['masks']:.2f}",
                    "overhead": f"{overhead:.1%}",
                    "policy ms/env": f"{ms['policy'] / num_envs:.2f}",
                }
            )
    plot(rows, "overhead_quick" if args.quick else "overhead")
    settings = "default digits settings" if not args.quick else f"digits {env_options}"
    benchlib.report(
        f"overhead{'_quick' if args.quick else ''}",
        "Controller overhead per lockstep step",
        rows,
        note=f"{settings}; mean over {args.steps} steps after one warm-up step; "
        "times are per lockstep step of all envs.",
    )


if __name__ == "__main__":
    main()
