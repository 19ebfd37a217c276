"""The TRAINING seeds' own pass on a user's model, carried by the model's output.

Esper's `Trainer` adds the loss of ``model.seed_forward(x)`` to its task loss, which
gives a TRAINING seed exactly the gradient of the fully-on model (`esper.model.slotset`).
A user's loop knows nothing of seeds: it computes ``loss = criterion(slotted(x), y)``
and steps its optimiser. So `esper.grow.SlottedModel` runs the own pass inside the
training forward and returns `carry`'s output: the host's output, bit for bit, whose
backward sends the loss gradient to the host's graph unchanged and *also* into the own
pass's graph, the only way it reaches the TRAINING seeds (the host is a constant there).
The seed's gradient is then ``J_on^T · dL/dy(host)``: the own pass's Jacobian, taken
where the seed is on (so a seed feeding a BatchNorm sees the normalisation of its own
term and does not drift, the straight-through failure), times the loss gradient read
at the host's output. That equals the fully-on gradient while the seed's term at the
output is still zero (at birth) and to first order after. A loop that wants the exact
gradient adds ``criterion(slotted.seed_forward(x), y)``: `seed_forward` hands over the
pass the forward already ran and *claims* it, which switches the carried gradient off,
so nothing is counted twice and no second forward runs.

Measured (``bench/bench_user_seed_pass.py --seeds 4``: digits, a user's conv-BN CNN, a
TRAINING seed on the conv that feeds a BatchNorm, 6 epochs; the seed's prospective
contribution after epoch 6, median / worst of 4, nats): ``conv_heavy`` straight-through
-25.8 / -21,384, carried -2.4 / -5.3, exact -0.000 / -0.0; ``conv_light``
straight-through -28.1 / -78.4, carried -0.83 / -1.1, exact -0.35 / -0.4. The carried
pass ends the drift; the exact one is better still, for a few added lines in the loop::

    out = slotted(x)
    loss = criterion(out, y)
    own = slotted.seed_forward(x)  # None while no seed is TRAINING
    if own is not None:
        loss = loss + criterion(own, y)
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from esper.model import GrowableModel


@dataclass
class Claim:
    """Whether a caller took the own pass for an explicit loss (`seed_forward`)."""

    taken: bool = False


@dataclass
class OwnPass:
    """One training forward's own pass: its inputs (matched by identity), its output,
    and the claim that switches the gradient `carry` sends to it."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    output: Any
    claim: Claim = field(default_factory=Claim)

    def matches(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
        return (
            len(args) == len(self.args)
            and all(a is b for a, b in zip(args, self.args, strict=True))
            and kwargs.keys() == self.kwargs.keys()
            and all(kwargs[k] is self.kwargs[k] for k in kwargs)
        )


class _Carry(torch.autograd.Function):
    """Value: the host's output. Backward: the gradient to the host unchanged, and the
    same gradient to the own pass unless the pass was claimed (then its own loss
    trains the seeds)."""

    @staticmethod
    def forward(ctx: Any, host: Tensor, own: Tensor, claim: Claim) -> Tensor:
        ctx.claim = claim
        return host.clone()  # a new tensor: autograd needs one, the bits stay the host's

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, Tensor | None, None]:
        return grad, (None if ctx.claim.taken else grad), None


def carry(host: Any, own: Any, claim: Claim) -> tuple[Any, int]:
    """The host's output with the own pass's gradient path attached to each floating
    tensor (tensors, and tuples / lists / dicts of them, as the model returned them);
    also how many tensors were paired (0: the output holds none we can carry)."""
    if isinstance(host, Tensor):
        if not isinstance(own, Tensor):
            return host, 0
        if (
            own.requires_grad
            and host.is_floating_point()
            and own.shape == host.shape
            and own.dtype == host.dtype
        ):
            return _Carry.apply(host, own, claim), 1
        return host, 1  # a tensor the TRAINING seeds do not reach: nothing to carry
    if isinstance(host, tuple | list) and type(own) is type(host) and len(own) == len(host):
        pairs = [carry(h, o, claim) for h, o in zip(host, own, strict=True)]
        items = [item for item, _ in pairs]
        made = type(host)(*items) if hasattr(host, "_fields") else type(host)(items)
        return made, sum(n for _, n in pairs)
    if isinstance(host, dict) and type(own) is type(host) and own.keys() == host.keys():
        made, paired = copy.copy(host), 0  # keeps the dict's class (OrderedDict, ...)
        for key in host:
            made[key], n = carry(host[key], own[key], claim)
            paired += n
        return made, paired
    return host, 0


