"""Rewards (docs/ARCHITECTURE.md, Reward).

The episode objective is ``J = q − λ·g`` (q: validation quality, g: parameter growth
ratio). Both modes telescope, so the episode sum never depends on how credit is spread
over the steps:

* ``objective`` (default): ``r_t = ΔJ_t − penalty_t``;
  ``Σ r_t = J_T − J_0 − Σ penalty``.
* ``contribution``: adds potential-based shaping ``Φ(s_t) − Φ(s_{t−1})`` with
  ``Φ(s) = w · Σ_{live seeds} clip(contribution, −1, 1)``: a seed whose counterfactual
  contribution grows is credited before its alpha reaches 1 and its value shows up in
  q. The potential is 0 at reset (no seeds) and forced to 0 on the last step of an
  episode, so the shaping sums to zero and ``Σ r_t`` equals the objective mode's sum.
  Shaping uses γ = 1 on purpose: with the agent's γ < 1 the shaping stays exactly
  telescoping (the property we test) at the cost of a tiny bias in the discounted return.
* ``twin``: the objective mode with a static twin as baseline. The env trains, in
  lockstep, a copy of the host with the identical initialisation and data order that
  never grows; b_t is the twin's validation quality after step t. Germination is the
  identity at birth, so ``q_t − b_t`` is the growth's effect with the host's own
  seed-to-seed noise removed. ``r_t = (q_t − b_t) − (q_{t−1} − b_{t−1}) − λ·Δg_t −
  penalty_t``, so ``Σ r_t = (J_T − J_0) − (b_T − b_0) − Σ penalty``: the objective
  change minus the twin's own quality change. With ``b_0 = q_0`` (identical hosts,
  validated at reset) and ``g_0 = 0`` this is ``J_T − b_T − Σ penalty``: the final
  objective's gain over the static host of the same seed. The twin's term does not
  depend on the actions, so the policy gradient is unchanged in expectation; only its
  variance drops. Cost: one extra host training and validation per step.

Governor penalties (rollbacks) are subtracted in both modes and kept in the data.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

from esper.lifecycle import LIVE_STAGES, SeedStage

RewardMode = Literal["objective", "contribution", "twin"]
REWARD_MODES: tuple[str, ...] = ("objective", "contribution", "twin")


@dataclass(frozen=True)
class RewardConfig:
    mode: RewardMode = "objective"
    # λ: price of one unit of growth ratio in quality units. 0.05 makes doubling the
    # host's parameters worth 5 accuracy points.
    growth_penalty: float = 0.05
    # w: weight of the contribution potential (contribution mode only).
    contribution_weight: float = 1.0

    def __post_init__(self) -> None:
        if self.mode not in REWARD_MODES:
            raise ValueError(
                f"unknown reward mode {self.mode!r}; allowed: {', '.join(REWARD_MODES)}"
            )
        for name in ("growth_penalty", "contribution_weight"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")


@dataclass(frozen=True)
class RewardBreakdown:
    """One step's reward and its parts (logged as telemetry)."""

    total: float
    quality_delta: float
    growth_delta: float
    penalty: float
    shaping: float
    baseline_delta: float = 0.0  # the twin's quality change (twin mode), subtracted


def contribution_potential(
    stages: Iterable[SeedStage], contributions: Iterable[float | None], weight: float
) -> float:
    """Φ(s): weighted sum of the clipped contributions of live seeds."""
    total = 0.0
    for stage, value in zip(stages, contributions, strict=True):
        if SeedStage(stage) in LIVE_STAGES and value is not None and math.isfinite(value):
            total += min(max(float(value), -1.0), 1.0)
    return weight * total


class RewardTracker:
    """Turns per-step (quality, growth, penalty, potential) into rewards for one env."""

    def __init__(self, config: RewardConfig | None = None) -> None:
        self.config = config or RewardConfig()
        self._quality = 0.0
        self._growth = 0.0
        self._potential = 0.0
        self._baseline = 0.0
        self.initial_objective = 0.0

    def objective(self, quality: float, growth: float) -> float:
        return quality - self.config.growth_penalty * growth

    def reset(self, quality: float, growth: float, baseline: float = 0.0) -> None:
        """Start an episode from the fresh host's quality and growth (Φ = 0);
        ``baseline`` is the twin's quality b_0 (twin mode)."""
        self._quality, self._growth, self._potential = float(quality), float(growth), 0.0
        self._baseline = float(baseline)
        self.initial_objective = self.objective(quality, growth)

    def step(
        self,
        quality: float,
        growth: float,
        *,
        penalty: float = 0.0,
        potential: float = 0.0,
        last: bool = False,
        baseline: float = 0.0,
    ) -> RewardBreakdown:
        """Reward of one step. ``potential`` is Φ of the new state (contribution mode);
        ``last`` marks the episode's final step (Φ forced to 0); ``baseline`` is the
        twin's quality b_t (twin mode; ignored otherwise)."""
        if not math.isfinite(quality):
            raise ValueError(f"quality must be finite to compute a reward, got {quality!r}")
        dq = float(quality) - self._quality
        dg = float(growth) - self._growth
        shaping = 0.0
        if self.config.mode == "contribution":
            new_potential = 0.0 if last else float(potential)
            shaping = new_potential - self._potential
            self._potential = new_potential
        db = 0.0
        if self.config.mode == "twin":
            if not math.isfinite(baseline):
                raise ValueError(f"the twin's quality must be finite, got {baseline!r}")
            db = float(baseline) - self._baseline
            self._baseline = float(baseline)
        total = dq - db - self.config.growth_penalty * dg - float(penalty) + shaping
        self._quality, self._growth = float(quality), float(growth)
        return RewardBreakdown(total, dq, dg, float(penalty), shaping, db)
