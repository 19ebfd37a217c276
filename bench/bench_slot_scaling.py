"""Scaling in slots: the per-step cost of the controller's inputs and decision for S slots.

A digits-shaped CNN host (1x8x8 inputs, width 1, depth S: widths 1, 2, 4, 8, 8, ...
with pooling only while the map is >= 4x4, so deep blocks run on 2x2 maps) carries a
HOLDING seed in every slot, the worst case for crediting. For S in {1, 8, 32, 64}:

  masks            `stage_tensors` of every slot + `compute_batch_masks` (one env)
  observation      `build_observation` from the model's slot states
  policy           `PPOAgent.act` for one env (normaliser, network, sampling)
  counterfactuals  `fast_counterfactuals`: live validation + one variant per seed (exact)
  sampled m        the sampled mode (`TrainConfig.credit_samples=m`): live validation +
                   m seeds drawn at random; the cost depends on which slots are drawn
                   (a seed early in the host re-runs more blocks), so it is the mean
                   over 16 fixed draws of the best of N/4 runs of each
  validation       one plain validation pass (the reference the env pays anyway)

on 360 validation images (the digits split size). Best of N after a warm-up. The FLOP
ratios (`esper.training.flops.count_flops`, sampled: mean over the same draws) do not
depend on the machine's load.

With ``--trainer``, also `Trainer.validate` itself (FLOP bookkeeping included) with
``credit_samples=m`` against its plain validation, at the largest S: the mean over the
first 4S/m calls after a structure change (each newly drawn seed's FLOPs are counted once
on one row) and the best call once every seed's count is known.

    OMP_NUM_THREADS=1 python bench/bench_slot_scaling.py           # S in {1, 8, 32, 64}
    python bench/bench_slot_scaling.py --quick
"""

from __future__ import annotations

import argparse
import os
import statistics
from functools import partial

import torch

import benchlib
from bench_counterfactual import grow
from esper.env import GLOBAL_DIM, SLOT_DIM, compute_batch_masks
from esper.env.masks import blueprint_cost_table, stage_tensors
from esper.env.observations import TrainingProgress, build_observation
from esper.model import CNNHost, blueprints_for
from esper.rl import PPOAgent
from esper.training import fast_counterfactuals, variants_to_measure
from esper.training.counterfactual import sample_variants
from esper.training.flops import count_flops
from esper.training.objective import evaluate

VAL_IMAGES = 360
DRAWS = 16


