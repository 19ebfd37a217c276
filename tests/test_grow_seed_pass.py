"""TRAINING seeds on a user's model learn in their own pass, as on Esper's hosts.

The user's CNN has a slot on a conv whose output feeds a BatchNorm (where the
straight-through rule drifts) and a dropout (so the own pass must replay the forward's
random draws and leave the host's random stream alone)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from esper.grow import attach
from esper.lifecycle import SeedStage
from esper.model import LifecycleConfig

SID = "r0c0"


class UserCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.drop = nn.Dropout(0.2)
        self.conv2, self.bn2 = nn.Conv2d(4, 6, 3, padding=1), nn.BatchNorm2d(6)
        self.head = nn.Linear(6 * 4 * 4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.drop(F.relu(self.bn1(self.conv1(x))))
        h = F.max_pool2d(F.relu(self.bn2(self.conv2(h))), 2)
        return self.head(h.flatten(1))


def _setup(blueprint: str = "conv_heavy", randomise: bool = True, device: str = "cpu"):
    torch.manual_seed(0)
    net = UserCNN().to(device)
    reference = copy.deepcopy(net)
    x = torch.randn(16, 1, 8, 8, device=device)
    y = torch.randint(0, 5, (16,), device=device)
    slotted = attach(net, ["conv1"], x[:2], LifecycleConfig(min_train_epochs=1))
    slotted.germinate(SID, blueprint)
    if randomise:  # a seed that has trained a while: its term is no longer zero
        with torch.no_grad():
            for p in slotted.seed_parameters(SID):
                p.add_(0.3 * torch.randn_like(p))
    return net, reference, slotted, x, y


def _seed_grads(slotted) -> list[torch.Tensor]:
    return [p.grad.clone() for p in slotted.seed_parameters(SID)]


def _fully_on_grads(slotted, x, y, loss_at=None, rng_seed=7):
    """Gradient w.r.t. the seed of the model with the seed fully on (train mode, same
    dropout draw), the host's buffers restored. ``loss_at``: take dL/dy at these
    logits instead of at the fully-on ones."""
    buffers = [b.clone() for b in slotted.buffers()]
    torch.manual_seed(rng_seed)
    on = slotted(x, alpha_override={SID: 1.0})
    params = slotted.seed_parameters(SID)
    if loss_at is None:
        grads = torch.autograd.grad(F.cross_entropy(on, y), params)
    else:
        at = loss_at.detach().requires_grad_()
        (dl_dy,) = torch.autograd.grad(F.cross_entropy(at, y), at)
        grads = torch.autograd.grad(on, params, grad_outputs=dl_dy)
    with torch.no_grad():
        for b, saved in zip(slotted.buffers(), buffers, strict=True):
            b.copy_(saved)
    return list(grads)


CUDA = pytest.param(
    "cuda",
    marks=[
        pytest.mark.gpu,
        pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
    ],
)


def _rng(device: str) -> torch.Tensor:
    return torch.cuda.get_rng_state() if device == "cuda" else torch.get_rng_state()


@pytest.mark.parametrize("device", ["cpu", CUDA])
@pytest.mark.parametrize("call", ["wrapper", "user_model"])
def test_a_training_seed_leaves_the_host_bit_identical_over_training(call, device, monkeypatch):
    """Outputs, host gradients, BatchNorm statistics, parameters and the random stream
    equal those of the same model trained without any seed, step after step, whether
    the loop calls the wrapper or the user's own module."""
    # Equal bits need the same kernels for the same shapes in both models.
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    net, reference, slotted, x, y = _setup(device=device)
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    opt.add_param_group({"params": slotted.seed_parameters(SID)})  # as the Grower does
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9)
    slotted.train(), reference.train()
    seed = slotted.slots[SID].seed
    seed_before = {name: p.clone() for name, p in seed.named_parameters()}
    for step in range(4):
        torch.manual_seed(step)
        out = (slotted if call == "wrapper" else net)(x)
        rng_after = _rng(device)
        torch.manual_seed(step)
        ref_out = reference(x)
        assert torch.equal(_rng(device), rng_after), step
        assert torch.equal(out, ref_out), step
        opt.zero_grad(), ref_opt.zero_grad()
        F.cross_entropy(out, y).backward()
        F.cross_entropy(ref_out, y).backward()
        for (name, p), q in zip(net.named_parameters(), reference.parameters(), strict=True):
            assert torch.equal(p.grad, q.grad), (step, name)
        opt.step(), ref_opt.step()
        for (name, a), b in zip(net.named_buffers(), reference.buffers(), strict=True):
            assert torch.equal(a, b), (step, name)
    assert slotted.slot_state(SID).stage == SeedStage.TRAINING
    # And the seed learned all along (but for the bias of its last conv, a per-channel
    # constant that the BatchNorm after the slot removes: no gradient, rightly).
    still = {name for name, p in seed.named_parameters() if torch.equal(p, seed_before[name])}
    assert still == {"3.bias"}


