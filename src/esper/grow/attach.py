"""Seed slots on the named submodules of any `nn.Module`.

``attach(model, ["layer1", "blocks.3"], sample)`` runs the model once on ``sample`` to
read each named submodule's output shape, then registers one forward hook per submodule
that passes its output through a `esper.model.SeedSlot`. The user's model is neither
copied nor rewritten: its own ``forward`` runs, and calling ``model(x)`` directly already
runs the slots. The returned `SlottedModel` holds the slots (so its ``state_dict`` holds
the growth), takes per-call alpha overrides and offers the lifecycle operations of
`esper.model.GrowableModel`, the slot set it shares with Esper's own hosts.

Topology and channels come from the output shape: ``[N, C, H, W]`` is a conv map
(``cnn``, C channels), ``[N, T, D]`` a token sequence (``transformer``, channels last),
``[N, D]`` a feature vector (``mlp``). Whether a sequence point is causal (a token may
see only earlier tokens: a decoder) or not (an encoder) is the user's choice,
``attach(..., causal=...)``; it decides the attention seeds built there. Seeds at these
points are residual (depth) seeds ``h + α·f(h)``.

``attach(..., widen=["fc1", "conv2"])`` adds *width sites*: new units inside the named
``nn.Linear`` / ``nn.Conv2d`` layers, their consumers found by tracing the model
(`esper.grow.widen`). A width seed's fan-in reads the producer's input (a forward hook
on the producer keeps it for the forward under way) and its fan-out term is added to
the consumer's output (a forward hook on the consumer), the pending term of Esper's
hosts. Width slots take only the ``wide_*`` blueprints; ids ``r1c0, r1c1, ...`` in
``widen`` order. `SlottedModel.fold_in_place` folds a fossil into the user's own
layers (``model.fc1.out_features`` grows), as `esper.model.fold` does on Esper's hosts.

TRAINING seeds learn in their own pass, as on Esper's hosts, with no change to the
user's loop: a training forward returns the host's output with the own pass's gradient
attached (`esper.grow.seedpass`).
"""

from __future__ import annotations

import contextvars
import copy
import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from esper.grow.seedpass import SeedPass
from esper.grow.widen import WidenError, WidenPoint, find_site
from esper.model import GrowableModel, LifecycleConfig, SeedSlot
from esper.model.fold import FoldPlan, fold_slot, pad_inputs, pad_units
from esper.model.width import UnitSite
from esper.slots import InjectionSpec, SlotConfig, SlotIdError, format_slot_id, parse_slot_id

# Per-call alpha overrides reach the hooks through a context variable: it is local to the
# thread / task that set it, so concurrent evaluations never see each other's overrides.
_OVERRIDES: contextvars.ContextVar[Mapping[str, float] | None] = contextvars.ContextVar(
    "esper_grow_alpha_override", default=None
)
_TOPOLOGY_BY_NDIM = {4: "cnn", 3: "transformer", 2: "mlp"}
_SHAPES = "[N, C, H, W] (cnn), [N, T, D] (transformer) or [N, D] (mlp)"


class AttachError(ValueError):
    """A submodule cannot carry a slot (unknown name, non-tensor output, unfit shape), or
    a named layer cannot be widened exactly (`esper.grow.widen`)."""


@dataclass(frozen=True)
class AttachPoint:
    """Where a slot sits: the submodule path (as in ``named_modules``), its spec and, for
    a token sequence (``transformer``), whether its seeds are causal (None elsewhere)."""

    name: str
    spec: InjectionSpec
    causal: bool | None = None

    def __post_init__(self) -> None:
        if self.spec.topology == "transformer":
            if self.causal is None:  # files written before the choice existed: causal
                object.__setattr__(self, "causal", True)
            elif not isinstance(self.causal, bool):
                raise AttachError(
                    f"attach point {self.name!r}: causal must be True or False, got {self.causal!r}"
                )
        elif self.causal is not None:
            raise AttachError(
                f"attach point {self.name!r} is a {self.spec.topology} point; causal applies "
                f"only to token sequences [N, T, D], got causal={self.causal!r}"
            )

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, **asdict(self.spec), "causal": self.causal}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> AttachPoint:
        spec = InjectionSpec(
            str(data["slot_id"]), int(data["channels"]), data["topology"], float(data["position"])
        )
        return cls(str(data["name"]), spec, data.get("causal"))


