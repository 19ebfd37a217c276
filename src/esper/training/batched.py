"""Host training of E lockstep envs as one batched computation (issue 16, item 1).

The training phase of `Trainer.train_step` (``_train``: one epoch or
``batches_per_step`` batches) costs ~4 ms per 64-image batch for a 500-parameter digits
CNN, almost all of it per-call overhead. `train_batched` runs that phase for E trainers
at once, on one *grouped* network:

* env e's images are channel group e of one input ``[B, E·C, H, W]``; every conv runs
  with ``groups=E`` on the envs' weights concatenated along the output channels, and
  BatchNorm over the ``E·C`` channels is exactly per-env BatchNorm (its statistics are
  per channel); ReLU and max-pooling are per channel; the linear head is a batched
  matmul over ``[E, K, C]``. The loss is the sum of the envs' mean losses, so each env's
  gradient is exactly its own.
* Seeds stay per env: at block i, env e's slot module (any blueprint, stage or blend)
  is applied to its channel slice only, and a width seed's pending term is added to its
  slice of the next conv's output (or its row of the logits). A TRAINING seed learns
  from its env's own `MorphogeneticModel.seed_forward` pass, as in the per-env loop.
* For the duration of the phase every env's host parameters and BatchNorm buffers are
  *views* into the stacked tensors (so per-env code such as ``seed_forward`` sees the
  current values); afterwards they own their storage again.
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

from esper.lifecycle import SeedStage
from esper.training.counterfactual import CounterfactualResult
from esper.training.objective import EvalTotals, quality, task_loss

# Grouped convs with a few channels per group run ~3x faster channels-last on CPU
# (16 digits envs: 8.9 vs 28.8 ms per batch, forward + backward, one thread).
_CL = torch.channels_last
_BN_FIELDS = ("weight", "bias", "running_mean", "running_var")
TrainOutput = tuple[EvalTotals, dict[str, float], int]
_HAS_MODULE = (
    SeedStage.GERMINATED,
    SeedStage.TRAINING,
    SeedStage.BLENDING,
    SeedStage.HOLDING,
    SeedStage.FOSSILIZED,
)


def _cnn_layout(host: nn.Module) -> tuple | None:
    """Shape signature of a plain `CNNHost` (None: some other structure)."""
    from esper.model.hosts import CNNHost  # lazy: esper.model imports are not free

    if type(host) is not CNNHost:
        return None
    layout = []
    for block in host.blocks:
        kinds = tuple(type(m) for m in block)
        if kinds[:3] != (nn.Conv2d, nn.BatchNorm2d, nn.ReLU) or kinds[3:] not in (
            (),
            (nn.MaxPool2d,),
        ):
            return None
        conv, bn = block[0], block[1]
        if (
            conv.bias is not None
            or conv.groups != 1
            or not bn.track_running_stats
            or bn.momentum is None
        ):
            return None
        layout.append((tuple(conv.weight.shape), len(kinds) == 4, bn.eps, bn.momentum))
    return tuple(layout), tuple(host.classifier.weight.shape)


def supports_host(host: nn.Module) -> str | None:
    """Why this host cannot train batched (None: it can)."""
    if _cnn_layout(host) is None:
        return (
            "batched host training supports plain CNNHost hosts only (conv-BN-ReLU[-pool] "
            f"blocks, a linear head), got {type(host).__name__}"
        )
    return None


def batched_support(trainers: Sequence) -> str | None:
    """Why these trainers cannot train as one batched computation (None: they can)."""
    if not trainers:
        return "no trainers"
    first = trainers[0]
    layout = _cnn_layout(first.model.host)
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
        if _cnn_layout(tr.model.host) != layout:
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


class _Stacked:
    """The E hosts' parameters and BatchNorm buffers as stacked tensors, with every
    env's own tensors turned into views of them until `release`."""

    def __init__(self, hosts: Sequence[nn.Module]) -> None:
        self.hosts = hosts
        E = len(hosts)
        self.convs, self.bns, self.pools = [], [], []
        self.params: list[Tensor] = []  # stacked leaves, in host.parameters() order
        self._owners: list[list[Tensor]] = []  # per stacked tensor: the env tensors
        for i, block in enumerate(hosts[0].blocks):
            self.pools.append(len(block) == 4)
            conv_w = self._stack([h.blocks[i][0].weight for h in hosts], param=True)
            bn = [h.blocks[i][1] for h in hosts]
            self.convs.append(conv_w)
            self.bns.append(
                (
                    self._stack([m.weight for m in bn], param=True),
                    self._stack([m.bias for m in bn], param=True),
                    self._stack([m.running_mean for m in bn]),
                    self._stack([m.running_var for m in bn]),
                    bn[0].eps,
                    bn[0].momentum,
                )
            )
        cls = [h.classifier for h in hosts]
        self.head_w = self._stack([c.weight for c in cls], param=True, new_dim=True)
        self.head_b = self._stack([c.bias for c in cls], param=True, new_dim=True)
        self.num_envs = E

    def _stack(self, tensors: list[Tensor], param: bool = False, new_dim: bool = False):
        with torch.no_grad():
            joined = torch.stack(tensors) if new_dim else torch.cat(tensors)
        if param:
            joined.requires_grad_(True)
            self.params.append(joined)
        views = joined.detach().view(len(tensors), *tensors[0].shape)
        for e, t in enumerate(tensors):
            t.data = views[e]
        self._owners.append(tensors)
        return joined

    def env_params(self) -> list[list[Tensor]]:
        """For each stacked leaf, the envs' own parameters (in `params` order)."""
        return [o for o in self._owners if isinstance(o[0], nn.Parameter)]

    def release(self, batches: int) -> None:
        """Give every env tensor its own storage again; count the training forwards in
        each BatchNorm's ``num_batches_tracked`` as the per-env loop does."""
        for owners in self._owners:
            for t in owners:
                t.data = t.data.clone()
        for host in self.hosts:
            for block in host.blocks:
                block[1].num_batches_tracked += batches


