"""Optimiser surgery: after a fold, the next optimiser step equals the unfolded model's
(SGD with momentum and weight decay, Adam); new entries start at zero; Adam's step
count follows the documented rule; the fossil's parameters leave the optimiser."""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
from torch import nn

from esper.lifecycle import SeedStage
from esper.model import CNNHost, LifecycleConfig, MLPHost, MorphogeneticModel, TransformerHost
from esper.model.fold import FoldPlan, ParamChange, Piece
from esper.model.slot import StageChange
from esper.training.surgery import carry_optimizer_state
from model_helpers import advance

LIFECYCLE = LifecycleConfig(min_train_epochs=1, blend_epochs=2)
OPTIMIZERS: dict[str, Callable] = {
    "sgd": lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, weight_decay=1e-3),
    "adam": lambda ps: torch.optim.Adam(ps, lr=1e-2, weight_decay=1e-3),
    "adamw-amsgrad": lambda ps: torch.optim.AdamW(ps, lr=1e-2, amsgrad=True),
}
HOSTS = {
    "cnn": lambda: (CNNHost(width=1, depth=3), torch.randn(8, 1, 8, 8)),
    "mlp": lambda: (MLPHost(6, 3, hidden=5, depth=3), torch.randn(8, 6)),
    "transformer": lambda: (
        TransformerHost(7, d_model=8, n_heads=2, n_layers=3),
        torch.randint(0, 7, (3, 5)),
    ),
}


