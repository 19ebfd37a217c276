"""Grow a torchvision ResNet-18: slots after its four stages, growth in a plain loop.

Needs torchvision (``pip install 'esper[vision]'``); without it the example says so and
exits cleanly. The network is built with random weights (nothing is downloaded). Data:
CIFAR-10 from a local folder of python batches (``--cifar DIR``), else class-conditional
synthetic 3x32x32 images.

    python examples/resnet18.py --cifar ~/data/cifar-10-batches-py
    python examples/resnet18.py --tiny    # seconds (what the tests run)
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from esper.grow import Grower, GrowerConfig, attach, export_model
from esper.model import LifecycleConfig
from esper.policy import HeuristicConfig, HeuristicController
from esper.training.datasets import load_cifar10, make_synthetic

SKIP = "torchvision is not installed (pip install 'esper[vision]'); skipping the ResNet-18 example"


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="a few seconds, for tests")
    parser.add_argument("--cifar", default=None, help="folder with CIFAR-10 python batches")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--train", type=int, default=5000)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        import torchvision
    except ImportError:
        print(SKIP)
        return []
    if args.tiny:
        args.epochs, args.train = 3, 64
    if args.cifar is not None:
        data = load_cifar10(args.cifar, max_train=args.train, max_val=1000)
    else:
        data = make_synthetic((3, 32, 32), n_train=args.train, n_val=max(64, args.train // 5))
    device = torch.device(args.device)
    x, y = data.train_x.to(device), data.train_y.to(device)
    vx, vy = data.val_x.to(device), data.val_y.to(device)
    val_batches = [(vx[i : i + 256], vy[i : i + 256]) for i in range(0, len(vy), 256)]
    print(f"data: {data.name}, {len(y)} train / {len(vy)} val, device {device}")

    torch.manual_seed(args.seed)
    model = torchvision.models.resnet18(weights=None, num_classes=10).to(device)
    stages = ["layer1", "layer2", "layer3", "layer4"]
    lifecycle = LifecycleConfig(min_train_epochs=1, blend_epochs=2, embargo_epochs=1)
    slotted = attach(model, stages, x[:2], lifecycle)
    print(
        "slots:",
        ", ".join(f"{p.spec.slot_id}={p.name} ({p.spec.channels})" for p in slotted.points),
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    grower = Grower(
        slotted,
        optimizer,
        val_batches,
        HeuristicController(HeuristicConfig(plateau_patience=0)),
        GrowerConfig(max_steps=args.epochs, blueprints=("conv_light", "attention", "norm")),
    )
    order = torch.Generator().manual_seed(args.seed)
    start = time.perf_counter()
    for epoch in range(args.epochs):
        perm = torch.randperm(len(y), generator=order).to(device)
        for i in range(0, len(perm), 64):
            idx = perm[i : i + 64]
            optimizer.zero_grad()
            loss = F.cross_entropy(slotted(x[idx]), y[idx])
            loss.backward()
            optimizer.step()
        step = grower.step(train_loss=loss.item())
        print(f"  epoch {epoch + 1}: {step.action}  (val acc {step.quality:.3f})")
    slotted.eval()
    plain = export_model(slotted)
    with torch.no_grad():
        diff = (plain(vx[:16]) - slotted(vx[:16])).abs().max().item()
    seeds = [f"{s.slot_id} {s.blueprint} {s.stage.name.lower()}" for s in slotted.slot_states()]
    row = {
        "seconds": time.perf_counter() - start,
        "val_acc": step.quality,
        "params": sum(p.numel() for p in plain.parameters()),
        "seeds": ", ".join(s for s in seeds if " None " not in s) or "none",
        "export_diff": diff,
    }
    print(
        f"\ngrown ResNet-18: val acc {row['val_acc']:.4f}, {row['params']} params after "
        f"export, seeds: {row['seeds']}; max |export - grown| = {diff:.2e}, "
        f"{row['seconds']:.1f} s"
    )
    return [row]


if __name__ == "__main__":
    main()
