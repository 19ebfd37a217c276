"""The fast paths a run takes, chosen for the machine at hand unless a setting forces them.

Three settings, each ``"auto"`` by default and recorded, with the reason, in the run's
``provenance.json`` (``speed``) and its start message:

* ``run.batched_envs`` (``"auto"`` | true | false): train the envs' hosts as one grouped
  computation (`esper.training.batched`). Auto: on wherever the envs can take that path
  (CNN hosts, SGD, float32, one device, more than one env), else the per-env loop.
  Forcing it on where it cannot run is an error; either way a step whose envs cannot be
  batched (`batched_support`) runs the per-env loop, with the same trajectories.
* ``task.channels_last`` (``"auto"`` | true | false, CNN tasks): NHWC convolutions. Auto:
  on for images of at least `CHANNELS_LAST_MIN_SIZE` pixels a side
  (`esper.training.tasks.resolve_channels_last`); a rule, not a timing, so a run's
  layout, and so its float results, never depend on what else the machine was doing.
* ``run.threads`` (0 = auto | N): torch intra-op threads, set by the CLI (which owns its
  process; a library call of `esper.run.train` leaves the caller's setting alone).
  Auto: the idle cores now (cores minus the 1-minute load average, 1 .. 4) when one
  training batch of this process's hosts is big enough for a second thread to pay
  (`THREAD_MIN_FLOATS`), else 1. Counting idle cores keeps the protection of the old
  rule: on a busy machine extra threads cost 10-16x (2 cores at load 6: static digits,
  1 env 3.2 -> 0.34 env steps/s, 4 envs 5.1 -> 0.31).
* ``run.keep_freed_memory`` ("auto" | false; CLI only, glibc): freed memory is kept for
  reuse instead of handed back to the system after every batch (`keep_freed_memory`);
  the user's own glibc settings (``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_``)
  win over it.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from typing import Any, Literal

AUTO = "auto"
Mode = Literal["auto", "forced", "caller"]

# Floats of activations in one training batch of the process's hosts (all envs of a
# batched step) from which auto threads use the idle cores. The two sides measured on
# this 2-core machine: the reference workload (3x32x32, width 8, batch 512: 23 M floats)
# ran 1.35x faster with 2 threads than 1 (issue 24: 1.70x vs 1.26x of the reference);
# digits (width 2, batch 64: 0.1 M floats per env) gains little from a second thread
# (BENCHMARKS.md, "threads"). Between the two the threshold is a guess, not a measurement.
THREAD_MIN_FLOATS = 4_000_000
MAX_AUTO_THREADS = 4


@dataclass(frozen=True)
class Choice:
    """One speed setting as a run resolved it: the value, whether ``auto`` chose it or
    the config forced it (``caller``: left as the calling program set it), and why."""

    value: bool | int
    mode: Mode
    why: str

    def to_dict(self) -> dict[str, Any]:
        return {"value": self.value, "mode": self.mode, "why": self.why}


@dataclass(frozen=True)
class SpeedChoices:
    """What a run resolved for each speed setting (None: not applicable to its task)."""

    batched_envs: Choice
    channels_last: Choice | None
    threads: Choice
    allocator: Choice

    def to_dict(self) -> dict[str, Any]:
        return {
            "batched_envs": self.batched_envs.to_dict(),
            "channels_last": None if self.channels_last is None else self.channels_last.to_dict(),
            "threads": self.threads.to_dict(),
            "keep_freed_memory": self.allocator.to_dict(),
        }

    def summary(self) -> str:
        """One line for the run's start message."""
        batched = "on" if self.batched_envs.value else "off"
        parts = [f"batched envs {batched} ({self.batched_envs.mode})"]
        if self.channels_last is not None:
            layout = "channels_last" if self.channels_last.value else "NCHW"
            parts.append(f"{layout} ({self.channels_last.mode})")
        n = int(self.threads.value)
        parts.append(f"{n} thread{'s' if n != 1 else ''} ({self.threads.mode})")
        if self.allocator.value:
            parts.append(f"freed memory kept ({self.allocator.mode})")
        return ", ".join(parts)


def check_switch(name: str, value: object) -> None:
    """``value`` must be true, false or "auto"."""
    if not (isinstance(value, bool) or value == AUTO):
        raise ValueError(f'{name} must be true, false or "auto", got {value!r}')


