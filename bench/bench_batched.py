"""Batched envs: env steps/s of E envs trained one by one vs as one batched computation.

`VectorMorphogenesisEnv(E)` steps its envs' hosts one after another (the per-env loop);
`VectorMorphogenesisEnv(E, batched=True)` trains them as one grouped network per
optimiser step and validates them, seeds' counterfactual variants included, in one
grouped pass (esper.training.batched). Both run in this process, alternating round by round, so
the ratio is measured side by side under the same machine load (reported: the 1-minute
load average before and after).

Actions: ``wait`` (static hosts: what the host costs), ``seeds`` (at the first timed
step env i germinates a ``conv_light`` seed in slot i mod S: seeds in different slots
per env; batched, each slot's seeds run as one grouped convolution, in the seeds' own
pass and as counterfactual variants in the grouped validation).

    OMP_NUM_THREADS=1 python bench/bench_batched.py             # digits + fashion subset
    python bench/bench_batched.py --quick

``--rss ROUNDS``: memory instead of speed. 16 batched digits envs play ROUNDS episodes of
random legal actions (germinate, fossilize, prune, wait), and the process's resident
set (now, and its peak) is printed after each round: it must stay flat.
"""

from __future__ import annotations

import argparse
import os
import resource
import time

import torch

import benchlib
from esper.actions import FactoredAction, LifecycleOp
from esper.env import VectorMorphogenesisEnv

FASHION = {"max_train": 4096, "max_val": 1024}  # the subset (full: 60k / 10k images)


def _actions(vec: VectorMorphogenesisEnv, mode: str, step: int) -> list[FactoredAction]:
    if mode == "seeds" and step == 0:
        slots = vec.slot_config.num_slots
        conv_light = vec.action_spec.blueprints.index("conv_light")
        return [
            FactoredAction(LifecycleOp.GERMINATE, i % slots, conv_light, 0)
            for i in range(vec.num_envs)
        ]
    return [FactoredAction.wait()] * vec.num_envs


def _random_actions(vec: VectorMorphogenesisEnv, gen: torch.Generator) -> list[FactoredAction]:
    """A random legal action per env (ops drawn among the legal ones, WAIT included)."""
    masks = vec.masks()
    out = []
    for e in range(vec.num_envs):
        op = int(torch.multinomial(masks.op[e].double(), 1, generator=gen))
        if op == int(LifecycleOp.WAIT):
            out.append(FactoredAction.wait())
            continue
        slot = int(torch.multinomial(masks.slot[e, op].double(), 1, generator=gen))
        blueprint = 0
        if op == int(LifecycleOp.GERMINATE):
            blueprint = int(torch.multinomial(masks.blueprint[e, slot].double(), 1, generator=gen))
        blend = int(torch.multinomial(masks.blend[e].double(), 1, generator=gen))
        out.append(FactoredAction(LifecycleOp(op), slot, blueprint, blend))
    return out


def _rss_mib() -> tuple[float, float]:
    """(resident set now, peak resident set) of this process, MiB (Linux)."""
    with open("/proc/self/statm") as f:
        now = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    return now, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _malloc_trim() -> None:
    """Hand the C heap's free pages back to the system (glibc), so that RSS shows what
    is live rather than what the allocator keeps for reuse."""
    import contextlib
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def rss_rounds(rounds: int, envs: int, options: dict) -> None:
    """Episodes of random legal actions on batched envs; RSS printed after each (and
    after `malloc_trim`: what stays is live memory, not the allocator's free pages)."""
    vec = VectorMorphogenesisEnv(envs, seed=0, task="digits", batched=True, **options)
    gen = torch.Generator().manual_seed(0)
    start = time.perf_counter()
    for r in range(1, rounds + 1):
        vec.reset(seeds=[1000 * r + e for e in range(envs)])
        for _ in range(vec.max_epochs):
            vec.step(_random_actions(vec, gen))
        now, peak = _rss_mib()
        _malloc_trim()
        trimmed, _ = _rss_mib()
        print(
            f"round {r}: RSS {now:.1f} MiB ({trimmed:.1f} after malloc_trim), peak {peak:.1f} MiB, "
            f"{time.perf_counter() - start:.0f} s, load {os.getloadavg()[0]:.2f}",
            flush=True,
        )
    vec.close()