def _submodule(model: nn.Module, name: str) -> nn.Module:
    if not isinstance(name, str) or not name:
        raise AttachError(f"a slot needs a submodule name such as 'layer1', got {name!r}")
    try:
        return model.get_submodule(name)
    except AttributeError:
        names = [n for n, _ in model.named_modules() if n]
        shown = ", ".join(names[:24]) + (", ..." if len(names) > 24 else "")
        raise AttachError(
            f"model {type(model).__name__} has no submodule {name!r}; its submodules: {shown}"
        ) from None


def _slot_ids(
    points: Sequence[str] | Mapping[str, str], row: int = 0, required: bool = True
) -> dict[str, str]:
    """Submodule name -> slot id: ``r{row}c0, r{row}c1, ...`` in list order, or as mapped."""
    if isinstance(points, str):
        raise AttachError(f"pass a list of submodule names, got the string {points!r}")
    if isinstance(points, Mapping):
        ids = {str(name): str(sid) for name, sid in points.items()}
        for sid in ids.values():
            parse_slot_id(sid)
        if len(set(ids.values())) != len(ids):
            raise SlotIdError(f"duplicate slot ids in {ids}")
    else:
        names = list(points)
        if len(set(names)) != len(names):
            raise AttachError(f"a submodule is named twice in {names}")
        ids = {name: format_slot_id(row, i) for i, name in enumerate(names)}
    if not ids and required:
        raise AttachError("attach needs at least one submodule name")
    return ids


def _as_args(sample: Any) -> tuple[Any, ...]:
    return sample if isinstance(sample, tuple) else (sample,)


@torch.no_grad()
def _probe(model: nn.Module, modules: dict[str, nn.Module], sample: Any) -> dict[str, list]:
    """Outputs seen at each submodule in one eval-mode forward (train flags restored)."""
    seen: dict[str, list] = {name: [] for name in modules}
    handles = [
        module.register_forward_hook(lambda _m, _a, out, name=name: seen[name].append(out))
        for name, module in modules.items()
    ]
    flags = [(m, m.training) for m in model.modules()]
    try:
        model.eval()  # no BatchNorm statistics change, no dropout noise
        model(*_as_args(sample))
    finally:
        for handle in handles:
            handle.remove()
        for m, flag in flags:
            m.train(flag)
    return seen


def _spec(name: str, slot_id: str, outputs: list, position: float) -> InjectionSpec:
    if not outputs:
        raise AttachError(f"submodule {name!r} did not run in the model's forward of the sample")
    if len(outputs) > 1:
        raise AttachError(
            f"submodule {name!r} ran {len(outputs)} times in one forward (shared weights); "
            "a slot needs a submodule that runs once per forward"
        )
    out = outputs[0]
    if not isinstance(out, Tensor):
        raise AttachError(
            f"submodule {name!r} returns a {type(out).__name__}, not a tensor; a slot "
            "transforms one tensor: attach it to a submodule that returns one"
        )
    topology = _TOPOLOGY_BY_NDIM.get(out.dim())
    if topology is None or not out.is_floating_point() or 0 in out.shape:
        raise AttachError(
            f"submodule {name!r} returns a {out.dtype} tensor of shape {tuple(out.shape)}: "
            f"no blueprint fits it; slots take floating tensors {_SHAPES}"
        )
    channels = int(out.shape[1] if topology == "cnn" else out.shape[-1])
    return InjectionSpec(slot_id, channels, topology, position)  # type: ignore[arg-type]


def _causal_choice(
    causal: bool | Mapping[str, bool], names: Sequence[str]
) -> Callable[[str], bool]:
    """Submodule name -> causal, from ``attach``'s ``causal`` (checked here)."""
    if isinstance(causal, bool):
        return lambda name: causal
    if not isinstance(causal, Mapping):
        raise AttachError(
            f"causal must be True, False or a mapping submodule name -> bool, got {causal!r}"
        )
    for name, value in causal.items():
        if name not in names:
            raise AttachError(
                f"causal names {name!r}, which is not an attached submodule; attached: "
                f"{', '.join(names)}"
            )
        if not isinstance(value, bool):
            raise AttachError(f"causal[{name!r}] must be True or False, got {value!r}")
    return lambda name: causal.get(name, True)


