"""Grow a too-narrow MLP wider: a plain `nn.Sequential` on flattened Fashion-MNIST.

The user's model is ``nn.Sequential(Flatten, Linear(784, 4), ReLU, Linear(4, 10))``: a
hidden layer deliberately too narrow. ``attach(model, [], sample, widen=["1"])`` puts a
width site on the hidden Linear (its consumer, the head, is found by tracing); the
`Grower` germinates width seeds there, and each one it fossilizes is folded into the
model's own layers (``model[1].out_features`` grows) with the optimiser's state carried.

For each seed the script trains, on the same data in the same order: the narrow model
grown, the same narrow model not grown, and static models of several widths
(``--static-widths``: the family's front), and prints the paired differences of test
accuracy, mean ± SE over the seeds (inside 2 SE is no difference).

    python examples/mlp_fashion_mnist.py              # 8 seeds, Fashion-MNIST
    python examples/mlp_fashion_mnist.py --tiny       # seconds, on digits (the tests)

Falls back to scikit-learn's digits when /usr/share/datasets/fashion-mnist is absent.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from esper.grow import Grower, GrowerConfig, attach, export_model
from esper.model import LifecycleConfig
from esper.policy import HeuristicConfig, HeuristicController
from esper.training.datasets import FASHION_MNIST_ROOT, load_digits_data, load_fashion_mnist


def make_mlp(inputs: int, hidden: int, classes: int = 10) -> nn.Sequential:
    """The user's model: nothing in it knows Esper."""
    return nn.Sequential(
        nn.Flatten(), nn.Linear(inputs, hidden), nn.ReLU(), nn.Linear(hidden, classes)
    )


