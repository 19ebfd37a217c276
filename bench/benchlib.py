"""Helpers shared by the benchmark scripts: output files, tables, machine line, timing,
and cached PPO training runs.

Scripts import it as ``benchlib`` (a script's own folder is first on ``sys.path``).
Everything a script writes goes under ``bench/out/`` (git-ignored; ``$ESPER_BENCH_OUT``
overrides it).
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from esper.env.rewards import RewardConfig
from esper.experiment import EpisodeRecord
from esper.rl import PPOConfig
from esper.run import evaluate, train
from esper.run_config import MAIN_JOB_PPO, RunConfig, load_config, replace_section

OUT = Path(__file__).resolve().parent / "out"


def out_dir(sub: str | None = None) -> Path:
    """``bench/out`` (or ``$ESPER_BENCH_OUT``, which the tests point at a temp folder)."""
    root = Path(os.environ.get("ESPER_BENCH_OUT", OUT))
    path = root if sub is None else root / sub
    path.mkdir(parents=True, exist_ok=True)
    return path


def machine() -> str:
    """One line naming the CPU, core count, torch build and thread count."""
    model = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (
        f"{model}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"torch threads {torch.get_num_threads()}, OMP_NUM_THREADS="
        f"{os.environ.get('OMP_NUM_THREADS', 'unset')}"
    )


def set_threads(threads: int) -> None:
    """Timing runs use one intra-op thread (the machine is shared; see BENCHMARKS.md)."""
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    torch.set_num_threads(threads)


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    values = [float(v) for v in values]
    if not values:
        raise ValueError("mean_std of no values")
    return statistics.fmean(values), statistics.pstdev(values) if len(values) > 1 else 0.0


def pm(values: Sequence[float], digits: int = 3) -> str:
    m, s = mean_std(values)
    return f"{m:.{digits}f} ± {s:.{digits}f}"


def markdown_table(rows: list[dict[str, Any]], columns: Sequence[str] | None = None) -> str:
    """A GitHub markdown table (also readable in a terminal)."""
    if not rows:
        return "(no rows)"
    columns = list(columns or rows[0])
    cells = [[_cell(row.get(c, "")) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    lines = [
        "| " + " | ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)) + " |",
        "|" + "|".join("-" * (w + 2) for w in widths) + "|",
    ]
    lines += [
        "| " + " | ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) + " |" for r in cells
    ]
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def write_csv(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    return path


def report(name: str, title: str, rows: list[dict[str, Any]], columns=None, note: str = "") -> str:
    """Print a titled markdown table and save it as ``out/<name>.md`` and ``.csv``."""
    text = f"### {title}\n\n{markdown_table(rows, columns)}\n"
    if note:
        text += f"\n{note}\n"
    print(text, flush=True)
    out = out_dir()
    (out / f"{name}.md").write_text(text, encoding="utf-8")
    write_csv(out / f"{name}.csv", rows)
    return text


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend (imported on use: it is slow)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, name: str) -> Path:
    """Save a small PNG as ``out/<name>.png`` and close the figure."""
    path = out_dir() / f"{name}.png"
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    fig.clf()
    return path


def sgd_step_timer(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> Callable[[], float]:
    """A timed training batch of ``model`` on (x, y): zero_grad, task loss, backward and a
    momentum-SGD step (lr 0.05, momentum 0.9); each call returns its seconds."""
    from esper.training.objective import task_loss

    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)

    def step() -> float:
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        task_loss(model(x), y).backward()
        optimizer.step()
        return time.perf_counter() - start

    return step


def best_of(fn: Callable[[], object], repeats: int) -> float:
    """Fastest of ``repeats`` calls after one warm-up call (seconds)."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


# -- runs -----------------------------------------------------------------------------


def run_config(
    task: str,
    *,
    controller: str = "ppo",
    task_options: dict[str, Any] | None = None,
    env: dict[str, Any] | None = None,
    envs: int = 4,
    episodes: int = 64,
    seed: int = 0,
) -> RunConfig:
    return load_config(
        None,
        {
            "run": {
                "controller": controller,
                "task": task,
                "envs": envs,
                "episodes": episodes,
                "seed": seed,
                "checkpoint_every": 1000,
            },
            "task": dict(task_options or {}),
            # The benches' recorded figures were taken at a fixed λ and PPOConfig's own
            # settings: pin them against `esper train`'s defaults (a λ range, MAIN_JOB_PPO).
            "env": {"growth_penalty": RewardConfig().growth_penalty, **(env or {})},
            "ppo": {k: getattr(PPOConfig(), k) for k in MAIN_JOB_PPO},
        },
    )


def train_ppo(
    config: RunConfig, name: str, log: Callable[[str], None] = print
) -> tuple[Path, float]:
    """Train a PPO controller into ``out/runs/<name>-<config hash>``; returns (checkpoint,
    seconds).

    A finished run with the identical resolved config is reused (its recorded training
    time is returned), so scripts that need the same policy (growth quality and slot
    transfer) train it once. The hash keeps runs of different configs (or of a config
    whose defaults changed with the code) apart, so a retrain never overwrites a run
    another script may be reading. Delete ``bench/out/runs`` to retrain.
    """
    toml = config.to_toml()
    digest = hashlib.sha256(toml.encode()).hexdigest()[:8]
    run_dir = out_dir("runs") / f"{name}-{digest}"
    marker = run_dir / "bench_done.json"
    checkpoint = run_dir / "checkpoints" / "last.pt"
    if marker.is_file() and checkpoint.is_file():
        done = json.loads(marker.read_text(encoding="utf-8"))
        if done.get("config") == toml:
            log(f"reusing PPO run {run_dir} (trained in {done['seconds']:.0f} s)")
            return checkpoint, float(done["seconds"])
    log(
        f"training PPO {name}: {config.run.envs} envs x {config.run.updates} updates "
        f"({config.run.updates * config.run.envs} episodes) on {config.run.task}"
    )
    start = time.perf_counter()
    train(config, run_dir, force=True)
    seconds = time.perf_counter() - start
    marker.write_text(json.dumps({"config": toml, "seconds": seconds}), encoding="utf-8")
    log(f"trained {name} in {seconds:.0f} s")
    return checkpoint, seconds


def evaluate_on_seeds(
    config: RunConfig,
    episodes: int,
    controller: str,
    checkpoint: Path | None = None,
    deterministic: bool = True,
) -> list[EpisodeRecord]:
    """``episodes`` evaluation episodes in one lockstep round: env ``i`` always gets
    evaluation seed ``episode_seed(seed, i, 0, evaluation=True)``, whatever the
    controller, so every controller sees the same host inits and data orders.
    ``deterministic`` (PPO only): argmax actions, else sampled ones."""
    cfg = replace_section(config, "run", controller=controller, envs=episodes)
    if controller == "ppo" and checkpoint is None:
        raise ValueError("evaluating controller 'ppo' needs a checkpoint")
    return evaluate(
        cfg,
        checkpoint=checkpoint if controller == "ppo" else None,
        episodes=episodes,
        deterministic=deterministic,
    )