def batched_choice(setting: bool | str, vec: Any) -> Choice:
    """The batched-envs choice ``vec`` (a `VectorMorphogenesisEnv`) was built with."""
    check_switch("batched_envs", setting)
    mode: Mode = "auto" if setting == AUTO else "forced"
    if vec.batched:
        why = f"{vec.num_envs} envs train as one grouped computation"
    else:
        why = vec.batched_reason or "per-env loop"
    return Choice(vec.batched, mode, why)


def channels_last_choice(task: str, options: dict[str, Any]) -> Choice | None:
    """The memory layout of ``task``'s CNN host (None: the task's host is not a CNN)."""
    from esper.training import get_task
    from esper.training.tasks import CHANNELS_LAST_MIN_SIZE, resolve_channels_last, task_options

    if "channels_last" not in task_options(task):
        return None
    setting = options.get("channels_last", AUTO)
    check_switch("task.channels_last", setting)
    shape = get_task(task, **options).sample_shape
    if len(shape) != 3:  # e.g. the synthetic task with a flat shape: an MLP host
        return None
    value = resolve_channels_last(setting, shape[-1])
    if setting != AUTO:
        return Choice(value, "forced", "task.channels_last set")
    size = f"{shape[-2]}x{shape[-1]}"
    if value:
        why = f"{size} images (>= {CHANNELS_LAST_MIN_SIZE} a side: 1.4-1.6x per batch)"
    else:
        why = f"{size} images (< {CHANNELS_LAST_MIN_SIZE} a side: NCHW measured faster)"
    return Choice(value, "auto", why)


def idle_cores(window: float = 0.2) -> tuple[int, int, str]:
    """(idle cores, cores, what was measured) of this machine now.

    Busy cores come from what the CPUs did over ``window`` seconds (``/proc/stat``),
    rounded to whole cores; where that file is missing, from the 1-minute load average,
    rounded up. The load average alone misleads on small VMs: an idle 2-core machine
    here sits at load 0.8-1.1 (a kernel thread counted as runnable) while its CPUs
    are 99 % idle, which read as one idle core."""
    cores = os.cpu_count() or 1
    busy = cpu_busy(window)
    if busy is not None:
        return max(0, cores - math.floor(busy * cores + 0.5)), cores, f"CPU {busy:.0%} busy"
    try:
        load = os.getloadavg()[0]
    except (OSError, AttributeError):  # not on this platform
        load = 0.0
    return max(0, cores - math.ceil(load)), cores, f"1-min load {load:.2f}"