def load(name: str, max_train: int, val: int):
    """(train_x, train_y, val_x, val_y, test_x, test_y, name); val is cut from train."""
    if name == "fashion-mnist" and Path(FASHION_MNIST_ROOT).is_dir():
        data = load_fashion_mnist(max_train=max_train + val)
    else:
        data = load_digits_data()
    x, y = data.train_x.flatten(1), data.train_y
    val = min(val, len(y) // 5)
    return (x[val:], y[val:], x[:val], y[:val], data.val_x.flatten(1), data.val_y, data.name)


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    was = model.training
    model.eval()
    logits = torch.cat([model(x[i : i + 1000]) for i in range(0, len(x), 1000)])
    model.train(was)
    return F.cross_entropy(logits, y).item(), (logits.argmax(1) == y).float().mean().item()


def run(args: argparse.Namespace, data, seed: int, hidden: int, grow: bool) -> dict:
    train_x, train_y, val_x, val_y, test_x, test_y, _ = data
    torch.manual_seed(seed)
    model = make_mlp(train_x.shape[1], hidden)
    net: nn.Module = model
    grower = None
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    if grow:
        lifecycle = LifecycleConfig(min_train_epochs=1, blend_epochs=1, embargo_epochs=1)
        net = attach(model, [], train_x[:2], lifecycle, widen=["1"])
        val_batches = [(val_x[i : i + 500], val_y[i : i + 500]) for i in range(0, len(val_y), 500)]
        # Eager: with a short budget quality rarely plateaus, so grow whenever no seed is
        # alive; wide_x1 doubles the hidden layer each time a seed is kept.
        controller = HeuristicController(HeuristicConfig(plateau_patience=0))
        config = GrowerConfig(
            max_steps=args.epochs,
            growth_penalty=0.0,
            seed=seed,
            blueprints=("wide_x1",),
            max_growth=args.max_growth,
        )
        grower = Grower(net, optimizer, val_batches, controller, config)
    order = torch.Generator().manual_seed(seed)  # the same data order for every model
    start = time.perf_counter()
    for _ in range(args.epochs):
        perm = torch.randperm(len(train_y), generator=order)
        total = 0.0
        for i in range(0, len(perm), args.batch):
            idx = perm[i : i + args.batch]
            x, y = train_x[idx], train_y[idx]
            optimizer.zero_grad()
            loss = F.cross_entropy(net(x), y)
            own = net.seed_forward(x) if grower is not None else None
            if own is not None:  # TRAINING seeds: their exact fully-on gradient
                loss = loss + F.cross_entropy(own, y)
            loss.backward()
            optimizer.step()
            total += loss.item() * len(idx)
        if grower is not None:
            val_loss, val_acc = evaluate(net, val_x, val_y)
            grower.step(train_loss=total / len(perm), val_loss=val_loss, val_metric=val_acc)
    seconds = time.perf_counter() - start
    final = net
    if grower is not None:
        final = export_model(net.eval())  # the user's Sequential, wider, no Esper inside
    _, test_acc = evaluate(final, test_x, test_y)
    return {
        "hidden": int(model[1].out_features),
        "params": sum(p.numel() for p in final.parameters()),
        "test_acc": test_acc,
        "seconds": seconds,
    }


def paired(a: list[float], b: list[float]) -> tuple[float, float]:
    """Mean and standard error of the paired differences a - b."""
    d = [x - y for x, y in zip(a, b, strict=True)]
    mean = sum(d) / len(d)
    if len(d) < 2:
        return mean, float("nan")
    var = sum((x - mean) ** 2 for x in d) / (len(d) - 1)
    return mean, math.sqrt(var / len(d))


def main(argv: list[str] | None = None) -> dict[str, list[dict]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="a few seconds, for tests")
    parser.add_argument("--seeds", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--train", type=int, default=12000, help="training images used")
    parser.add_argument("--hidden", type=int, default=4, help="the too-narrow start")
    parser.add_argument(
        "--static-widths", type=int, nargs="*", default=[16, 32, 64],
        help="static (never grown) hidden widths: the model family's front",
    )  # fmt: skip
    parser.add_argument(
        "--max-growth", type=float, default=None,
        help="cap: seed params <= this x the narrow model's params (None: no cap)",
    )  # fmt: skip
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--data", choices=("fashion-mnist", "digits"), default=None)
    args = parser.parse_args(argv)
    if args.tiny:
        args.seeds, args.epochs, args.train, args.data = 2, 4, 600, args.data or "digits"
    data = load(args.data or "fashion-mnist", args.train, 300 if args.tiny else 2000)
    print(f"data: {data[-1]}, {len(data[1])} train / {len(data[3])} val / {len(data[5])} test")
    kinds = {"grown": (args.hidden, True), "not grown": (args.hidden, False)}
    kinds.update({f"static h={w}": (w, False) for w in args.static_widths})
    rows: dict[str, list[dict]] = {k: [] for k in kinds}
    for seed in range(args.seeds):
        for kind, (hidden, grow) in kinds.items():
            rows[kind].append(run(args, data, seed, hidden, grow))
        g = rows["grown"][-1]
        others = ", ".join(f"{k} {rows[k][-1]['test_acc']:.4f}" for k in list(kinds)[1:])
        print(f"seed {seed}: grown h={g['hidden']} {g['test_acc']:.4f}, {others}", flush=True)
    print(f"\n{'model':<14} {'hidden':>10} {'params':>8} {'test acc':>9} {'train s':>8}")
    for kind, rs in rows.items():
        n = len(rs)
        hidden = sorted(r["hidden"] for r in rs)
        shown = str(hidden[0]) if hidden[0] == hidden[-1] else f"{hidden[0]}-{hidden[-1]}"
        print(
            f"{kind:<14} {shown:>10} {sum(r['params'] for r in rs) / n:>8.0f} "
            f"{sum(r['test_acc'] for r in rs) / n:>9.4f} {sum(r['seconds'] for r in rs) / n:>8.1f}"
        )
    grown = [r["test_acc"] for r in rows["grown"]]
    print(f"\npaired test-accuracy differences over {args.seeds} seeds (mean ± SE):")
    for kind in list(kinds)[1:]:
        mean, se = paired(grown, [r["test_acc"] for r in rows[kind]])
        print(f"  grown - {kind:<14} {mean:+.4f} ± {se:.4f}")
    return rows


if __name__ == "__main__":
    main()
