"""The text part of the Pareto protocol (issue 12), run by `bench_pareto.py --tasks text`.

A character-level transformer on the KJV text: a 2-block host grown to 4 blocks by the
always-grow schedule (one whole-block seed in each of its 2 slots, germinated from step
``grow_at`` on), against static 2- and 4-block models on the same seeds (paired: same
init seed and data order). Every run records validation loss and cumulative training
FLOPs per step. Reported, per seed and as mean ± std:

* equal steps: validation loss of the three after the static 4-block model's ``steps``;
* equal FLOPs: the static models' loss interpolated at the FLOPs the grown model used
  in those steps;
* compute to reach: the FLOPs the grown model needs to first reach the static 4-block
  model's final validation loss, as a fraction of the static model's (goal ≤ 80 %).
"""

from __future__ import annotations

import shutil
import statistics
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import benchlib
from esper.env import EnvConfig, MorphogenesisEnv
from esper.experiment import episode_seed
from esper.policy import AlwaysGrowController, StaticController
from esper.training import datasets
from paretolib import blueprint_index, play

# The whole decoder-layer seed; the transformer MLP seed stands in where it is missing.
BLOCK_BLUEPRINTS = ("layer", "mlp")
KJV_HINT = (
    "install the Debian KJV (`sudo apt-get install bible-kjv`) and export it: "
    "`bible -f gen1:1-rev22:21 > kjv.txt`, then pass --text-path kjv.txt"
)


@dataclass(frozen=True)
class TextSetup:
    options: dict  # `text` task options and TrainConfig overrides
    batches_per_step: int
    steps: int  # steps of the static 4-block model (the reference budget)
    grow_at: int  # first step at which the schedule may germinate
    flops_limit: float = 1.5  # the grown run stops past this multiple of the static FLOPs


def text_setup(quick: bool) -> TextSetup:
    if quick:
        options = {"d_model": 16, "n_heads": 2, "seq_len": 16, "batch_size": 8,
                   "max_chars": 20_000, "max_val_sequences": 16}  # fmt: skip
        return TextSetup(options, batches_per_step=2, steps=4, grow_at=1)
    options = {"d_model": 64, "n_heads": 4, "seq_len": 64, "batch_size": 32,
               "max_chars": 1_000_000, "max_val_sequences": 128}  # fmt: skip
    return TextSetup(options, batches_per_step=20, steps=30, grow_at=10)


def text_path(args) -> Path | None:
    """``--text-path``, else the KJV exported into bench/out (made once with `bible`)."""
    if args.text_path is not None:
        return Path(args.text_path)
    path = benchlib.out_dir() / "kjv.txt"
    if path.is_file() and path.stat().st_size > 0:
        return path
    bible = shutil.which("bible")
    if bible is None:
        return None
    text = subprocess.run([bible, "-f", "gen1:1-rev22:21"], capture_output=True, check=True)
    path.write_bytes(text.stdout)
    return path


def config(setup: TextSetup, path: Path, layers: int, steps: int) -> EnvConfig:
    return EnvConfig(
        task="text",
        task_options={**setup.options, "path": str(path), "n_layers": layers},
        max_epochs=steps,
        batches_per_step=setup.batches_per_step,
    )


def run(args, publish) -> dict | None:
    setup = text_setup(args.quick)
    path = text_path(args)
    if path is None:
        print(f"skipping text: no text file. {KJV_HINT}", flush=True)
        return None
    try:
        small = MorphogenesisEnv(config(setup, path, 2, 2 * setup.steps))
    except datasets.DataError as err:
        print(f"skipping text: {err}", flush=True)
        return None
    large = MorphogenesisEnv(config(setup, path, 4, setup.steps), data=small.data)
    blueprint = blueprint_index(small.action_spec.blueprints, BLOCK_BLUEPRINTS)
    blueprint_name = small.action_spec.blueprints[blueprint]
    seeds = [episode_seed(0, i, 0, evaluation=True) for i in range(args.text_seeds)]
    print(f"== text: {path} ({small.data.n_train} training windows), blueprint "
          f"{blueprint_name!r}, {len(seeds)} seeds", flush=True)  # fmt: skip
    runs: dict[str, list[dict]] = {"static-2": [], "static-4": [], "grown 2→4": []}
    for seed in seeds:
        start = time.perf_counter()
        s4 = play(large, StaticController(), seed)
        s2 = play(small, StaticController(), seed)
        grow = AlwaysGrowController(blueprint, start=setup.grow_at)
        grown = play(small, grow, seed, flops_limit=setup.flops_limit * s4["train_flops"])
        for name, row in zip(runs, (s2, s4, grown), strict=True):
            runs[name].append(row)
        print(f"  seed {seed}: final val loss static-2 {s2['val_loss']:.3f}, static-4 "
              f"{s4['val_loss']:.3f}, grown {grown['val_loss']:.3f} "
              f"({time.perf_counter() - start:.0f} s)", flush=True)  # fmt: skip
    rows = [compare(s2, s4, g, setup.steps) for s2, s4, g in zip(*runs.values(), strict=True)]
    table = summary_table(rows)
    note = (
        f"{len(seeds)} seeds (paired); d_model {setup.options['d_model']}, seq_len "
        f"{setup.options['seq_len']}, batch {setup.options['batch_size']}, "
        f"{setup.batches_per_step} batches per step, {setup.steps} steps for static-4 "
        f"(static-2 runs {2 * setup.steps}); grown: always-grow schedule planting "
        f"{blueprint_name!r} seeds from step {setup.grow_at}, stopped at "
        f"{setup.flops_limit}x the static-4 FLOPs; "
        f"germinated/fossilized/pruned per grown run "
        f"{_mean(runs['grown 2→4'], 'germinated'):.1f}/"
        f"{_mean(runs['grown 2→4'], 'fossilized'):.1f}/"
        f"{_mean(runs['grown 2→4'], 'pruned'):.1f}; governor rollbacks (all seeds) "
        + ", ".join(f"{k} {sum(r['rollbacks'] for r in v)}" for k, v in runs.items())
        + f"; params static-2 "
        f"{runs['static-2'][0]['params']}, static-4 {runs['static-4'][0]['params']}, grown "
        f"{_mean(runs['grown 2→4'], 'params'):.0f}. FLOPs: the env's counter (training, "
        f"validation and counterfactual passes). Machine: {benchlib.machine()}."
    )
    suffix = "_quick" if args.quick else ""
    benchlib.report(f"pareto_text{suffix}", "Growth that pays: text (2 → 4 blocks)", table,
                    note=note)  # fmt: skip
    benchlib.write_csv(benchlib.out_dir() / f"pareto_text{suffix}_seeds.csv", rows)
    curves = [
        {"run": name, "seed_index": i, "step": s, "val_loss": v, "train_flops": f}
        for name, items in runs.items()
        for i, row in enumerate(items)
        for s, v, _, f in row["curve"]
    ]
    benchlib.write_csv(benchlib.out_dir() / f"pareto_text{suffix}_curves.csv", curves)
    publish(plot(runs, setup, blueprint_name, suffix), args)
    return {"rows": rows, "table": table}


