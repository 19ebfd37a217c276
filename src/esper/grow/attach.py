"""Seed slots on the named submodules of any `nn.Module`.

``attach(model, ["layer1", "blocks.3"], sample)`` runs the model once on ``sample`` to
read each named submodule's output shape, then registers one forward hook per submodule
that passes its output through a `esper.model.SeedSlot`. The user's model is neither
copied nor rewritten: its own ``forward`` runs, and calling ``model(x)`` directly already
runs the slots. The returned `SlottedModel` holds the slots (so its ``state_dict`` holds
the growth), takes per-call alpha overrides and offers the lifecycle operations.

Topology and channels come from the output shape: ``[N, C, H, W]`` is a conv map
(``cnn``, C channels), ``[N, T, D]`` a token sequence (``transformer``, channels last;
its attention blueprint is causal), ``[N, D]`` a feature vector (``mlp``). Seeds are
residual (depth) seeds ``h + α·f(h)``; new units inside a user's layer (width growth)
are not offered here.
"""

from __future__ import annotations

import contextvars
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from esper.lifecycle import SeedStage, is_live
from esper.model import LifecycleConfig, ParamCounts, SeedSlot, SlotState, StageChange
from esper.model.slot import check_alpha_overrides
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
    """Where a slot sits: the submodule path (as in ``named_modules``) and its spec."""

    name: str
    spec: InjectionSpec

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, **asdict(self.spec)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> AttachPoint:
        spec = InjectionSpec(
            str(data["slot_id"]), int(data["channels"]), data["topology"], float(data["position"])
        )
        return cls(str(data["name"]), spec)


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


def attach(
    model: nn.Module,
    points: Sequence[str] | Mapping[str, str],
    sample: Any,
    lifecycle: LifecycleConfig | None = None,
) -> SlottedModel:
    """Put a seed slot after each named submodule of ``model`` (not copied).

    ``points``: submodule names (ids ``r0c0, r0c1, ...`` in that order) or a mapping
    name -> slot id. ``sample``: one input batch (a tensor, or a tuple of positional
    arguments) on the model's device. Raises `AttachError` naming the submodule when a
    name is unknown, its output is not one tensor, or no blueprint fits its shape.
    """
    ids = _slot_ids(points)
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
    attach_points = [
        AttachPoint(name, _spec(name, ids[name], seen[name], (i + 1) / n))
        for i, name in enumerate(order)
    ]
    return SlottedModel(model, attach_points, lifecycle)


class SlottedModel(nn.Module):
    """A user's model with seed slots hooked onto some of its submodules.

    ``self.model`` is the user's module itself. ``forward(*args, alpha_override=None,
    **kwargs)`` calls ``self.model(*args, **kwargs)``; ``alpha_override`` maps slot ids to
    the alpha used for this call only (0.0 = seed off, 1.0 = fully on).
    """

    def __init__(
        self,
        model: nn.Module,
        points: Sequence[AttachPoint],
        lifecycle: LifecycleConfig | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        self.lifecycle = lifecycle if lifecycle is not None else LifecycleConfig()
        self.slot_config = SlotConfig.from_specs([p.spec for p in points])
        by_id = {p.spec.slot_id: p for p in points}
        self.points: tuple[AttachPoint, ...] = tuple(by_id[s] for s in self.slot_config)
        self.slots = nn.ModuleDict(
            {p.spec.slot_id: SeedSlot(p.spec, self.lifecycle) for p in self.points}
        )
        like = next(iter(model.parameters()), None)
        if like is not None:
            self.slots.to(device=like.device, dtype=like.dtype)
        self._handles = [
            _submodule(model, p.name).register_forward_hook(self._hook(p.spec.slot_id))
            for p in self.points
        ]

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
        for handle in self._handles:
            handle.remove()
        self._handles = []
        return self.model

    def forward(self, *args: Any, alpha_override: Mapping[str, float] | None = None, **kwargs):
        token = _OVERRIDES.set(self._check_overrides(alpha_override))
        try:
            return self.model(*args, **kwargs)
        finally:
            _OVERRIDES.reset(token)

    def _check_overrides(self, overrides: Mapping[str, float] | None) -> dict[str, float]:
        return check_alpha_overrides(overrides, self._slot)

    # -- lifecycle (the operations of `MorphogeneticModel`) -----------------------------
    def _slot(self, slot_id: str) -> SeedSlot:
        if slot_id not in self.slots:
            raise SlotIdError(
                f"unknown slot {slot_id!r}; this model's slots: {', '.join(self.slot_config)}"
            )
        return self.slots[slot_id]  # type: ignore[return-value]

    def point(self, slot_id: str) -> AttachPoint:
        return self.points[self.slot_config.index_of(slot_id)]

    def germinate(self, slot_id: str, blueprint: str, blend: str = "linear") -> list[StageChange]:
        return self._slot(slot_id).germinate(blueprint, blend)

    def prune(self, slot_id: str, reason: str = "policy") -> StageChange:
        return self._slot(slot_id).prune(reason)

    def fossilize(self, slot_id: str) -> StageChange:
        return self._slot(slot_id).fossilize()

    def record_contribution(self, slot_id: str, value: float, stderr: float | None = None) -> None:
        """Latest contribution (> 0: the seed helps) and its standard error (None: exact),
        which the gates of `step_epoch` read."""
        if stderr is not None and not float(stderr) >= 0:
            raise ValueError(f"stderr of slot {slot_id}'s contribution must be >= 0, got {stderr}")
        slot = self._slot(slot_id)
        slot.contribution = float(value)
        slot.contribution_se = None if stderr is None else float(stderr)

    def step_epoch(self) -> list[StageChange]:
        """Mechanical lifecycle transitions once per growth step, in slot order."""
        return [change for slot in self.slots.values() for change in slot.step_epoch()]

    def slot_state(self, slot_id: str) -> SlotState:
        return self._slot(slot_id).state()

    def slot_states(self) -> list[SlotState]:
        return [slot.state() for slot in self.slots.values()]

    def seed_parameters(self, slot_id: str) -> list[nn.Parameter]:
        return list(self._slot(slot_id).parameters())

    def host_parameters(self) -> list[nn.Parameter]:
        return list(self.model.parameters())

    def param_counts(self) -> ParamCounts:
        live = fossils = 0
        for slot in self.slots.values():
            if is_live(slot.stage):
                live += slot.num_seed_params()
            elif slot.stage == SeedStage.FOSSILIZED:
                fossils += slot.num_seed_params()
        host = sum(p.numel() for p in self.model.parameters())
        return ParamCounts(host=host, live_seeds=live, fossils=fossils)

    def growth_ratio(self) -> float:
        counts = self.param_counts()
        return (counts.live_seeds + counts.fossils) / max(counts.host, 1)

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
                f"checkpoint slots {[(p.name, p.spec.slot_id) for p in theirs]} differ from "
                f"this model's {[(p.name, p.spec.slot_id) for p in self.points]}"
            )


def load_slotted(
    model: nn.Module, source: str | Path | Mapping[str, Any], map_location: Any = None
) -> SlottedModel:
    """Re-attach the slots described in a `SlottedModel` state dict (or file saved with
    ``torch.save(slotted.state_dict(), path)``) to a fresh ``model`` and load the weights,
    seeds included. No sample input is needed: the checkpoint names the submodules."""
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
