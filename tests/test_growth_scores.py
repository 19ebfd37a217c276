"""Growth scores (issue 20): the GradMax-style first-order loss decrease per new unit
agrees with a brute-force finite difference through a real width seed."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from esper.model.scores import growth_scores
from esper.model.width import UnitSite


def tiny() -> tuple[nn.Sequential, UnitSite, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 3), nn.Identity(), nn.Linear(3, 4)).double()
    site = UnitSite(net[0], (net[1],), net[2])
    x, y = torch.randn(32, 5, dtype=torch.float64), torch.randint(0, 4, (32,))
    return net, site, x, y


def test_the_score_is_the_loss_decrease_rate_of_the_best_new_unit() -> None:
    net, site, x, y = tiny()

    def loss_with(seed: nn.Module | None = None) -> torch.Tensor:
        z = net(x)
        if seed is not None:
            z = z + seed(x)
        return nn.functional.cross_entropy(z, y)

    score = growth_scores(site, [loss_with], k=1)
    v = score.fan_in[0]
    # Brute force: a real width seed of one unit with fan-in v (no bias); its fan-out
    # gradient at zero, by central finite differences, then a step against it.
    seed = site.build(1).double()
    with torch.no_grad():
        seed.fan_in[0].weight.copy_(v.view(1, -1))
        seed.fan_in[0].bias.zero_()
    fan_out = seed.fan_out.weight  # [4, 1], zero
    eps, grad = 1e-6, torch.zeros_like(fan_out)
    for i in range(fan_out.shape[0]):
        with torch.no_grad():
            fan_out[i, 0] = eps
            up = loss_with(seed)
            fan_out[i, 0] = -eps
            down = loss_with(seed)
            fan_out[i, 0] = 0.0
        grad[i, 0] = (up - down) / (2 * eps)
    rate = float(grad.pow(2).sum())  # the loss falls at ‖∂L/∂u‖² per unit step
    assert float(score.gains[0]) == pytest.approx(rate, rel=1e-6)
    # ...and a small step along −∂L/∂u lowers the loss by that rate to first order.
    step = 1e-4
    with torch.no_grad():
        fan_out.copy_(-step * grad)
        drop = float(loss_with() - loss_with(seed))
    assert drop == pytest.approx(step * rate, rel=1e-3)
    # No other unit direction does better: v is the top singular direction.
    for _ in range(20):
        w = torch.randn(5, dtype=torch.float64)
        w = w / w.norm()
        with torch.no_grad():
            seed.fan_in[0].weight.copy_(w.view(1, -1))
            fan_out.zero_()
        loss_with(seed)
        (g,) = torch.autograd.grad(loss_with(seed), fan_out)
        assert float(g.pow(2).sum()) <= rate * (1 + 1e-9)


def test_scores_carry_a_standard_error_over_batches_and_leave_grads_alone() -> None:
    net, site, x, y = tiny()
    runs = [
        (lambda i=i: nn.functional.cross_entropy(net(x[8 * i : 8 * i + 8]), y[8 * i : 8 * i + 8]))
        for i in range(4)
    ]
    score = growth_scores(site, runs, k=2)
    assert score.batches == 4 and score.gains.shape == (2,) and score.stderr.shape == (2,)
    assert bool((score.stderr > 0).all()) and float(score.gains[0]) > 0
    assert torch.allclose(score.per_param, score.gains / site.param_count(1))
    assert all(p.grad is None for p in net.parameters())


def test_growth_scores_name_what_they_cannot_score() -> None:
    conv = UnitSite(nn.Conv2d(1, 2, 3), (), nn.Conv2d(2, 3, 3))
    with pytest.raises(TypeError, match="nn.Linear, got Conv2d -> Conv2d"):
        growth_scores(conv, [], k=1)
    _, site, _, _ = tiny()
    with pytest.raises(ValueError, match=r"k must be an int in \[1, 5\], got 9"):
        growth_scores(site, [], k=9)
