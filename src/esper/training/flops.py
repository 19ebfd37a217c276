"""Training compute in FLOPs (issue 12, item 4).

What is counted, per env and episode:

* training: ``samples x (1 + BACKWARD_FACTOR) x F_train``, where ``F_train`` is the
  forward FLOPs per sample of the live model in *train* mode. Train mode runs every
  seed that trains, TRAINING seeds included (their value is hidden from the host, but
  they run forward and backward all the same), so seeds of any kind (residual or
  width) are covered without knowing how they work. Backward costs about twice the
  forward (gradients of the inputs and of the weights), the usual 6N-per-token rule.
* validation and counterfactual passes: forward only, counted exactly on the real
  call (shared prefixes and stacked variants included).

FLOPs are those `torch.utils.flop_counter.FlopCounterMode` counts: matmuls, convolutions
and attention (2 per multiply-add); element-wise ops (norms, activations) are not counted,
as in the model-growth literature. A fold leaves the count as it was (the fossil's
multiply-adds now run inside one wider layer); a live width seed next to it reads or
feeds the folded units and costs more.

Counting a whole pass under `FlopCounterMode` costs ~3 validation passes (70-90 ms for a
64-slot model), so `BlockFlops` composes a pass's count from pieces, each counted once
per *its own* state and kept: the embedding, each host block (its parameter shapes, its
input's shape, whether a width term feeds it), each slot (stage, blueprint, seed
shapes, alpha zero or not, override), the head. A stage change recounts one slot on one
row; a fold, the blocks whose shapes changed. Whole-model totals are also kept by
`structure_key`, so a step whose structure was seen before walks nothing. The composed
count equals the counter's on the real pass (tests/test_training_flops.py, every host
kind, seed kind, width seeds, fossils, folded hosts), since a pass runs exactly these
pieces (`MorphogeneticModel.run_block`, `apply_slot`, `host.embed`, `head`) and a
count is linear in the rows.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import TypeVar

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

BACKWARD_FACTOR = 2  # backward FLOPs per forward FLOP
T = TypeVar("T")


def _rng_devices(device: torch.device) -> list[int]:
    if device.type != "cuda":
        return []
    return [device.index if device.index is not None else torch.cuda.current_device()]


def count_flops(fn: Callable[[], T]) -> tuple[T, int]:
    """Run ``fn()`` under `FlopCounterMode`; returns its result and the FLOPs it used."""
    with FlopCounterMode(display=False) as counter:
        out = fn()
    return out, int(counter.get_total_flops())


def _side_effect_free(model: nn.Module, x: Tensor, train: bool, fn: Callable[[], T]) -> T:
    """``fn()`` with ``model`` in train or eval mode, autograd on in train mode, buffers
    restored and random generators forked after it (counting never changes training)."""
    was_training = model.training
    saved = [(b, b.detach().clone()) for b in model.buffers()]
    try:
        with torch.random.fork_rng(devices=_rng_devices(x.device)):
            model.train(train)
            with torch.set_grad_enabled(train):
                return fn()
    finally:
        model.train(was_training)
        with torch.no_grad():
            for buffer, value in saved:
                buffer.copy_(value)


def forward_flops(model: nn.Module, x: Tensor, *, train: bool = False, **forward_kw) -> int:
    """FLOPs of one ``model(x, **forward_kw)`` in train or eval mode, without side effects.

    Train mode runs with autograd on (TRAINING seeds only run then). Buffers (BatchNorm
    running statistics) are restored and the random generators forked, so counting never
    changes what training does next.
    """
    return _side_effect_free(
        model, x, train, lambda: count_flops(lambda: _forward(model, x, train, forward_kw))[1]
    )


def _forward(model: nn.Module, x: Tensor, train: bool, forward_kw: dict) -> None:
    model(x, **forward_kw)
    # TRAINING seeds' own pass (`MorphogeneticModel.seed_forward`), which the Trainer
    # runs next to every training forward.
    if train and not forward_kw and getattr(model, "own_seed_pass", False):
        model.seed_forward(x)


def structure_key(model: nn.Module) -> tuple[Hashable, ...]:
    """What a forward's FLOPs depend on: parameter shapes and (for a morphogenetic
    model) each slot's stage and whether its alpha is 0."""
    shapes = tuple((name, tuple(p.shape)) for name, p in model.named_parameters())
    states = getattr(model, "slot_states", None)
    stages = (
        () if states is None else tuple((s.slot_id, int(s.stage), s.alpha > 0) for s in states())
    )
    return shapes, stages