def attach(
    model: nn.Module,
    points: Sequence[str] | Mapping[str, str],
    sample: Any,
    lifecycle: LifecycleConfig | None = None,
    *,
    causal: bool | Mapping[str, bool] = True,
    widen: Sequence[str] | Mapping[str, str] = (),
) -> SlottedModel:
    """Put a seed slot after each named submodule of ``model`` (not copied), and a width
    site at each ``nn.Linear`` / ``nn.Conv2d`` named in ``widen``.

    ``points``: submodule names (ids ``r0c0, r0c1, ...`` in that order) or a mapping
    name -> slot id. ``sample``: one input batch (a tensor, or a tuple of positional
    arguments) on the model's device. ``causal``: for submodules that return a token
    sequence ``[N, T, D]``, whether a seed's attention may see only earlier tokens
    (True, a decoder) or every token (False, an encoder); one bool, or a mapping
    name -> bool (names left out: True). True is the default because it is the safe
    side: a causal seed in an encoder only sees less, a non-causal seed in a decoder
    would read the tokens it is asked to predict. Raises `AttachError` naming the
    submodule when a name is unknown, its output is not one tensor, no blueprint fits
    its shape, or ``causal`` names a submodule that is not a token sequence.

    ``widen``: layer names (ids ``r1c0, r1c1, ...`` in that order) or a mapping name ->
    slot id. Each gets a width site whose consumer is found by tracing the model with
    ``torch.fx`` (`esper.grow.widen`); a layer that cannot be widened exactly (a residual
    add or second reader of its units, a reshape or norm that mixes them, a tied or
    shared weight) is one `AttachError` naming it and the reason. ``points`` may be
    empty when ``widen`` is not.
    """
    widen_ids = _slot_ids(widen, row=1, required=False)
    ids = _slot_ids(points, required=not widen_ids)
    clash = set(ids.values()) & set(widen_ids.values())
    if clash:
        raise SlotIdError(f"slot ids {sorted(clash)} are given to a depth and a width point")
    is_causal = _causal_choice(causal, list(ids))
    modules = {name: _submodule(model, name) for name in ids}
    by_object: dict[int, str] = {}
    for name, module in modules.items():
        if id(module) in by_object:
            raise AttachError(
                f"submodules {by_object[id(module)]!r} and {name!r} are the same module; "
                "attach one slot per module"
            )
        by_object[id(module)] = name
    producers = {name: _submodule(model, name) for name in widen_ids}
    seen = _probe(model, {**modules, **producers}, sample)
    order = sorted(ids, key=lambda n: parse_slot_id(ids[n]))
    n = len(order)
    attach_points = []
    for i, name in enumerate(order):
        spec = _spec(name, ids[name], seen[name], (i + 1) / n)
        sequence = spec.topology == "transformer"
        if not sequence and isinstance(causal, Mapping) and name in causal:
            raise AttachError(
                f"causal names {name!r}, whose output {tuple(seen[name][0].shape)} is not a "
                "token sequence [N, T, D]; causal applies only to those"
            )
        attach_points.append(AttachPoint(name, spec, is_causal(name) if sequence else None))
    widen_points, sites = [], []
    if widen_ids:
        wanted = sorted(widen_ids, key=lambda n: parse_slot_id(widen_ids[n]))
        for i, name in enumerate(wanted):
            spec = _spec(name, widen_ids[name], seen[name], (i + 1) / len(wanted))
            site, consumer = _find_site(model, name, seen[name][0].dim())
            widen_points.append(WidenPoint(name, consumer, spec))
            sites.append(site)
        for point in attach_points:
            _check_depth_point(point.name, modules[point.name], widen_points, sites)
    return SlottedModel(model, attach_points, lifecycle, widen=widen_points, sites=sites)


def _check_depth_point(
    name: str, module: nn.Module, widen: Sequence[WidenPoint], sites: Sequence[UnitSite]
) -> None:
    """A depth slot must not sit on a width site's units: a fold would widen the tensor
    its seed reads. Its output carries them when the module is (or holds) the producer
    or one of the ops on the way, but not the consumer (past which the width is the
    consumer's output width again)."""
    inside = {id(m) for m in module.modules()}
    for point, site in zip(widen, sites, strict=True):
        chain = (site.producer, *site.unit_ops)
        if any(id(m) in inside for m in chain) and id(site.consumer) not in inside:
            raise AttachError(
                f"depth point {name!r} outputs the units of width site {point.name!r} "
                f"(read by {point.consumer!r}); a fold would change the width its seed "
                f"reads: put the depth slot at {point.consumer!r} or later, or widen "
                "another layer"
            )


