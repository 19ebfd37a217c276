"""Cost of batched action masks (`compute_batch_masks`) for E envs x S slots.

    python bench/bench_masks.py            # E in {1, 16, 256} x S in {1, 8, 64}
    python bench/bench_masks.py --quick    # fewer repeats (a few seconds)

Prints the median time per call of the batched tensor builder and, for comparison,
of the per-env reference (`compute_action_masks` once per env), on random stages.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from dataclasses import dataclass

import torch

from esper.env.masks import compute_action_masks, compute_batch_masks
from esper.lifecycle import NUM_STAGES, SeedStage
from esper.slots import SlotConfig

NUM_BLUEPRINTS = 5


@dataclass(frozen=True)
class _Slot:
    slot_id: str
    stage: SeedStage
    contribution_lower: float | None


def _median_ms(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def bench(num_envs: int, num_slots: int, repeats: int, device: str, reference: bool) -> tuple:
    gen = torch.Generator().manual_seed(0)
    stages = torch.randint(NUM_STAGES, (num_envs, num_slots), generator=gen)
    contributions = torch.rand(num_envs, num_slots, generator=gen, dtype=torch.float64) - 0.5
    costs = torch.randint(1, 200, (num_slots, NUM_BLUEPRINTS), generator=gen)
    budget = torch.full((num_envs,), 500.0, dtype=torch.float64)
    args = [t.to(device) for t in (stages, contributions, costs, budget)]

    def batched():
        masks = compute_batch_masks(*args)
        if device != "cpu":
            torch.cuda.synchronize()
        return masks

    batch_ms = _median_ms(batched, repeats)
    ref_ms = math.nan
    if reference:
        config = SlotConfig.for_grid(1, num_slots)
        envs = [
            [
                _Slot(sid, SeedStage(int(stages[e, i])), float(contributions[e, i]))
                for i, sid in enumerate(config.slot_ids)
            ]
            for e in range(num_envs)
        ]

        def per_env():
            for slots, left in zip(envs, budget.tolist(), strict=True):
                compute_action_masks(slots, config, costs, budget_left=left)

        ref_ms = _median_ms(per_env, max(1, repeats // 10))
    return batch_ms, ref_ms


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few repeats, a few seconds")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--no-reference", action="store_true", help="skip the per-env loop")
    args = parser.parse_args(argv)
    repeats = 5 if args.quick else 50
    print(f"batched masks, {NUM_BLUEPRINTS} blueprints, device={args.device}, median of {repeats}")
    print(f"{'E':>5} {'S':>4} {'batched ms':>11} {'per-env ms':>11} {'us/env':>8}")
    for num_envs in (1, 16, 256):
        for num_slots in (1, 8, 64):
            # The Python reference is slow at 256 x 64; in --quick mode skip it there.
            reference = not args.no_reference and not (args.quick and num_envs * num_slots > 2048)
            batch_ms, ref_ms = bench(num_envs, num_slots, repeats, args.device, reference)
            print(
                f"{num_envs:>5} {num_slots:>4} {batch_ms:>11.3f} {ref_ms:>11.3f} "
                f"{1e3 * batch_ms / num_envs:>8.2f}"
            )


if __name__ == "__main__":
    main()