def cpu_busy(window: float) -> float | None:
    """Share of all CPUs' time spent busy over ``window`` seconds (None: no /proc/stat)."""

    def sample() -> tuple[int, int] | None:
        try:
            with open("/proc/stat") as f:
                fields = [int(v) for v in f.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        if len(fields) < 5:
            return None
        return sum(fields[:8]), fields[3] + fields[4]  # total, idle + iowait

    first = sample()
    if first is None:
        return None
    time.sleep(window)
    second = sample()
    if second is None or second[0] <= first[0]:
        return None
    total, idle = second[0] - first[0], second[1] - first[1]
    return min(1.0, max(0.0, 1.0 - idle / total))


def threads_choice(setting: int, batch_floats: int | None) -> Choice:
    """Torch threads for ``run.threads = setting`` (0 = auto) when one training batch of
    this process's hosts holds ``batch_floats`` activation floats (None: unknown)."""
    if setting > 0:
        return Choice(setting, "forced", "run.threads set")
    if batch_floats is not None and batch_floats < THREAD_MIN_FLOATS:
        return Choice(
            1,
            "auto",
            f"one training batch is {batch_floats / 1e6:.1f} M activation floats "
            f"(< {THREAD_MIN_FLOATS / 1e6:.0f} M: a second thread gains little)",
        )
    idle, cores, measured = idle_cores()
    # Under torchrun every local rank resolves this at once: they share the idle cores.
    ranks = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))
    n = max(1, min(MAX_AUTO_THREADS, idle // ranks))
    shared = f", shared by {ranks} local ranks" if ranks > 1 else ""
    return Choice(n, "auto", f"{idle} idle of {cores} cores ({measured}){shared}")


# glibc's mallopt parameters and the values `keep_freed_memory` sets: blocks up to 256 MB
# come from the heap (not a fresh mapping each), and up to 1 GB of freed heap is kept.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
KEEP_MMAP_THRESHOLD = 256 << 20
KEEP_TRIM_THRESHOLD = 1 << 30
_GLIBC_ENV = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")
_kept = False


def keep_freed_memory(setting: bool | str = AUTO) -> Choice:
    """Ask glibc's malloc to keep freed memory for the next batch (once per process).

    By default glibc maps a large block afresh and returns freed memory at the top of its
    heap to the system, so every training batch's activations and gradients (16 MB each
    for the first block of the reference workload's host) fault their pages in again:
    measured 2.9-8.7 K minor page faults per batch on that host, ~0.4 K with this
    setting (one thread, 2-core machine, ``getrusage`` over 10 batches; the time it
    saves is the ``run.keep_freed_memory=false`` row of `bench/bench_reference.py`).
    The process keeps its peak heap, which a training loop reaches in its first batch.
    ``setting`` (``run.keep_freed_memory``): false leaves the allocator alone."""
    global _kept
    import ctypes
    import ctypes.util

    check_switch("keep_freed_memory", setting)
    if setting is False:
        return Choice(False, "forced", "run.keep_freed_memory set")
    if any(name in os.environ for name in _GLIBC_ENV):
        return Choice(False, "forced", "the environment sets glibc's malloc thresholds")
    if _kept:
        return Choice(True, "auto", "glibc malloc keeps freed memory (page faults per batch)")
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        mallopt = getattr(libc, "mallopt", None)
    except OSError:
        mallopt = None
    if mallopt is None or not _is_glibc():
        return Choice(False, "auto", "not glibc's malloc: left as it is")
    if not (mallopt(_M_MMAP_THRESHOLD, KEEP_MMAP_THRESHOLD)
            and mallopt(_M_TRIM_THRESHOLD, KEEP_TRIM_THRESHOLD)):  # fmt: skip
        return Choice(False, "auto", "glibc refused the malloc thresholds")
    _kept = True
    return Choice(True, "auto", "glibc malloc keeps freed memory (page faults per batch)")


def _is_glibc() -> bool:
    import platform

    return platform.libc_ver()[0] == "glibc"


def batch_floats(task: str, options: dict[str, Any], envs_per_batch: int) -> int | None:
    """Activation floats of one training batch of ``envs_per_batch`` hosts of ``task``
    (None where the host cannot be sized)."""
    from esper.training import get_task
    from esper.training.sizing import host_size

    try:
        spec = get_task(task, **options)
        return host_size(spec).activations * spec.hparams.batch_size * envs_per_batch
    except (ValueError, RuntimeError, NotImplementedError):  # advice, never a failure
        return None


def build_envs(
    config: Any, num_envs: int, *, tune_process: bool = False
) -> tuple[Any, SpeedChoices]:
    """The `VectorMorphogenesisEnv` of ``num_envs`` envs for ``config`` (a `RunConfig`)
    with every speed setting resolved, and what was chosen. ``tune_process``: the caller
    owns the process (the CLI), so torch's intra-op threads are set from ``run.threads``
    and the allocator keeps freed memory; else both stay as the caller set them."""
    import dataclasses

    import torch

    from esper.env.vector import VectorMorphogenesisEnv

    run = config.run
    options = dict(config.task)
    layout = channels_last_choice(run.task, options)
    env_config = config.env_config()
    if layout is not None:  # the resolved layout, so the envs build exactly what is recorded
        task_options = {**env_config.task_options, "channels_last": bool(layout.value)}
        env_config = dataclasses.replace(env_config, task_options=task_options)
    vec = VectorMorphogenesisEnv(
        num_envs, env_config, env_devices=run.env_devices, batched=run.batched_envs
    )
    batched = batched_choice(run.batched_envs, vec)
    allocator = keep_freed_memory(run.keep_freed_memory) if tune_process else _CALLER
    if tune_process:
        sized = {**options, "channels_last": bool(layout.value)} if layout is not None else options
        if config.env.batches_per_step is not None:
            sized["batches_per_step"] = config.env.batches_per_step
        floats = batch_floats(run.task, sized, num_envs if vec.batched else 1)
        threads = threads_choice(run.threads, floats)
        torch.set_num_threads(int(threads.value))
    else:
        threads = Choice(torch.get_num_threads(), "caller", "as the calling program set them")
    return vec, SpeedChoices(batched, layout, threads, allocator)


_CALLER = Choice(False, "caller", "as the calling program set it")
