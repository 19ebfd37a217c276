"""Host training of E lockstep envs as one batched computation (issue 16, item 1).

The training phase of `Trainer.train_step` (one epoch or ``batches_per_step`` batches)
costs ~4 ms per 64-image batch for a 500-parameter digits CNN, almost all of it
per-call overhead. `train_batched` runs that phase for E trainers at once: the same
training step (`esper.training.step.train_phase`: zero_grad, loss, backward, clip,
seed gradient norms, step) on one *grouped* network:

* the network: `esper.training.grouped` (env e = channel group e, ``groups=E``
  convolutions, per-env BatchNorm, a batched head; seeds per env on their channel
  slice; TRAINING seeds' own passes grouped too). The loss is the sum of the envs'
  mean task losses, so each env's gradient is exactly its own.
* the optimisers: one SGD over the stacked host parameters, with env 0's settings
  (SGD is elementwise, so it is E SGDs; a fresh env's missing momentum buffer becomes
  a zero one, which gives ``buf = grad`` exactly as a fresh SGD does), and every env's
  own seed optimisers. Gradients are clipped per env's host and per seed.
* every `TrainConfig` field is classified in `CONFIG_FIELDS`: values this path
  implements, settings all envs must share, per-env settings, and fields the training
  phase does not read. Anything else is refused by `batched_support`.
* envs go in groups of at most `ACTIVATION_BUDGET` activation floats per layer (one
  group for digits; pairs on fashion-mnist, where bigger groups fall out of cache).
* every env validates in one grouped eval pass (`validate_batched`), its seeds'
  counterfactual variants included: a variant is a channel group (lane) of its own
  that splits off its env's live lane at its slot's block, as `fast_counterfactuals`
  splits a row block off. Envs with sampled credit (`credit_samples`) validate on their
  own (the trainer draws their variants).

`batched_support` says why a set of trainers cannot take this path (None: they can);
the caller then trains them one by one. Results equal the per-env loop's to float
tolerance (grouped kernels sum in another order): tests/test_env_batched.py,
tests/test_training_batched_fields.py.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from esper.training.config import TrainConfig
from esper.training.counterfactual import (
    LIVE,
    CounterfactualResult,
    PairedDiff,
    make_result,
    variants_to_measure,
)
from esper.training.grouped import (
    CL,
    Picked,
    Plan,
    Stacked,
    block_pool,
    cnn_layout,
    host_block,
    lane_slots,
    output_head,
    supports_host,
    take_groups,
    train_forward,
)
from esper.training.objective import StackedTotals
from esper.training.step import (
    ClipSet,
    TrainPhase,
    optimizer_like,
    optimizer_params,
    optimizer_settings,
    train_phase,
)

__all__ = [
    "ACTIVATION_BUDGET",
    "CONFIG_FIELDS",
    "batched_support",
    "config_support",
    "supports_host",
    "train_batched",
    "validate_batched",
]

# Every `TrainConfig` field, by what training E envs as one grouped step needs of it.
# tests/test_training_batched_fields.py fails on a field missing here, so a new field
# is classified before the batched path can skip it; it also runs each "same" and
# "per env" field at a non-default value, batched and alone.
CONFIG_FIELDS: dict[str, str] = {
    # Values this path implements (`CONFIG_VALUES`); any other is refused.
    "optimizer": "values",
    "amp": "values",
    # One stacked optimiser and one batch schedule for all envs: equal in every env.
    "lr": "same",
    "momentum": "same",
    "weight_decay": "same",
    "batch_size": "same",
    "batches_per_step": "same",
    "grad_clip": "same",
    # Read by each env's own seed optimisers: may differ between envs.
    "seed_lr": "per env",
    # Not read by the training phase: validation, credit, governor and the episode run
    # per env in `Trainer.train_step` (the grouped validation of seedless envs chunks
    # rows by env 0's eval_batch_size, which changes only the summation order).
    "eval_batch_size": "after training",
    "max_epochs": "after training",
    "measure_fossils": "after training",
    "credit_samples": "after training",
    "plateau_tolerance": "after training",
    "history": "after training",
    "governor": "after training",
}
# SGD (momentum, weight decay) is elementwise, so one SGD over stacked parameters is E
# SGDs; Adam/AdamW keep a step count per optimiser (a rollback restarts one env's).
# The grouped kernels run in the parameters' dtype: no autocast.
CONFIG_VALUES: dict[str, tuple] = {"optimizer": ("sgd",), "amp": ("off",)}
_WHY = {
    "optimizer": "supports optimizer 'sgd' only",
    "amp": "runs without mixed precision (amp 'off'), in the parameters' dtype",
}


def config_support(config: TrainConfig) -> str | None:
    """Why one env's config cannot train batched (None: it can)."""
    for name, allowed in CONFIG_VALUES.items():
        value = getattr(config, name)
        if value not in allowed:
            return f"batched host training {_WHY[name]}, got {name}={value!r}"
    return None


