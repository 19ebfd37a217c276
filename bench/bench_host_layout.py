"""Host layout: time per training batch of the CNN host by pooling schedule and memory format.

The reference system's tiny workload (issue 16): CIFAR-shaped 3x32x32 synthetic images,
CNN base width 8, 3 blocks, batch 512, SGD. Each configuration trains the host built
by the `synthetic` task with the given `pool_at` and `channels_last` task options
(forward, loss, backward, optimiser step); the figure is the fastest of ``--repeats``
batches after a warm-up, so other jobs on the machine inflate it least.

    OMP_NUM_THREADS=1 python bench/bench_host_layout.py
    python bench/bench_host_layout.py --quick
"""

from __future__ import annotations

import argparse

import torch

import benchlib
from esper.training import get_task
from esper.training.objective import task_loss

# (label, pool_at, channels_last); pool_at None = the task's default schedule.
CONFIGS = (
    ("default pools", None, False),
    ("default pools, channels_last", None, True),
    ("pool after every block", [0, 1, 2], False),
    ("pool after every block, channels_last", [0, 1, 2], True),
)


def batch_seconds(pool_at, channels_last: bool, batch: int, width: int, repeats: int) -> float:
    task = get_task(
        "synthetic",
        shape=(3, 32, 32),
        n_train=batch,
        n_val=16,
        width=width,
        depth=3,
        pool_at=pool_at,
        channels_last=channels_last,
    )
    data = task.make_data(seed=0)
    torch.manual_seed(0)
    host = task.make_host(data)
    optimizer = torch.optim.SGD(host.parameters(), lr=0.05, momentum=0.9)
    x, y = data.train_x[:batch], data.train_y[:batch]
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        task_loss(host(x), y).backward()
        optimizer.step()

    return benchlib.best_of(step, repeats)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--width", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="batch 32, 2 repeats")
    args = parser.parse_args(argv)
    if args.quick:
        args.batch, args.repeats = 32, 2
    benchlib.set_threads(args.threads)
    print(f"machine: {benchlib.machine()}", flush=True)
    rows, base = [], None
    for label, pool_at, channels_last in CONFIGS:
        seconds = batch_seconds(pool_at, channels_last, args.batch, args.width, args.repeats)
        base = seconds if base is None else base
        rows.append(
            {
                "host layout": label,
                "ms per batch": round(1000 * seconds, 1),
                "speed-up vs first row": f"{base / seconds:.2f}x",
            }
        )
    benchlib.report(
        "host_layout",
        f"CNN host per training batch: 3x32x32, width {args.width}, 3 blocks, batch "
        f"{args.batch}, {args.threads} thread(s)",
        rows,
        note="Fastest of the timed batches after one warm-up (bench/bench_host_layout.py).",
    )


if __name__ == "__main__":
    main()
