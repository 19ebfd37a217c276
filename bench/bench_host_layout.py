"""Host layout: time per training batch of the CNN host by pooling schedule and memory format.

The reference system's tiny workload (issue 16): CIFAR-shaped 3x32x32 synthetic images,
CNN base width 8, 3 blocks, batch 512, SGD. Each configuration trains the host built
by the `synthetic` task with the given `pool_at` and `channels_last` task options
(forward, loss, backward, optimiser step); the figure is the fastest of ``--repeats``
batches after a warm-up, so other jobs on the machine inflate it least.

    OMP_NUM_THREADS=1 python bench/bench_host_layout.py
    python bench/bench_host_layout.py --quick
    python bench/bench_host_layout.py --rule    # the shapes behind channels_last="auto"

``--rule`` times NCHW against channels_last, interleaved (median of paired ratios), on
the image sizes either side of the ``channels_last="auto"`` threshold
(`esper.training.tasks.CHANNELS_LAST_MIN_SIZE`).
"""

from __future__ import annotations

import argparse
import statistics

import torch

import benchlib
from esper.training import get_task
from esper.training.objective import task_loss
from esper.training.tasks import resolve_channels_last

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
    )  # the rows' layouts are forced: this table is what "auto" is judged by
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


# (label, shape, width, batch, pool_at) of the --rule table.
RULE_CASES = (
    ("3x32x32, width 8, batch 512, pool every block", (3, 32, 32), 8, 512, [0, 1, 2]),
    ("1x28x28 (fashion-mnist), width 4, batch 128", (1, 28, 28), 4, 128, None),
    ("1x16x16, width 4, batch 128", (1, 16, 16), 4, 128, None),
    ("1x8x8 (digits), width 2, batch 64", (1, 8, 8), 2, 64, None),
)


def layout_step(shape, width: int, batch: int, pool_at, channels_last: bool):
    """One timed training batch (seconds) of the synthetic task's host, the data stored
    in the host's layout as the task stores it."""
    task = get_task("synthetic", shape=shape, n_train=batch, n_val=16, width=width,
                    depth=3, pool_at=pool_at, channels_last=channels_last)  # fmt: skip
    data = task.make_data(seed=0)
    torch.manual_seed(0)
    host = task.make_host(data)
    return benchlib.sgd_step_timer(host, data.train_x[:batch], data.train_y[:batch])


def rule_rows(rounds: int) -> list[dict]:
    rows = []
    for label, shape, width, batch, pool_at in RULE_CASES:
        nchw = layout_step(shape, width, batch, pool_at, False)
        nhwc = layout_step(shape, width, batch, pool_at, True)
        nchw(), nhwc()
        pairs = [(min(nchw() for _ in range(3)), min(nhwc() for _ in range(3)))
                 for _ in range(rounds)]  # fmt: skip
        ratio = statistics.median(a / b for a, b in pairs)
        rows.append({"image, host, batch": label,
                     "NCHW ms": round(1000 * min(a for a, _ in pairs), 2),
                     "channels_last ms": round(1000 * min(b for _, b in pairs), 2),
                     "NCHW / channels_last": f"{ratio:.2f}x",
                     "auto picks": "channels_last" if resolve_channels_last("auto", shape[-1])
                     else "NCHW"})  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--width", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="batch 32, 2 repeats")
    parser.add_argument("--rule", action="store_true", help="the channels_last auto rule")
    args = parser.parse_args(argv)
    if args.rule:
        benchlib.set_threads(args.threads)
        print(f"machine: {benchlib.machine()}", flush=True)
        benchlib.report(
            "host_layout_rule",
            f"NCHW vs channels_last per training batch, {args.threads} thread(s)",
            rule_rows(2 if args.quick else 8),
            note="Median of interleaved pairs, each the best of 3 batches "
            "(bench/bench_host_layout.py --rule).",
        )
        return
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
