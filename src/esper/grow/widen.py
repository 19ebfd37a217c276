"""Width sites on a user's own layers, found by tracing the model.

``attach(model, points, sample, widen=["fc1", "conv2"])`` names ``nn.Linear`` /
``nn.Conv2d`` *producers*. For each, `find_site` follows the producer's output through
a ``torch.fx`` graph (`torch.fx.symbolic_trace`: no sample needed, so a checkpoint
re-attaches without one; of the producer's parent first, then of each ancestor while
the units leave it) until the next ``Linear`` / ``Conv2d``, its *consumer*, and builds
an `esper.model.width.UnitSite` from those module references. The ops on the way
become the site's ``unit_ops`` (acting on each unit alone: an activation, dropout, a
BatchNorm over the units, spatial pooling of a conv map) and ``consumer_ops`` (a
flatten of a conv map into a Linear, a spatial mean, and whatever elementwise op
follows it). Functional ops (``F.relu(x)``, ``x.view(x.size(0), -1)``) become small
modules (`UnitFn`) so a seed's fan-in can copy them for its new units.

Refused, with one `AttachError` naming the submodule and the reason, whenever the new
units could not be added exactly (the widened network would not compute the same
function at birth, or a fold could not make it physical):

- the producer runs more than once per forward, or its weight is tied / read elsewhere;
- its output (or an op's on the way) is read by two operations: a residual add (both
  sides would need the new units), a skip connection, a second head;
- an op mixes units: a reshape other than a conv map's flatten into a Linear, a
  LayerNorm / GroupNorm / softmax across the units (a new unit changes every other
  unit's value), an op with a second tensor input;
- the consumer is not a Linear / Conv2d (groups=1) reading exactly these units, is
  shared, or its weight is tied; the units reach the model's output with no consumer.

LayerNorm and GroupNorm over the units are refused, not approximated: with k zero-fan-out
units the normalisation statistics change, so germination would change the function.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn
from torch.nn.modules.batchnorm import _BatchNorm

from esper.model.width import UnitSite
from esper.slots import InjectionSpec


class WidenError(ValueError):
    """A named producer cannot be widened exactly (``attach`` raises it as an
    `esper.grow.AttachError` with the same reason)."""


# Elementwise: act on each entry alone, any layout.
_ELEMENTWISE_MODULES: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.LeakyReLU, nn.ELU,
    nn.Softplus, nn.Mish, nn.Hardswish, nn.Hardtanh, nn.Hardsigmoid, nn.Identity,
    nn.Dropout, nn.AlphaDropout,
)  # fmt: skip
# Per channel of a conv map: spatial pooling, channel dropout.
_MAP_MODULES: tuple[type[nn.Module], ...] = (
    nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.Dropout2d,
)  # fmt: skip
_ELEMENTWISE_FUNCTIONS: frozenset[Callable[..., Any]] = frozenset(
    {
        F.relu, torch.relu, F.gelu, F.silu, torch.sigmoid, F.sigmoid, torch.tanh, F.tanh,
        F.leaky_relu, F.elu, F.softplus, F.mish, F.hardswish, F.relu6, F.hardtanh,
    }
)  # fmt: skip
_MAP_FUNCTIONS: frozenset[Callable[..., Any]] = frozenset(
    {F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d, F.adaptive_max_pool2d}
)
_ELEMENTWISE_METHODS = frozenset({"relu", "sigmoid", "tanh", "contiguous"})
_DROPOUT_FUNCTIONS = {F.dropout: nn.Dropout, F.dropout2d: nn.Dropout2d}
_SCALAR_OPS = frozenset({operator.mul, operator.truediv, operator.add, operator.sub})
# Reads of a tensor's shape: they consume no values (``x.view(x.size(0), -1)``).
_SHAPE_READS = frozenset({"size", "dim"})
_MIXERS = {
    nn.LayerNorm: "LayerNorm normalises across the units: a new unit changes the mean and "
    "variance every unit is divided by",
    nn.GroupNorm: "GroupNorm normalises across the units of a group: a new unit changes "
    "their statistics",
    nn.Softmax: "softmax across the units: a new unit changes every unit's value",
    nn.LogSoftmax: "log-softmax across the units: a new unit changes every unit's value",
}


class UnitFn(nn.Module):
    """A stateless functional op of the user's forward as a module (a seed's fan-in
    copies it for its new units): ``fn(x, *args, **kwargs)``, or ``x.<method>(...)``."""

    def __init__(
        self, fn: Callable[..., Any] | str, args: tuple[Any, ...], kwargs: Mapping[str, Any]
    ) -> None:
        super().__init__()
        self.fn, self.args, self.kwargs = fn, tuple(args), dict(kwargs)

    def forward(self, x: Tensor) -> Tensor:
        if isinstance(self.fn, str):
            return getattr(x, self.fn)(*self.args, **self.kwargs)
        return self.fn(x, *self.args, **self.kwargs)

    def extra_repr(self) -> str:
        name = self.fn if isinstance(self.fn, str) else getattr(self.fn, "__name__", self.fn)
        return f"{name}, args={self.args}, kwargs={self.kwargs}"


@dataclass(frozen=True)
class WidenPoint:
    """A width site of a user's model: the producer's path (as in ``named_modules``),
    the consumer's, and the slot's spec (``channels``: the producer's units now)."""

    name: str
    consumer: str
    spec: InjectionSpec

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "consumer": self.consumer, **asdict(self.spec)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> WidenPoint:
        spec = InjectionSpec(
            str(data["slot_id"]), int(data["channels"]), data["topology"], float(data["position"])
        )
        return cls(str(data["name"]), str(data["consumer"]), spec)


def trace(model: nn.Module) -> fx.GraphModule:
    """``torch.fx.symbolic_trace(model)``, its failure a `WidenError` with the reason."""
    try:
        return fx.symbolic_trace(model)
    except Exception as exc:  # fx raises many kinds (TraceError, TypeError, ...)
        raise WidenError(
            f"width sites need a model torch.fx can trace; tracing {type(model).__name__} "
            f"failed: {type(exc).__name__}: {exc}"
        ) from None


def _calls(graph: fx.Graph, name: str) -> list[fx.Node]:
    return [n for n in graph.nodes if n.op == "call_module" and n.target == name]


def _check_not_shared(model: nn.Module, graph: fx.Graph, name: str, role: str) -> fx.Node:
    """The one call of submodule ``name``; its weight read nowhere else."""
    calls = _calls(graph, name)
    if len(calls) != 1:
        raise WidenError(
            f"{role} {name!r} runs {len(calls)} times per forward; a widened layer must run "
            "once (shared layers would get units the other call does not feed)"
        )
    module = model.get_submodule(name)
    own = {id(p) for p in module.parameters(recurse=False)}
    for other, p in model.named_parameters(remove_duplicate=False):
        if id(p) in own and other.rpartition(".")[0] != name:
            raise WidenError(
                f"{role} {name!r}: its weight is tied to {other!r}; widening one would "
                "break the tie"
            )
    for node in graph.nodes:
        if node.op == "get_attr" and str(node.target).startswith(name + "."):
            raise WidenError(
                f"{role} {name!r}: the forward reads its tensor {node.target!r} directly; "
                "widening would change that read"
            )
    return calls[0]


def _value_users(node: fx.Node) -> list[fx.Node]:
    """Users that read the node's values (not only its shape)."""
    return [
        u
        for u in node.users
        if not (u.op == "call_method" and u.target in _SHAPE_READS)
        and not (u.op == "call_function" and u.target is getattr and u.args[1] == "shape")
    ]


def _describe(node: fx.Node) -> str:
    if node.op == "call_module":
        return f"submodule {node.target!r}"
    if node.op == "output":
        return "the model's output"
    target = node.target if isinstance(node.target, str) else node.target.__name__
    return f"{node.op} {target!r}"


def _other_inputs(node: fx.Node, cur: fx.Node) -> list[fx.Node]:
    found: list[fx.Node] = []
    fx.node.map_arg((node.args, node.kwargs), lambda n: found.append(n) or n)
    return [n for n in found if n is not cur and not _is_shape_of(n, cur)]


def _is_shape_of(node: fx.Node, cur: fx.Node) -> bool:
    """``cur.size(0)`` or ``cur.shape[0]`` (the batch size in ``x.view(x.size(0), -1)``)."""
    if node.op == "call_method" and node.target == "size":
        return node.args[0] is cur
    if node.op == "call_function" and node.target is operator.getitem:
        base = node.args[0]
        return isinstance(base, fx.Node) and base.op == "call_function" and base.args[0] is cur
    return False


def _is_flatten(node: fx.Node, module: nn.Module | None) -> bool:
    if isinstance(module, nn.Flatten):
        return module.start_dim == 1 and module.end_dim == -1
    args, kwargs = node.args[1:], node.kwargs
    if node.op == "call_function" and node.target is torch.flatten:
        return (args or (kwargs.get("start_dim", 0),))[0] == 1 and kwargs.get("end_dim", -1) == -1
    if node.op == "call_method" and node.target == "flatten":
        return tuple(args) in ((1,), (1, -1)) or kwargs.get("start_dim") == 1
    if node.op == "call_method" and node.target in ("view", "reshape"):
        shape = args[0] if len(args) == 1 and isinstance(args[0], tuple | list) else args
        return len(shape) == 2 and shape[1] == -1
    return False


def _is_spatial_mean(node: fx.Node) -> bool:
    if node.op != "call_method" or node.target != "mean":
        return False
    dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    keep = node.kwargs.get("keepdim", node.args[2] if len(node.args) > 2 else False)
    return not keep and isinstance(dims, tuple | list) and sorted(dims) in ([2, 3], [-2, -1])


class _Escapes(WidenError):
    """The units leave the traced submodule: look again from its parent."""


def _graph(model: nn.Module, prefix: str) -> fx.Graph:
    """The fx graph of submodule ``prefix``, its module and attribute names made
    model-wide (``mlp.0`` traced inside ``blocks.0`` is ``blocks.0.mlp.0``)."""
    graph = trace(model.get_submodule(prefix) if prefix else model).graph
    if prefix:
        for node in graph.nodes:
            if node.op in ("call_module", "get_attr"):
                node.target = f"{prefix}.{node.target}"
    return graph


def find_site(
    model: nn.Module, name: str, producer_ndim: int | None = None
) -> tuple[UnitSite, str]:
    """The unit site of producer ``name`` and its consumer's name (module docstring).
    ``producer_ndim``: how many dims the producer's output has (from a sample; None when
    unknown, then a Linear producer's BatchNorm1d is taken to see ``[N, D]``).

    The walk traces the producer's parent first and moves up one parent at a time only
    while the units leave it: the path from a layer to its consumer is usually inside
    one small module (a block's MLP), and a model whose forward fx cannot trace as a
    whole (a mask built from a shape) is then still widened where its blocks can be.
    """
    parts = name.split(".") if isinstance(name, str) else []
    for depth in range(len(parts) - 1, -1, -1):
        prefix = ".".join(parts[:depth])
        try:
            return _walk(model, _graph(model, prefix), name, producer_ndim, at_root=depth == 0)
        except _Escapes:
            continue
    raise WidenError(f"model {type(model).__name__} has no submodule {name!r}")


def _walk(
    model: nn.Module, graph: fx.Graph, name: str, producer_ndim: int | None, at_root: bool
) -> tuple[UnitSite, str]:
    try:
        producer = model.get_submodule(name)
    except AttributeError:
        raise WidenError(f"model {type(model).__name__} has no submodule {name!r}") from None
    if not isinstance(producer, nn.Linear | nn.Conv2d):
        raise WidenError(
            f"submodule {name!r} is a {type(producer).__name__}; width sites grow an "
            "nn.Linear or an nn.Conv2d"
        )
    if isinstance(producer, nn.Conv2d) and producer.groups != 1:
        raise WidenError(
            f"submodule {name!r} is a grouped Conv2d (groups={producer.groups}); its units "
            "cannot grow one at a time"
        )
    cur = _check_not_shared(model, graph, name, "submodule")
    is_map = isinstance(producer, nn.Conv2d)
    unit_ops: list[nn.Module] = []
    consumer_ops: list[nn.Module] = []
    flattened = False
    while True:
        users = _value_users(cur)
        if not users:
            raise WidenError(f"submodule {name!r}: its output is never used")
        if len(users) > 1:
            readers = ", ".join(_describe(u) for u in users)
            raise WidenError(
                f"submodule {name!r}: its units are read by {len(users)} operations "
                f"({readers}); a residual add or a second reader would need both sides "
                "widened"
            )
        node = users[0]
        if node.op == "output":
            raise (WidenError if at_root else _Escapes)(
                f"submodule {name!r}: its units reach the model's output with no Linear / "
                "Conv2d consuming them; widening would change the output's size"
            )
        module = model.get_submodule(str(node.target)) if node.op == "call_module" else None
        others = _other_inputs(node, cur)
        if others:
            add = node.target in (operator.add, torch.add, operator.iadd)
            why = (
                "a residual add would need both sides widened"
                if add
                else "it mixes them with another tensor"
            )
            raise WidenError(
                f"submodule {name!r}: {_describe(node)} combines its units with "
                f"{_describe(others[0])}; {why}"
            )
        if isinstance(module, nn.Linear | nn.Conv2d):
            return _consumer(model, graph, name, producer, node, module, is_map, flattened,
                             tuple(unit_ops), tuple(consumer_ops)), str(node.target)  # fmt: skip
        op = _unit_op(name, node, module, is_map, producer_ndim)
        if op == "flatten" or op == "mean":
            if not is_map:
                raise WidenError(
                    f"submodule {name!r}: {_describe(node)} reshapes the output of a Linear "
                    "and mixes its units with other dims"
                )
            is_map, flattened = False, op == "flatten"
            consumer_ops.append(nn.Flatten(1) if op == "flatten" else _spatial_mean(node))
        elif consumer_ops:  # after the flatten: only elementwise ops reach here
            consumer_ops.append(op)  # type: ignore[arg-type]
        else:
            unit_ops.append(op)  # type: ignore[arg-type]
        cur = node


def _spatial_mean(node: fx.Node) -> nn.Module:
    return UnitFn("mean", tuple(node.args[1:]), node.kwargs)


def _unit_op(
    name: str, node: fx.Node, module: nn.Module | None, is_map: bool, producer_ndim: int | None
) -> nn.Module | str:
    """The op of ``node`` as a per-unit module, "flatten" / "mean", or a `WidenError`."""
    if _is_flatten(node, module):
        return "flatten"
    if _is_spatial_mean(node):
        return "mean"
    if module is not None:
        for kind, why in _MIXERS.items():
            if isinstance(module, kind):
                raise WidenError(f"submodule {name!r}: {_describe(node)} is a {why}")
        if isinstance(module, _ELEMENTWISE_MODULES):
            return module
        if isinstance(module, _MAP_MODULES) and is_map:
            return module
        if isinstance(module, _BatchNorm):
            ok = isinstance(module, nn.BatchNorm2d) if is_map else (
                isinstance(module, nn.BatchNorm1d) and producer_ndim in (None, 2)
            )  # fmt: skip
            if ok:
                return module
            raise WidenError(
                f"submodule {name!r}: {_describe(node)} ({type(module).__name__}) does not "
                "normalise over its units' dim"
            )
        raise WidenError(
            f"submodule {name!r}: {_describe(node)} ({type(module).__name__}) is not known "
            "to act on each unit alone; width growth needs activations, dropout, BatchNorm "
            "or pooling between a layer and its consumer"
        )
    args, kwargs = tuple(node.args[1:]), dict(node.kwargs)
    if node.op == "call_function":
        fn = node.target
        if fn in _DROPOUT_FUNCTIONS and (is_map or fn is F.dropout):
            p = kwargs.get("p", args[0] if args else 0.5)
            return _DROPOUT_FUNCTIONS[fn](p)  # follows train / eval like the user's call
        if fn in _ELEMENTWISE_FUNCTIONS or (fn in _MAP_FUNCTIONS and is_map):
            return UnitFn(fn, args, kwargs)  # type: ignore[arg-type]
        if fn in _SCALAR_OPS and len(args) == 1 and isinstance(args[0], int | float):
            return UnitFn(fn, args, kwargs)  # type: ignore[arg-type]
    if node.op == "call_method" and node.target in _ELEMENTWISE_METHODS:
        return UnitFn(str(node.target), args, kwargs)
    raise WidenError(
        f"submodule {name!r}: {_describe(node)} may mix its units (a reshape, a "
        "reduction or an op not known to act on each unit alone); width growth cannot "
        "pass it"
    )


def _consumer(
    model: nn.Module,
    graph: fx.Graph,
    name: str,
    producer: nn.Module,
    node: fx.Node,
    consumer: nn.Module,
    is_map: bool,
    flattened: bool,
    unit_ops: tuple[nn.Module, ...],
    consumer_ops: tuple[nn.Module, ...],
) -> UnitSite:
    cname = str(node.target)
    try:
        _check_not_shared(model, graph, cname, "its consumer")
    except WidenError as exc:
        raise WidenError(f"submodule {name!r}: {exc}") from None
    units = int(producer.weight.shape[0])
    if isinstance(consumer, nn.Conv2d):
        if consumer.groups != 1:
            raise WidenError(
                f"submodule {name!r}: its consumer {cname!r} is a grouped Conv2d "
                f"(groups={consumer.groups}); new input channels cannot join one group"
            )
        if not is_map:
            raise WidenError(f"submodule {name!r}: consumer {cname!r} reads a reshaped tensor")
        span = 1
    elif is_map:
        raise WidenError(
            f"submodule {name!r}: Linear {cname!r} reads the conv map's last dim, not its "
            "channels; flatten the map (or pool it) before the Linear"
        )
    else:
        fan_in = int(consumer.weight.shape[1])
        span = fan_in // units if flattened else 1
        if fan_in != units * span:
            raise WidenError(
                f"submodule {name!r}: consumer {cname!r} reads {fan_in} inputs, not a "
                f"whole number per unit of its {units} units"
            )
    try:
        return UnitSite(producer, unit_ops, consumer, "next", consumer_ops, span)
    except (TypeError, ValueError) as exc:
        raise WidenError(f"submodule {name!r}: {exc}") from None
