"""Pieces of the Pareto protocol (issue 12) shared by `bench_pareto.py` and
`pareto_text.py`: one episode with its FLOPs, paired statistics and interpolation on
the static front. (The always-grow schedule is `esper.policy.AlwaysGrowController`.)"""

from __future__ import annotations

import dataclasses
import itertools
import math
import statistics
from collections.abc import Sequence

from esper.env import MorphogenesisEnv
from esper.model import LifecycleConfig
from esper.policy import HeuristicConfig
from esper.telemetry.events import SeedFossilized, SeedGerminated, SeedPruned, seed_event_class
from esper.training.data import BatchStream
from esper.training.flops import BACKWARD_FACTOR, forward_flops

# Two-sided 95 % quantiles of Student's t for 1..30 degrees of freedom (no scipy here).
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179,
         2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064,
         2.060, 2.056, 2.052, 2.048, 2.045, 2.042)  # fmt: skip


def t975(df: int) -> float:
    if df < 1:
        raise ValueError(f"a t interval needs >= 1 degree of freedom, got {df}")
    return _T975[df - 1] if df <= len(_T975) else 1.96


def paired(a: Sequence[float], b: Sequence[float]) -> dict[str, float]:
    """Mean of ``a - b`` (same seeds), its standard error and 95 % t interval."""
    if len(a) != len(b) or not a:
        raise ValueError(f"paired differences need equal non-empty lists, got {len(a)}, {len(b)}")
    d = [float(x) - float(y) for x, y in zip(a, b, strict=True)]
    mean = statistics.fmean(d)
    if len(d) < 2:
        return {"mean": mean, "se": math.nan, "lo": math.nan, "hi": math.nan, "n": 1}
    se = statistics.stdev(d) / math.sqrt(len(d))
    half = t975(len(d) - 1) * se
    return {"mean": mean, "se": se, "lo": mean - half, "hi": mean + half, "n": len(d)}


def interp_log(xs: Sequence[float], ys: Sequence[float], x: float) -> tuple[float, bool]:
    """``ys`` at ``x``, linear in log(x) between the sorted points ``xs``; outside them
    the nearest end value, with ``True`` (clamped) as second element."""
    pts = sorted(zip(xs, ys, strict=True))
    if x <= pts[0][0]:
        return pts[0][1], x < pts[0][0]
    if x >= pts[-1][0]:
        return pts[-1][1], x > pts[-1][0]
    for (x0, y0), (x1, y1) in itertools.pairwise(pts):
        if x0 <= x <= x1:
            t = (math.log(x) - math.log(x0)) / (math.log(x1) - math.log(x0))
            return y0 + t * (y1 - y0), False
    raise AssertionError("unreachable")


# -- blueprints ---------------------------------------------------------------------------


def blueprint_index(names: Sequence[str], preference: Sequence[str]) -> int:
    """Index in ``names`` of the first of ``preference`` that the topology offers."""
    for name in preference:
        if name in names:
            return list(names).index(name)
    raise ValueError(f"none of {list(preference)} among the blueprints {list(names)}")


# -- FLOPs ------------------------------------------------------------------------------


def trained_samples(env: MorphogenesisEnv, steps: int) -> int:
    """Training samples of ``steps`` env steps (the batch pattern of `BatchStream` does not
    depend on the seed, only on the data size, batch size and steps)."""
    cfg = env.train_config
    stream = BatchStream(env.data.n_train, cfg.batch_size, seed=0)
    return sum(
        int(i.numel()) for _ in range(steps) for i in stream.step_batches(cfg.batches_per_step)
    )


def scratch_flops(env: MorphogenesisEnv, steps: int) -> int:
    """What the env's FLOPs counter reports for training ``env.model``'s current
    architecture from scratch, with no controller, for ``steps`` steps: forward + backward
    on the training samples and one validation pass per step plus the reset's. Every
    module counts (train mode), live seeds included."""
    x = env.data.train_x[:2]
    per_sample = forward_flops(env.model, x, train=True) / x.shape[0]
    samples = (1 + BACKWARD_FACTOR) * trained_samples(env, steps) + env.data.n_val * (steps + 1)
    return round(per_sample * samples)


# -- one episode --------------------------------------------------------------------------

_KINDS = {SeedGerminated: "germinated", SeedFossilized: "fossilized", SeedPruned: "pruned"}