def composable(model: nn.Module) -> bool:
    """Whether ``model`` runs as the pieces `BlockFlops` counts (a `MorphogeneticModel`)."""
    return all(hasattr(model, n) for n in ("run_block", "apply_slot", "head", "slot_states"))


def _slot_key(slot: nn.Module) -> tuple:
    """What a slot's FLOPs depend on, besides its input: its own state only."""
    return (
        type(slot).__name__,
        int(slot.stage),
        slot.alpha > 0.0,
        slot.blueprint,
        getattr(slot, "gate", None) is not None,
        bool(getattr(slot, "straight_through", True)),
        slot.training,
    )


class _Dims(tuple):
    """An activation's shape without its batch dimension: what a dry walk carries."""


class _Miss(Exception):
    """A dry walk met a piece never counted."""


def _dims(value):
    """Per-row shape of a piece's input or output (tensors, pairs, None)."""
    if value is None or isinstance(value, _Dims):
        return value
    if isinstance(value, tuple):
        return tuple(_dims(v) for v in value)
    return _Dims(value.shape[1:])


# Piece key -> (its FLOPs on the rows it was counted on, per-row shape of its output).
_PIECES: dict[Hashable, tuple[int, object]] = {}


class BlockFlops:
    """FLOPs of a model's passes composed from per-piece counts (see the module
    docstring): `eval_row` (a `fast_counterfactuals` pass, per validation row) and
    `train_rows` (one train-mode forward plus the seeds' own pass on ``x``).

    A structure seen for the first time is first walked *dry*: each piece's key from
    the shapes the pieces before it produce (kept with their counts), no tensor
    computed; only a piece never counted makes a real walk (one or two rows) that
    counts it under `FlopCounterMode`."""

    def __init__(self, pieces: dict[Hashable, tuple[int, object]] | None = None) -> None:
        # A piece's key describes it fully (types, settings, shapes, stage, input shape),
        # so every env of a process shares one table: 16 envs count a new seed once.
        self._pieces = _PIECES if pieces is None else pieces
        self._totals: dict[Hashable, int] = {}  # per model structure (`structure_key`)
        self._reprs: dict[int, tuple[weakref.ref, tuple, str]] = {}
        self._params: dict[int, tuple] = {}  # id(model) -> (model, seeds and gates, list)

    def _named_params(self, model) -> list[tuple[str, Tensor]]:
        """``model.named_parameters()`` (host's, then each slot's), kept while the
        modules stay: host modules keep their parameter objects for the model's life (a
        fold swaps their data, whose shape is read each time); a slot's seed and gate
        come and go, so its part is re-read when either object changes (kept with the
        very objects it was read from: no id reuse)."""
        kept = self._params.get(id(model))
        if kept is None or kept[0]() is not model:
            host = [(f"host.{n}", p) for n, p in model.host.named_parameters()]
            kept = (weakref.ref(model), host, {})
            self._params[id(model)] = kept
        out = list(kept[1])
        for sid, slot in model.slots.items():
            part = kept[2].get(sid)
            if part is None or part[0] is not slot.seed or part[1] is not slot.gate:
                names = [(f"slots.{sid}.{n}", p) for n, p in slot.named_parameters()]
                part = (slot.seed, slot.gate, names)
                kept[2][sid] = part
            out.extend(part[2])
        return out

    def _structure(self, model) -> tuple:
        """`structure_key` (parameter shapes, each slot's stage and alpha > 0), cheaply."""
        shapes = tuple((name, tuple(p.shape)) for name, p in self._named_params(model))
        stages = tuple((sid, int(s.stage), s.alpha > 0) for sid, s in model.slots.items())
        return shapes, stages

    def _repr(self, module: nn.Module, shapes: tuple) -> str:
        """``repr(module)`` (its layers' types, settings and shapes), kept per module
        while its parameter ``shapes`` stay (a fold changes them)."""
        kept = self._reprs.get(id(module))
        if kept is None or kept[0]() is not module or kept[1] != shapes:
            if len(self._reprs) > 4096:  # ids of modules long gone
                self._reprs.clear()
            kept = (weakref.ref(module), shapes, repr(module))
            self._reprs[id(module)] = kept
        return kept[2]

    def _piece(self, dry: bool, key: Hashable, fn: Callable[..., T], *args) -> tuple:
        """``fn(*args)`` (dry: its output's shape) and its FLOPs, counted the first time
        ``key`` is seen (dry: a miss raises `_Miss`)."""
        kept = self._pieces.get(key)
        if dry:
            if kept is None:
                raise _Miss
            return kept[1], kept[0]
        if kept is None:
            out, flops = count_flops(lambda: fn(*args))
            self._pieces[key] = (flops, _dims(out))
            return out, flops
        return fn(*args), kept[0]

    def _walk(self, model, x, mode: str, dry: bool, overrides=None, start=None):
        """One pass of ``model`` on ``x`` piece by piece (dry: on shapes), counting unseen
        pieces: returns (per block: (FLOPs of block i and its slot, what entered block
        i, its pending term, the block's output, its width input), embed FLOPs, head
        FLOPs). ``start``: (block, activation, pending) to begin at (the own pass)."""
        host = model.host
        slots = model.slots
        # Parameter shapes by module, from one pass over the model's parameters.
        shapes: dict[str, list] = {}
        rest_shapes = []
        for name, p in self._named_params(model):
            parts = name.split(".")
            if parts[0] == "host" and parts[1] == "blocks":
                shapes.setdefault(f"block.{parts[2]}", []).append(tuple(p.shape))
            elif parts[0] == "host":
                rest_shapes.append((name, tuple(p.shape)))
            elif parts[0] == "slots" and parts[2] in ("seed", "gate"):
                shapes.setdefault(f"{parts[2]}.{parts[1]}", []).append(tuple(p.shape))
        rest = type(host).__name__, tuple(rest_shapes)
        if start is None:
            key = ("embed", mode, rest, _dims(x))
            h, embed = self._piece(dry, key, host.embed, x)
            first, pending = 0, None
        else:
            (first, h, pending), embed = start, 0
        per_block = []
        for i in range(first, model.num_blocks):
            sid = model._block_slots[i]
            slot = slots[sid] if sid is not None else None
            tap = slot is not None and slot.holds_width
            block = host.blocks[i]
            layers = self._repr(block, tuple(shapes.get(f"block.{i}", ())))
            # No block index in the key: equal blocks anywhere cost the same.
            key = ("block", mode, layers, _dims(h), pending is not None, tap)
            entered, pend_in = h, pending
            (out, width_in), b = self._piece(dry, key, model.run_block, i, h, pending)
            alpha = None if overrides is None else overrides.get(sid)
            s_key = self._slot_piece(mode, slot, alpha, out, width_in, shapes)
            (h, pending), f = self._piece(dry, s_key, model.apply_slot, i, out, width_in, alpha)
            per_block.append((b + f, entered, pend_in, out, width_in))
        key = ("head", mode, rest, _dims(h), pending is not None)
        _, head = self._piece(dry, key, model.head, h, pending)
        return per_block, embed, head, shapes

    def _slot_piece(self, mode: str, slot, alpha, out, width_in, shapes: dict) -> tuple:
        """A slot's piece key: its own state and input shapes (not its position)."""
        state = None
        if slot is not None:
            sid, seed = slot.slot_id, slot.seed
            seed_shapes = tuple(shapes.get(f"seed.{sid}", ()))
            state = (
                *_slot_key(slot),
                tuple(shapes.get(f"gate.{sid}", ())),
                None if seed is None else self._repr(seed, seed_shapes),
            )
        return ("slot", mode, state, alpha, _dims(out), _dims(width_in))

    def _dry_or_real(self, model, x: Tensor, train: bool, compose) -> int:
        """``compose(dry)`` on shapes; on a miss, again on real tensors (counting)."""
        try:
            return compose(True)
        except _Miss:
            return _side_effect_free(model, x, train, lambda: compose(False))

    def eval_row(self, model, x: Tensor, variants: dict[str, float]) -> int:
        """Per-row FLOPs of `fast_counterfactuals(model, x, ..., variants)` (x: >= 1 row)."""
        key = ("eval", self._structure(model), tuple(sorted(variants.items())))
        total = self._totals.get(key)
        if total is not None:
            return total
        row = x[:1]

        @torch.no_grad()
        def compose(dry: bool) -> int:
            per_block, embed, head, shapes = self._walk(
                model, _dims(row) if dry else row, "eval", dry
            )
            after = [head] * (len(per_block) + 1)  # FLOPs of blocks i.. and the head
            for i in range(len(per_block) - 1, -1, -1):
                after[i] = after[i + 1] + per_block[i][0]
            flops = embed + after[0]
            for sid, alpha in variants.items():
                i = model.block_index(sid)
                _, _, _, out, width_in = per_block[i]
                s_key = self._slot_piece("eval", model.slots[sid], alpha, out, width_in, shapes)
                _, f = self._piece(dry, s_key, model.apply_slot, i, out, width_in, alpha)
                flops += f + after[i + 1]
            return flops

        if model.training:  # the pass runs in eval mode: so must its pieces' keys
            total = _side_effect_free(model, row, False, lambda: compose(False))
        else:
            total = self._dry_or_real(model, row, False, compose)
        self._totals[key] = total
        return total

    def train_rows(self, model, x: Tensor) -> int:
        """FLOPs of one train-mode forward on ``x`` (>= 2 rows: BatchNorm) and, with
        TRAINING seeds, their own pass (`MorphogeneticModel.seed_forward`), as
        `forward_flops(model, x, train=True)` counts them."""
        key = ("train", self._structure(model), tuple(x.shape))
        total = self._totals.get(key)
        if total is not None:
            return total

        def compose(dry: bool) -> int:
            xs = _Dims(x.shape[1:]) if dry else x
            per_block, embed, head, _ = self._walk(model, xs, "train", dry)
            flops = embed + sum(b[0] for b in per_block) + head
            training = model.training_seeds() if getattr(model, "own_seed_pass", False) else []
            if training:
                first = min(model.block_index(sid) for sid in training)
                _, entered, pend_in, _, _ = per_block[first]
                if not dry:
                    entered = entered.detach()
                    pend_in = None if pend_in is None else pend_in.detach()
                own, _, own_head, _ = self._walk(
                    model, xs, "own", dry, dict.fromkeys(training, 1.0), (first, entered, pend_in)
                )
                flops += sum(b[0] for b in own) + own_head
            return flops

        if not model.training or not torch.is_grad_enabled():
            total = _side_effect_free(model, x, True, lambda: compose(False))
        else:
            total = self._dry_or_real(model, x, True, compose)
        self._totals[key] = total
        return total