def _find_site(model: nn.Module, name: str, ndim: int | None) -> tuple[UnitSite, str]:
    try:
        return find_site(model, name, ndim)
    except WidenError as exc:
        text = str(exc)
        raise AttachError(text if text.startswith("width") else f"cannot widen {text}") from None


class SlottedModel(GrowableModel):
    """A user's model with seed slots hooked onto some of its submodules.

    ``self.model`` is the user's module itself. ``forward(*args, alpha_override=None,
    **kwargs)`` calls ``self.model(*args, **kwargs)``; ``alpha_override`` maps slot ids to
    the alpha used for this call only (0.0 = seed off, 1.0 = fully on). Lifecycle
    operations, counts and the TRAINING-seed rule are `GrowableModel`'s.

    With ``own_seed_pass`` (default) a training forward of the user's model (through
    this wrapper or called directly, in train mode with autograd on, while a seed is
    TRAINING) also runs the seeds' own pass, replaying the forward's random draws (the
    same dropout masks) and leaving the host's random stream, BatchNorm statistics,
    output and gradients exactly as without the seed; the output carries the pass's
    gradient to the seeds (`esper.grow.seedpass`). `seed_forward` hands that pass to a
    loop that adds its loss explicitly (the exact fully-on gradient).
    """

    def __init__(
        self,
        model: nn.Module,
        points: Sequence[AttachPoint],
        lifecycle: LifecycleConfig | None = None,
        own_seed_pass: bool = True,
        *,
        widen: Sequence[WidenPoint] = (),
        sites: Sequence[UnitSite] | None = None,
    ) -> None:
        """``widen``: width points; ``sites``: their unit sites on ``model``'s modules, in
        the same order (None: found again by tracing ``model``, as on loading)."""
        super().__init__()
        self.model = model
        lifecycle = lifecycle if lifecycle is not None else LifecycleConfig()
        if sites is None:
            sites = [_find_site(model, w.name, None)[0] for w in widen]
        site_of = {w.spec.slot_id: site for w, site in zip(widen, sites, strict=True)}
        self.slot_config = SlotConfig.from_specs([p.spec for p in (*points, *widen)])
        by_id = {p.spec.slot_id: p for p in points}
        wide_by_id = {w.spec.slot_id: w for w in widen}
        self.points: tuple[AttachPoint, ...] = tuple(
            by_id[s] for s in self.slot_config if s in by_id
        )
        self.widen_points: tuple[WidenPoint, ...] = tuple(
            wide_by_id[s] for s in self.slot_config if s in wide_by_id
        )

        def make(sid: str) -> SeedSlot:
            if sid in by_id:
                return SeedSlot(by_id[sid].spec, lifecycle, causal=by_id[sid].causal is not False)
            return SeedSlot(wide_by_id[sid].spec, lifecycle, site_of[sid], residual=False)

        self._init_slots((make(sid) for sid in self.slot_config), lifecycle, own_seed_pass)
        like = next(iter(model.parameters()), None)
        if like is not None:
            self.slots.to(device=like.device, dtype=like.dtype)
        # The producer's input of the forward under way, per width slot; read (and
        # dropped) by the consumer's hook. Runtime only, never serialised.
        self._taps: dict[str, Tensor] = {}
        # (submodule name, handle): width hooks first, so a consumer's width term joins
        # its output before a depth slot on the same module transforms it.
        self._named_handles: list[tuple[str, Any]] = []
        for w in self.widen_points:
            sid = w.spec.slot_id
            self._named_handles += [
                (w.name, _submodule(model, w.name).register_forward_hook(self._tap(sid))),
                (w.consumer, _submodule(model, w.consumer).register_forward_hook(self._term(sid))),
            ]
        self._named_handles += [
            (p.name, _submodule(model, p.name).register_forward_hook(self._hook(p.spec.slot_id)))
            for p in self.points
        ]
        self._seed_pass = SeedPass(self, model, measuring=lambda: bool(_OVERRIDES.get()))

    @property
    def _handles(self) -> list[Any]:
        return [handle for _, handle in self._named_handles]

    def _tap(self, slot_id: str):
        def keep_input(module: nn.Module, args: tuple, output: Any) -> None:
            if self.slots[slot_id].holds_width:
                self._taps[slot_id] = args[0]

        return keep_input

    def _term(self, slot_id: str):
        def add_term(module: nn.Module, args: tuple, output: Tensor) -> Tensor | None:
            tap = self._taps.pop(slot_id, None)
            overrides = _OVERRIDES.get()
            alpha = None if not overrides else overrides.get(slot_id)
            term = self.slots[slot_id].width_term(tap, alpha)
            return None if term is None else output + term

        return add_term

    def width_site(self, slot_id: str) -> UnitSite:
        """The unit site of a width slot (its layers are the user's own modules)."""
        site = self._slot(slot_id).width_site
        if site is None:
            raise SlotIdError(f"slot {slot_id} is a depth slot, not a width site")
        return site

    def fold_in_place(self, slot_id: str) -> FoldPlan:
        """Fold the FOSSILIZED width seed of ``slot_id`` into the user's own layers, in
        place (`esper.model.fold`): the producer (and its BatchNorms) gets the new output
        units, the consumer their input columns; same function, same `param_counts`;
        the slot is DORMANT. Apply the returned plan to your optimiser with
        `esper.training.surgery.carry_optimizer_state` (the `Grower` does)."""
        plan = fold_slot(self._slot(slot_id), self.slots.values())
        self._taps.clear()
        self._refresh_widths()
        return plan

    def _refresh_widths(self) -> None:
        """Width points' channels read from their producers again (after a fold)."""
        points = []
        for w in self.widen_points:
            slot = self.slots[w.spec.slot_id]
            units = slot.width_site.units  # type: ignore[union-attr]
            spec = dataclasses.replace(w.spec, channels=units)
            slot.spec = spec  # type: ignore[union-attr]
            points.append(dataclasses.replace(w, spec=spec))
        self.widen_points = tuple(points)
        self.slot_config = SlotConfig.from_specs(
            [p.spec for p in (*self.points, *self.widen_points)]
        )

    def _hook(self, slot_id: str):
        def run_slot(module: nn.Module, args: tuple, output: Any) -> Tensor:
            if not isinstance(output, Tensor):
                raise AttachError(
                    f"slot {slot_id}: its submodule now returns a {type(output).__name__}, "
                    "not a tensor"
                )
            overrides = _OVERRIDES.get()
            return self.slots[slot_id](output, None if not overrides else overrides.get(slot_id))

        return run_slot

    def detach(self) -> nn.Module:
        """Remove the hooks: the user's model runs as before attaching (folded widths
        stay: they are its own layers now); returns it."""
        for handle in (*self._handles, *self._seed_pass.handles):
            handle.remove()
        self._named_handles, self._seed_pass.handles = [], []
        return self.model

    def strip_hooks(self, copied: nn.Module) -> None:
        """Remove this wrapper's hooks from a deep copy of its model (``copy.deepcopy``
        keeps them, still pointing at these slots)."""
        for name, handle in self._named_handles:
            copied.get_submodule(name)._forward_hooks.pop(handle.id, None)
        for handle in self._seed_pass.handles:
            copied._forward_pre_hooks.pop(handle.id, None)
            copied._forward_hooks.pop(handle.id, None)
            copied._forward_hooks_with_kwargs.pop(handle.id, None)
            copied._forward_hooks_always_called.pop(handle.id, None)

    def __deepcopy__(self, memo: dict[int, Any]) -> SlottedModel:
        """A copy whose hooks run its own slots (copying the hooks themselves would leave
        the copy's model running these slots)."""
        model = copy.deepcopy(self.model, memo)
        self.strip_hooks(model)
        # The same memo: the copied sites refer to the copied model's layers.
        sites = [copy.deepcopy(self.width_site(w.spec.slot_id), memo) for w in self.widen_points]
        twin = SlottedModel(
            model, self.points, self.lifecycle, self.own_seed_pass,
            widen=self.widen_points, sites=sites,
        )  # fmt: skip
        memo[id(self)] = twin
        twin.slots.load_state_dict(self.slots.state_dict())
        return twin.train(self.training)

    def forward(self, *args: Any, alpha_override: Mapping[str, float] | None = None, **kwargs):
        token = _OVERRIDES.set(self._check_overrides(alpha_override))
        try:
            return self.model(*args, **kwargs)
        finally:
            _OVERRIDES.reset(token)

    # -- the seeds' own pass ------------------------------------------------------------
    def seed_forward(self, *args: Any, **kwargs: Any) -> Any:
        """The output with every TRAINING seed fully on and the host as constants, for
        those seeds' own loss (None when no seed is TRAINING). Right after a training
        forward on these very inputs it is that forward's own pass, now *claimed*: the
        forward's output no longer carries its gradient, so a loop that adds
        ``criterion(slotted.seed_forward(x), y)`` trains the seeds with exactly the
        fully-on gradient, without a second pass."""
        return self._seed_pass.take(args, kwargs) if self.training_seeds() else None

    # -- what the slot set needs from this wrapper ----------------------------------------
    def point(self, slot_id: str) -> AttachPoint:
        return self.points[self.slot_config.index_of(slot_id)]

    def host_parameters(self) -> list[nn.Parameter]:
        return list(self.model.parameters())

    # -- serialisation: the attachment travels with the weights ------------------------
    def get_extra_state(self) -> dict[str, Any]:
        return {
            "points": [p.to_dict() for p in self.points],
            "widen": [w.to_dict() for w in self.widen_points],
            "lifecycle": asdict(self.lifecycle),
        }

    def set_extra_state(self, state: dict[str, Any]) -> None:
        theirs = [AttachPoint.from_dict(p) for p in state["points"]]
        if list(self.points) != theirs:
            raise AttachError(
                f"checkpoint slots {_describe(theirs)} differ from this model's "
                f"{_describe(self.points)}"
            )
        wide = [WidenPoint.from_dict(w) for w in state.get("widen", [])]
        if list(self.widen_points) != wide:

            def show(ws: Sequence[WidenPoint]) -> list[tuple]:
                return [(w.name, w.spec.slot_id, w.spec.channels) for w in ws]

            raise AttachError(
                f"checkpoint width sites {show(wide)} differ from this model's "
                f"{show(self.widen_points)}"
            )


