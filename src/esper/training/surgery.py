"""Optimiser surgery: an optimiser follows a structural change of its parameters.

One function, `carry_optimizer_state`, that whoever owns an optimiser calls after a fold
(`esper.model.fold.FoldPlan`; the `Trainer` does for its host and seed optimisers, a
user's loop for its own). For every changed parameter the optimiser holds it:

- resizes every per-element state tensor (SGD ``momentum_buffer``, Adam ``exp_avg`` /
  ``exp_avg_sq`` / ``max_exp_avg_sq``, any state of the parameter's shape): each region
  of the new tensor takes the state of the tensor that now sits there (the parameter's
  own old state, or a fossil's state from a *donor*, the fossil's own optimiser), and
  entries no old tensor covers, new units' weights, start at zero;
- keeps the Parameter object (a fold keeps it; where a change replaced it, the new one
  takes the old one's place in ``param_groups`` and in the state);
- drops the fossil's own parameters (``plan.absorbed``) if it held them: their entries
  live on in the host's tensors. So a fossil joins the host's optimiser.

Adam's ``step`` (one count per tensor, while a folded tensor joins entries that stepped
different numbers of times, the fossil's seed optimiser being younger than the host's):
the merged tensor takes the **largest** count among its pieces (the host's, in an
episode), and every piece's moments are rescaled by ``(1 - b^T) / (1 - b^t)`` (T the new
count, t the piece's own; b = beta1 for ``exp_avg``, beta2 for the squared moments), so
the bias-corrected moments Adam steps with are exactly what they were. When the counts
agree (and always for SGD), the next step equals the unfolded model's to float
rounding; otherwise only the weight of the next gradient in the fossil's moments differs
(that of an optimiser of age T instead of t). Entries that are new (zero moments) step
under the tensor's count T as well, so their first updates are those of an old Adam's:
small, where a fresh Adam's first step would be a full ``lr`` per entry.

Also not carried exactly: a gated fossil (its gate was a parameter of its own; the state
of its fan-out is carried unscaled); hyperparameters that differ between the fossil's
optimiser and the host's (``seed_lr``: the fossil learns at the host's rate from now);
gradient clipping, which takes one norm per optimiser.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from torch.optim import Optimizer

if TYPE_CHECKING:
    from esper.model.fold import FoldPlan, ParamChange, Piece

_BETA_INDEX = {"exp_avg": 0, "exp_avg_sq": 1, "max_exp_avg_sq": 1}  # Adam-family moments


def _group_of(optimizer: Optimizer, param: Tensor) -> dict[str, Any] | None:
    for group in optimizer.param_groups:
        if any(p is param for p in group["params"]):
            return group
    return None


def _state_of(
    param: Tensor, owners: Sequence[Optimizer]
) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """(state, param group) of ``param`` in the first optimiser that has stepped it."""
    for opt in owners:
        state = opt.state.get(param)  # .get: the state is a defaultdict
        if state:
            group = _group_of(opt, param)
            if group is not None:
                return state, group
    return None


def _count(step: Any) -> int:
    return int(step.item() if isinstance(step, Tensor) else step)


def _like(template: Any, value: int) -> Any:
    """``value`` in ``template``'s type (a 0-dim tensor of its dtype and device, or a
    number), as the optimiser keeps its step."""
    if isinstance(template, Tensor):
        return torch.tensor(float(value), dtype=template.dtype, device=template.device)
    return type(template)(value)


def _bias(group: dict[str, Any], key: str, step: int) -> float:
    beta = group["betas"][_BETA_INDEX[key]]
    return 1.0 - beta**step


def _carried_state(
    optimizer: Optimizer, change: ParamChange, group: dict[str, Any], owners: Sequence[Optimizer]
) -> dict[str, Any]:
    """The state of ``change.new`` assembled from its pieces' states (module docstring)."""
    found: list[tuple[Piece, dict[str, Any], dict[str, Any]]] = []
    for piece in change.pieces:
        hit = _state_of(piece.source, owners)
        if hit is not None:
            found.append((piece, *hit))
    if not found:
        return {}  # nothing stepped yet: the optimiser starts this tensor fresh
    counted = [
        (_count(state["step"]), state["step"], p) for p, state, _ in found if "step" in state
    ]
    out: dict[str, Any] = {}
    new_count = 0
    if counted:
        new_count = max(count for count, _, _ in counted)
        # Kept in the type the optimiser gave this parameter's own count, where it had one.
        template = next((raw for _, raw, p in counted if p.source is change.old), counted[0][1])
        out["step"] = _like(template, new_count)
    keys = dict.fromkeys(key for _, state, _ in found for key in state if key != "step")
    for key in keys:
        merged: Tensor | None = None
        for piece, state, source_group in found:
            value = state.get(key)
            if value is None:
                continue  # this piece never had it (SGD before its first step): zeros
            shape = change.old_shape if piece.source is change.old else piece.source.shape
            if not isinstance(value, Tensor) or value.shape != shape:
                raise ValueError(
                    f"cannot carry {type(optimizer).__name__} state {key!r} through a "
                    f"structural change: expected a tensor of shape {tuple(shape)} per "
                    f"parameter, got {type(value).__name__} "
                    f"{tuple(value.shape) if isinstance(value, Tensor) else value!r}"
                )
            if merged is None:
                merged = value.new_zeros(change.new.shape)
            own_count = _count(state.get("step", 0))
            if key in _BETA_INDEX and "betas" in group and 0 < own_count != new_count:
                # Keep the bias-corrected moment: m / (1 - b^t) == m' / (1 - b^T).
                value = value * (_bias(group, key, new_count) / _bias(source_group, key, own_count))
            merged[piece.dst] = value
        if merged is not None:
            out[key] = merged
    return out


def carry_optimizer_state(
    optimizer: Optimizer, plan: FoldPlan, donors: Sequence[Optimizer] = ()
) -> None:
    """Make ``optimizer`` follow ``plan`` (module docstring). ``donors``: optimisers
    whose state is read for parameters ``optimizer`` does not hold (the fossil's own
    optimiser when the host's one is operated on); they are not changed: drop them."""
    owners = [optimizer, *donors]
    updates: list[tuple[ParamChange, dict[str, Any], dict[str, Any]]] = []
    for change in plan.changes:
        group = _group_of(optimizer, change.old)
        if group is not None:
            updates.append((change, group, _carried_state(optimizer, change, group, owners)))
    # Written after all are read: a piece may read a state another change replaces.
    for change, group, state in updates:
        optimizer.state.pop(change.old, None)
        if state:
            optimizer.state[change.new] = state
        if change.new is not change.old:
            group["params"] = [change.new if p is change.old else p for p in group["params"]]
    absorbed = {id(p) for p in plan.absorbed}
    for group in optimizer.param_groups:
        group["params"] = [p for p in group["params"] if id(p) not in absorbed]
    for param in plan.absorbed:
        optimizer.state.pop(param, None)