def _mean(rows: list[dict], key: str) -> float:
    return statistics.fmean(float(r[key]) for r in rows)


def loss_at(curve, flops: float) -> float | None:
    """Validation loss at ``flops`` (linear between steps); None past the curve's end."""
    prev = (0.0, None)
    for _, loss, _, f in curve:
        if f >= flops:
            if prev[1] is None:
                return loss
            t = (flops - prev[0]) / (f - prev[0])
            return prev[1] + t * (loss - prev[1])
        prev = (f, loss)
    return None


def compare(s2: dict, s4: dict, grown: dict, steps: int) -> dict:
    target, budget = s4["val_loss"], s4["train_flops"]
    at = min(steps, len(grown["curve"])) - 1
    grown_flops = grown["curve"][at][3]
    reached = next((f for _, v, _, f in grown["curve"] if v <= target), None)
    # The same measure for the model that never grows: growth only pays if it beats this.
    small = next((f for _, v, _, f in s2["curve"] if v <= target), None)
    return {
        "static-4 loss": target,
        "static-2 loss @steps": s2["curve"][steps - 1][1],
        "grown loss @steps": grown["curve"][at][1],
        "grown FLOPs @steps / static-4": grown_flops / budget,
        "static-2 loss @grown FLOPs": loss_at(s2["curve"], grown_flops),
        "static-4 loss @grown FLOPs": loss_at(s4["curve"], grown_flops),
        "FLOPs to reach static-4 loss / static-4": None if reached is None else reached / budget,
        "static-2 FLOPs to reach static-4 loss / static-4": (
            None if small is None else small / budget
        ),
        "grown FLOPs run / static-4": grown["curve"][-1][3] / budget,
        "static-4 GFLOPs": budget / 1e9,
    }


def summary_table(rows: list[dict]) -> list[dict]:
    table = []
    for key in rows[0]:
        values = [r[key] for r in rows if r[key] is not None]
        missing = len(rows) - len(values)
        cell = benchlib.pm(values) if values else "—"
        if missing:  # a loss never reached, or FLOPs beyond the end of the other run
            what = "not reached" if "to reach" in key else "beyond the other run's FLOPs"
            cell += f" ({missing} of {len(rows)} seeds: {what})"
        table.append({"measure": key, "mean ± std over seeds": cell})
    return table


def plot(runs: dict[str, list[dict]], setup: TextSetup, blueprint: str, suffix: str) -> Path:
    plt = benchlib.pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for name, items in runs.items():
        n = min(len(r["curve"]) for r in items)
        steps = [items[0]["curve"][k][0] for k in range(n)]
        loss = [statistics.fmean(r["curve"][k][1] for r in items) for k in range(n)]
        tflops = [statistics.fmean(r["curve"][k][3] for r in items) / 1e12 for k in range(n)]
        axes[0].plot(steps, loss, label=name)
        axes[1].plot(tflops, loss, label=name)
    target = _mean(runs["static-4"], "val_loss")
    low = min(_mean(r, "val_loss") for r in runs.values())
    for ax in axes:
        ax.axhline(target, color="grey", linestyle=":", linewidth=1,
                   label="static-4 final loss")  # fmt: skip
        ax.set_ylabel("validation loss (nats/char)", fontsize=9)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
        ax.set_ylim(low - 0.1, low + 1.0)
    axes[0].axvline(setup.grow_at, color="grey", linestyle="--", linewidth=1,
                    label=f"{blueprint!r} seeds planted from here")  # fmt: skip
    axes[0].set_xlabel(f"step ({setup.batches_per_step} batches each)", fontsize=9)
    axes[1].set_xlabel("cumulative training TFLOPs (training, validation, counterfactuals)",
                       fontsize=9)  # fmt: skip
    axes[0].legend(fontsize=8)
    fig.suptitle(f"text (KJV, char level): 2 → 4 blocks vs static, mean of "
                 f"{len(runs['static-4'])} paired seeds", fontsize=10)  # fmt: skip
    fig.tight_layout()
    path = benchlib.out_dir() / f"pareto_text{suffix}.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
