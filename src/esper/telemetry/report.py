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


def rolling_window(n: int) -> int:
    """The learning curves' rolling-mean window for ``n`` episodes (stated on the plot)."""
    return max(3, n // 10)


def plot_learning_curves(episodes: list[dict], path: Path, baseline: list[dict] = ()) -> None:
    """Every finished episode, a trailing rolling mean and, when the run played one, the
    static host on round 0's seeds as a dashed line."""
    from matplotlib.ticker import MaxNLocator

    plt = _plt()
    fig, axes = plt.subplots(1, 3, figsize=(13, 4.0))
    order = list(range(len(episodes)))
    window = rolling_window(len(episodes))
    for ax, key, label in zip(
        axes,
        ("quality", "episode_return", "objective"),
        ("final validation quality", "episode return", "objective (quality − λ·growth)"),
        strict=True,
    ):
        values = [e[key] for e in episodes]
        ax.plot(order, values, ".", alpha=0.45, label="one training episode")
        ax.plot(order, _rolling(values, window), "-",
                label=f"rolling mean over the last {window} episodes")  # fmt: skip
        if baseline:
            level = float(np.mean([b[key] for b in baseline]))
            name = f"static host on round 0's seeds (mean of {len(baseline)})"
            ax.axhline(level, color="k", ls="--", lw=1, label=name)
            label += f"\n(static host: {level:.3f})"
        ax.set_xlabel("finished episode (in order)")
        ax.set_ylabel(key)
        ax.set_title(label, fontsize=10)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(handles), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


_MARKERS = {"seed_germinated": ("^", "germinated"), "seed_fossilized": ("*", "fossilized"),
            "seed_pruned": ("x", "pruned")}  # fmt: skip


def plot_lifecycle(
    steps: list[dict],
    slot_ids: list[str],
    path: Path,
    max_envs: int = 8,
    seed_events: list[dict] = (),
) -> None:
    """Stage of every slot after each step of the last recorded episode of each env, with
    a marker at every germination, fossilization and prune (a prune passes PRUNED within
    the step, so the stage colours alone would hide it)."""
    from matplotlib.colors import ListedColormap
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch
    from matplotlib.ticker import MaxNLocator

    plt = _plt()
    last: dict[int, int] = {}
    for s in steps:
        last[s["env"]] = max(last.get(s["env"], -1), s["episode"])
    envs = sorted(last)[:max_envs]
    fig, axes = plt.subplots(
        len(envs), 1, figsize=(10, 1.2 + 0.35 * len(slot_ids) * len(envs) + 0.6), squeeze=False
    )
    cmap = ListedColormap(STAGE_COLOURS)
    seen: set[int] = set()
    marked: set[str] = set()
    for ax, env in zip(axes[:, 0], envs, strict=True):
        rows = sorted(
            (s for s in steps if s["env"] == env and s["episode"] == last[env]),
            key=lambda s: s["step"],
        )
        grid = np.array([[STAGES.index(x) for x in s["stages"]] for s in rows]).T
        seen.update(int(v) for v in np.unique(grid))
        ax.imshow(
            grid, aspect="auto", cmap=cmap, vmin=0, vmax=len(STAGES) - 1, interpolation="nearest"
        )
        for e in seed_events:
            if e["env"] == env and e["episode"] == last[env] and e["kind"] in _MARKERS:
                marker = _MARKERS[e["kind"]][0]
                ax.plot(e["step"], slot_ids.index(e["slot_id"]), marker, color="k", ms=6)
                marked.add(e["kind"])
        ax.set_yticks(range(len(slot_ids)), slot_ids, fontsize=7)
        ax.set_ylabel(f"env {env}\nepisode {last[env]}", fontsize=8)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlim(-0.5, len(rows) - 0.5)
    axes[-1, 0].set_xlabel("step (host epoch) of the episode; colour = stage after the step")
    handles = [Patch(color=STAGE_COLOURS[i], label=STAGES[i]) for i in sorted(seen)]
    handles += [
        Line2D([], [], marker=_MARKERS[k][0], color="k", ls="", label=_MARKERS[k][1])
        for k in _MARKERS
        if k in marked
    ]
    episodes = sorted(set(last[e] for e in envs))
    shown = f"episode {episodes[0]}" if len(episodes) == 1 else f"episodes {episodes}"
    fig.suptitle(f"slot stages in the last recorded {shown} of each env", fontsize=10)
    fig.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, 0.955),
               ncol=min(len(handles), 11), fontsize=7, frameon=False)  # fmt: skip
    fig.tight_layout(rect=(0, 0, 1, 0.9))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_action_mix(steps: list[dict], path: Path, bins: int = 20) -> None:
    """Share of each op among the decisions of consecutive groups of rounds."""
    plt = _plt()
    rounds = sorted({s["episode"] for s in steps})
    per_bin = -(-len(rounds) // min(bins, len(rounds)))
    index = {r: i // per_bin for i, r in enumerate(rounds)}
    nbins = max(index.values()) + 1
    counts = np.zeros((nbins, len(OPS)))
    for s in steps:
        counts[index[s["episode"]], OPS.index(s["op"])] += 1
    share = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(8, 3.6))
    bottom = np.zeros(nbins)
    for j, op in enumerate(OPS):
        ax.bar(range(nbins), share[:, j], bottom=bottom, label=op)
        bottom += share[:, j]
    labels = []
    for b in range(nbins):
        members = [r for r in rounds if index[r] == b]
        labels.append(f"{members[0]}" if len(members) == 1 else f"{members[0]}–{members[-1]}")
    ax.set_xticks(range(nbins), labels, fontsize=7, rotation=45 if nbins > 10 else 0)
    ax.set_xlabel(f"round (each bar: {per_bin} round{'s' if per_bin > 1 else ''}, all envs)")
    ax.set_ylabel("share of decisions")
    ax.set_ylim(0, 1)
    ax.set_title("action mix (executed ops; an illegal action runs as WAIT)", fontsize=10)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# What a PPO user reads, in this order: (title, y label, diagnostics keys).
_PPO_PANELS = [
    ("mean episode return", "return", ["_return"]),
    ("value loss", "loss (normalised targets)", ["value_loss"]),
    ("explained variance", "1 − Var(R − V) / Var(R)", ["explained_variance"]),
    ("approx KL (old ‖ new)", "nats", ["approx_kl"]),
    ("entropy per head (1 = uniform)", "entropy / log(#legal)",
     [f"entropy/{h}" for h in ("op", "slot", "blueprint", "blend")]),
    ("clip fraction", "share of samples clipped", ["clip_frac"]),
]  # fmt: skip


def plot_ppo(updates: list[dict], path: Path, episodes: list[dict] = ()) -> None:
    """PPO diagnostics per update, with the mean return of the episodes each update used."""
    plt = _plt()
    fig = ppo_figure(updates, episodes)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def ppo_figure(updates: list[dict], episodes: list[dict] = ()):
    """The figure of `plot_ppo` (a matplotlib Figure; the caller closes it)."""
    plt = _plt()
    returns: dict[int, list[float]] = defaultdict(list)
    for e in episodes:
        returns[e["episode"]].append(e["episode_return"])
    x = [u["update"] for u in updates]
    fig, axes = plt.subplots(2, 3, figsize=(12, 5.6))
    for ax, (title, ylabel, keys) in zip(axes.ravel(), _PPO_PANELS, strict=True):
        for key in keys:
            if key == "_return":
                y = [np.mean(returns[u["update"]]) if returns[u["update"]] else np.nan
                     for u in updates]  # fmt: skip
            else:
                y = [u["diagnostics"].get(key, np.nan) for u in updates]
            style = "-" if len(keys) == 1 else ["o-", "s--", "^:", "x-."][keys.index(key)]
            ax.plot(x, y, style, ms=4, label=key.split("/")[-1] if len(keys) > 1 else None)
        if len(keys) > 1:
            # Normalised entropies lie in [0, 1]: the band above 1 holds the legend, so
            # it never covers a point (a "best" placement did, wherever the data sat).
            ax.set_ylim(-0.05, 1.35)
            ax.set_yticks(np.linspace(0, 1, 6))
            ax.legend(fontsize=7, loc="upper center", ncol=len(keys), frameon=False,
                      handlelength=1.5, columnspacing=1.0)  # fmt: skip
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("PPO update (round)")
        ax.set_ylabel(ylabel, fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def _mean_std(rows: list[dict], key: str) -> str:
    if not rows:
        return "n/a"
    v = np.array([r[key] for r in rows], dtype=float)
    return f"{v.mean():.4f} ± {v.std():.4f}"


def learning_progress(episodes: list[dict], key: str = "episode_return") -> dict[str, Any] | None:
    """Does the run improve? The mean of ``key`` per round, then the last third of the
    rounds against the first third (whole rounds; the middle third is left out).

    The standard error comes from the rounds' means (Welch: sqrt(s1²/n1 + s3²/n3) with
    sample variances), so round-to-round noise (host seeds, λ draws) is in it. None with
    fewer than 6 rounds (two rounds per third at least, for a variance)."""
    per_round: dict[int, list[float]] = defaultdict(list)
    for e in episodes:
        per_round[int(e["episode"])].append(float(e[key]))
    rounds = sorted(per_round)
    k = len(rounds) // 3
    if k < 2:
        return None
    means = np.array([np.mean(per_round[r]) for r in rounds])
    first, last = means[:k], means[-k:]
    se = float(np.sqrt(first.var(ddof=1) / k + last.var(ddof=1) / k))
    diff = float(last.mean() - first.mean())
    return {
        "rounds": len(rounds),
        "per_third": k,
        "first": float(first.mean()),
        "first_se": float(first.std(ddof=1) / np.sqrt(k)),
        "last": float(last.mean()),
        "last_se": float(last.std(ddof=1) / np.sqrt(k)),
        "diff": diff,
        "se": se,
        "z": diff / se if se > 0 else float("inf") if diff > 0 else 0.0,
    }


def _learning_lines(episodes: list[dict], baseline: list[dict]) -> list[str]:
    progress = learning_progress(episodes)
    if progress is None:
        return []
    p, k = progress, progress["per_third"]
    verdict = "**improves** (by >= 2 SE)" if p["z"] >= 2 else "does not improve by 2 SE"
    lines = [
        "## Learning",
        "",
        f"Mean episode return per round; the last {k} of {p['rounds']} rounds against the "
        f"first {k} (mean of the rounds' means ± SE over rounds):",
        "",
        f"- first third: {p['first']:.4f} ± {p['first_se']:.4f}; last third: "
        f"{p['last']:.4f} ± {p['last_se']:.4f}",
        f"- last − first: **{p['diff']:+.4f} ± {p['se']:.4f}** ({p['z']:+.1f} SE): the run "
        f"{verdict}",
    ]
    obj = learning_progress(episodes, "objective")
    if obj is not None:
        lines.append(
            f"- objective (accuracy − λ·growth): first third {obj['first']:.4f}, last third "
            f"{obj['last']:.4f}, last − first {obj['diff']:+.4f} ± {obj['se']:.4f}"
        )
    if baseline:
        rounds = sorted({int(e["episode"]) for e in episodes})
        tail = [e for e in episodes if int(e["episode"]) >= rounds[-k]]
        b = np.array([e["objective"] for e in baseline], dtype=float)
        t = np.array([e["objective"] for e in tail], dtype=float)
        lines.append(
            f"- static host (round 0's {len(b)} seeds): objective {b.mean():.4f} ± "
            f"{b.std(ddof=1) / np.sqrt(len(b)) if len(b) > 1 else 0.0:.4f} (SE); last third's "
            f"{len(t)} episodes: {t.mean():.4f} ± "
            f"{t.std(ddof=1) / np.sqrt(len(t)) if len(t) > 1 else 0.0:.4f} (other seeds)"
        )
    return [*lines, ""]


def _summary(by_kind: dict[str, list[dict]], plots: list[str]) -> str:
    runs = by_kind["run_started"]
    run = runs[-1] if runs else {}
    episodes, baseline = by_kind["episode_ended"], by_kind["baseline_episode_ended"]
    envs = int(run.get("num_envs") or 1)
    rounds = sorted({e["episode"] for e in episodes})
    last_rounds = rounds[-max(1, len(rounds) // 5) :]  # the last fifth, whole rounds
    tail = [e for e in episodes if e["episode"] >= last_rounds[0]] if episodes else []
    lines = [
        f"# Run `{run.get('run_name', '?')}`",
        "",
        f"- controller: **{run.get('controller', '?')}**, task: **{run.get('task', '?')}**",
        f"- slots: {' '.join(run.get('slot_ids', []))}; envs: {envs}; seed: {run.get('seed', '?')}",
        f"- finished episodes: {len(episodes)} of {run.get('episodes', '?')}; "
        f"PPO updates: {len(by_kind['ppo_update'])}; sessions: {len(runs)}",
        "",
        f"## Final table (the last {len(last_rounds)} of {len(rounds)} rounds: their "
        f"{len(tail)} training episodes, mean ± std)",
        "",
        "| metric | value | static host, round-0 seeds |",
        "|---|---|---|",
    ]
    for key in ("quality", "growth", "objective", "episode_return", "params_added"):
        lines.append(f"| {key} | {_mean_std(tail, key)} | {_mean_std(baseline, key)} |")
    total = Counter()
    for e in episodes:
        for key in ("germinated", "fossilized", "pruned", "illegal", "rollbacks"):
            total[key] += e[key]
    lines += ["", "| events over the run | count |", "|---|---|"]
    lines += [f"| {k} | {total[k]} |" for k in ("germinated", "fossilized", "pruned")]
    lines += [f"| illegal actions run as WAIT | {total['illegal']} |"]
    lines += [f"| governor rollbacks | {total['rollbacks']} |", ""]
    lines += _learning_lines(episodes, baseline)
    lines += _timing_lines(by_kind) + _provenance_lines(runs)
    lines += ["## Plots", ""] + [f"![{p}]({p})" for p in plots] + [""]
    return "\n".join(lines)


def _timing_lines(by_kind: dict[str, list[dict]]) -> list[str]:
    """Throughput has one definition everywhere (this summary, the `run_finished` event,
    the progress lines on stderr, the README): training env steps / the wall time they
    took, both summed over the rounds. A mean of per-round rates would weigh a fast
    round like a slow one and overstate it."""
    rounds, finished = by_kind["round_ended"], by_kind["run_finished"]
    if not rounds:
        return []
    walls = np.array([r["wall_s"] for r in rounds])
    steps = sum(int(r["env_steps"]) for r in rounds)
    rate = steps / walls.sum() if walls.sum() > 0 else 0.0
    total = sum(f["wall_s"] for f in finished)
    return [
        "## Timing",
        "",
        f"- throughput: {steps:,} training env steps in {walls.sum():.0f} s = {rate:.2f} env "
        "steps/s (total steps / total wall time of the rounds: rollout, PPO update, checkpoint)",
        f"- {len(rounds)} rounds: {walls.mean():.1f} s per round (min {walls.min():.1f}, "
        f"max {walls.max():.1f})",
        f"- session wall time: {total:.0f} s over {len(finished)} ended session(s) of "
        f"{len(by_kind['run_started'])}, {sum(f['interrupted'] for f in finished)} of "
        "them interrupted (a killed process records no end); it adds start-up, data "
        "loading and the baseline round to the rounds' time",
        "",
    ]


def _provenance_lines(runs: list[dict]) -> list[str]:
    lines = ["## Provenance (per session; all of it in provenance.json)", ""]
    for r in runs:
        p = r.get("provenance") or {}
        if not p:
            continue
        commit = p.get("git_commit")
        where = f"git {commit[:10]}{' (dirty)' if p.get('git_dirty') else ''}" if commit else ""
        lines.append(
            f"- {p.get('started', '?')}: esper {p.get('esper', '?')} {where}; torch "
            f"{p.get('torch', '?')}, Python {p.get('python', '?')}; device {p.get('device')}, "
            f"{p.get('torch_threads')} threads of {p.get('cpu_count')} cores; "
            f"`{' '.join(p.get('command', []))}`"
        )
    return [*lines, ""] if len(lines) > 2 else []


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
    episodes = by_kind["episode_ended"]
    steps = by_kind["episode_step"]
    written: list[Path] = []
    if episodes:
        plot_learning_curves(
            episodes, run_dir / "learning_curves.png", by_kind["baseline_episode_ended"]
        )
        written.append(run_dir / "learning_curves.png")
    if steps:
        seed_events = [r for k in _MARKERS for r in by_kind[k]]
        plot_lifecycle(steps, run.get("slot_ids") or [], run_dir / "lifecycle.png",
                       seed_events=seed_events)  # fmt: skip
        plot_action_mix(steps, run_dir / "action_mix.png")
        written += [run_dir / "lifecycle.png", run_dir / "action_mix.png"]
    if by_kind["ppo_update"]:
        plot_ppo(by_kind["ppo_update"], run_dir / "ppo.png", episodes)
        written.append(run_dir / "ppo.png")
    summary = run_dir / "summary.md"
    summary.write_text(_summary(by_kind, [p.name for p in written]), encoding="utf-8")
    return [*written, summary]
