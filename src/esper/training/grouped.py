"""The hosts of E envs as one grouped network (`esper.training.batched` trains it).

* Env e's images are channel group e of one input ``[B, E·C, H, W]``; every conv runs
  with ``groups=E`` on the envs' weights concatenated along the output channels;
  BatchNorm over the ``E·C`` channels is exactly per-env BatchNorm (its statistics are
  per channel); ReLU and max-pooling are per channel; the linear head is a batched
  matmul over ``[E, K, C]``.
* Seeds stay per env: at block i, env e's slot module (any blueprint, stage or blend)
  is applied to its channel slice only, and a width seed's pending term is added to its
  slice of the next conv's output (or its row of the logits).
* TRAINING seeds' own pass (`MorphogeneticModel.seed_forward`) runs grouped too, on the
  host as constants (`Detached`), except for envs whose pass crosses another seed
  (`Plan`).
* While `Stacked` lives, every env's host parameters and BatchNorm buffers are *views*
  into the stacked tensors (so per-env code sees the current values); `release` gives
  them their own storage again.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from esper.lifecycle import SeedStage
from esper.training.objective import task_loss

# Grouped convs with a few channels per group run ~3x faster channels-last on CPU
# (16 digits envs: 8.9 vs 28.8 ms per batch, forward + backward, one thread).
CL = torch.channels_last
_HAS_MODULE = (
    SeedStage.GERMINATED,
    SeedStage.TRAINING,
    SeedStage.BLENDING,
    SeedStage.HOLDING,
    SeedStage.FOSSILIZED,
)


def cnn_layout(host: nn.Module) -> tuple | None:
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
    if cnn_layout(host) is None:
        return (
            "batched host training supports plain CNNHost hosts only (conv-BN-ReLU[-pool] "
            f"blocks, a linear head), got {type(host).__name__}"
        )
    return None


class Stacked:
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


def active_slots(models: Sequence[nn.Module], i: int) -> list[int]:
    """Envs whose slot at block i holds a seed module (anything else is the identity)."""
    out = []
    for e, model in enumerate(models):
        sid = model._block_slots[i]
        if sid is not None:
            slot = model.slots[sid]
            if slot.seed is not None and slot.stage in _HAS_MODULE:
                out.append(e)
    return out


class Plan:
    """Which env has what at which block: fixed for a step (stages change between steps).

    TRAINING seeds' own pass (`MorphogeneticModel.seed_forward`) runs grouped for the
    envs in ``grouped`` from block ``start`` (the earliest of their first TRAINING
    seeds), on the main forward's activations there: blocks before an env's own first
    TRAINING seed compute exactly what the main forward did. An env whose pass would
    cross another seed module (BLENDING, HOLDING, FOSSILIZED: detached constants in
    that pass, with buffers left alone) runs ``seed_forward`` itself (``alone``).
    """

    def __init__(self, models) -> None:
        self.active = [active_slots(models, i) for i in range(models[0].num_blocks)]
        self.width = [
            {e: models[e].slots[models[e]._block_slots[i]].holds_width for e in active}
            for i, active in enumerate(self.active)
        ]
        training = [set(m.training_seeds()) for m in models]
        firsts = [m._first_training_block() for m in models]
        seeded = [e for e, first in enumerate(firsts) if first is not None]

        def crosses_other(e: int, start: int) -> bool:
            return any(
                e in self.active[i] and models[e]._block_slots[i] not in training[e]
                for i in range(start, len(self.active))
            )

        start = min((firsts[e] for e in seeded), default=0)
        self.grouped = [e for e in seeded if not crosses_other(e, start)]
        self.alone = [e for e in seeded if e not in self.grouped]
        self.start = min((firsts[e] for e in self.grouped), default=0)
        self.firsts = firsts
        self.training = training


def grouped_pass(
    layers,
    models,
    plan: Plan,
    envs: list[int],
    h: Tensor,
    pend: dict,
    start: int,
    *,
    seed_pass: bool = False,
    record=None,
):
    """Blocks ``start``.. and the head of the grouped host for ``envs`` (indices into
    ``models``; group k of ``h`` is env ``envs[k]``): logits ``[B, len(envs), K]``.
    ``seed_pass``: TRAINING seeds on at alpha 1 (their own pass). ``record(i, h, pend)``
    sees what enters block i."""
    G = len(envs)
    local = {e: k for k, e in enumerate(envs)}
    for i in range(start, len(layers.convs)):
        if record is not None:
            record(i, h, pend)
        z = F.conv2d(h, layers.convs[i].contiguous(memory_format=CL), padding=1, groups=G)
        full = _pending_full(pend, z, G)
        if full is not None:
            z = z + full
        g, b, rm, rv, eps, momentum = layers.bns[i]
        z = F.batch_norm(z, rm, rv, g, b, training=True, momentum=momentum, eps=eps)
        z = F.relu(z, inplace=True)  # BatchNorm's backward reads its input, not output
        if layers.pools[i]:
            z = F.max_pool2d(z, 2)
        outs, pend = {}, {}
        for e in plan.active[i]:
            k = local.get(e)
            if k is None:
                continue
            model = models[e]
            alpha = 1.0 if seed_pass and model._block_slots[i] in plan.training[e] else None
            tap = _env_part(h, k, G) if plan.width[i][e] else None
            out_k, p = model.apply_slot(i, _env_part(z, k, G), tap, alpha)
            outs[k] = out_k
            if p is not None:
                pend[k] = p
        h = _join(z, outs, G)
    feats = h.mean(dim=(-2, -1)).view(h.shape[0], G, -1)
    logits = torch.einsum("bec,ekc->bek", feats, layers.head_w) + layers.head_b
    if pend:
        zero = logits.new_zeros(logits[:, 0].shape)
        logits = logits + torch.stack([pend.get(k, zero) for k in range(G)], 1)
    return logits


class Detached:
    """Envs ``envs`` of the stacked host as constants (the own seed pass's host): no
    gradient, BatchNorm on batch statistics without touching the running ones."""

    def __init__(self, stacked: Stacked, envs: list[int]) -> None:
        E, index = stacked.num_envs, torch.tensor(envs, device=stacked.head_w.device)

        def pick(t: Tensor) -> Tensor:
            return t.detach().view(E, -1, *t.shape[1:]).index_select(0, index).flatten(0, 1)

        self.convs = [pick(w) for w in stacked.convs]
        self.bns = [(pick(g), pick(b), None, None, eps, m) for g, b, _, _, eps, m in stacked.bns]
        self.pools = stacked.pools
        self.head_w = stacked.head_w.detach().index_select(0, index)
        self.head_b = stacked.head_b.detach().index_select(0, index)


def _gather(t: Tensor, envs: list[int], E: int) -> Tensor:
    """Channel groups ``envs`` of a grouped activation, detached, in that order."""
    return torch.cat([_slice(t, e, E) for e in envs], 1).detach().contiguous(memory_format=CL)


def train_forward(stacked: Stacked, models, plan: Plan, x: Tensor, xs: list[Tensor], ys: Tensor):
    """Train-mode forward of all envs: (logits ``[B, E, K]``, the summed loss of the
    TRAINING seeds' own passes or None)."""
    E = stacked.num_envs
    entering: dict = {}

    def record(i: int, h: Tensor, pend: dict) -> None:
        if plan.grouped and i == plan.start:
            entering["h"], entering["pend"] = h, pend
        for e in plan.alone:
            if plan.firsts[e] == i:  # `seed_forward` reuses the forward up to here
                p = pend.get(e)
                models[e]._seed_prefix = (
                    xs[e],
                    i,
                    _env_part(h, e, E).detach(),
                    None if p is None else p.detach(),
                )

    everyone = list(range(E))
    logits = grouped_pass(
        stacked, models, plan, everyone, x.contiguous(memory_format=CL), {}, 0, record=record
    )
    seed_loss = None
    if plan.grouped:
        envs = plan.grouped
        h = _gather(entering["h"], envs, E)
        pend = {
            k: entering["pend"][e].detach() for k, e in enumerate(envs) if e in entering["pend"]
        }
        own = grouped_pass(
            Detached(stacked, envs), models, plan, envs, h, pend, plan.start, seed_pass=True
        ).float()
        # One loss per env on a dense [B, K] as `seed_forward`'s caller computes it: the
        # float32 cross-entropy of a strided [B, K, G] view rounds differently (1e-10
        # apart after a step, in float64 runs).
        seed_loss = sum(task_loss(own[:, k].contiguous(), ys[e]) for k, e in enumerate(envs))
    for e in plan.alone:
        own = models[e].seed_forward(xs[e])
        term = task_loss(own.float(), ys[e])
        seed_loss = term if seed_loss is None else seed_loss + term
    return logits, seed_loss
