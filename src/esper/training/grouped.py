"""The hosts of E envs as one grouped network (`esper.training.batched` trains it).

* Env e's images are channel group e of one input ``[B, E·C, H, W]``; every conv runs
  with ``groups=E`` on the envs' weights concatenated along the output channels;
  BatchNorm over the ``E·C`` channels is exactly per-env BatchNorm (its statistics are
  per channel); ReLU and max-pooling are per channel; the linear head is a batched
  matmul over ``[E, K, C]``.
* Seeds stay per env: at block i, env e's slot module (any blueprint, stage or blend)
  is applied to its channel slice only, and a width seed's pending term is added to its
  slice of the next conv's output (or its row of the logits). Plain convolution seeds
  (`conv_light`) of several envs at one block run as one grouped convolution
  (`_conv_seed`); a hidden TRAINING seed costs nothing in the main pass.
* TRAINING seeds' own pass (`MorphogeneticModel.seed_forward`) runs grouped too, on the
  host as constants (`Detached`): each env joins it at the block of its first TRAINING
  seed with the main forward's output of that block, so no host block before it is run
  twice; envs whose pass crosses another seed run alone (`Plan`).
* Eval passes of *lanes* (an env's live model or one of its counterfactual variants,
  `Picked`, `lane_slots`) serve `esper.training.batched.validate_batched`.
* While `Stacked` lives, every env's host parameters and BatchNorm buffers are *views*
  into the stacked tensors (so per-env code sees the current values); `release` gives
  them their own storage again, and their share of the last gradient.
* Only a plain `CNNHost` qualifies (`cnn_layout`, read from module types and
  settings), and none whose modules carry hooks: the grouped pass calls none of the
  host's modules, so a hook would silently miss the batched steps.
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


def block_pool(block: nn.Module) -> nn.MaxPool2d | None:
    """The block's max-pool, found by module type (None: the block does not pool)."""
    pools = [m for m in block if isinstance(m, nn.MaxPool2d)]
    return pools[0] if pools else None


def cnn_layout(host: nn.Module) -> tuple | None:
    """Shape signature of a plain `CNNHost` (None: some other structure): what the
    grouped pass computes from, so envs batch together only when theirs are equal."""
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
        conv, bn, pool = block[0], block[1], block_pool(block)
        if (
            conv.bias is not None
            or conv.groups != 1
            or conv.padding_mode != "zeros"
            or not bn.affine
            or not bn.track_running_stats
            or bn.momentum is None
            or (pool is not None and pool.return_indices)
        ):
            return None
        pooling = None
        if pool is not None:
            pooling = (pool.kernel_size, pool.stride, pool.padding, pool.dilation, pool.ceil_mode)
        conv_settings = (conv.stride, conv.padding, conv.dilation)
        layout.append((tuple(conv.weight.shape), conv_settings, bn.eps, bn.momentum, pooling))
    if host.classifier.bias is None:
        return None
    return tuple(layout), tuple(host.classifier.weight.shape)


def _hooked(host: nn.Module) -> str | None:
    """Name of a module or parameter of ``host`` that carries a hook, global module
    hooks included (None: none does). torch offers no public query, so its hook
    dictionaries are read."""
    hooks = torch.nn.modules.module
    if hooks._global_forward_hooks or hooks._global_forward_pre_hooks:
        return "all modules (a global hook)"
    if hooks._global_backward_hooks or hooks._global_backward_pre_hooks:
        return "all modules (a global hook)"
    for name, m in host.named_modules():
        if m._forward_hooks or m._forward_pre_hooks or m._backward_hooks:
            return name or "the host"
        if m._backward_pre_hooks:
            return name or "the host"
    for name, p in host.named_parameters():
        if p._backward_hooks or p._post_accumulate_grad_hooks:
            return name
    return None


def supports_host(host: nn.Module) -> str | None:
    """Why this host cannot train batched (None: it can)."""
    if cnn_layout(host) is None:
        return (
            "batched host training supports plain CNNHost hosts only (conv-BN-ReLU[-pool] "
            f"blocks, a linear head), got {type(host).__name__}"
        )
    # The grouped network calls none of the host's modules and its gradients land on
    # stacked tensors: a hook (a statistic collected for growth) would be skipped.
    hooked = _hooked(host)
    if hooked is not None:
        return (
            f"batched host training would skip the hooks registered on the host "
            f"({hooked!r}); train these envs one by one"
        )
    return None