def grown(topology: str, stages: dict) -> tuple[MorphogeneticModel, torch.Tensor]:
    torch.manual_seed(11)
    host, x = HOSTS[topology]()
    # float64: the fold changes summation order, and float32 rounding would hide little.
    model = MorphogeneticModel(host, lifecycle=LIFECYCLE).double().train()
    x = x.double() if x.is_floating_point() else x
    for sid, (bp, _) in stages.items():
        model.germinate(sid, bp)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():  # seeds that already compute something
        for sid in stages:
            for p in model.seed_parameters(sid):
                p.copy_(0.3 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    for sid, (_, stage) in stages.items():
        advance(model, sid, stage)
    return model, x


def step(model: MorphogeneticModel, optimizers, x: torch.Tensor) -> None:
    for opt in optimizers:
        opt.zero_grad(set_to_none=True)
    loss = model(x).sin().sum()
    own = model.seed_forward(x)
    (loss if own is None else loss + own.sin().sum()).backward()
    for opt in optimizers:
        opt.step()


def host_and_seed_optimizers(
    model: MorphogeneticModel, kind: str
) -> dict[str, torch.optim.Optimizer]:
    out = {"host": OPTIMIZERS[kind](model.host_parameters())}
    for sid in model.slot_config.slot_ids:
        params = model.seed_parameters(sid)
        if params:
            out[sid] = OPTIMIZERS[kind](params)
    return out


def fold_with_surgery(model, optimizers, slot_id: str) -> FoldPlan:
    plan = model.fold_in_place(slot_id)
    carry_optimizer_state(optimizers["host"], plan, donors=[optimizers.pop(slot_id)])
    for opt in optimizers.values():
        if opt is not optimizers["host"]:
            carry_optimizer_state(opt, plan)
    return plan


@pytest.mark.parametrize("kind", OPTIMIZERS)
@pytest.mark.parametrize("topology", HOSTS)
def test_the_step_after_a_fold_equals_the_unfolded_models_step(topology, kind) -> None:
    # A lone fossil: a live neighbour would gain zero weights the unfolded model lacks.
    model, x = grown(topology, {"r0c1": ("wide_x1", SeedStage.FOSSILIZED)})
    optimizers = host_and_seed_optimizers(model, kind)
    for _ in range(3):  # the same number of steps for every optimiser (Adam counts agree)
        step(model, optimizers.values(), x)
    reference = copy.deepcopy((model, optimizers))  # the unfolded equivalent
    fold_with_surgery(model, optimizers, "r0c1")
    ref_model, ref_optimizers = reference
    for _ in range(2):
        step(model, optimizers.values(), x)
        step(ref_model, ref_optimizers.values(), x)
        want, got = ref_model.fold_width().state_dict(), model.state_dict()
        assert want.keys() == got.keys()
        for key, value in want.items():
            if torch.is_tensor(value):
                torch.testing.assert_close(got[key], value, atol=1e-10, rtol=1e-9, msg=key)


def test_new_entries_start_at_zero_and_old_ones_keep_their_state() -> None:
    stages = {
        "r0c0": ("wide_half", SeedStage.BLENDING),
        "r0c1": ("wide_x1", SeedStage.FOSSILIZED),
        "r0c2": ("wide_x2", SeedStage.TRAINING),
    }
    model, x = grown("cnn", stages)
    optimizers = host_and_seed_optimizers(model, "adam")
    for _ in range(2):
        step(model, optimizers.values(), x)
    down = model.slots["r0c2"].seed.fan_in[0].weight
    up = model.slots["r0c0"].seed.fan_out.weight
    consumer = model.host.blocks[2][0].weight
    fossil_out = model.slots["r0c1"].seed.fan_out.weight
    old = {
        name: {k: v.clone() for k, v in optimizers[owner].state[p].items()}
        for name, owner, p in (
            ("down", "r0c2", down),
            ("up", "r0c0", up),
            ("consumer", "host", consumer),
            ("fossil_out", "r0c1", fossil_out),
        )
    }
    k = model.slots["r0c1"].seed.units
    fold_with_surgery(model, optimizers, "r0c1")
    for key in ("exp_avg", "exp_avg_sq"):
        state = optimizers["r0c2"].state[down][key]  # the downstream seed reads k new inputs
        assert torch.equal(state[:, :-k], old["down"][key]) and not state[:, -k:].any()
        state = optimizers["r0c0"].state[up][key]  # the upstream seed feeds k new units
        assert torch.equal(state[:-k], old["up"][key]) and not state[-k:].any()
        state = optimizers["host"].state[consumer][key]  # the fossil's moments moved here
        assert torch.equal(state[:, :-k], old["consumer"][key])
        assert torch.equal(state[:, -k:], old["fossil_out"][key])
    for _ in range(2):  # and every optimiser steps on the new shapes
        step(model, optimizers.values(), x)


def test_adam_takes_the_largest_count_and_keeps_bias_corrected_moments() -> None:
    model, x = grown("mlp", {"r0c1": ("wide_x1", SeedStage.FOSSILIZED)})
    optimizers = host_and_seed_optimizers(model, "adam")
    for _ in range(5):  # the host's optimiser is older than the fossil's
        step(model, [optimizers["host"]], x)
    for _ in range(2):
        step(model, optimizers.values(), x)
    producer = model.host.blocks[1][0].weight
    seed_in = model.slots["r0c1"].seed.fan_in[0].weight
    seed_state = {k: v.clone() for k, v in optimizers["r0c1"].state[seed_in].items()}
    fold_with_surgery(model, optimizers, "r0c1")
    state = optimizers["host"].state[producer]
    assert isinstance(state["step"], torch.Tensor) and float(state["step"]) == 7.0
    k = seed_in.shape[0]
    for key, beta in (("exp_avg", 0.9), ("exp_avg_sq", 0.999)):
        corrected_before = seed_state[key] / (1 - beta**2)
        corrected_after = state[key][-k:] / (1 - beta**7)
        torch.testing.assert_close(corrected_after, corrected_before, rtol=1e-6, atol=0)


def test_a_replaced_parameter_takes_the_old_ones_place() -> None:
    """A change that could not keep the Parameter object (a user's layer rebuilt):
    param_groups and state follow it; the absorbed parameter leaves the optimiser."""
    old, absorbed = nn.Parameter(torch.ones(2, 3)), nn.Parameter(torch.ones(1, 3))
    opt = torch.optim.SGD([old, absorbed], lr=0.1, momentum=0.9)
    (old.sum() * 2 + absorbed.sum() * 3).backward()
    opt.step()
    new = nn.Parameter(torch.ones(3, 3))
    plan = FoldPlan(
        "r0c0",
        (
            ParamChange(
                old,
                new,
                old.shape,
                (Piece(old, (slice(0, 2),)), Piece(absorbed, (slice(2, 3),))),
            ),
        ),
        (absorbed,),
        StageChange("r0c0", SeedStage.FOSSILIZED, SeedStage.DORMANT, "folded"),
    )
    carry_optimizer_state(opt, plan)
    assert opt.param_groups[0]["params"] == [new]
    assert old not in opt.state and absorbed not in opt.state
    buf = opt.state[new]["momentum_buffer"]
    assert torch.equal(buf, torch.tensor([[2.0] * 3, [2.0] * 3, [3.0] * 3]))


def test_state_it_cannot_carry_is_named() -> None:
    model, x = grown("mlp", {"r0c1": ("wide_x1", SeedStage.FOSSILIZED)})
    opt = torch.optim.NAdam(model.host_parameters())  # keeps a scalar mu_product
    step(model, [opt], x)
    with pytest.raises(ValueError, match="NAdam state 'mu_product'"):
        carry_optimizer_state(opt, model.fold_in_place("r0c1"))
