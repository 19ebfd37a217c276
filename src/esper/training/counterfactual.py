"""Counterfactual contributions of seeds, in one shared validation pass.

A contribution is measured on the validation *loss*, paired per sample: the live model
and the variant see the same samples, so for a seed with alpha > 0 the contribution is
``mean_i(loss_i(seed off) - loss_i(live))`` and for a seed still in TRAINING (alpha 0,
its value hidden from the host) the prospective contribution is
``mean_i(loss_i(live) - loss_i(seed on at alpha 1))``. Positive means the seed helps.
Its standard error is ``std_i(d_i) / sqrt(n)`` of those paired differences, so the
lifecycle gates can tell a real effect from noise (on ~360 digits images one image
moves accuracy by 0.28 points; the paired loss difference is far less noisy). The same
comparison in quality units (accuracy, or -loss for lm) is kept as
``quality_contributions``.

The fast pass shares everything two variants have in common. Variant "slot j changed"
equals the live forward up to block j's output, so the live activations are computed
once; at slot j the variant row-block is split off (alpha 0 costs nothing there), and
from then on all variants run through the remaining blocks *stacked on the batch
dimension* with the live rows, one kernel launch per block for all of them. Total work
for k blocks and a seed at every slot is about k + (k-1) + ... + 1 blocks instead of
k * (k + 1) for one full pass per variant. Hosts are per-sample in eval mode (BatchNorm
uses running stats), so stacking does not change any result.

Sampled credit (`sampled_counterfactuals`, `TrainConfig.credit_samples`): with many
seeds, each step measures a uniform random subset of m variants (without replacement),
so the extra cost is at most m validation passes whatever the number of seeds. Each
variant is measured with probability m / n, so ``CounterfactualResult.total_contribution``
(the measured sum divided by that probability) is an unbiased estimate of the sum over
all seeds, and each measured seed's reading is an exact one for this step.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor

from esper.lifecycle import SeedStage, is_live
from esper.training.data import TaskKind
from esper.training.objective import EvalTotals, quality

LIVE = "live"


@dataclass(frozen=True)
class CounterfactualResult:
    """Validation of the live model plus the contribution of each measured seed."""

    val_loss: float
    val_acc: float
    quality: float
    # Paired validation-loss contribution (nats; > 0: the seed helps) and its standard error.
    contributions: dict[str, float] = field(default_factory=dict)
    contribution_se: dict[str, float] = field(default_factory=dict)
    prospective: frozenset[str] = frozenset()  # which contributions are prospective
    variant_losses: dict[str, float] = field(default_factory=dict)
    # The same comparison in quality units (accuracy / -loss), same sign convention.
    quality_contributions: dict[str, float] = field(default_factory=dict)
    # Sampled mode: the probability with which each variant was measured this step
    # (1.0: all of them, exact) and the variants wanted but not measured.
    inclusion_prob: float = 1.0
    unmeasured: frozenset[str] = frozenset()

    def total_contribution(self) -> float:
        """Sum of the contributions of all wanted variants; unbiased in the sampled mode
        (Horvitz-Thompson: each measured term weighted by 1 / its inclusion probability)."""
        return sum(self.contributions.values()) / self.inclusion_prob


@dataclass
class PairedDiff:
    """Running sums of ``d_i = loss_i(variant) - loss_i(live)`` over the same samples."""

    total: Tensor | float = 0.0
    total_sq: Tensor | float = 0.0
    count: int = 0

    def add(self, variant_losses: Tensor, live_losses: Tensor) -> None:
        d = variant_losses.double() - live_losses.double()
        self.total = self.total + d.sum()
        self.total_sq = self.total_sq + (d * d).sum()
        self.count += int(d.numel())

    def mean_and_se(self) -> tuple[float, float]:
        """Mean difference and its standard error (inf with fewer than 2 samples)."""
        n = self.count
        if n == 0:
            return math.nan, math.nan
        mean = float(self.total) / n
        if n < 2:
            return mean, math.inf
        var = max(float(self.total_sq) - n * mean * mean, 0.0) / (n - 1)
        return mean, math.sqrt(var / n)


def variants_to_measure(model, measure_fossils: bool = True) -> dict[str, float]:
    """Slot id -> alpha override of its variant: 0.0 (switch off) or 1.0 (switch on).

    Live seeds with alpha > 0 are switched off; live seeds at alpha 0 (TRAINING) are
    switched on. Fossils (alpha 1) are switched off when ``measure_fossils``.
    """
    out: dict[str, float] = {}
    for state in model.slot_states():
        if is_live(state.stage):
            out[state.slot_id] = 0.0 if state.alpha > 0.0 else 1.0
        elif state.stage == SeedStage.FOSSILIZED and measure_fossils:
            out[state.slot_id] = 0.0
    return out


def _clip(c: float) -> float:
    # A variant that diverges (loss inf) is worth "a lot", not an inf in an observation.
    return max(-1e6, min(1e6, c))


def _contribution(live_q: float, variant_q: float, alpha_override: float) -> float:
    c = live_q - variant_q if alpha_override == 0.0 else variant_q - live_q
    return 0.0 if math.isnan(c) else _clip(c)


def loss_contribution(diff: PairedDiff, alpha_override: float) -> tuple[float, float]:
    """(contribution, standard error) from ``d = loss(variant) - loss(live)``."""
    mean, se = diff.mean_and_se()
    c = mean if alpha_override == 0.0 else -mean
    if math.isnan(c):
        return 0.0, math.nan  # a NaN error passes no gate and triggers no prune
    if math.isinf(c):
        return _clip(c), 0.0  # decisive either way
    return c, se if math.isfinite(se) else math.inf


def _accumulate(
    totals: Mapping[str, EvalTotals],
    paired: Mapping[str, PairedDiff],
    names: list[str],
    logits: Tensor,
    y: Tensor,
    n: int,
) -> None:
    """Row block k of ``logits`` (n rows each) belongs to ``names[k]``; block 0 is live."""
    live = totals[names[0]].add(logits[:n], y)
    for k, name in enumerate(names[1:], start=1):
        paired[name].add(totals[name].add(logits[k * n : (k + 1) * n], y), live)


def make_result(
    kind: TaskKind,
    totals: Mapping[str, EvalTotals],
    paired: Mapping[str, PairedDiff],
    variants: Mapping[str, float],
) -> CounterfactualResult:
    live = totals[LIVE]
    live_q = quality(kind, live.loss, live.accuracy)
    measured = {sid: loss_contribution(paired[sid], a) for sid, a in variants.items()}
    return CounterfactualResult(
        val_loss=live.loss,
        val_acc=live.accuracy,
        quality=live_q,
        contributions={sid: c for sid, (c, _) in measured.items()},
        contribution_se={sid: se for sid, (_, se) in measured.items()},
        prospective=frozenset(sid for sid, a in variants.items() if a > 0.0),
        variant_losses={sid: totals[sid].loss for sid in variants},
        quality_contributions={
            sid: _contribution(live_q, quality(kind, totals[sid].loss, totals[sid].accuracy), a)
            for sid, a in variants.items()
        },
    )


def _stack_pending(
    live: Tensor | None, variant: Tensor | None, live_rows: int, variant_rows: int
) -> Tensor | None:
    """Width terms of the live rows and of one variant's rows, stacked like the rows
    (a side that adds nothing contributes zeros; None when neither adds anything)."""
    if live is None and variant is None:
        return None
    like = live if live is not None else variant
    assert like is not None
    if live is None:
        live = like.new_zeros((live_rows, *like.shape[1:]))
    if variant is None:
        variant = like.new_zeros((variant_rows, *like.shape[1:]))
    return torch.cat([live, variant])


@torch.no_grad()
def fast_counterfactuals(
    model,
    x: Tensor,
    y: Tensor,
    kind: TaskKind,
    variants: Mapping[str, float],
    eval_batch_size: int = 1024,
    max_stacked_rows: int | None = None,
) -> CounterfactualResult:
    """Live validation and every variant in one shared pass (model must be in eval mode).

    Validation samples go through in chunks of ``eval_batch_size``; with m variants a
    chunk grows to (1 + m) stacked row-blocks. ``max_stacked_rows`` (default
    ``8 * eval_batch_size``) caps that, shrinking the chunks when there are many seeds,
    so memory stays bounded while small models keep the large batches they run fastest.
    """
    host = model.host
    slot_at_block = {model.block_index(sid): sid for sid in model.slot_config.slot_ids}
    order = sorted(variants, key=model.block_index)
    totals = {name: EvalTotals() for name in (LIVE, *order)}
    paired = {name: PairedDiff() for name in order}
    cap = max_stacked_rows if max_stacked_rows is not None else 8 * eval_batch_size
    chunk = max(1, min(eval_batch_size, cap // (1 + len(order))))
    for start in range(0, x.shape[0], chunk):
        xc, yc = x[start : start + chunk], y[start : start + chunk]
        n = xc.shape[0]
        stack, pending = host.embed(xc), None
        names = [LIVE]  # row-block order in `stack`
        for i in range(model.num_blocks):
            # A width seed's term at block i is pending for block i+1 (or the head).
            h, tap = model.run_block(i, stack, pending)
            sid = slot_at_block.get(i)
            out, pending = model.apply_slot(i, h, tap)
            if sid in variants:
                v_out, v_pending = model.apply_slot(
                    i, h[:n], None if tap is None else tap[:n], variants[sid]
                )
                out = torch.cat([out, v_out])
                pending = _stack_pending(pending, v_pending, h.shape[0], n)
                names.append(sid)
            stack = out
        _accumulate(totals, paired, names, model.head(stack, pending), yc, n)
    return make_result(kind, totals, paired, variants)


@torch.no_grad()
def reference_counterfactuals(
    model,
    x: Tensor,
    y: Tensor,
    kind: TaskKind,
    variants: Mapping[str, float],
    eval_batch_size: int = 1024,
) -> CounterfactualResult:
    """The plain definition: one full validation pass per variant (for tests and bench)."""
    totals = {name: EvalTotals() for name in (LIVE, *variants)}
    paired = {sid: PairedDiff() for sid in variants}
    for start in range(0, x.shape[0], eval_batch_size):
        xc, yc = x[start : start + eval_batch_size], y[start : start + eval_batch_size]
        live = totals[LIVE].add(model(xc), yc)
        for sid, alpha in variants.items():
            losses = totals[sid].add(model(xc, alpha_override={sid: alpha}), yc)
            paired[sid].add(losses, live)
    return make_result(kind, totals, paired, variants)


def sample_variants(
    variants: Mapping[str, float], samples: int, generator: torch.Generator
) -> tuple[dict[str, float], float]:
    """A uniform random subset of ``samples`` variants (all when there are no more than
    that) and the probability with which each variant is in it."""
    if samples < 1:
        raise ValueError(f"credit samples must be >= 1, got {samples}")
    n = len(variants)
    if n <= samples:
        return dict(variants), 1.0
    ids = sorted(variants)  # the draw must not depend on the mapping's order
    picked = torch.randperm(n, generator=generator)[:samples].tolist()
    return {ids[i]: variants[ids[i]] for i in sorted(picked)}, samples / n


@torch.no_grad()
def sampled_counterfactuals(
    model,
    x: Tensor,
    y: Tensor,
    kind: TaskKind,
    variants: Mapping[str, float],
    samples: int,
    generator: torch.Generator,
    eval_batch_size: int = 1024,
    max_stacked_rows: int | None = None,
) -> CounterfactualResult:
    """`fast_counterfactuals` on ``samples`` variants drawn with ``generator``; equal
    to the exact pass when there are no more variants than that. Each measured variant
    costs at most the blocks from its slot to the head, so the pass costs at most
    ``1 + samples`` validation passes."""
    chosen, prob = sample_variants(variants, samples, generator)
    result = fast_counterfactuals(model, x, y, kind, chosen, eval_batch_size, max_stacked_rows)
    if prob == 1.0:
        return result
    return dataclasses.replace(
        result, inclusion_prob=prob, unmeasured=frozenset(variants) - frozenset(chosen)
    )
