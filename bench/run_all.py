"""Run every Esper benchmark, one subprocess each, with one intra-op thread.

    python bench/run_all.py                    # everything (about 45 min on 2 CPU cores)
    python bench/run_all.py --quick            # every script's --quick mode (~1-2 min)
    python bench/run_all.py --only overhead,slot_scaling
    python bench/run_all.py --list

Each script prints its tables; its output is also kept in ``bench/out/logs/<name>.txt``,
and the scripts of issue 8 write ``bench/out/<name>.md`` / ``.csv`` / ``.png``.
``OMP_NUM_THREADS=1`` is set for every script (timings on a shared machine); the
growth-quality run trains the 3-slot PPO policy that the slot-transfer run reuses, so
it runs first.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import benchlib

BENCH = Path(__file__).resolve().parent

# name -> (script, extra args for a full run): cheap timing runs first, then the long ones.
BENCHMARKS: dict[str, tuple[str, list[str]]] = {
    "masks": ("bench_masks.py", []),
    "counterfactual": ("bench_counterfactual.py", []),
    "ppo_update": ("bench_ppo_update.py", ["--threads", "1"]),
    "sb3": ("bench_sb3.py", ["--threads", "1"]),  # vs sb3-contrib RecurrentPPO (bench extra)
    "overhead": ("bench_overhead.py", []),
    "batched": ("bench_batched.py", []),  # batched envs vs the per-env loop (issue 16)
    "slot_scaling": ("bench_slot_scaling.py", []),
    "flop_share": ("bench_flop_share.py", []),  # FLOP bookkeeping, scores, folding (issue 24)
    "controllers": ("bench_controllers.py", []),
    "distributed": ("bench_distributed.py", []),
    "growth": ("bench_growth.py", []),
    "transfer": ("bench_transfer.py", []),
    "pareto": ("bench_pareto.py", []),
    # issue 20: oracle capture (reads the front `pareto` wrote with --static-only)
    "rightsize": ("bench_rightsize.py", ["--seeds", "16"]),
    "governor": ("bench_governor.py", ["--gates"]),
    "width_init": ("bench_width_init.py", ["--seeds", "8"]),
    "user_seed_pass": ("bench_user_seed_pass.py", ["--seeds", "4"]),  # issue 19
    "host_layout": ("bench_host_layout.py", []),
    "reference": ("bench_reference.py", []),  # issue 24: the matched workload, fast paths
    "learned": ("bench_learned.py", ["--seeds", "12", "--transfer", "5", "8"]),
    # issue 22: policy-gradient variance per reward mode on one set of rollouts
    "credit": ("bench_credit.py", ["--episodes", "16", "--envs", "8"]),
}


def run(name: str, quick: bool, out: Path) -> tuple[int, float]:
    script, extra = BENCHMARKS[name]
    command = [sys.executable, str(BENCH / script), *(["--quick"] if quick else extra)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    print(f"== {name}: {' '.join(command[1:])}", flush=True)
    start = time.perf_counter()
    with subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    ) as proc, (out / f"{name}{'_quick' if quick else ''}.txt").open("w") as log:  # fmt: skip
        for line in proc.stdout:
            print(line, end="", flush=True)
            log.write(line)
    seconds = time.perf_counter() - start
    print(f"== {name}: exit {proc.returncode} after {seconds:.0f} s\n", flush=True)
    return proc.returncode, seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="every script's --quick mode")
    parser.add_argument("--only", default=None, help="comma-separated names (see --list)")
    parser.add_argument("--list", action="store_true", help="print the benchmark names")
    args = parser.parse_args(argv)
    if args.list:
        for name, (script, _) in BENCHMARKS.items():
            print(f"{name:<16} bench/{script}")
        return 0
    names = list(BENCHMARKS) if args.only is None else args.only.split(",")
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        parser.error(f"unknown benchmark {unknown[0]!r}; allowed: {', '.join(BENCHMARKS)}")
    out = benchlib.out_dir("logs")
    results = {name: run(name, args.quick, out) for name in names}
    print("summary:")
    for name, (code, seconds) in results.items():
        print(f"  {name:<16} {'ok' if code == 0 else f'FAILED (exit {code})':<16} {seconds:6.0f} s")
    return 0 if all(code == 0 for code, _ in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
