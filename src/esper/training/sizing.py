"""The memory a run's envs will need, estimated before any data is read or host is built.

The task's host is built on PyTorch's meta device (shapes without storage: even a
width-1,000,000 host costs nothing) and one meta sample runs through it with hooks that
count its activations. Per-env costs that are not the host's are measured constants.
The estimate is meant to refuse sizes that cannot fit (a factor of 2 either way does
not matter there), not to tune a run that nearly fits.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from esper.training.data import TaskData
from esper.training.tasks import Task

# Bytes per host parameter in one env, over 4 bytes of float32: weights, gradients,
# optimiser state, the governor's rollback copy and the env's probe host. Measured 5.4
# (digits, width 128: 1.48 M parameters, 32 MB per env, 10 envs against 2 after two
# steps; /proc/self/status VmRSS); 6 rounds it up.
HOST_COPIES = 6
# What an env holds besides its host (trainer, lifecycle, cost table, Python objects):
# measured 0.43 MB per env (digits, width 2: 66 envs against 2, same method).
ENV_OVERHEAD_BYTES = 512 * 1024
FLOAT_BYTES = 4


@dataclass(frozen=True)
class HostSize:
    """A task host's size, counted on the meta device."""

    params: int
    activations: int  # floats that leaf modules output for one sample (kept for backward)
    widest: int  # floats of the largest single leaf-module output for one sample


@dataclass(frozen=True)
class MemoryEstimate:
    """Estimated bytes of one process's envs (the data set itself not included)."""

    host: HostSize
    per_env: int  # held for the whole run: host copies and env state
    step: int  # transient: the activations of one training or evaluation batch
    envs: int

    @property
    def total(self) -> int:
        return self.envs * self.per_env + self.step


def host_size(task: Task) -> HostSize:
    """Parameters and activations of ``task``'s host, without allocating either."""
    lm = task.kind == "lm"
    x = torch.empty((1, *task.sample_shape), dtype=torch.long if lm else torch.float32,
                    device="meta")  # fmt: skip
    y = torch.empty(x.shape if lm else (1,), dtype=torch.long, device="meta")
    probe = TaskData(task.kind, x, y, x, y, task.probe_classes, name=f"{task.name} size probe")
    with torch.device("meta"):
        host = task.make_host(probe)
    params = sum(p.numel() for p in host.parameters())
    outputs: list[int] = []

    def count(module: nn.Module, args: object, out: object) -> None:
        if isinstance(out, torch.Tensor):
            outputs.append(out.numel())

    leaves = [m for m in host.modules() if next(m.children(), None) is None]
    handles = [m.register_forward_hook(count) for m in leaves]
    try:
        with torch.no_grad():
            host.eval()(x)
    finally:
        for handle in handles:
            handle.remove()
    return HostSize(params, sum(outputs), max(outputs, default=0))


def estimate_memory(
    task: Task, envs: int, *, batched: bool = False, twin: bool = False
) -> MemoryEstimate:
    """Bytes that ``envs`` envs of ``task`` need in one process.

    ``batched``: the envs' hosts train as one grouped computation, so every env's batch
    is in memory at once; ``twin``: each env also trains a static twin host
    (``reward_mode = "twin"``)."""
    size = host_size(task)
    hosts = 2 if twin else 1
    per_env = ENV_OVERHEAD_BYTES + hosts * HOST_COPIES * FLOAT_BYTES * size.params
    hp = task.hparams
    # Training keeps every activation and gets a gradient of each; evaluation (no grad)
    # holds about two layers' outputs at a time.
    train = 2 * FLOAT_BYTES * size.activations * hp.batch_size
    evaluate = 2 * FLOAT_BYTES * size.widest * hp.eval_batch_size
    step = max(train, evaluate) * (envs if batched else 1)
    return MemoryEstimate(size, per_env, step, envs)


def format_bytes(n: float) -> str:
    """``512 KB``, ``3.1 GB``, ``2.2 PB``: the unit that keeps the figure readable."""
    units = ("B", "KB", "MB", "GB", "TB", "PB")
    i = 0
    while n >= 1024 and i < len(units) - 1:
        n, i = n / 1024, i + 1
    return f"{n:.0f} {units[i]}" if i < 2 else f"{n:.1f} {units[i]}"