def _slice(t: Tensor, e: int, E: int) -> Tensor:
    c = t.shape[1] // E
    return t[:, e * c : (e + 1) * c]


def _env_part(t: Tensor, e: int, E: int) -> Tensor:
    """Env e's channels as a tensor of its own: per-env modules (seeds) get the dense
    layout they get in the per-env loop (oneDNN kernels crash in backward on the
    strided channel slice of a channels-last tensor)."""
    return _slice(t, e, E).contiguous()


def _join(full: Tensor, parts: dict[int, Tensor], E: int) -> Tensor:
    """``full`` with env e's channel slice replaced by ``parts[e]``."""
    if not parts:
        return full
    return torch.cat([parts[e] if e in parts else _slice(full, e, E) for e in range(E)], 1)


def _pending_full(parts: dict[int, Tensor], like: Tensor, E: int) -> Tensor | None:
    """Per-env width terms as one tensor shaped like ``like`` (zeros elsewhere)."""
    if not parts:
        return None
    c = like.shape[1] // E
    zero = like.new_zeros((like.shape[0], c, *like.shape[2:]))
    return torch.cat([parts.get(e, zero) for e in range(E)], 1)


def _active_slots(models: Sequence[nn.Module], i: int) -> list[int]:
    """Envs whose slot at block i holds a seed module (anything else is the identity)."""
    out = []
    for e, model in enumerate(models):
        sid = model._block_slots[i]
        if sid is not None:
            slot = model.slots[sid]
            if slot.seed is not None and slot.stage in _HAS_MODULE:
                out.append(e)
    return out


class _Plan:
    """Which env has what at which block: fixed for a step (stages change between steps)."""

    def __init__(self, models) -> None:
        self.firsts = [m._first_training_block() for m in models]
        self.active = [_active_slots(models, i) for i in range(models[0].num_blocks)]
        self.width = [
            {e: models[e].slots[models[e]._block_slots[i]].holds_width for e in active}
            for i, active in enumerate(self.active)
        ]
        self.seed_pass = [bool(m.training_seeds()) for m in models]


def _forward(stacked: _Stacked, models, plan: _Plan, x: Tensor, xs: list[Tensor]):
    """Train-mode forward of all envs: logits ``[B, E, K]``; records each env's seed
    prefix (what enters its first TRAINING seed's block) for `seed_forward`."""
    E = stacked.num_envs
    firsts = plan.firsts
    h, pend = x.contiguous(memory_format=_CL), {}
    for i, w in enumerate(stacked.convs):
        for e, first in enumerate(firsts):
            if first == i:  # the own seed pass starts here and reuses this prefix
                p = pend.get(e)
                models[e]._seed_prefix = (
                    xs[e],
                    i,
                    _env_part(h, e, E).detach(),
                    None if p is None else p.detach(),
                )
        z = F.conv2d(h, w.contiguous(memory_format=_CL), padding=1, groups=E)
        full = _pending_full(pend, z, E)
        if full is not None:
            z = z + full
        g, b, rm, rv, eps, momentum = stacked.bns[i]
        z = F.batch_norm(z, rm, rv, g, b, training=True, momentum=momentum, eps=eps)
        z = F.relu(z, inplace=True)  # BatchNorm's backward reads its input, not output
        if stacked.pools[i]:
            z = F.max_pool2d(z, 2)
        outs, pend = {}, {}
        for e in plan.active[i]:
            tap = _env_part(h, e, E) if plan.width[i][e] else None
            out_e, p = models[e].apply_slot(i, _env_part(z, e, E), tap)
            outs[e] = out_e
            if p is not None:
                pend[e] = p
        h = _join(z, outs, E)
    feats = h.mean(dim=(-2, -1)).view(h.shape[0], E, -1)
    logits = torch.einsum("bec,ekc->bek", feats, stacked.head_w) + stacked.head_b
    if pend:
        logits = logits + torch.stack(
            [pend[e] if e in pend else logits.new_zeros(logits[:, e].shape) for e in range(E)], 1
        )
    return logits


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
    stacked = _Stacked([m.host for m in models])
    plan = _Plan(models)
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
            logits = _forward(stacked, models, plan, x, xs).float()  # as `Trainer._train`
            losses = F.cross_entropy(logits.permute(0, 2, 1), ye.T, reduction="none")  # [B, E]
            loss = losses.mean(0).sum()
            for e, model in enumerate(models):
                own = model.seed_forward(xs[e]) if plan.seed_pass[e] else None
                if own is not None:
                    loss = loss + task_loss(own.float(), ye[e])
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
        if not any(_active_slots([tr.model], i) for i in range(tr.model.num_blocks))
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
    convs = [w.contiguous(memory_format=_CL) for w in convs]
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
        h = x.repeat(1, E, 1, 1).contiguous(memory_format=_CL)
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