def batched_support(trainers: Sequence) -> str | None:
    """Why these trainers cannot train as one batched computation (None: they can)."""
    if not trainers:
        return "no trainers"
    first = trainers[0]
    layout = cnn_layout(first.model.host)
    same = [name for name, kind in CONFIG_FIELDS.items() if kind == "same"]
    for tr in trainers:
        reason = supports_host(tr.model.host) or config_support(tr.config)
        if reason is not None:
            return reason
        if tr.device != first.device:
            return f"batched envs must share one device, got {first.device} and {tr.device}"
        if cnn_layout(tr.model.host) != layout:
            return "batched envs must have hosts of one shape"
        for name in same:
            mine, theirs = getattr(tr.config, name), getattr(first.config, name)
            if mine != theirs:
                return f"batched envs must share {name}, got {theirs!r} and {mine!r}"
        if getattr(tr.model, "own_seed_pass", True) is False:
            return "batched host training needs own_seed_pass=True (the default)"
        # The stacked optimiser copies env 0's settings as they stand (a scheduler may
        # have moved them since the config built the optimiser).
        try:
            settings = optimizer_settings(tr.host_optimizer)
        except ValueError as err:
            return f"batched host training needs one host optimiser group: {err}"
        ref = optimizer_settings(first.host_optimizer)
        differ = [k for k in ref if settings.get(k) != ref[k]]
        if differ:
            k = differ[0]
            return (
                f"batched envs' host optimisers must share their settings, got "
                f"{k}={ref[k]!r} and {settings.get(k)!r}"
            )
        stream = tr.stream
        # Batches line up only if every stream is at the same place of a same-sized epoch.
        if (stream.n, stream.batch_size, stream.position) != (
            first.stream.n,
            first.stream.batch_size,
            first.stream.position,
        ):
            return "batched envs' batch streams are not aligned"
    return None


# Envs per grouped computation: at most this many activation floats in the largest
# layer, so one group's working set stays in cache. Digits (64 images, <= 256 floats
# each) batches all 16 envs; on a fashion-mnist subset (128 images of 6,272 floats) 16
# envs in one group train slower than one by one, 2 per group 1.6x faster (ms per env
# and step: 16 per group 123, 8: 89, 4: 85, 2: 80, 1: 94, per-env loop 131).
ACTIVATION_BUDGET = 2**21


def _floats_per_sample(host: nn.Module, shape: tuple[int, ...]) -> int:
    """Largest activation of one sample in the host (floats), given its input shape."""
    h, w = shape[-2:]
    most = 0
    for block in host.blocks:
        most = max(most, block[0].out_channels * h * w)
        if block_pool(block) is not None:
            h, w = h // 2, w // 2
    return most