def measure(task: str, envs: int, steps: int, batched: bool, mode: str, options: dict) -> float:
    """Seconds per lockstep step (all envs), mean over ``steps`` after one warm-up."""
    vec = VectorMorphogenesisEnv(envs, seed=0, task=task, batched=batched, **options)
    if steps + 1 > vec.max_epochs:
        raise ValueError(f"steps + 1 = {steps + 1} must fit in one episode ({vec.max_epochs})")
    vec.reset()
    vec.step([FactoredAction.wait()] * envs)  # warm-up: first-call costs, FLOP counts
    start = time.perf_counter()
    for t in range(steps):
        vec.step(_actions(vec, mode, t))
        if batched and not vec.last_step_batched:
            raise RuntimeError(
                f"step {t} fell back to the per-env loop: {vec._stepper.last_reason}"
            )
    seconds = (time.perf_counter() - start) / steps
    vec.close()
    return seconds


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default="digits,fashion-mnist")
    parser.add_argument("--envs", type=int, default=16)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per run")
    parser.add_argument("--rounds", type=int, default=2, help="per-env/batched alternations")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="digits, 4 envs, 2 batches/step")
    parser.add_argument("--rss", type=int, default=0, metavar="ROUNDS", help="memory run")
    parser.add_argument("--rss-epochs", type=int, default=10, help="steps per --rss episode")
    args = parser.parse_args(argv)
    benchlib.set_threads(args.threads)
    if args.rss:
        options = {"max_epochs": args.rss_epochs, "batches_per_step": 4}
        print(f"machine: {benchlib.machine()}; digits {options}", flush=True)
        rss_rounds(args.rss, args.envs, options)
        return
    digits_options: dict = {}
    fashion_options = {"task_options": FASHION, "batches_per_step": 10}
    if args.quick:
        args.tasks, args.envs, args.steps, args.rounds = "digits", 4, 2, 1
        digits_options = {"batches_per_step": 2, "max_epochs": 4}
    print(f"machine: {benchlib.machine()}", flush=True)
    rows = []
    for task in args.tasks.split(","):
        options = fashion_options if task == "fashion-mnist" else digits_options
        modes = ("wait", "seeds") if task == "digits" else ("wait",)
        for mode in modes:
            load_before = os.getloadavg()[0]
            times: dict[bool, list[float]] = {False: [], True: []}
            for _ in range(args.rounds):
                for batched in (False, True):
                    times[batched].append(
                        measure(task, args.envs, args.steps, batched, mode, options)
                    )
            loop, batch = (args.envs * len(times[b]) / sum(times[b]) for b in (False, True))
            rows.append(
                {
                    "task": task,
                    "actions": mode,
                    "envs": args.envs,
                    "per-env loop env steps/s": f"{loop:.1f}",
                    "batched env steps/s": f"{batch:.1f}",
                    "ratio": f"{batch / loop:.2f}x",
                    "load avg (before, after)": f"{load_before:.2f}, {os.getloadavg()[0]:.2f}",
                }
            )
            print(rows[-1], flush=True)
    settings = (
        f"digits {digits_options or 'defaults (one epoch per step)'}; fashion-mnist "
        f"subset {FASHION}, batches_per_step 10"
    )
    benchlib.report(
        f"batched{'_quick' if args.quick else ''}",
        "Batched envs vs the per-env loop (env steps/s, one process, side by side)",
        rows,
        note=f"{settings}; {args.rounds} alternating rounds of {args.steps} timed steps "
        f"after one warm-up step; torch threads {args.threads}.",
    )


if __name__ == "__main__":
    main()
