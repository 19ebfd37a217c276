"""How a TRAINING seed learns on a user's model: straight-through, carried, exact.

A user's CNN (conv-BN-ReLU, conv-BN-ReLU, max-pool, linear head) on digits, with a slot
on the first conv, whose output feeds a BatchNorm: the case where straight-through
seeds drifted on Esper's hosts (BENCHMARKS, "TRAINING seeds learn in a pass of their
own"). The seed is germinated at once and trained for ``--epochs`` epochs alongside
the host (SGD lr 0.05, momentum 0.9, batch 64, one optimiser, seed params in their own
group as the `Grower` adds them). Arms:

- ``straight``: ``own_seed_pass = False``, the straight-through rule inside forward;
- ``carried``: the default, the user's loop unchanged (``loss = ce(slotted(x), y)``):
  the forward's output carries the seed's own pass (`esper.grow.seedpass`);
- ``exact``: the loop adds ``ce(slotted.seed_forward(x), y)``: the fully-on gradient.

Reported per arm and epoch: the seed's prospective contribution, validation loss
with the seed off minus with it on (eval mode, nats; > 0: the seed would help), as
median and worst over ``--seeds`` seeds. The host's trajectory is the same in every arm
(the tests check it bit for bit), so only the seed differs.

    OMP_NUM_THREADS=1 python bench/bench_user_seed_pass.py --seeds 4
"""

from __future__ import annotations

import argparse
import statistics

import torch
import torch.nn.functional as F
from torch import nn

from esper.grow import attach
from esper.training.tasks import get_task

ARMS = ("straight", "carried", "exact")


class UserCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.conv2, self.bn2 = nn.Conv2d(4, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.head = nn.Linear(8 * 4 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.bn1(self.conv1(x)))
        h = F.max_pool2d(F.relu(self.bn2(self.conv2(h))), 2)
        return self.head(h.flatten(1))


def run(arm: str, blueprint: str, seed: int, epochs: int, data) -> list[float]:
    torch.manual_seed(seed)
    net = UserCNN()
    slotted = attach(net, ["conv1"], data.train_x[:2])
    slotted.own_seed_pass = arm != "straight"
    slotted.germinate("r0c0", blueprint)
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    opt.add_param_group({"params": slotted.seed_parameters("r0c0")})
    order = torch.Generator().manual_seed(seed)
    contributions = []
    for _ in range(epochs):
        slotted.train()
        perm = torch.randperm(data.n_train, generator=order)
        for start in range(0, data.n_train, 64):
            idx = perm[start : start + 64]
            x, y = data.train_x[idx], data.train_y[idx]
            opt.zero_grad()
            loss = F.cross_entropy(slotted(x), y)
            if arm == "exact":
                loss = loss + F.cross_entropy(slotted.seed_forward(x), y)
            loss.backward()
            opt.step()
        slotted.eval()
        with torch.no_grad():
            off = F.cross_entropy(slotted(data.val_x), data.val_y)
            on = F.cross_entropy(slotted(data.val_x, alpha_override={"r0c0": 1.0}), data.val_y)
        contributions.append(float(off - on))
    return contributions


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--blueprints", default="conv_heavy,conv_light")
    parser.add_argument("--quick", action="store_true", help="1 seed x 2 epochs (smoke run)")
    args = parser.parse_args()
    if args.quick:
        args.seeds, args.epochs = 1, 2
    torch.set_num_threads(1)
    data = get_task("digits").make_data(seed=0)
    for blueprint in args.blueprints.split(","):
        print(f"{blueprint}: prospective contribution (nats), median / worst of {args.seeds}")
        epochs = " ".join(f"{'epoch ' + str(e + 1):>20}" for e in range(args.epochs))
        print(f"{'arm':<10}{epochs}")
        for arm in ARMS:
            runs = [run(arm, blueprint, s, args.epochs, data) for s in range(args.seeds)]
            cells = [
                f"{statistics.median(c):+9.3f} / {min(c):+9.1f}" for c in zip(*runs, strict=True)
            ]
            print(f"{arm:<10}" + " ".join(f"{cell:>20}" for cell in cells), flush=True)


if __name__ == "__main__":
    main()