class Stacked:
    """The E hosts' layers as stacked tensors. ``bind`` (training): the parameters are
    new leaves and every env's own parameters and BatchNorm buffers are views of them
    until `release`; otherwise (an eval pass) plain copies.

    ``weights``, ``bns``, ``head_w``, ``head_b`` are what `grouped_pass` computes with;
    ``convs`` and ``pools`` (env 0's modules: `cnn_layout` makes them equal in every
    env) give the convolutions' and pools' settings."""

    def __init__(self, hosts: Sequence[nn.Module], bind: bool = True) -> None:
        self.hosts, self.bind = hosts, bind
        self.num_envs = len(hosts)
        self.params: list[Tensor] = []  # stacked leaves, in host.parameters() order
        self._bound: list[tuple[Tensor, list[Tensor]]] = []  # (stacked, env tensors)
        self.convs: list[nn.Conv2d] = [block[0] for block in hosts[0].blocks]
        self.pools = [block_pool(block) for block in hosts[0].blocks]
        self.weights: list[Tensor] = []
        self.bns: list[tuple] = []
        for i in range(len(self.convs)):
            bn = [h.blocks[i][1] for h in hosts]
            self.weights.append(self._stack([h.blocks[i][0].weight for h in hosts], param=True))
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

    def _stack(self, tensors: list[Tensor], param: bool = False, new_dim: bool = False):
        with torch.no_grad():
            joined = torch.stack(tensors) if new_dim else torch.cat(tensors)
        if not self.bind:
            return joined
        if param:
            joined.requires_grad_(True)
            self.params.append(joined)
        views = joined.detach().view(len(tensors), *tensors[0].shape)
        for e, t in enumerate(tensors):
            t.data = views[e]
        self._bound.append((joined, tensors))
        return joined

    def env_params(self) -> list[list[Tensor]]:
        """For each stacked leaf, the envs' own parameters (in `params` order)."""
        return [owners for _, owners in self._bound if isinstance(owners[0], nn.Parameter)]

    def release(self, batches: int) -> None:
        """Give every env tensor its own storage again, and leave each env's host what
        the per-env loop leaves: its share of the last batch's gradient, and the
        training forwards counted in each BatchNorm's ``num_batches_tracked``."""
        for joined, owners in self._bound:
            grads = None if joined.grad is None else joined.grad.view(len(owners), -1)
            for e, t in enumerate(owners):
                t.data = t.data.clone()
                if grads is not None:
                    t.grad = grads[e].view_as(t).clone()
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


def block_slots(model: nn.Module) -> tuple[str | None, ...]:
    """The slot id after each of ``model``'s blocks (None: no slot enabled there)."""
    at = {model.block_index(sid): sid for sid in model.slots}
    return tuple(at.get(i) for i in range(model.num_blocks))


def holds_seed_module(model: nn.Module, slot_id: str | None) -> bool:
    """Whether the slot holds a seed module (anything else is the identity)."""
    if slot_id is None:
        return False
    slot = model.slots[slot_id]
    return slot.seed is not None and slot.stage in _HAS_MODULE


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
        self.slot_ids = [block_slots(m) for m in models]  # per env, per block
        blocks = range(models[0].num_blocks)
        self.active = [
            [e for e, m in enumerate(models) if holds_seed_module(m, self.slot_ids[e][i])]
            for i in blocks
        ]
        self.width = [
            {e: models[e].slots[self.slot_ids[e][i]].holds_width for e in self.active[i]}
            for i in blocks
        ]
        training = [set(m.training_seeds()) for m in models]
        firsts = [
            min((m.block_index(s) for s in training[e]), default=None) for e, m in enumerate(models)
        ]
        seeded = [e for e, first in enumerate(firsts) if first is not None]

        def crosses_other(e: int, start: int) -> bool:
            return any(
                e in self.active[i] and self.slot_ids[e][i] not in training[e]
                for i in range(start, len(self.active))
            )

        self.grouped = [e for e in seeded if not crosses_other(e, firsts[e])]  # type: ignore[arg-type]
        self.alone = [e for e in seeded if e not in self.grouped]
        # Block -> the grouped envs whose own pass starts there (their first TRAINING seed).
        self.joins: dict[int, list[int]] = {}
        for e in self.grouped:
            self.joins.setdefault(firsts[e], []).append(e)  # type: ignore[arg-type]
        self.start = min(self.joins, default=0)
        self.training = training


def _hidden(slot, alpha: float | None) -> bool:
    """Whether the slot's seed leaves its input unchanged in this call: a GERMINATED or
    TRAINING seed hidden from the forward (its own pass trains it), as `SeedSlot` rules."""
    if alpha is not None or slot.stage not in (SeedStage.GERMINATED, SeedStage.TRAINING):
        return False
    return not (slot.straight_through and slot.training and torch.is_grad_enabled())


