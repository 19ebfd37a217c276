"""Share of an env step spent on FLOP bookkeeping, growth scores and in-episode folding.

Times, inside real env steps, every call of the pieces below and divides by the steps'
wall time (one torch thread; the share, not the absolute time, is the figure: it holds
under load as both parts slow alike):

  flops    `FlopMeter` (`add_training`, `add_counterfactuals`; in older versions every
           `count_flops` call, the pass it wrapped included)
  scores   `esper.model.scores` (growth scores the observation reads)
  fold     `Trainer.fold` (in-episode folding of fossilized width seeds)

Modes: ``wait`` (digits, static host), ``growth`` (digits, short lifecycle windows: a
seed of another blueprint germinates whenever a slot is free, width seeds among them,
and every seed that may is fossilized, a width fossil folded into the host at once, so
structures keep changing), ``sampled`` (`Trainer.train_step` on the 64-slot host of
bench_slot_scaling.py with ``credit_samples=4``, a structure change every step: one
seed pruned and another germinated), ``batched`` (16 digits envs, batched, a seed in
every env as in bench_batched.py ``seeds``).

Each mode runs twice in one process: ``cold`` (first) and ``warm`` (again: per-piece
FLOP counts are kept per process, as over the episodes of a training run).

    OMP_NUM_THREADS=1 python bench/bench_flop_share.py [--modes wait,growth,sampled,batched]
    python bench/bench_flop_share.py --quick
"""

from __future__ import annotations

import argparse
import os
import time
from collections import defaultdict

import torch

TIMES: dict[str, float] = defaultdict(float)


DEPTH: dict[str, int] = defaultdict(int)


def _wrap(owner, name: str, label: str) -> None:
    inner = getattr(owner, name, None)
    if inner is None:
        return

    def timed(*args, **kwargs):
        DEPTH[label] += 1  # only the outermost timed call of a label counts
        start = time.perf_counter()
        try:
            return inner(*args, **kwargs)
        finally:
            DEPTH[label] -= 1
            if DEPTH[label] == 0:
                TIMES[label] += time.perf_counter() - start

    setattr(owner, name, timed)


def instrument() -> None:
    import esper.model.scores as scores
    import esper.training.counterfactual as cf
    import esper.training.flops as flops
    import esper.training.trainer as trainer

    for name in ("add_training", "add_counterfactuals"):
        _wrap(flops.FlopMeter, name, "flops")
    if not hasattr(flops.FlopMeter, "add_counterfactuals"):  # before BlockFlops
        _wrap(flops, "count_flops", "flops")
        _wrap(cf, "count_flops", "flops")
        _wrap(trainer, "sampled_pass_flops", "flops")
    for name in dir(scores):
        if not name.startswith("_") and callable(getattr(scores, name)):
            fn = getattr(scores, name)
            if getattr(fn, "__module__", None) == scores.__name__ and not isinstance(fn, type):
                _wrap(scores, name, "scores")
    _wrap(trainer.Trainer, "fold", "fold")


def run_env_steps(steps, step_fn) -> float:
    start = time.perf_counter()
    for t in range(steps):
        step_fn(t)
    return time.perf_counter() - start


def mode_wait(steps: int) -> float:
    from esper.actions import FactoredAction
    from esper.env import MorphogenesisEnv

    env = MorphogenesisEnv(task="digits", seed=0, max_epochs=steps + 1)
    env.reset()
    TIMES.clear()
    return run_env_steps(steps, lambda t: env.step(FactoredAction.wait()))


def mode_growth(steps: int) -> float:
    from esper.actions import FactoredAction, LifecycleOp
    from esper.env import MorphogenesisEnv
    from esper.model import LifecycleConfig

    quick = LifecycleConfig(
        min_train_epochs=1,
        blend_epochs=1,
        blend_threshold=-1.0,
        prune_threshold=-1.0,
        fossilize_threshold=-1.0,
        fold_on_fossilize=True,  # a fossilized width seed folds into the host at once
    )
    env = MorphogenesisEnv(task="digits", seed=0, max_epochs=steps + 1, lifecycle=quick)
    env.reset()
    names = env.action_spec.blueprints
    order = [names.index(n) for n in ("wide_x1", "conv_light", "depthwise", "norm", "wide_half")]

    def step(t: int) -> None:
        states = env.model.slot_states()
        free = [i for i, s in enumerate(states) if s.stage.name == "DORMANT"]
        masks = env.conditional_masks()
        ripe = [i for i in range(len(states)) if bool(masks.slot[int(LifecycleOp.FOSSILIZE), i])]
        if ripe:
            env.step(FactoredAction(LifecycleOp.FOSSILIZE, ripe[0], 0, 0))
        elif free:
            action = FactoredAction(LifecycleOp.GERMINATE, free[0], order[t % len(order)], 0)
            env.step(action)
        else:
            env.step(FactoredAction.wait())

    TIMES.clear()
    return run_env_steps(steps, step)


def mode_sampled(steps: int) -> float:
    import dataclasses

    from bench_counterfactual import grow
    from esper.model import CNNHost
    from esper.training import Trainer, get_task

    slots = 64
    torch.manual_seed(0)
    host = CNNHost(1, 10, width=1, depth=slots, image_size=8)
    model = grow(host, [f"r0c{i}" for i in range(slots)]).train()  # HOLDING everywhere
    task = get_task("synthetic", shape=(1, 8, 8), n_train=64, n_val=360, batches_per_step=1)
    config = dataclasses.replace(task.hparams, credit_samples=4)
    trainer = Trainer(model, task.make_data(), config)
    trainer.train_step()

    def step(t: int) -> None:
        sid = f"r0c{(7 * t) % slots}"  # a structure change every step
        if model.slot_state(sid).stage.name == "HOLDING":
            model.prune(sid)
        trainer.train_step()

    TIMES.clear()
    return run_env_steps(steps, step)


def mode_batched(steps: int) -> float:
    import sys

    sys.path.insert(0, os.path.dirname(__file__))
    from bench_batched import _actions
    from esper.actions import FactoredAction
    from esper.env import VectorMorphogenesisEnv

    vec = VectorMorphogenesisEnv(16, seed=0, task="digits", batched=True)
    vec.reset()
    vec.step([FactoredAction.wait()] * 16)
    TIMES.clear()
    return run_env_steps(steps, lambda t: vec.step(_actions(vec, "seeds", t)))


MODES = {"wait": mode_wait, "growth": mode_growth, "sampled": mode_sampled, "batched": mode_batched}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--quick", action="store_true", help="wait and growth, 2 steps")
    args = parser.parse_args(argv)
    if args.quick:
        args.modes, args.steps = "wait,growth", 2
    torch.set_num_threads(1)
    instrument()
    for mode in args.modes.split(","):
        # cold: the first run in this process; warm: the same run again (per-piece FLOP
        # counts are kept per process, as over a training run's episodes).
        for when in ("cold", "warm"):
            load = os.getloadavg()[0]
            seconds = MODES[mode](args.steps)
            shares = {k: f"{100 * v / seconds:.2f} %" for k, v in sorted(TIMES.items())}
            print(
                f"{mode} ({when}): {args.steps} steps, {1000 * seconds / args.steps:.0f} "
                f"ms/step, shares {shares}, load {load:.2f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
