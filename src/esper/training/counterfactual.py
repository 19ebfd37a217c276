"""Counterfactual contributions of seeds, in one shared validation pass.

For a seed with alpha > 0: ``quality(live) - quality(seed off)``. For a seed still in
TRAINING (alpha 0, its value hidden from the host): the prospective contribution
``quality(seed on at alpha 1) - quality(live)``.

The fast pass shares everything two variants have in common. Variant "slot j changed"
equals the live forward up to block j's output, so the live activations are computed
once; at slot j the variant row-block is split off (alpha 0 costs nothing there), and
from then on all variants run through the remaining blocks *stacked on the batch
dimension* with the live rows, one kernel launch per block for all of them. Total work
for k blocks and a seed at every slot is about k + (k-1) + ... + 1 blocks instead of
k * (k + 1) for one full pass per variant. Hosts are per-sample in eval mode (BatchNorm
uses running stats), so stacking does not change any result.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor

from esper.lifecycle import SeedStage, is_live
from esper.training.data import TaskKind
from esper.training.objective import EvalTotals, evaluate, quality

LIVE = "live"


@dataclass(frozen=True)
class CounterfactualResult:
    """Validation of the live model plus the contribution of each measured seed."""

    val_loss: float
    val_acc: float
    quality: float
    contributions: dict[str, float] = field(default_factory=dict)
    prospective: frozenset[str] = frozenset()  # which contributions are prospective
    variant_losses: dict[str, float] = field(default_factory=dict)


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


def _contribution(live_q: float, variant_q: float, alpha_override: float) -> float:
    c = live_q - variant_q if alpha_override == 0.0 else variant_q - live_q
    if math.isnan(c):
        return 0.0
    # A variant that diverges (loss inf) is worth "a lot", not an inf in an observation.
    return max(-1e6, min(1e6, c))


def _result(
    kind: TaskKind, totals: Mapping[str, EvalTotals], variants: Mapping[str, float]
) -> CounterfactualResult:
    live = totals[LIVE]
    live_q = quality(kind, live.loss, live.accuracy)
    contributions = {
        sid: _contribution(live_q, quality(kind, totals[sid].loss, totals[sid].accuracy), a)
        for sid, a in variants.items()
    }
    return CounterfactualResult(
        val_loss=live.loss,
        val_acc=live.accuracy,
        quality=live_q,
        contributions=contributions,
        prospective=frozenset(sid for sid, a in variants.items() if a > 0.0),
        variant_losses={sid: totals[sid].loss for sid in variants},
    )


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
    cap = max_stacked_rows if max_stacked_rows is not None else 8 * eval_batch_size
    chunk = max(1, min(eval_batch_size, cap // (1 + len(order))))
    for start in range(0, x.shape[0], chunk):
        xc, yc = x[start : start + chunk], y[start : start + chunk]
        n = xc.shape[0]
        stack = host.embed(xc)
        names = [LIVE]  # row-block order in `stack`
        for i, block in enumerate(host.blocks):
            h = block(stack)
            sid = slot_at_block.get(i)
            if sid is None:
                stack = h
                continue
            slot = model.slots[sid]
            out = slot(h)
            if sid in variants:
                out = torch.cat([out, slot(h[:n], variants[sid])])
                names.append(sid)
            stack = out
        logits = host.head(stack)
        for k, name in enumerate(names):
            totals[name].add(logits[k * n : (k + 1) * n], yc)
    return _result(kind, totals, variants)


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
    totals = {LIVE: evaluate(model, x, y, eval_batch_size)}
    for sid, alpha in variants.items():
        totals[sid] = evaluate(model, x, y, eval_batch_size, alpha_override={sid: alpha})
    return _result(kind, totals, variants)