def host_block(layers, i: int, h: Tensor, pend: dict, G: int, training: bool) -> Tensor:
    """Host block i (conv, BatchNorm, ReLU, pool) of ``G`` grouped envs, with the width
    terms ``pend`` (group -> term) added to the conv's output. ``layers``: `Stacked`,
    `Detached`, or anything with their ``convs``, ``pools``, ``weights``, ``bns``."""
    conv = layers.convs[i]
    weight = layers.weights[i].contiguous(memory_format=CL)
    # A slot's output joined back (`_join`) is a plain-layout tensor: back to channels-
    # last, where the grouped kernels run ~3x faster (a no-op when it already is).
    h = h.contiguous(memory_format=CL)
    z = F.conv2d(h, weight, None, conv.stride, conv.padding, conv.dilation, G)
    full = _pending_full(pend, z, G)
    if full is not None:
        z = z + full
    g, b, rm, rv, eps, momentum = layers.bns[i]
    z = F.batch_norm(z, rm, rv, g, b, training=training, momentum=momentum, eps=eps)
    z = F.relu(z, inplace=True)  # BatchNorm's backward reads its input, not output
    pool = layers.pools[i]
    return z if pool is None else pool(z)  # per channel: the same on E·C channels as on C


def _conv_seed(slot, alpha: float | None) -> tuple | None:
    """(group key, multiplier) of a slot whose output is ``h + a * conv(h_in)`` with a
    plain `nn.Conv2d` seed (``conv_light``), so that such slots of several envs run as
    one grouped convolution; None for any other slot (it runs on its own)."""
    seed = slot.seed
    if type(seed) is not nn.Conv2d or slot.gate is not None or alpha == 0.0:
        return None
    stage = slot.stage
    if alpha is None:
        if stage not in (SeedStage.BLENDING, SeedStage.HOLDING, SeedStage.FOSSILIZED):
            return None  # hidden, or a straight-through TRAINING seed
        alpha = slot.alpha
    elif stage not in _HAS_MODULE:
        return None
    if seed.groups != 1 or seed.padding_mode != "zeros" or isinstance(seed.padding, str):
        return None
    key = (
        tuple(seed.weight.shape),
        seed.bias is not None,
        seed.stride,
        seed.padding,
        seed.dilation,
        stage == SeedStage.FOSSILIZED,  # a fossil sees the host's gradient; others do not
    )
    return key, float(alpha)


def _grouped_conv_seeds(members: list, z: Tensor, G: int) -> dict[int, Tensor]:
    """``h + a * conv(h_in)`` of every member ``(k, slot, a)`` (group k of ``z``) as one
    grouped convolution: what each slot's own forward gives, term by term."""
    ks = [k for k, _, _ in members]
    seeds = [slot.seed for _, slot, _ in members]
    first = seeds[0]
    h = torch.cat([_slice(z, k, G) for k in ks], 1)
    h_in = h if members[0][1].stage == SeedStage.FOSSILIZED else h.detach()
    weight = torch.cat([s.weight for s in seeds]).contiguous(memory_format=CL)
    bias = torch.cat([s.bias for s in seeds]) if first.bias is not None else None
    f = F.conv2d(
        h_in.contiguous(memory_format=CL),
        weight,
        bias,
        first.stride,
        first.padding,
        first.dilation,
        len(members),
    )
    c = f.shape[1] // len(members)
    scale = torch.tensor([a for _, _, a in members], dtype=f.dtype, device=f.device)
    out = h + f * scale.repeat_interleave(c).view(1, -1, 1, 1)
    return {k: out[:, j * c : (j + 1) * c] for j, k in enumerate(ks)}


def _apply_slots(
    models, plan: Plan, i: int, envs: list[int], h: Tensor, z: Tensor, seed_pass: bool
) -> tuple[Tensor, dict]:
    """Block i's slots on its output ``z`` (group k = env ``envs[k]``; ``h``: what
    entered the block, a width seed's input): (the activation after the slots, the
    width terms pending for block i+1 by group). Convolution seeds of the same shape
    run as one grouped convolution (`_conv_seed`); any other slot on its env's part."""
    G = len(envs)
    local = {e: k for k, e in enumerate(envs)}
    members = []
    for e in plan.active[i]:
        k = local.get(e)
        if k is None:
            continue
        slot_id = plan.slot_ids[e][i]
        alpha = 1.0 if seed_pass and slot_id in plan.training[e] else None
        members.append((k, e, models[e].slots[slot_id], alpha))
    return _slot_outputs(models, plan, i, members, h, z, G)