def test_a_loop_that_adds_the_seeds_own_loss_gives_them_the_fully_on_gradient():
    net, reference, slotted, x, y = _setup()
    slotted.train(), reference.train()
    expected = _fully_on_grads(slotted, x, y)
    torch.manual_seed(7)
    out = slotted(x)
    own = slotted.seed_forward(x)  # the forward's own pass, claimed: no second pass
    loss = F.cross_entropy(out, y) + F.cross_entropy(own, y)
    loss.backward()
    for got, want in zip(_seed_grads(slotted), expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
    torch.manual_seed(7)
    F.cross_entropy(reference(x), y).backward()
    for p, q in zip(net.parameters(), reference.parameters(), strict=True):
        assert torch.equal(p.grad, q.grad)  # the own loss reaches no host parameter


def test_an_unchanged_loop_trains_the_seed_by_its_own_pass():
    """``loss = ce(slotted(x), y)`` alone: the seed's gradient is its own pass's
    Jacobian (seed on) applied to the loss gradient at the host's output, not the
    straight-through one (Jacobian where the seed is off)."""
    _, reference, slotted, x, y = _setup()
    slotted.train(), reference.train()
    torch.manual_seed(7)
    expected = _fully_on_grads(slotted, x, y, loss_at=reference(x))
    torch.manual_seed(7)
    F.cross_entropy(slotted(x), y).backward()
    for got, want in zip(_seed_grads(slotted), expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
    # The straight-through rule (own_seed_pass = False) gives a different gradient.
    _, _, straight, x, y = _setup()
    straight.own_seed_pass = False
    straight.train()
    torch.manual_seed(7)
    F.cross_entropy(straight(x), y).backward()
    pairs = zip(_seed_grads(straight), expected, strict=True)
    assert any(not torch.allclose(a, b) for a, b in pairs)


def test_at_birth_the_unchanged_loop_gets_exactly_the_fully_on_gradient():
    _, _, slotted, x, y = _setup("conv_light", randomise=False)
    slotted.train()
    expected = _fully_on_grads(slotted, x, y)
    torch.manual_seed(7)
    F.cross_entropy(slotted(x), y).backward()
    for got, want in zip(_seed_grads(slotted), expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
        assert got.abs().sum() > 0


def test_the_own_pass_runs_only_while_it_can_train_a_seed():
    net, _, slotted, x, _ = _setup()
    calls = []
    net.conv2.register_forward_hook(lambda *_: calls.append(1))
    slotted.train()
    slotted(x)
    assert len(calls) == 2  # the host's forward and the seed's own pass
    with torch.no_grad():
        calls.clear()
        slotted(x)
        assert len(calls) == 1
    slotted.eval()
    calls.clear()
    slotted(x)
    slotted.train()
    slotted(x, alpha_override={SID: 1.0})  # a measurement, not a training forward
    assert len(calls) == 2
    slotted.record_contribution(SID, 1.0)
    slotted.step_epoch()  # TRAINING -> BLENDING: the seed now learns in the forward
    calls.clear()
    slotted(x)
    assert len(calls) == 1
    assert slotted.seed_forward(x) is None


def test_seed_forward_on_other_inputs_runs_a_fresh_pass_and_leaves_the_forwards():
    _, _, slotted, x, y = _setup()
    slotted.train()
    out = slotted(x)
    other = x.clone()
    own = slotted.seed_forward(other)  # not this forward's inputs: a pass of its own
    (F.cross_entropy(out, y) + 0 * own.sum()).backward()
    carried = _seed_grads(slotted)
    assert all(g.abs().sum() > 0 for g in carried)  # the forward's pass still trains it
    slotted.zero_grad()
    out = slotted(x)
    slotted.seed_forward(x)  # claimed, then not used: the forward carries nothing now
    F.cross_entropy(out, y).backward()
    assert all(p.grad is None for p in slotted.seed_parameters(SID))


def test_an_output_with_no_tensor_to_carry_the_pass_is_an_error():
    class Boxed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            return {"logits": self.fc(x), "extra": [x.sum()]}, object()

    model = Boxed()
    slotted = attach(model, ["fc"], torch.randn(2, 4))
    slotted.germinate(SID, "mlp")
    slotted.train()
    out, _ = slotted(torch.randn(3, 4))  # tuples and dicts of tensors are carried
    assert out["logits"].grad_fn is not None

    class Opaque(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            return type("Out", (), {"logits": self.fc(x)})()

    slotted = attach(Opaque(), ["fc"], torch.randn(2, 4))
    slotted.germinate(SID, "mlp")
    slotted.train()
    with pytest.raises(TypeError, match=r"Opaque returned a Out: no tensor .*own_seed_pass"):
        slotted(torch.randn(3, 4))
    slotted.own_seed_pass = False  # the straight-through rule needs nothing of the output
    slotted(torch.randn(3, 4))
