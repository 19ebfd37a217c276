"""Growth scores: how fast the loss would fall per new unit at a unit site (issue 20).

GradMax / TINY style, linearised. New units at a site (`esper.model.width.UnitSite`)
with fan-in ``v`` (a unit vector over the producer's input) and fan-out ``u`` (zero at
birth) add ``u · (v·x)`` to the consumer's output ``z`` when the unit ops are read as
the identity near zero. At ``u = 0`` the loss gradient with respect to ``u`` is
``M v`` with ``M = E[g_z xᵀ]`` (``g_z = ∂L/∂z``, ``x`` the producer's input), so a
gradient step on ``u`` lowers the loss at the rate ``‖M v‖²``. The best ``k`` fan-ins
are the top right singular vectors of ``M`` and the rate of the i-th is ``σ_i²``: the
first-order loss decrease per new unit, in loss units per unit step.

`growth_scores` estimates ``M`` from a few batches, takes its top-``k`` right singular
vectors and reports, per unit, the mean over batches of ``‖M_b v_i‖²`` with its
standard error (the directions are fixed from the mean ``M``, so per-batch values are
comparable), and the rate per parameter the unit would cost (``per_param``) so sites of
different sizes compare. Linear sites only (an MLP's or a transformer's); a convolutional
site's correlation runs over kernel positions and is not implemented here.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from esper.model.width import UnitSite


@dataclass(frozen=True)
class GrowthScore:
    gains: Tensor  # [k] mean over batches of ‖M_b v_i‖² (loss per unit step, first order)
    stderr: Tensor  # [k] their standard errors over batches (NaN with one batch)
    fan_in: Tensor  # [k, in_units] unit-norm fan-in directions (top right singular vectors)
    per_param: Tensor  # [k] gains divided by the parameters one new unit costs
    batches: int


def growth_scores(
    site: UnitSite, losses: Iterable[Callable[[], Tensor]], k: int = 1
) -> GrowthScore:
    """Scores of ``k`` new units at ``site``. Each item of ``losses`` runs one batch's
    forward through the site's layers and returns its scalar loss; parameters' ``.grad``
    are left untouched (the gradient is taken with respect to the consumer's output
    only)."""
    if not (isinstance(site.producer, nn.Linear) and isinstance(site.consumer, nn.Linear)):
        raise TypeError(
            f"growth_scores needs a site whose producer and consumer are nn.Linear, got "
            f"{type(site.producer).__name__} -> {type(site.consumer).__name__}"
        )
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= site.in_units:
        raise ValueError(f"k must be an int in [1, {site.in_units}], got {k!r}")
    seen: dict[str, Tensor] = {}

    def keep_input(_m: nn.Module, args: tuple, _out: Tensor) -> None:
        seen["x"] = args[0]

    def keep_output(_m: nn.Module, _args: tuple, out: Tensor) -> None:
        seen["z"] = out

    correlations = []
    hooks = [
        site.producer.register_forward_hook(keep_input),
        site.consumer.register_forward_hook(keep_output),
    ]
    try:
        for run in losses:
            seen.clear()
            loss = run()
            if "x" not in seen or "z" not in seen:
                raise RuntimeError("a loss callable did not run the site's producer and consumer")
            (g,) = torch.autograd.grad(loss, seen["z"])
            x = seen["x"].detach()
            g2, x2 = g.reshape(-1, g.shape[-1]), x.reshape(-1, x.shape[-1])
            # Sum over samples: the loss is already a mean, so g carries the 1/N.
            correlations.append(g2.T @ x2)
    finally:
        for hook in hooks:
            hook.remove()
    if not correlations:
        raise ValueError("growth_scores needs at least one batch")
    stacked = torch.stack(correlations)  # [B, out, in]
    _, _, vh = torch.linalg.svd(stacked.mean(0), full_matrices=False)
    fan_in = vh[:k]  # [k, in]
    per_batch = (stacked @ fan_in.T).pow(2).sum(dim=1)  # [B, k]: ‖M_b v_i‖²
    gains = per_batch.mean(0)
    n = per_batch.shape[0]
    stderr = (
        per_batch.std(0, unbiased=True) / math.sqrt(n)
        if n > 1
        else torch.full_like(gains, math.nan)
    )
    return GrowthScore(gains, stderr, fan_in, gains / site.param_count(1), n)