def group_size(trainers: Sequence, rows: int) -> int:
    """How many envs to put in one grouped pass of ``rows`` samples per env."""
    first = trainers[0]
    per_env = rows * _floats_per_sample(first.model.host, tuple(first.data.train_x.shape))
    return max(1, min(len(trainers), ACTIVATION_BUDGET // max(per_env, 1)))


def train_batched(trainers: Sequence) -> list[TrainPhase]:
    """The training phase of each trainer's next step, for all of them at once (pass
    each to ``train_step(trained=)``). Call `batched_support` first; raises ValueError
    if it objects."""
    reason = batched_support(trainers)
    if reason is not None:
        raise ValueError(reason)
    size = group_size(trainers, trainers[0].config.batch_size)
    return [
        out
        for start in range(0, len(trainers), size)
        for out in _train_group(trainers[start : start + size])
    ]


def _train_group(trainers: Sequence) -> list[TrainPhase]:
    E = len(trainers)
    models = [tr.model for tr in trainers]
    cfg, device = trainers[0].config, trainers[0].device
    for tr in trainers:
        tr.sync_seed_optimizers()
        tr.model.train()
    batches = [tr.stream.step_batches(cfg.batches_per_step) for tr in trainers]
    if len({tuple(int(i.numel()) for i in b) for b in batches}) != 1:
        raise RuntimeError("batch streams drew batches of different sizes")  # aligned above
    shared = all(tr.data.train_x is trainers[0].data.train_x for tr in trainers)
    stacked = Stacked([m.host for m in models])
    plan = Plan(models)
    host_opts = [tr.host_optimizer for tr in trainers]
    optimizer = optimizer_like(host_opts[0], stacked.params)
    env_params = stacked.env_params()
    _load_momentum(optimizer, stacked.params, env_params, host_opts)
    seed_opts = [opt for tr in trainers for _, opt in tr.seed_optimizers.values()]
    totals = StackedTotals()

    def batch_loss(k: int) -> torch.Tensor:
        idx = torch.stack([b[k] for b in batches]).to(device, non_blocking=True)  # [E, B]
        if shared:
            xe, ye = trainers[0].data.train_x[idx], trainers[0].data.train_y[idx]
        else:
            xe = torch.stack([tr.data.train_x[i] for tr, i in zip(trainers, idx, strict=True)])
            ye = torch.stack([tr.data.train_y[i] for tr, i in zip(trainers, idx, strict=True)])
        x = xe.transpose(0, 1).reshape(idx.shape[1], -1, *xe.shape[3:])  # group e = env e
        logits, seed_loss = train_forward(stacked, models, plan, x, list(xe.unbind(0)), ye)
        # Each env's mean task loss, summed: each env's gradient is exactly its own.
        loss = totals.add(logits.float(), ye.T).mean(1).sum()  # float32 as `Trainer`'s
        return loss if seed_loss is None else loss + seed_loss

    try:
        grad_norms = train_phase(
            len(batches[0]),
            batch_loss,
            [optimizer, *_joined(seed_opts)],
            # Clipped apart, as in each env's loop: each env's host, each seed.
            clip_sets=[
                ClipSet(tuple(stacked.params), envs=E),
                *(ClipSet(optimizer_params(opt)) for opt in seed_opts),
            ],
            seed_params={
                (e, sid): tr.model.seed_parameters(sid)
                for e, tr in enumerate(trainers)
                for sid in tr.seed_optimizers
            },
            grad_clip=cfg.grad_clip,
        )
    finally:
        _store_momentum(optimizer, stacked.params, env_params, host_opts)
        stacked.release(len(batches[0]))
    return [
        TrainPhase(
            env_totals,
            {sid: grad_norms[(e, sid)] for sid in tr.seed_optimizers},
            sum(int(i.numel()) for i in batches[e]),
        )
        for e, (tr, env_totals) in enumerate(zip(trainers, totals.split(), strict=True))
    ]


@torch.no_grad()
def validate_batched(trainers: Sequence) -> list[CounterfactualResult | None]:
    """Every trainer's validation pass with its seeds' counterfactual variants (what
    `Trainer.validate` computes with `fast_counterfactuals`), as one eval-mode grouped
    pass over the shared validation set; None for trainers that validate on their own
    (sampled credit draws its variants in `Trainer.validate`; another validation set).
    Pass to ``train_step(validated=)``.

    Each env is a *lane* (a channel group) of the grouped host; the variant "slot j
    changed" of env e is a lane of its own that splits off env e's live lane at block
    j, as `fast_counterfactuals` splits a row block off, and runs env e's layers from
    there: every env's variants ride in the same kernel calls."""
    out: list[CounterfactualResult | None] = [None] * len(trainers)
    todo = [k for k, tr in enumerate(trainers) if tr.config.credit_samples is None]
    val_x = trainers[todo[0]].data.val_x if todo else None
    todo = [k for k in todo if trainers[k].data.val_x is val_x]
    if len(todo) < 2 or batched_support([trainers[k] for k in todo]) is not None:
        return out
    variants = {
        k: variants_to_measure(trainers[k].model, trainers[k].config.measure_fossils) for k in todo
    }
    first = trainers[todo[0]]
    fps = _floats_per_sample(first.model.host, tuple(first.data.val_x.shape))
    most = max(1, ACTIVATION_BUDGET // (32 * fps))  # lanes per group, at 32 rows
    groups: list[list[int]] = [[]]
    for k in todo:  # envs in order, as many lanes per group as fit
        lanes = sum(1 + len(variants[j]) for j in groups[-1])
        if groups[-1] and lanes + 1 + len(variants[k]) > most:
            groups.append([])
        groups[-1].append(k)
    for group in groups:
        lanes = sum(1 + len(variants[k]) for k in group)
        rows = min(first.config.eval_batch_size, max(32, ACTIVATION_BUDGET // (lanes * fps)))
        results = _validate_group([trainers[k] for k in group], [variants[k] for k in group], rows)
        for k, result in zip(group, results, strict=True):
            out[k] = result
    return out


def _validate_group(
    trainers: Sequence, variants: list[dict[str, float]], rows: int
) -> list[CounterfactualResult]:
    """One eval-mode grouped pass of envs and their variants (lanes) over the shared
    validation set, in chunks of ``rows``."""
    E = len(trainers)
    first = trainers[0]
    val_x, val_y = first.data.val_x, first.data.val_y
    models = [tr.model for tr in trainers]
    for model in models:
        model.eval()
    stacked, plan = Stacked([m.host for m in models], bind=False), Plan(models)
    # Lanes: env e's live lane is lane e; a variant's lane joins at its slot's block.
    splits: dict[int, list[tuple[int, str]]] = {}
    for e, (model, wanted) in enumerate(zip(models, variants, strict=True)):
        for sid in sorted(wanted, key=model.block_index):
            splits.setdefault(model.block_index(sid), []).append((e, sid))
    lanes = [(e, None) for e in range(E)] + [v for i in sorted(splits) for v in splits[i]]
    totals, paired = StackedTotals(), {v: PairedDiff() for v in lanes[E:]}
    try:
        for start in range(0, val_x.shape[0], rows):
            x, y = val_x[start : start + rows], val_y[start : start + rows]
            logits = _lanes_pass(stacked, models, plan, variants, splits, E, x)
            losses = totals.add(logits, y[:, None].expand(-1, len(lanes)))
            for v, lane in zip(lanes[E:], losses[E:], strict=True):
                paired[v].add(lane, losses[v[0]])
    finally:
        for model in models:
            model.train()
    env_totals = totals.split()
    results = []
    for e, (tr, wanted) in enumerate(zip(trainers, variants, strict=True)):
        mine = {LIVE: env_totals[e]}
        mine.update((v[1], t) for v, t in zip(lanes[E:], env_totals[E:], strict=True) if v[0] == e)
        pairs = {sid: paired[(e, sid)] for sid in wanted}
        results.append(make_result(tr.kind, mine, pairs, wanted))
    return results


def _lanes_pass(stacked, models, plan, variants, splits, E: int, x: Tensor) -> Tensor:
    """Logits ``[B, lanes, K]`` of every live lane and variant lane on ``x``."""
    owners = list(range(E))  # lane -> env
    alphas: list[dict | None] = [None] * E  # lane -> its variant's override, once split
    h = x.repeat(1, E, 1, 1).contiguous(memory_format=CL)  # every env sees x
    pend: dict = {}
    for i in range(len(stacked.convs)):
        layers = Picked(stacked, owners, i)
        z = host_block(layers, i, h, pend, len(owners), False)
        new = splits.get(i, [])
        if new:  # variant lanes split off their env's live lane before slot i
            G = len(owners)
            z = torch.cat([z, take_groups(z, [e for e, _ in new], G)], 1)
            if any(plan.width[i].get(e, False) for e in owners):
                h = torch.cat([h, take_groups(h, [e for e, _ in new], G)], 1)
            for e, sid in new:  # a width term from block i-1 is in z already
                owners.append(e)
                alphas.append({sid: variants[e][sid]})
        h, pend = lane_slots(models, plan, i, owners, alphas, h, z)
    return output_head(Picked(stacked, owners, None), h, pend, len(owners))


def _joined(optimizers: Sequence[torch.optim.Optimizer]) -> list[torch.optim.Optimizer]:
    """The seed optimisers as few SGDs: those of equal settings become one over all their
    parameters, sharing each parameter's state dict with its own optimiser (so its
    momentum lands there). Per parameter it is the same update: SGD is elementwise, and
    on the CPU both take the per-tensor path; what goes is one step call per seed."""
    groups: dict[tuple, list[torch.optim.Optimizer]] = {}
    for opt in optimizers:
        settings = optimizer_settings(opt)
        if settings["class"] is not torch.optim.SGD or settings.get("foreach"):
            return list(optimizers)
        groups.setdefault(tuple(sorted(settings.items(), key=lambda kv: kv[0])), []).append(opt)
    out = []
    for members in groups.values():
        if len(members) == 1:
            out.extend(members)
            continue
        params = [p for opt in members for p in optimizer_params(opt)]
        joined = optimizer_like(members[0], params)
        for opt in members:
            for p in optimizer_params(opt):
                joined.state[p] = opt.state[p]  # one dict: the seed's own state
        out.append(joined)
    return out


def _load_momentum(optimizer, params, env_params, host_opts) -> None:
    """Stacked momentum buffers from the envs' host optimisers (zeros for a fresh one,
    which SGD turns into ``buf = grad`` exactly, as it does for a missing buffer)."""
    found = False
    for leaf, owners in zip(params, env_params, strict=True):
        bufs = [
            opt.state.get(p, {}).get("momentum_buffer")
            for opt, p in zip(host_opts, owners, strict=True)
        ]
        if all(b is None for b in bufs):
            continue
        found = True
        with torch.no_grad():
            parts = [
                torch.zeros_like(p) if b is None else b for b, p in zip(bufs, owners, strict=True)
            ]
            optimizer.state[leaf]["momentum_buffer"] = torch.stack(parts).view_as(leaf).clone()
    if found:  # every leaf needs a buffer, or SGD would clone the gradient for the rest
        for leaf in params:
            optimizer.state[leaf].setdefault("momentum_buffer", torch.zeros_like(leaf))


def _store_momentum(optimizer, params, env_params, host_opts) -> None:
    for leaf, owners in zip(params, env_params, strict=True):
        buf = optimizer.state.get(leaf, {}).get("momentum_buffer")
        if buf is None:
            continue
        parts = buf.view(len(owners), *owners[0].shape)
        for e, (opt, p) in enumerate(zip(host_opts, owners, strict=True)):
            opt.state[p]["momentum_buffer"] = parts[e].clone()
