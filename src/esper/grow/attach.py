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
``attach(..., causal=...)``; it decides the attention seeds built there. Seeds are
residual (depth) seeds ``h + α·f(h)``; new units inside a user's layer (width growth)
are not offered here.

TRAINING seeds learn in their own pass, as on Esper's hosts, with no change to the
user's loop: a training forward returns the host's output with the own pass's gradient
attached (`esper.grow.seedpass`).
"""

from __future__ import annotations

import contextvars
import copy
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from esper.grow.seedpass import SeedPass
from esper.model import GrowableModel, LifecycleConfig, SeedSlot
from esper.slots import InjectionSpec, SlotConfig, SlotIdError, format_slot_id, parse_slot_id

# Per-call alpha overrides reach the hooks through a context variable: it is local to the
# thread / task that set it, so concurrent evaluations never see each other's overrides.
_OVERRIDES: contextvars.ContextVar[Mapping[str, float] | None] = contextvars.ContextVar(
    "esper_grow_alpha_override", default=None
)
_TOPOLOGY_BY_NDIM = {4: "cnn", 3: "transformer", 2: "mlp"}
_SHAPES = "[N, C, H, W] (cnn), [N, T, D] (transformer) or [N, D] (mlp)"


class AttachError(ValueError):
    """A submodule cannot carry a slot (unknown name, non-tensor output, unfit shape)."""


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


def _slot_ids(points: Sequence[str] | Mapping[str, str]) -> dict[str, str]:
    """Submodule name -> slot id: ``r0c0, r0c1, ...`` in list order, or as mapped."""
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
        ids = {name: format_slot_id(0, i) for i, name in enumerate(names)}
    if not ids:
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
) -> SlottedModel:
    """Put a seed slot after each named submodule of ``model`` (not copied).

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
    """
    ids = _slot_ids(points)
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
    seen = _probe(model, modules, sample)
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
    return SlottedModel(model, attach_points, lifecycle)


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
    ) -> None:
        super().__init__()
        self.model = model
        lifecycle = lifecycle if lifecycle is not None else LifecycleConfig()
        self.slot_config = SlotConfig.from_specs([p.spec for p in points])
        by_id = {p.spec.slot_id: p for p in points}
        self.points: tuple[AttachPoint, ...] = tuple(by_id[s] for s in self.slot_config)
        self._init_slots(
            (SeedSlot(p.spec, lifecycle, causal=p.causal is not False) for p in self.points),
            lifecycle,
            own_seed_pass,
        )
        like = next(iter(model.parameters()), None)
        if like is not None:
            self.slots.to(device=like.device, dtype=like.dtype)
        self._handles = [
            _submodule(model, p.name).register_forward_hook(self._hook(p.spec.slot_id))
            for p in self.points
        ]
        self._seed_pass = SeedPass(self, model, measuring=lambda: bool(_OVERRIDES.get()))

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
        """Remove the hooks: the user's model runs as before attaching; returns it."""
        for handle in (*self._handles, *self._seed_pass.handles):
            handle.remove()
        self._handles, self._seed_pass.handles = [], []
        return self.model

    def strip_hooks(self, copied: nn.Module) -> None:
        """Remove this wrapper's hooks from a deep copy of its model (``copy.deepcopy``
        keeps them, still pointing at these slots)."""
        for point, handle in zip(self.points, self._handles, strict=False):
            copied.get_submodule(point.name)._forward_hooks.pop(handle.id, None)
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
        twin = SlottedModel(model, self.points, self.lifecycle, self.own_seed_pass)
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
            "lifecycle": asdict(self.lifecycle),
        }

    def set_extra_state(self, state: dict[str, Any]) -> None:
        theirs = [AttachPoint.from_dict(p) for p in state["points"]]
        if list(self.points) != theirs:
            raise AttachError(
                f"checkpoint slots {_describe(theirs)} differ from this model's "
                f"{_describe(self.points)}"
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
    lifecycle = LifecycleConfig(**extra.get("lifecycle", {}))
    slotted = SlottedModel(model, points, lifecycle)
    slotted.load_state_dict(state)
    return slotted