def _describe(points: Sequence[AttachPoint]) -> list[tuple]:
    return [
        (p.name, p.spec.slot_id)
        if p.causal is None
        else (p.name, p.spec.slot_id, f"causal={p.causal}")
        for p in points
    ]


def load_slotted(
    model: nn.Module, source: str | Path | Mapping[str, Any], map_location: Any = None
) -> SlottedModel:
    """Re-attach the slots described in a `SlottedModel` state dict (or file saved with
    ``torch.save(slotted.state_dict(), path)``) to a fresh ``model`` and load the weights,
    seeds included. No sample input is needed: the checkpoint names the submodules and
    whether each sequence point is causal (files written before that choice existed
    hold causal points, and load as such)."""
    state = source
    if not isinstance(source, Mapping):
        state = torch.load(source, map_location=map_location, weights_only=True)
    extra = state.get("_extra_state") if isinstance(state, Mapping) else None
    if not isinstance(extra, Mapping) or "points" not in extra:
        raise AttachError(
            f"{source if isinstance(source, str | Path) else 'state dict'} is not a "
            "SlottedModel checkpoint (no '_extra_state' with attach points)"
        )
    points = [AttachPoint.from_dict(p) for p in extra["points"]]
    for p in points:
        _submodule(model, p.name)
    widen = [WidenPoint.from_dict(w) for w in extra.get("widen", [])]
    lifecycle = LifecycleConfig(**extra.get("lifecycle", {}))
    slotted = SlottedModel(model, points, lifecycle, widen=widen)
    for w in widen:  # the checkpoint's layers may be wider (folded): widen fresh ones
        grow_to(slotted.width_site(w.spec.slot_id), w.spec.channels)
    slotted._refresh_widths()
    slotted.load_state_dict(state)
    return slotted


def grow_to(site: UnitSite, units: int) -> None:
    """Give a site's layers ``units`` units (zeros, to be overwritten by a load)."""
    k = units - site.units
    if k < 0:
        raise AttachError(
            f"checkpoint has {units} units where the model has {site.units}: a fold never "
            "narrows a layer"
        )
    if k:
        for layer in site.unit_layers:
            pad_units(layer, k)
        pad_inputs(site.consumer, k * site.unit_span)
