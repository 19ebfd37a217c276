"""Grow your own CNN: a user-defined model in a hand-written loop, on Fashion-MNIST.

The model class and the training loop are plain PyTorch. Esper adds three lines: attach
slots after three blocks, build a `Grower`, call ``grower.step`` once per epoch. The
same model is also trained without growth (same seed, same data order), and the grown
model is exported to a plain `nn.Module` at the end. Growth decisions read a validation
split carved from the training images; the table reports the official test split.

    python examples/cnn_fashion_mnist.py            # 1 min 41 s on a busy 2-core CPU
    python examples/cnn_fashion_mnist.py --tiny     # seconds, on digits (what the tests run)

Falls back to scikit-learn's digits when /usr/share/datasets/fashion-mnist is absent.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from esper.grow import Grower, GrowerConfig, attach, export_model
from esper.model import LifecycleConfig
from esper.policy import HeuristicConfig, HeuristicController
from esper.training.datasets import FASHION_MNIST_ROOT, load_digits_data, load_fashion_mnist


class SmallCNN(nn.Module):
    """Three conv blocks (conv-BN-ReLU), two max-pools, global pooling, a linear head."""

    def __init__(self, width: int = 4, classes: int = 10) -> None:
        super().__init__()

        def block(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU()
            )

        self.block1 = block(1, width)
        self.block2 = block(width, 2 * width)
        self.block3 = block(2 * width, 4 * width)
        self.head = nn.Linear(4 * width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.max_pool2d(self.block1(x), 2)
        h = F.max_pool2d(self.block2(h), 2)
        return self.head(self.block3(h).mean(dim=(2, 3)))


def load(name: str, max_train: int, val: int):
    """(train_x, train_y, val_x, val_y, test_x, test_y, name); val is cut from train."""
    if name == "fashion-mnist" and Path(FASHION_MNIST_ROOT).is_dir():
        data = load_fashion_mnist(max_train=max_train + val)
    else:
        data = load_digits_data()
    x, y = data.train_x, data.train_y
    val = min(val, len(y) // 5)
    return (x[val:], y[val:], x[:val], y[:val], data.val_x, data.val_y, data.name)


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    model.eval()
    logits = torch.cat([model(x[i : i + 1000]) for i in range(0, len(x), 1000)])
    model.train()
    return F.cross_entropy(logits, y).item(), (logits.argmax(1) == y).float().mean().item()


def warm_up(args: argparse.Namespace, data) -> None:
    """A few untimed training steps of a throwaway model: torch's one-time start-up
    costs (thread pool, kernel choice, allocator) would otherwise land in the "train s"
    of whichever model the table times first."""
    train_x, train_y, val_x, val_y = data[:4]
    model = SmallCNN(args.width)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    for i in range(0, 3 * args.batch, args.batch):
        optimizer.zero_grad()
        F.cross_entropy(model(train_x[i : i + args.batch]), train_y[i : i + args.batch]).backward()
        optimizer.step()
    evaluate(model, val_x, val_y)


def run(args: argparse.Namespace, data, grow: bool, width: int | None = None) -> dict:
    train_x, train_y, val_x, val_y, test_x, test_y, _ = data
    torch.manual_seed(args.seed)
    model = SmallCNN(width or args.width)  # the user's model
    net: nn.Module = model
    if grow:
        lifecycle = LifecycleConfig(min_train_epochs=1, blend_epochs=2, embargo_epochs=1)
        net = attach(model, ["block1", "block2", "block3"], train_x[:2], lifecycle)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    val_batches = [(val_x[i : i + 500], val_y[i : i + 500]) for i in range(0, len(val_y), 500)]
    grower = None
    if grow:
        # Eager heuristic: with a short budget quality rarely plateaus, so it grows as soon
        # as no seed is alive, offering seeds that add real capacity.
        controller = HeuristicController(HeuristicConfig(plateau_patience=0))
        config = GrowerConfig(
            max_steps=args.epochs, blueprints=("conv_heavy", "inverted", "conv_light")
        )
        grower = Grower(net, optimizer, val_batches, controller, config)
    order = torch.Generator().manual_seed(args.seed)  # the same data order in both runs
    start = time.perf_counter()
    for epoch in range(args.epochs):
        perm = torch.randperm(len(train_y), generator=order)
        total = 0.0
        for i in range(0, len(perm), args.batch):
            idx = perm[i : i + args.batch]
            optimizer.zero_grad()
            loss = F.cross_entropy(net(train_x[idx]), train_y[idx])
            loss.backward()
            optimizer.step()
            total += loss.item() * len(idx)
        if grower is not None:
            val_loss, val_acc = evaluate(net, val_x, val_y)
            step = grower.step(train_loss=total / len(perm), val_loss=val_loss, val_metric=val_acc)
            moves = [
                f"{c.slot_id} {c.source.name}->{c.target.name} ({c.reason})"
                for c in step.changes
                if not c.reason.startswith(("policy", "embargo"))
            ]
            if step.action != "WAIT" or moves or args.verbose:
                print(
                    f"  epoch {epoch + 1}: val acc {val_acc:.3f}; {step.action}", *moves, sep="; "
                )
    seconds = time.perf_counter() - start
    test_loss, test_acc = evaluate(net, test_x, test_y)
    row = {
        "model": "grown" if grow else "not grown" if width is None else f"static w={width}",
        "params": sum(p.numel() for p in net.parameters()),
        "test_acc": test_acc,
        "test_loss": test_loss,
        "seconds": seconds,
        "seeds": "-",
    }
    if grow:
        states = net.slot_states()
        row["seeds"] = (
            ", ".join(
                f"{s.slot_id} {s.blueprint} {s.stage.name.lower()}" for s in states if s.blueprint
            )
            or "none"
        )
        net.eval()
        plain = export_model(net)
        with torch.no_grad():
            diff = (plain(test_x[:256]) - net(test_x[:256])).abs().max().item()
        row["export"] = (sum(p.numel() for p in plain.parameters()), diff)
        row["params"] = row["export"][0]  # what the function uses: no still-training seeds
    return row


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="a few seconds, for tests")
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--train", type=int, default=12000, help="training images used")
    parser.add_argument("--width", type=int, default=4)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data", choices=("fashion-mnist", "digits"), default=None)
    parser.add_argument(
        "--static-widths", type=int, nargs="*", default=[],
        help="also train static (never grown) models of these widths, for a sized comparison",
    )  # fmt: skip
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args(argv)
    if args.tiny:  # digits: no 30 MB of IDX files to unpack
        args.epochs, args.train, args.data = 4, 600, args.data or "digits"
    data = load(args.data or "fashion-mnist", args.train, 300 if args.tiny else 2000)
    print(f"data: {data[-1]}, {len(data[1])} train / {len(data[3])} val / {len(data[5])} test")
    warm_up(args, data)  # every model below seeds torch itself: results do not change
    rows = [run(args, data, grow=False), run(args, data, grow=True)]
    rows += [run(args, data, grow=False, width=w) for w in args.static_widths]
    print("\n(train s: the training loop's wall time, after an untimed warm-up)")
    print(f"{'model':<10} {'params':>7} {'test acc':>9} {'test loss':>10} {'train s':>8}  seeds")
    for r in rows:
        print(
            f"{r['model']:<10} {r['params']:>7} {r['test_acc']:>9.4f} {r['test_loss']:>10.4f} "
            f"{r['seconds']:>8.1f}  {r['seeds']}"
        )
    params, diff = next(r for r in rows if r["model"] == "grown")["export"]
    print(f"\nexported plain nn.Module: {params} params, max |export - grown| = {diff:.2e}")
    return rows


if __name__ == "__main__":
    main()