def _slot_outputs(
    models, plan: Plan, i: int, members: list, h: Tensor, z: Tensor, G: int
) -> tuple[Tensor, dict]:
    """Block i's slots ``members`` (group k, env e, slot, alpha override) on ``z``: (the
    activation after them, the width terms pending for block i+1 by group). A hidden
    seed is the identity (no copy of its channels, no gradient path); convolution seeds
    of the same shape run as one grouped convolution; any other slot on its group."""
    outs, pend = {}, {}
    convs: dict[tuple, list] = {}
    for k, e, slot, alpha in members:
        if _hidden(slot, alpha):
            continue
        conv = _conv_seed(slot, alpha)
        if conv is not None:
            convs.setdefault(conv[0], []).append((k, slot, conv[1]))
            continue
        tap = _env_part(h, k, G) if plan.width[i][e] else None
        out_k, p = models[e].apply_slot(i, _env_part(z, k, G), tap, alpha)
        outs[k] = out_k
        if p is not None:
            pend[k] = p
    for group in convs.values():
        outs.update(_grouped_conv_seeds(group, z, G))
    return _join(z, outs, G), pend


def output_head(layers, h: Tensor, pend: dict, G: int) -> Tensor:
    feats = h.mean(dim=(-2, -1)).view(h.shape[0], G, -1)
    logits = torch.einsum("bec,ekc->bek", feats, layers.head_w) + layers.head_b
    if pend:
        zero = logits.new_zeros(logits[:, 0].shape)
        logits = logits + torch.stack([pend.get(k, zero) for k in range(G)], 1)
    return logits


def grouped_pass(
    layers: Stacked | Detached,
    models,
    plan: Plan,
    envs: list[int],
    h: Tensor,
    pend: dict,
    start: int,
    *,
    seed_pass: bool = False,
    training: bool = True,
    record=None,
) -> Tensor:
    """Blocks ``start``.. and the head of the grouped host for ``envs`` (indices into
    ``models``; group k of ``h`` is env ``envs[k]``): logits ``[B, len(envs), K]``.
    ``seed_pass``: TRAINING seeds on at alpha 1 (their own pass). ``training``: False
    normalises with the running statistics (an eval pass). ``record(i, h, z)`` sees
    what enters block i and the block's output before its slot."""
    G = len(envs)
    for i in range(start, len(layers.convs)):
        z = host_block(layers, i, h, pend, G, training)
        if record is not None:
            record(i, h, z)
        h, pend = _apply_slots(models, plan, i, envs, h, z, seed_pass)
    return output_head(layers, h, pend, G)


class Detached:
    """Envs ``envs`` of the stacked host as constants (the own seed pass's host): no
    gradient, BatchNorm on batch statistics without touching the running ones. Layers
    are picked when first asked for (a block's envs are known when it runs)."""

    def __init__(
        self, stacked: Stacked, envs: list[int], blocks: range | None = None, head: bool = True
    ) -> None:
        E, index = stacked.num_envs, torch.tensor(envs, device=stacked.head_w.device)
        picked = range(len(stacked.convs)) if blocks is None else blocks

        def pick(t: Tensor) -> Tensor:
            return t.detach().view(E, -1, *t.shape[1:]).index_select(0, index).flatten(0, 1)

        self.convs, self.pools = stacked.convs, stacked.pools
        # Only ``blocks`` (default all) and, with ``head``, the head are picked.
        self.weights = [pick(w) if i in picked else None for i, w in enumerate(stacked.weights)]
        self.bns = [
            (pick(g), pick(b), None, None, eps, m) if i in picked else None
            for i, (g, b, _, _, eps, m) in enumerate(stacked.bns)
        ]
        if head:
            self.head_w = stacked.head_w.detach().index_select(0, index)
            self.head_b = stacked.head_b.detach().index_select(0, index)


def _gather(t: Tensor, envs: list[int], E: int) -> Tensor:
    """Channel groups ``envs`` of a grouped activation, detached, in that order."""
    return torch.cat([_slice(t, e, E) for e in envs], 1).detach().contiguous(memory_format=CL)