def cuda_devices(module: nn.Module) -> list[int]:
    """CUDA devices the module's parameters live on (whose generators a pass draws from)."""
    found = set()
    for p in module.parameters():
        if p.device.type == "cuda":
            found.add(p.device.index if p.device.index is not None else torch.cuda.current_device())
    return sorted(found)


def rng_state(devices: list[int]) -> tuple[Tensor, list[Tensor]]:
    return torch.get_rng_state(), [torch.cuda.get_rng_state(d) for d in devices]


def set_rng_state(state: tuple[Tensor, list[Tensor]], devices: list[int]) -> None:
    torch.set_rng_state(state[0])
    for device, value in zip(devices, state[1], strict=True):
        torch.cuda.set_rng_state(value, device)


class SeedPass:
    """The own pass of a user's model whose slots are hooks: two hooks on its root module
    run the pass after every training forward (train mode, autograd on, no alpha
    override, a seed TRAINING) and attach it to the output (`carry`); `take` hands the
    last one to ``seed_forward``. ``measuring()`` is True inside an alpha-override call
    (a measurement, or the own pass itself)."""

    def __init__(
        self, slotted: GrowableModel, model: nn.Module, measuring: Callable[[], bool]
    ) -> None:
        self.slotted, self.model, self.measuring = slotted, model, measuring
        self.last: OwnPass | None = None  # until ``take`` or the next forward
        self._rng_before: tuple | None = None  # where the running forward's draws began
        # Closures, not bound methods: ``copy.deepcopy(model)`` then copies no slots along
        # with the hooks (`SlottedModel.strip_hooks` removes them from such a copy).
        self.handles = [
            model.register_forward_pre_hook(lambda m, _args: self._before(m)),
            model.register_forward_hook(
                lambda m, args, kwargs, out: self._after(m, args, kwargs, out),
                with_kwargs=True,
            ),
        ]

    def _wanted(self, model: nn.Module) -> bool:
        return (
            self.slotted.own_seed_pass
            and model.training
            and torch.is_grad_enabled()
            and not self.measuring()
            and bool(self.slotted.training_seeds())
        )

    def _before(self, model: nn.Module) -> None:
        if not self.measuring():
            self.last = None  # a new forward of the host: the last pass is no one's now
        if self._wanted(model):
            devices = cuda_devices(model)
            self._rng_before = (devices, rng_state(devices))

    def _after(self, model: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        if not self._wanted(model) or self._rng_before is None:
            return None
        replay, self._rng_before = self._rng_before, None
        self.last = OwnPass(args, kwargs, self.run(args, kwargs, replay))
        carried, paired = carry(output, self.last.output, self.last.claim)
        if paired == 0:
            raise TypeError(
                f"{type(model).__name__} returned a {type(output).__name__}: no tensor "
                "(nor tuple / list / dict of tensors) to carry the TRAINING seeds' own pass; "
                "return one, or set own_seed_pass = False to train them straight-through"
            )
        return carried

    def run(self, args: tuple, kwargs: dict, replay: tuple | None = None) -> Any:
        """The model on ``args`` with every TRAINING seed fully on, the host and the other
        seeds as constants. ``replay``: the random state a forward started from, so the
        pass draws what it drew (dropout masks); the host's random stream goes on as if
        the pass never ran."""
        training = self.slotted.training_seeds()
        state = self.slotted.own_pass_state(training)
        devices = replay[0] if replay is not None else cuda_devices(self.model)
        with torch.random.fork_rng(devices=devices, device_type="cuda"):
            if replay is not None:
                set_rng_state(replay[1], devices)
            on = {"alpha_override": dict.fromkeys(training, 1.0)}
            return torch.func.functional_call(self.slotted, state, args, {**kwargs, **on})

    def take(self, args: tuple, kwargs: dict) -> Any:
        """The last forward's own pass, claimed (its carried gradient off), when it ran on
        these very inputs; else a fresh pass."""
        last, self.last = self.last, None
        if last is not None and last.matches(args, kwargs):
            last.claim.taken = True
            return last.output
        return self.run(args, kwargs)