def credit_costs(model, x, y, samples: list[int], repeats: int) -> dict[str, float]:
    """Seconds and FLOPs (as multiples of a plain validation pass) of exact and sampled
    credit; sampled: mean over DRAWS fixed random subsets of ``m`` seeds."""
    variants = variants_to_measure(model)

    def credit(subset):
        return partial(fast_counterfactuals, model, x, y, "classification", subset, 1024)

    _, plain_flops = count_flops(partial(evaluate, model, x, y, 1024))
    _, exact_flops = count_flops(credit(variants))
    out = {"exact flops x": exact_flops / plain_flops}
    for m in samples:
        gen = torch.Generator().manual_seed(m)
        subsets = [sample_variants(variants, m, gen)[0] for _ in range(DRAWS)]
        out[f"sampled {m}"] = statistics.mean(
            benchlib.best_of(credit(s), max(2, repeats // 4)) for s in subsets
        )
        out[f"sampled {m} flops x"] = (
            statistics.mean(count_flops(credit(s))[1] for s in subsets) / plain_flops
        )
    return out


def trainer_costs(model, num_slots: int, m: int, repeats: int) -> dict[str, float]:
    """`Trainer.validate` with sampled credit vs without credit (seconds)."""
    import dataclasses
    import time

    from esper.training import Trainer, get_task

    task = get_task("synthetic", shape=(1, 8, 8), n_train=64, n_val=VAL_IMAGES)
    trainer = Trainer(model, task.make_data(), dataclasses.replace(task.hparams, credit_samples=m))
    with torch.no_grad():
        plain = benchlib.best_of(partial(trainer.validate, with_counterfactuals=False), repeats)
        trainer.validate(with_counterfactuals=False)
        times = []
        for _ in range(4 * num_slots // m):
            start = time.perf_counter()
            trainer.validate()
            times.append(time.perf_counter() - start)
        steady = benchlib.best_of(trainer.validate, repeats)
    return {"plain": plain, "first": statistics.mean(times), "steady": steady}


def costs(
    num_slots: int, repeats: int, samples: list[int], trainer: bool = False
) -> dict[str, float]:
    torch.manual_seed(0)
    host = CNNHost(1, 10, width=1, depth=num_slots, image_size=8)
    host_params = sum(p.numel() for p in host.parameters())
    model = grow(host, [f"r0c{i}" for i in range(num_slots)])
    blueprints = blueprints_for(model.topology)
    table = blueprint_cost_table(model.slot_config, blueprints, model=model)
    x, y = torch.rand(VAL_IMAGES, 1, 8, 8), torch.randint(0, 10, (VAL_IMAGES,))
    agent = PPOAgent(model.slot_config, GLOBAL_DIM, SLOT_DIM, blueprints)
    progress = TrainingProgress(5, 20, 0.5, 0.6, 0.8, 0.75, growth=0.1)

    def masks():
        stages, contributions = stage_tensors(model.slot_states())
        return compute_batch_masks(
            stages[None], contributions[None], table, torch.tensor([1e9], dtype=torch.float64)
        )

    def observation():
        return build_observation(
            progress, model.slot_states(), host_params=host_params, blueprints=blueprints
        )

    obs = {k: v[None] for k, v in observation().items()}
    batch_masks, hidden = masks(), agent.initial_hidden(1)

    def policy():
        return agent.act(obs, batch_masks, hidden, update_normalizer=False)

    variants = variants_to_measure(model)
    with torch.no_grad():
        fns = {
            "masks": masks,
            "observation": observation,
            "policy": policy,
            "counterfactuals": partial(
                fast_counterfactuals, model, x, y, "classification", variants, 1024
            ),
            "validation": partial(evaluate, model, x, y, 1024),
        }
        timed = {name: benchlib.best_of(fn, repeats) for name, fn in fns.items()}
        out = {**timed, **credit_costs(model, x, y, samples, repeats)}
    if trainer:
        for m in samples:
            tc = trainer_costs(model, num_slots, m, repeats)
            print(
                f"S={num_slots} Trainer.validate, credit_samples={m}: plain "
                f"{1e3 * tc['plain']:.1f} ms; mean of the first {4 * num_slots // m} calls "
                f"{1e3 * tc['first']:.1f} ms ({tc['first'] / tc['plain']:.2f}x); steady "
                f"{1e3 * tc['steady']:.1f} ms ({tc['steady'] / tc['plain']:.2f}x)",
                flush=True,
            )
    return out


def plot(measured: dict[int, dict[str, float]], name: str) -> None:
    plt = benchlib.pyplot()
    fig, ax = plt.subplots(figsize=(4.5, 2.8))
    slots = sorted(measured)
    for part in ("masks", "observation", "policy", "counterfactuals", "validation"):
        ax.plot(slots, [measured[s][part] for s in slots], "o-", label=part)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("slots (every one holding a seed)")
    ax.set_ylabel("ms per step (one env)")
    ax.legend(fontsize=7)
    benchlib.save_figure(fig, name)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slots", default="1,8,32,64")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--samples", default="4", help="credit_samples m of the sampled mode")
    parser.add_argument("--quick", action="store_true", help="S in {1, 8}, 2 repeats")
    parser.add_argument("--trainer", action="store_true", help="Trainer.validate at the largest S")
    args = parser.parse_args(argv)
    benchlib.set_threads(args.threads)
    if args.quick:
        args.slots, args.repeats = "1,8", 2
    print(f"machine: {benchlib.machine()}", flush=True)
    samples = [int(m) for m in args.samples.split(",")]
    load_before = os.getloadavg()[0]
    rows, measured = [], {}
    slots = [int(s) for s in args.slots.split(",")]
    for num_slots in slots:
        raw = costs(num_slots, args.repeats, samples, args.trainer and num_slots == max(slots))
        ms = {k: v if k.endswith("flops x") else 1e3 * v for k, v in raw.items()}
        measured[num_slots] = ms
        controller = ms["masks"] + ms["observation"] + ms["policy"]
        rows.append(
            {
                "slots": num_slots,
                "masks ms": f"{ms['masks']:.3f}",
                "observation ms": f"{ms['observation']:.3f}",
                "policy ms": f"{ms['policy']:.2f}",
                "masks+obs+policy ms": f"{controller:.2f}",
                "counterfactuals ms": f"{ms['counterfactuals']:.1f}",
                "validation ms": f"{ms['validation']:.1f}",
                "cf / validation": f"{ms['counterfactuals'] / ms['validation']:.1f}x",
                "cf FLOPs / validation": f"{ms['exact flops x']:.1f}x",
                **{
                    k: v
                    for m in samples
                    for k, v in (
                        (f"sampled m={m} ms", f"{ms[f'sampled {m}']:.1f}"),
                        (
                            f"sampled m={m} / validation",
                            f"{ms[f'sampled {m}'] / ms['validation']:.2f}x",
                        ),
                        (f"sampled m={m} FLOPs / validation", f"{ms[f'sampled {m} flops x']:.2f}x"),
                    )
                },
            }
        )
    plot(measured, f"slot_scaling{'_quick' if args.quick else ''}")
    benchlib.report(
        f"slot_scaling{'_quick' if args.quick else ''}",
        "Per-step cost vs number of slots (one env, every slot holding a seed)",
        rows,
        note=f"best of {args.repeats} after a warm-up; {VAL_IMAGES} validation images; "
        f"sampled: mean over {DRAWS} draws of the best of {max(2, args.repeats // 4)}; "
        f"1-minute load average {load_before:.2f} before, {os.getloadavg()[0]:.2f} after.",
    )


if __name__ == "__main__":
    main()
