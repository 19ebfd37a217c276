"""Cost of seed counterfactuals, as a multiple of one plain validation pass.

For 1, 3 and 8 seeds (HOLDING, alpha 1, so every one needs a "seed off" variant) the
script times
  plain     one validation pass of the live model (seeds included),
  fast      `fast_counterfactuals`: live validation + all variants, shared prefix,
  reference `reference_counterfactuals`: live pass + one full pass per seed,
and prints both as ratios to the plain pass. Ratios include the live pass, so
"extra" = ratio - 1 is what crediting the seeds adds to validation.
Goal (issue 4): all seeds of a 3-slot host for at most 2 plain passes.

    OMP_NUM_THREADS=1 python bench/bench_counterfactual.py [--quick] [--device cpu]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from functools import partial

import torch

from esper.model import CNNHost, MorphogeneticModel, TransformerHost
from esper.training import fast_counterfactuals, reference_counterfactuals, variants_to_measure
from esper.training.objective import evaluate


def grow(host, slots: list[str]) -> MorphogeneticModel:
    """A model whose ``slots`` hold non-trivial seeds at alpha 1 (HOLDING)."""
    from esper.model import LifecycleConfig

    quick = LifecycleConfig(min_train_epochs=1, blend_epochs=1, blend_threshold=-1.0)
    model = MorphogeneticModel(host, lifecycle=quick)
    for sid in slots:
        blueprint = "lora" if host.topology == "transformer" else "conv_light"
        model.germinate(sid, blueprint)
        model.record_contribution(sid, 1.0)
        for _ in range(2):  # TRAINING -> BLENDING -> HOLDING
            model.slots[sid].step_epoch()
        with torch.no_grad():
            for p in model.seed_parameters(sid):
                p.normal_(0.0, 0.1)
    return model.eval()


def best_seconds(fns: list[Callable[[], object]], reps: int, device: torch.device) -> list[float]:
    """Fastest of ``reps`` runs of each function, interleaved so that load from other
    processes on a shared machine hits all of them alike."""
    for fn in fns:
        fn()  # warm-up (allocator, kernels)
    best = [float("inf")] * len(fns)
    for _ in range(reps):
        for i, fn in enumerate(fns):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            best[i] = min(best[i], time.perf_counter() - t0)
    return best


def cases(quick: bool):
    n_img, n_seq = (64, 8) if quick else (1024, 64)
    img8 = (torch.rand(n_img, 1, 8, 8), torch.randint(0, 10, (n_img,)))
    img32 = (torch.rand(n_img // 2, 3, 32, 32), torch.randint(0, 10, (n_img // 2,)))
    seq = (torch.randint(0, 64, (n_seq, 64)), torch.randint(0, 64, (n_seq, 64)))
    yield "cnn 3-slot (digits w=2)", lambda: CNNHost(1, 10, 2, 3, 8), img8, "classification", 3
    yield "cnn 8-slot (3x32x32 w=4)", lambda: CNNHost(3, 10, 4, 8, 32), img32, "classification", 8
    yield "transformer 3-slot", lambda: TransformerHost(64, 64, 4, 3, max_seq_len=64), seq, "lm", 3


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, a few seconds")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    reps = 2 if args.quick else 10
    ebs = 1024
    print(f"device={device} threads={torch.get_num_threads()} reps={reps} (fastest, interleaved)")
    print(f"{'host':28s} {'seeds':>5s} {'plain ms':>9s} {'fast x':>7s} {'ref x':>7s}")
    for name, make_host, (x, y), kind, n_slots in cases(args.quick):
        x, y = x.to(device), y.to(device)
        for n_seeds in (1, 3, 8):
            if n_seeds > n_slots:
                continue
            torch.manual_seed(0)
            # Seeds from the first slot on: the worst case (longest suffix to recompute).
            model = grow(make_host(), [f"r0c{i}" for i in range(n_seeds)]).to(device)
            variants = variants_to_measure(model)
            with torch.no_grad():
                plain, fast, ref = best_seconds(
                    [
                        partial(evaluate, model, x, y, ebs),
                        partial(fast_counterfactuals, model, x, y, kind, variants, ebs),
                        partial(reference_counterfactuals, model, x, y, kind, variants, ebs),
                    ],
                    reps,
                    device,
                )
            print(
                f"{name:28s} {n_seeds:5d} {plain * 1e3:9.2f} {fast / plain:7.2f} {ref / plain:7.2f}"
            )


if __name__ == "__main__":
    main()
