"""Host training of E lockstep envs as one batched computation (issue 16, item 1).

The training phase of `Trainer.train_step` (``_train``: one epoch or
``batches_per_step`` batches) costs ~4 ms per 64-image batch for a 500-parameter digits
CNN, almost all of it per-call overhead. `train_batched` runs that phase for E trainers
at once, on one *grouped* network:

* the network: `esper.training.grouped` (env e = channel group e, ``groups=E``
  convolutions, per-env BatchNorm, a batched head; seeds per env on their channel
  slice; TRAINING seeds' own passes grouped too). The loss is the sum of the envs'
  mean losses, so each env's gradient is exactly its own.
* envs go in groups of at most `ACTIVATION_BUDGET` activation floats per layer (one
  group for digits; pairs on fashion-mnist, where bigger groups fall out of cache).
* seedless envs validate in one grouped eval pass (`validate_batched`); envs with
  seeds or fossils measure their counterfactuals on their own.
* SGD (momentum, weight decay) is elementwise, so one SGD over the stacked parameters
  is E separate ones; a fresh env (no momentum buffer yet) gets a zero buffer, which
  gives exactly ``buf = grad`` as a fresh one does. Gradient clipping is per env.
  Adam/AdamW keep a step count per optimiser (a rollback restarts one env's), so they
  are refused rather than approximated.

`batched_support` says why a set of trainers cannot take this path (None: they can);
the caller then trains them one by one. Results equal the per-env loop's to float
tolerance (grouped kernels sum in another order): tests/test_env_batched.py.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from esper.training.counterfactual import CounterfactualResult
from esper.training.grouped import (
    CL,
    Plan,
    Stacked,
    active_slots,
    cnn_layout,
    supports_host,
    train_forward,
)
from esper.training.objective import EvalTotals, quality

_BN_FIELDS = ("weight", "bias", "running_mean", "running_var")
TrainOutput = tuple[EvalTotals, dict[str, float], int]


def batched_support(trainers: Sequence) -> str | None:
    """Why these trainers cannot train as one batched computation (None: they can)."""
    if not trainers:
        return "no trainers"
    first = trainers[0]
    layout = cnn_layout(first.model.host)
    if layout is None:
        return supports_host(first.model.host)
    for tr in trainers:
        cfg = tr.config
        if cfg.optimizer != "sgd":
            return f"batched host training supports optimizer 'sgd' only, got {cfg.optimizer!r}"
        if cfg.amp != "off":
            return f"batched host training runs in float32 only, got amp={cfg.amp!r}"
        if tr.device != first.device:
            return f"batched envs must share one device, got {first.device} and {tr.device}"
        if cnn_layout(tr.model.host) != layout:
            return "batched envs must have hosts of one shape"
        if (cfg.batch_size, cfg.batches_per_step) != (
            first.config.batch_size,
            first.config.batches_per_step,
        ):
            return "batched envs must share batch_size and batches_per_step"
        if getattr(tr.model, "own_seed_pass", True) is False:
            return "batched host training needs own_seed_pass=True (the default)"
        group = tr.host_optimizer.param_groups[0]
        ref = first.host_optimizer.param_groups[0]
        keys = ("lr", "momentum", "weight_decay", "dampening", "nesterov")
        if len(tr.host_optimizer.param_groups) != 1 or any(group[k] != ref[k] for k in keys):
            return "batched envs' host optimisers must share their settings"
        stream = tr.stream
        # Batches line up only if every stream is at the same place of a same-sized epoch.
        if (stream.n, stream.batch_size, stream._pos) != (
            first.stream.n,
            first.stream.batch_size,
            first.stream._pos,
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
        if len(block) == 4:
            h, w = h // 2, w // 2
    return most


def group_size(trainers: Sequence, rows: int) -> int:
    """How many envs to put in one grouped pass of ``rows`` samples per env."""
    first = trainers[0]
    per_env = rows * _floats_per_sample(first.model.host, tuple(first.data.train_x.shape))
    return max(1, min(len(trainers), ACTIVATION_BUDGET // max(per_env, 1)))


def train_batched(trainers: Sequence) -> list[TrainOutput]:
    """The training phase of each trainer's next step, for all of them at once:
    per trainer ``(training totals, mean seed grad norms, samples)`` as `Trainer._train`
    returns. Call `batched_support` first; raises ValueError if it objects."""
    reason = batched_support(trainers)
    if reason is not None:
        raise ValueError(reason)
    size = group_size(trainers, trainers[0].config.batch_size)
    return [
        out
        for start in range(0, len(trainers), size)
        for out in _train_group(trainers[start : start + size])
    ]


def _train_group(trainers: Sequence) -> list[TrainOutput]:
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
    group = host_opts[0].param_groups[0]
    optimizer = torch.optim.SGD(
        stacked.params,
        lr=group["lr"],
        momentum=group["momentum"],
        weight_decay=group["weight_decay"],
        dampening=group["dampening"],
        nesterov=group["nesterov"],
    )
    env_params = stacked.env_params()
    _load_momentum(optimizer, stacked.params, env_params, host_opts)
    seed_opts = [[opt for _, opt in tr.seed_optimizers.values()] for tr in trainers]
    grad_sq = [
        {sid: torch.zeros((), device=device) for sid in tr.seed_optimizers} for tr in trainers
    ]
    loss_sum = torch.zeros(E, device=device, dtype=torch.float32)  # as EvalTotals sums
    correct = torch.zeros(E, device=device, dtype=torch.long)
    try:
        for step in range(len(batches[0])):
            idx = torch.stack([b[step] for b in batches]).to(device, non_blocking=True)  # [E, B]
            if shared:
                xe, ye = trainers[0].data.train_x[idx], trainers[0].data.train_y[idx]
            else:
                xe = torch.stack([tr.data.train_x[i] for tr, i in zip(trainers, idx, strict=True)])
                ye = torch.stack([tr.data.train_y[i] for tr, i in zip(trainers, idx, strict=True)])
            B = idx.shape[1]
            x = xe.transpose(0, 1).reshape(B, -1, *xe.shape[3:])  # channel group e = env e
            optimizer.zero_grad(set_to_none=True)
            for opts in seed_opts:
                for opt in opts:
                    opt.zero_grad(set_to_none=True)
            xs = list(xe.unbind(0))
            logits, seed_loss = train_forward(stacked, models, plan, x, xs, ye)
            logits = logits.float()  # as `Trainer._train`
            losses = F.cross_entropy(logits.permute(0, 2, 1), ye.T, reduction="none")  # [B, E]
            loss = losses.mean(0).sum()
            if seed_loss is not None:
                loss = loss + seed_loss
            loss.backward()
            if cfg.grad_clip is not None:
                _clip_per_env(stacked.params, E, cfg.grad_clip)
                for opts in seed_opts:
                    for opt in opts:
                        params = [p for g in opt.param_groups for p in g["params"]]
                        nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            for e, model in enumerate(models):
                for sid in grad_sq[e]:
                    grads = [p.grad for p in model.seed_parameters(sid) if p.grad is not None]
                    if grads:
                        grad_sq[e][sid] += torch.linalg.vector_norm(
                            torch.stack([torch.linalg.vector_norm(g) for g in grads])
                        )
            optimizer.step()
            for opts in seed_opts:
                for opt in opts:
                    opt.step()
            with torch.no_grad():
                # Row sums of [E, B]: the same reduction as EvalTotals' sum of one env's [B].
                loss_sum += losses.detach().T.contiguous().sum(1)
                correct += (logits.argmax(dim=-1) == ye.T).sum(0)
    finally:
        _store_momentum(optimizer, stacked.params, env_params, host_opts)
        stacked.release(len(batches[0]))
        for model in models:
            model._seed_prefix = None
    out = []
    for e in range(E):
        samples = sum(int(i.numel()) for i in batches[e])
        totals = EvalTotals(loss_sum=loss_sum[e], correct=correct[e], count=samples)
        n = max(len(batches[e]), 1)
        out.append((totals, {sid: float(v) / n for sid, v in grad_sq[e].items()}, samples))
    return out


@torch.no_grad()
def validate_batched(trainers: Sequence) -> list[CounterfactualResult | None]:
    """The live validation pass of every trainer that has nothing else to measure (no
    seed module in any slot), as one eval-mode grouped pass over the shared validation
    set; None for the others (they validate on their own: their counterfactual
    variants stack on the batch dimension, per env). Pass to ``train_step(validated=)``."""
    out: list[CounterfactualResult | None] = [None] * len(trainers)
    plain = [
        k
        for k, tr in enumerate(trainers)
        if not any(active_slots([tr.model], i) for i in range(tr.model.num_blocks))
    ]
    val_x = trainers[plain[0]].data.val_x if plain else None
    plain = [k for k in plain if trainers[k].data.val_x is val_x]
    if len(plain) < 2 or batched_support([trainers[k] for k in plain]) is not None:
        return out
    # Fewer rows per chunk rather than fewer envs per group, down to 32 rows.
    size = group_size([trainers[k] for k in plain], 32)
    for start in range(0, len(plain), size):
        group = plain[start : start + size]
        first = trainers[group[0]]
        fps = _floats_per_sample(first.model.host, tuple(first.data.val_x.shape))
        rows = min(first.config.eval_batch_size, max(32, ACTIVATION_BUDGET // (len(group) * fps)))
        for k, result in zip(
            group, _validate_group([trainers[k] for k in group], rows), strict=True
        ):
            out[k] = result
    return out


def _validate_group(trainers: Sequence, rows: int) -> list[CounterfactualResult]:
    E = len(trainers)
    val_x = trainers[0].data.val_x
    hosts = [tr.model.host for tr in trainers]
    first = trainers[0]
    convs = [torch.cat([h.blocks[i][0].weight for h in hosts]) for i in range(len(hosts[0].blocks))]
    convs = [w.contiguous(memory_format=CL) for w in convs]
    bns = [
        [torch.cat([getattr(h.blocks[i][1], name) for h in hosts]) for name in _BN_FIELDS]
        for i in range(len(hosts[0].blocks))
    ]
    head_w = torch.stack([h.classifier.weight for h in hosts])
    head_b = torch.stack([h.classifier.bias for h in hosts])
    loss_sum: Tensor | float = 0.0  # in the logits' dtype, as EvalTotals sums
    correct = torch.zeros(E, device=val_x.device, dtype=torch.long)
    val_y = first.data.val_y
    for start in range(0, val_x.shape[0], rows):
        x, y = val_x[start : start + rows], val_y[start : start + rows]
        h = x.repeat(1, E, 1, 1).contiguous(memory_format=CL)
        for i, block in enumerate(hosts[0].blocks):
            h = F.conv2d(h, convs[i], padding=1, groups=E)
            weight, bias, mean, var = bns[i]
            h = F.batch_norm(h, mean, var, weight, bias, training=False, eps=block[1].eps)
            h = F.relu(h)
            if len(block) == 4:
                h = F.max_pool2d(h, 2)
        feats = h.mean(dim=(-2, -1)).view(h.shape[0], E, -1)
        logits = torch.einsum("bec,ekc->bek", feats, head_w) + head_b
        targets = y[:, None].expand(-1, E)
        losses = F.cross_entropy(logits.permute(0, 2, 1), targets, reduction="none")  # [n, E]
        loss_sum = loss_sum + losses.T.contiguous().sum(1)
        correct += (logits.argmax(dim=-1) == targets).sum(0)
    out = []
    for e, tr in enumerate(trainers):
        t = EvalTotals(loss_sum=loss_sum[e], correct=correct[e], count=int(val_x.shape[0]))  # type: ignore[index]
        out.append(
            CounterfactualResult(
                val_loss=t.loss, val_acc=t.accuracy, quality=quality(tr.kind, t.loss, t.accuracy)
            )
        )
    return out


def _clip_per_env(params: list[Tensor], E: int, max_norm: float) -> None:
    """`clip_grad_norm_` of each env's host gradients on its own."""
    grads = [p.grad.view(E, -1) for p in params if p.grad is not None]
    if not grads:
        return
    norms = torch.linalg.vector_norm(
        torch.stack([torch.linalg.vector_norm(g, dim=1) for g in grads], 1), dim=1
    )
    coef = torch.clamp(max_norm / (norms + 1e-6), max=1.0)
    for g in grads:
        g.mul_(coef[:, None])


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
