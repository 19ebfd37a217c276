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

Governor penalties (rollbacks) are subtracted in both modes and kept in the data.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

from esper.lifecycle import LIVE_STAGES, SeedStage

RewardMode = Literal["objective", "contribution"]
REWARD_MODES: tuple[str, ...] = ("objective", "contribution")


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
        self.initial_objective = 0.0

    def objective(self, quality: float, growth: float) -> float:
        return quality - self.config.growth_penalty * growth

    def reset(self, quality: float, growth: float) -> None:
        """Start an episode from the fresh host's quality and growth (Φ = 0)."""
        self._quality, self._growth, self._potential = float(quality), float(growth), 0.0
        self.initial_objective = self.objective(quality, growth)

    def step(
        self,
        quality: float,
        growth: float,
        *,
        penalty: float = 0.0,
        potential: float = 0.0,
        last: bool = False,
    ) -> RewardBreakdown:
        """Reward of one step. ``potential`` is Φ of the new state (contribution mode);
        ``last`` marks the episode's final step (Φ forced to 0)."""
        if not math.isfinite(quality):
            raise ValueError(f"quality must be finite to compute a reward, got {quality!r}")
        dq = float(quality) - self._quality
        dg = float(growth) - self._growth
        shaping = 0.0
        if self.config.mode == "contribution":
            new_potential = 0.0 if last else float(potential)
            shaping = new_potential - self._potential
            self._potential = new_potential
        total = dq - self.config.growth_penalty * dg - float(penalty) + shaping
        self._quality, self._growth = float(quality), float(growth)
        return RewardBreakdown(total, dq, dg, float(penalty), shaping)