def play(env: MorphogenesisEnv, controller, seed: int, flops_limit: float | None = None) -> dict:
    """One episode of ``controller`` on ``env`` reset with ``seed``.

    Returns final quality, params, growth, objective (quality − λ·growth, growth against
    the host the episode started with), seed event counts, the episode's training FLOPs
    as the env counts them (``train_flops``: forward + backward of host and seeds,
    validation and counterfactual passes; ``flops_train`` / ``flops_eval`` its parts),
    the FLOPs of training the final architecture from scratch for the same steps, and a
    per-step curve of (step, val_loss, quality, cumulative FLOPs). With ``flops_limit``
    the episode stops after the first step whose cumulative FLOPs reach it."""
    obs, info = env.reset(seed=seed)
    state = controller.initial_state()
    host_params = env.model.param_counts().total
    counts = dict.fromkeys([*_KINDS.values(), "rollbacks"], 0)
    fossil_steps: list[int] = []  # when growth became permanent (1-based steps)
    curve = []
    for step in range(env.max_epochs):
        action, state = controller.act(obs, env.conditional_masks(), state)
        obs, _, _, _, info = env.step(action)
        for event in info["events"]:
            kind = _KINDS.get(seed_event_class(event["source"], event["target"]))
            if kind is not None:
                counts[kind] += 1
                if kind == "fossilized":
                    fossil_steps.append(step + 1)
        counts["rollbacks"] += int(info.get("governor_event") is not None)
        curve.append((step + 1, float(info["val_loss"]), float(info["quality"]),
                      float(info["flops"])))  # fmt: skip
        if flops_limit is not None and curve[-1][3] >= flops_limit:
            break
    params = env.model.param_counts().total
    growth = (params - host_params) / host_params
    quality = float(info["quality"])
    return {
        "quality": quality,
        "val_loss": float(info["val_loss"]),
        "params": params,
        "growth": growth,
        "objective": quality - env.reward_config.growth_penalty * growth,
        "env_objective": float(info["objective"]),
        **counts,
        "fossil_steps": " ".join(map(str, fossil_steps)),
        "train_flops": float(info["flops"]),
        "flops_train": float(info["flops_train"]),
        "flops_eval": float(info["flops_eval"]),
        "scratch_flops": float(scratch_flops(env, len(curve))),
        "curve": curve,
    }


# -- per-episode rows -------------------------------------------------------------------

NUMERIC = ("quality", "val_loss", "params", "growth", "objective", "train_flops",
           "flops_train", "flops_eval", "scratch_flops", "germinated", "fossilized", "pruned",
           "rollbacks")  # fmt: skip


def number(text: str) -> int | float:
    return int(text) if text.lstrip("-").isdigit() else float(text)


def first_fossil(rows: list[dict]) -> str:
    """Mean step of an episode's first fossilization, over the episodes that had one."""
    firsts = [int(str(r.get("fossil_steps", "")).split()[0]) for r in rows
              if str(r.get("fossil_steps", "")).strip()]  # fmt: skip
    return f"{sum(firsts) / len(firsts):.1f} ({len(firsts)}/{len(rows)} eps)" if firsts else "—"


def config_overrides(text: str | None, config_cls: type, flag: str) -> dict:
    """``a=1,b=0.5`` -> keyword arguments of the dataclass ``config_cls`` (numbers only)."""
    if not text:
        return {}
    fields = {f.name: f.type for f in dataclasses.fields(config_cls)}
    out = {}
    for item in text.split(","):
        key, _, value = item.partition("=")
        if key not in fields or not value:
            raise SystemExit(f"{flag}: bad item {item!r}; fields: {', '.join(fields)}")
        out[key] = float(value) if "." in value else int(value)
    return out


def lifecycle_overrides(text: str | None) -> dict:
    """``min_train_epochs=1,blend_epochs=1`` -> LifecycleConfig keyword arguments."""
    return config_overrides(text, LifecycleConfig, "--lifecycle")


def heuristic_overrides(text: str | None) -> dict:
    """``underfit_accuracy=0.9`` -> HeuristicConfig keyword arguments."""
    return config_overrides(text, HeuristicConfig, "--heuristic")


# -- oracle capture (issue 20) ----------------------------------------------------------


def objective_at(row: dict, lam: float, start_params: float) -> float:
    """accuracy − λ·growth, growth charged against the host growth started from (a
    wider static host pays for its extra parameters as if grown at once)."""
    return float(row["quality"]) - lam * (float(row["params"]) - start_params) / start_params


def hindsight_oracle(static: dict[int, list[dict]], lam: float, start_params: float) -> int:
    """The static width whose mean objective at ``λ`` is best (chosen in hindsight)."""
    return max(
        static,
        key=lambda w: statistics.fmean(objective_at(r, lam, start_params) for r in static[w]),
    )


def capture(grown: Sequence[float], narrow: Sequence[float], oracle: Sequence[float]):
    """Oracle capture (grown − narrow) / (oracle − narrow), paired per seed, as a ratio
    of means with a delta-method standard error:
    Var(R) ≈ (var(d) − 2R·cov(d, e) + R²·var(e)) / (n · mean(e)²), d = grown − narrow,
    e = oracle − narrow. NaN when the oracle's own gain is under 2 SE (undefined)."""
    n = len(grown)
    if not n == len(narrow) == len(oracle) or n < 2:
        raise ValueError(f"capture needs >= 2 paired seeds in each list, got {n}")
    d = [g - s for g, s in zip(grown, narrow, strict=True)]
    e = [o - s for o, s in zip(oracle, narrow, strict=True)]
    md, me = statistics.fmean(d), statistics.fmean(e)
    se_e = statistics.stdev(e) / math.sqrt(n)
    if not (me > 2 * se_e and me > 0):
        return {"ratio": math.nan, "se": math.nan, "defined": False}
    r = md / me
    var = (
        statistics.variance(d)
        - 2 * r * statistics.covariance(d, e)
        + r * r * statistics.variance(e)
    ) / (n * me * me)
    return {"ratio": r, "se": math.sqrt(max(var, 0.0)), "defined": True}