@dataclass(frozen=True)
class StepFlops:
    train: int  # forward + backward on the training samples of one step
    eval: int  # validation and counterfactual passes of one step (forward only)

    @property
    def total(self) -> int:
        return self.train + self.eval


class FlopMeter:
    """Cumulative FLOPs of one trainer (one episode): ``train``, ``eval``, ``total``.
    Passes of a `MorphogeneticModel` are counted piece by piece (`BlockFlops`); any
    other model whole, under the counter, once per structure."""

    def __init__(self) -> None:
        self.train = 0
        self.eval = 0
        self.blocks = BlockFlops()
        self._train_cache: dict[Hashable, tuple[int, int]] = {}  # other models
        self._eval_cache: dict[Hashable, int] = {}

    @property
    def total(self) -> int:
        return self.train + self.eval

    def train_forward(self, model: nn.Module, sample_x: Tensor) -> tuple[int, int]:
        """``(FLOPs, rows)`` of one train-mode forward on ``sample_x`` (>= 2 rows, so
        BatchNorm can run), the seeds' own pass included."""
        rows = int(sample_x.shape[0])
        if composable(model):
            return self.blocks.train_rows(model, sample_x), rows
        key = structure_key(model)
        cached = self._train_cache.get(key)
        if cached is None:
            cached = (forward_flops(model, sample_x, train=True), rows)
            self._train_cache[key] = cached
        return cached

    def add_training(self, model: nn.Module, sample_x: Tensor, samples: int) -> int:
        """Count forward + backward on ``samples`` training samples; returns the FLOPs."""
        flops, rows = self.train_forward(model, sample_x)
        # FLOPs are linear in the batch size, so this is exact for whole samples.
        step = samples * (1 + BACKWARD_FACTOR) * flops // rows
        self.train += step
        return step

    def add_counterfactuals(self, model: nn.Module, x: Tensor, variants: dict[str, float]) -> int:
        """Count one `fast_counterfactuals` pass of ``model`` over ``x`` with
        ``variants`` (run elsewhere); returns its FLOPs."""
        flops = self.blocks.eval_row(model, x, variants) * int(x.shape[0])
        self.eval += flops
        return flops

    def has_eval(self, key: Hashable) -> bool:
        """Whether the FLOPs of the eval pass ``key`` are known (counted once)."""
        return key in self._eval_cache

    def measure_eval(self, key: Hashable, fn: Callable[[], T]) -> tuple[T, int]:
        """Run a forward-only pass ``fn``; counts it the first time ``key`` is seen."""
        flops = self._eval_cache.get(key)
        if flops is None:
            out, flops = count_flops(fn)
            self._eval_cache[key] = flops
        else:
            out = fn()
        self.eval += flops
        return out, flops