def _own_pass(stacked: Stacked, models, plan: Plan, seen: dict) -> tuple[list[int], Tensor]:
    """The grouped envs' own seed pass: (their order, logits ``[B, G, K]``).

    Env e joins at the block of its first TRAINING seed with the main forward's output
    of that block (``seen[i] = (h entering, z before the slots)``, detached): the per-env
    `seed_forward` recomputes that block from the same input, with the same values. From
    there it runs with the host as constants (`Detached`), its TRAINING seeds at alpha 1.
    So a seed at the last slot costs no host block at all."""
    E = stacked.num_envs
    envs: list[int] = []
    h = z = None
    pend: dict = {}
    for i in range(plan.start, len(stacked.convs)):
        joining = plan.joins.get(i, [])
        if envs:
            layers = Detached(stacked, envs, range(i, i + 1), head=False)
            z = host_block(layers, i, h, pend, len(envs), True)
        if joining:
            h_in, z_in = seen[i]
            fresh = _gather(z_in, joining, E)
            z = fresh if not envs else torch.cat([z, fresh], 1).contiguous(memory_format=CL)
            if any(plan.width[i].get(e, False) for e in (*envs, *joining)):
                entered = _gather(h_in, joining, E)  # a width seed's input
                h = entered if not envs else torch.cat([h, entered], 1)
            envs = envs + joining
        h, pend = _apply_slots(models, plan, i, envs, h if h is not None else z, z, True)
    return envs, output_head(Detached(stacked, envs, range(0)), h, pend, len(envs))


def train_forward(
    stacked: Stacked, models, plan: Plan, x: Tensor, xs: list[Tensor], ys: Tensor
) -> tuple[Tensor, Tensor | None]:
    """Train-mode forward of all envs: (logits ``[B, E, K]``, the summed loss of the
    TRAINING seeds' own passes or None)."""
    E = stacked.num_envs
    seen: dict = {}

    def record(i: int, h: Tensor, z: Tensor) -> None:
        if i in plan.joins:
            seen[i] = (h, z)

    logits = grouped_pass(
        stacked,
        models,
        plan,
        list(range(E)),
        x.contiguous(memory_format=CL),
        {},
        0,
        record=record if plan.grouped else None,
    )
    seed_loss = None
    if plan.grouped:
        envs, own = _own_pass(stacked, models, plan, seen)
        own = own.float()
        # One loss per env on a dense [B, K] as `seed_forward`'s caller computes it: the
        # float32 cross-entropy of a strided [B, K, G] view rounds differently (1e-10
        # apart after a step, in float64 runs).
        seed_loss = sum(task_loss(own[:, k].contiguous(), ys[e]) for k, e in enumerate(envs))
    for e in plan.alone:
        # The whole own pass, from the input: `seed_forward` recomputes the blocks before
        # the first TRAINING seed (the per-env loop reuses its forward's; equal values).
        own = models[e].seed_forward(xs[e])
        term = task_loss(own.float(), ys[e])
        seed_loss = term if seed_loss is None else seed_loss + term
    return logits, seed_loss


class Picked:
    """The layers of block ``i`` (or, with ``i`` None, the head) of a `Stacked` host
    for lanes owned by envs ``owners`` (an env may own several lanes: its live model
    and its counterfactual variants), running statistics included (an eval pass)."""

    def __init__(self, stacked: Stacked, owners: list[int], i: int | None) -> None:
        E = stacked.num_envs
        index = torch.tensor(owners, device=stacked.head_w.device)

        def pick(t: Tensor) -> Tensor:
            return t.view(E, -1, *t.shape[1:]).index_select(0, index).flatten(0, 1)

        n = len(stacked.convs)
        self.convs, self.pools = stacked.convs, stacked.pools
        self.weights: list = [None] * n
        self.bns: list = [None] * n
        if i is None:
            self.head_w = stacked.head_w.index_select(0, index)
            self.head_b = stacked.head_b.index_select(0, index)
            return
        g, b, rm, rv, eps, momentum = stacked.bns[i]
        self.weights[i] = pick(stacked.weights[i])
        self.bns[i] = (pick(g), pick(b), pick(rm), pick(rv), eps, momentum)


def take_groups(t: Tensor, groups: list[int], G: int) -> Tensor:
    """Channel groups ``groups`` of a tensor of ``G`` groups, in that order."""
    return torch.cat([_slice(t, k, G) for k in groups], 1)


def lane_slots(
    models, plan: Plan, i: int, owners: list[int], alphas: list, h: Tensor, z: Tensor
) -> tuple[Tensor, dict]:
    """Block i's slots for lanes (group k of ``z`` belongs to env ``owners[k]``;
    ``alphas[k]``: its variant's alpha override, or None for the seeds' own alphas):
    as `_apply_slots`, in eval mode, convolution seeds grouped."""
    members = []
    for k, e in enumerate(owners):
        if e not in plan.width[i]:
            continue  # no seed module at this block
        slot_id = plan.slot_ids[e][i]
        override = alphas[k]
        alpha = None if override is None else override.get(slot_id)
        if alpha != 0.0:  # a seed switched off is the identity and adds no width term
            members.append((k, e, models[e].slots[slot_id], alpha))
    return _slot_outputs(models, plan, i, members, h, z, len(owners))
