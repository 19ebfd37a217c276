"""Build a run's report from its ``events.jsonl``: PNG plots and ``summary.md``."""

from __future__ import annotations

from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from esper.actions import LifecycleOp
from esper.lifecycle import SeedStage
from esper.telemetry.sinks import read_events

OPS = [op.name for op in LifecycleOp]
STAGES = [stage.name for stage in SeedStage]
STAGE_COLOURS = [
    "#f0f0f0",  # DORMANT
    "#c6dbef",  # GERMINATED
    "#6baed6",  # TRAINING
    "#fd8d3c",  # BLENDING
    "#fdd0a2",  # HOLDING
    "#31a354",  # FOSSILIZED
    "#de2d26",  # PRUNED
    "#969696",  # EMBARGOED
]


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _rolling(values: list[float], window: int) -> np.ndarray:
    """Trailing mean over ``window`` points (over all points so far at the start)."""
    v = np.asarray(values, dtype=float)
    if len(v) == 0:
        return v
    window = max(1, min(window, len(v)))
    sums = np.cumsum(np.concatenate([[0.0], v]))
    ends = np.arange(1, len(v) + 1)
    starts = np.maximum(ends - window, 0)
    return (sums[ends] - sums[starts]) / (ends - starts)


def plot_learning_curves(episodes: list[dict], path: Path) -> None:
    plt = _plt()
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    order = list(range(len(episodes)))
    for ax, key, label in zip(
        axes,
        ("quality", "episode_return", "objective"),
        ("final validation quality", "episode return", "objective (quality − λ·growth)"),
        strict=True,
    ):
        values = [e[key] for e in episodes]
        ax.plot(order, values, ".", alpha=0.35, label="episodes")
        ax.plot(order, _rolling(values, max(3, len(values) // 10)), "-", label="rolling mean")
        ax.set_xlabel("finished episode")
        ax.set_title(label)
        ax.grid(alpha=0.3)
    axes[0].legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_lifecycle(steps: list[dict], slot_ids: list[str], path: Path, max_envs: int = 8) -> None:
    """Stage of every slot over the last recorded episode of each env."""
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    plt = _plt()
    last: dict[int, int] = {}
    for s in steps:
        last[s["env"]] = max(last.get(s["env"], -1), s["episode"])
    envs = sorted(last)[:max_envs]
    fig, axes = plt.subplots(
        len(envs), 1, figsize=(10, 0.5 + 0.35 * len(slot_ids) * len(envs) + 0.6), squeeze=False
    )
    cmap = ListedColormap(STAGE_COLOURS)
    for ax, env in zip(axes[:, 0], envs, strict=True):
        rows = sorted(
            (s for s in steps if s["env"] == env and s["episode"] == last[env]),
            key=lambda s: s["step"],
        )
        grid = np.array([[STAGES.index(x) for x in s["stages"]] for s in rows]).T
        ax.imshow(
            grid, aspect="auto", cmap=cmap, vmin=0, vmax=len(STAGES) - 1, interpolation="nearest"
        )
        ax.set_yticks(range(len(slot_ids)), slot_ids, fontsize=7)
        ax.set_ylabel(f"env {env}\nep {last[env]}", fontsize=8)
        ax.set_xlabel("step")
    handles = [Patch(color=c, label=n) for c, n in zip(STAGE_COLOURS, STAGES, strict=True)]
    fig.legend(handles=handles, loc="upper center", ncol=8, fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_action_mix(steps: list[dict], path: Path, bins: int = 20) -> None:
    plt = _plt()
    episodes = sorted({(s["episode"]) for s in steps})
    edges = np.linspace(0, len(episodes), min(bins, len(episodes)) + 1).astype(int)
    index = {ep: i for i, ep in enumerate(episodes)}
    counts = np.zeros((len(edges) - 1, len(OPS)))
    for s in steps:
        b = min(np.searchsorted(edges, index[s["episode"]], side="right") - 1, len(counts) - 1)
        counts[b, OPS.index(s["op"])] += 1
    share = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(8, 3.5))
    bottom = np.zeros(len(share))
    for j, op in enumerate(OPS):
        ax.bar(range(len(share)), share[:, j], bottom=bottom, label=op)
        bottom += share[:, j]
    ax.set_xlabel("episode bin (time →)")
    ax.set_ylabel("share of decisions")
    ax.set_title("action mix")
    ax.legend(ncol=4, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_ppo(updates: list[dict], path: Path) -> None:
    plt = _plt()
    keys = sorted({k for u in updates for k in u["diagnostics"]})
    cols = 3
    rows = max(1, -(-len(keys) // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(12, 2.6 * rows), squeeze=False)
    x = [u["update"] for u in updates]
    for ax, key in zip(axes.ravel(), keys, strict=False):
        ax.plot(x, [u["diagnostics"].get(key, np.nan) for u in updates], ".-")
        ax.set_title(key, fontsize=9)
        ax.grid(alpha=0.3)
    for ax in axes.ravel()[len(keys) :]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _summary(run: dict, episodes: list[dict], counts: Counter, plots: list[str]) -> str:
    tail = episodes[-max(1, len(episodes) // 5) :] if episodes else []

    def mean(key: str) -> str:
        if not tail:
            return "n/a"
        v = np.array([e[key] for e in tail], dtype=float)
        return f"{v.mean():.4f} ± {v.std():.4f}"

    lines = [
        f"# Run `{run.get('run_name', '?')}`",
        "",
        f"- controller: **{run.get('controller', '?')}**, task: **{run.get('task', '?')}**",
        f"- slots: {' '.join(run.get('slot_ids', []))}; envs: {run.get('num_envs', '?')}; "
        f"seed: {run.get('seed', '?')}",
        f"- finished episodes: {len(episodes)}; PPO updates: {counts.get('ppo_update', 0)}",
        "",
        f"## Final table (last {len(tail)} episodes, mean ± std)",
        "",
        "| metric | value |",
        "|---|---|",
    ]
    for key in ("quality", "growth", "objective", "episode_return", "params_added"):
        lines.append(f"| {key} | {mean(key)} |")
    total = Counter()
    for e in episodes:
        for key in ("germinated", "fossilized", "pruned", "illegal", "rollbacks"):
            total[key] += e[key]
    lines += ["", "| events over the run | count |", "|---|---|"]
    lines += [f"| {k} | {total[k]} |" for k in ("germinated", "fossilized", "pruned")]
    lines += [f"| illegal actions run as WAIT | {total['illegal']} |"]
    lines += [f"| governor rollbacks | {total['rollbacks']} |", ""]
    lines += ["## Plots", ""] + [f"![{p}]({p})" for p in plots] + [""]
    return "\n".join(lines)


def build_report(run_dir: str | Path) -> list[Path]:
    """Write the plots and ``summary.md`` into ``run_dir``; return the files written."""
    run_dir = Path(run_dir)
    events_path = run_dir / "events.jsonl"
    if not events_path.is_file():
        raise FileNotFoundError(f"{str(run_dir)!r} is not a run directory (no events.jsonl)")
    records = read_events(events_path)
    by_kind: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        by_kind[r["kind"]].append(r)
    run = by_kind["run_started"][-1] if by_kind["run_started"] else {}
    counts = Counter({k: len(v) for k, v in by_kind.items()})
    episodes = by_kind["episode_ended"]
    steps = by_kind["episode_step"]
    written: list[Path] = []
    if episodes:
        plot_learning_curves(episodes, run_dir / "learning_curves.png")
        written.append(run_dir / "learning_curves.png")
    if steps:
        plot_lifecycle(steps, run.get("slot_ids") or [], run_dir / "lifecycle.png")
        plot_action_mix(steps, run_dir / "action_mix.png")
        written += [run_dir / "lifecycle.png", run_dir / "action_mix.png"]
    if by_kind["ppo_update"]:
        plot_ppo(by_kind["ppo_update"], run_dir / "ppo.png")
        written.append(run_dir / "ppo.png")
    summary = run_dir / "summary.md"
    summary.write_text(_summary(run, episodes, counts, [p.name for p in written]))
    return [*written, summary]
