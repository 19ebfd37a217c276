"""Data-parallel PPO on `torch.distributed`, DD-PPO style (Wijmans et al., 2020).

Every rank steps its own share of the envs, computes gradients on its own rollouts, and
the ranks agree on everything that makes the next step identical:

* gradients: one flattened buffer, all-reduced and averaged, between ``backward()`` and
  the clip / optimiser step (`all_reduce_gradients`, called explicitly in `ppo_update`);
* statistics: observation / return normaliser moments merged exactly (`merge_moments`)
  once per update (no collective per env step, `PPOConfig.obs_normalizer_sync`),
  advantage mean and std over all ranks (`global_mean_std`), the masked-mean denominators
  and the approximate KL that decides the early stop (`mean_across_ranks`);
* weights: broadcast from rank 0 at start (`broadcast_parameters`); `check_in_sync` compares
  a checksum of every rank's parameters and raises when one has drifted.

Rank ``r`` of ``W`` owns the global envs ``r*E/W .. (r+1)*E/W - 1`` (`env_shard`), so the
seeds of env ``i`` are the same as in a one-process run. Rank 0 alone writes artefacts.

Launch with ``torchrun --nproc-per-node K -m esper train ppo ...``; `init_distributed`
reads torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT).
Backend: nccl when the policy runs on CUDA, gloo otherwise. A collective that waits
longer than ``timeout_s`` (a peer was killed or hangs) raises `PeerLostError`, a one-line
error, instead of hanging the job.

Not implemented: DD-PPO's straggler cut-off (a rank stops collecting once a fraction of
ranks have finished). Esper rounds are whole lockstep episodes of fixed length, so every
rank collects the same number of steps; cutting episodes short would change the reward
telescoping the env guarantees. See BENCHMARKS.md "Scale-out (issue 9)".
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

ENV_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
DEFAULT_TIMEOUT_S = 300.0


class DistributedSetupError(ValueError):
    """The launch environment or the env split is not usable."""


class PeerLostError(RuntimeError):
    """A collective failed: another rank died, hung past the timeout or diverged."""


@dataclass(frozen=True)
class DistContext:
    """Who this process is in a data-parallel job (a single process is rank 0 of 1)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None  # None: no process group (single process)

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the only rank that writes the run folder."""
        return self.rank == 0


SINGLE = DistContext()


@dataclass(frozen=True)
class EnvShard:
    """The global env indices ``offset .. offset + count - 1`` that one rank steps."""

    offset: int
    count: int
    total: int


def env_shard(total_envs: int, ctx: DistContext) -> EnvShard:
    """Rank ``r`` owns a contiguous block of ``total_envs / world_size`` global envs."""
    if total_envs < 1 or total_envs % ctx.world_size != 0:
        raise DistributedSetupError(
            f"--envs {total_envs} cannot be split over {ctx.world_size} processes: the total "
            f"env count must be a positive multiple of the process count {ctx.world_size}"
        )
    count = total_envs // ctx.world_size
    return EnvShard(ctx.rank * count, count, total_envs)


def launched_by_torchrun(environ: dict[str, str] | None = None) -> bool:
    environ = os.environ if environ is None else environ
    return "WORLD_SIZE" in environ and "RANK" in environ


def init_distributed(
    device: str | torch.device = "cpu",
    timeout_s: float = DEFAULT_TIMEOUT_S,
    environ: dict[str, str] | None = None,
) -> DistContext:
    """Join the process group described by torchrun's variables; `SINGLE` without them.

    ``device`` is where the policy runs: CUDA selects nccl (and this rank's GPU,
    ``cuda:LOCAL_RANK`` when no index is given), anything else gloo.
    """
    environ = dict(os.environ if environ is None else environ)
    if not launched_by_torchrun(environ):
        return SINGLE
    missing = [name for name in ENV_VARS if name not in environ]
    if missing:
        raise DistributedSetupError(
            f"distributed launch is missing {', '.join(missing)}; start with "
            "`torchrun --nproc-per-node K -m esper ...`, which sets "
            f"{', '.join(ENV_VARS)}"
        )
    try:
        rank, world = int(environ["RANK"]), int(environ["WORLD_SIZE"])
        local_rank = int(environ["LOCAL_RANK"])
    except ValueError as exc:
        raise DistributedSetupError(f"RANK/WORLD_SIZE/LOCAL_RANK must be integers: {exc}") from None
    if world < 1 or not 0 <= rank < world:
        raise DistributedSetupError(
            f"need 0 <= RANK < WORLD_SIZE, got RANK={rank}, WORLD_SIZE={world}"
        )
    if timeout_s <= 0:
        raise DistributedSetupError(f"timeout_s must be > 0, got {timeout_s}")
    if world == 1:
        return DistContext(0, 1, local_rank, None)
    device = torch.device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(device.index if device.index is not None else local_rank)
    if not dist.is_initialized():
        dist.init_process_group(
            backend,
            init_method=f"tcp://{environ['MASTER_ADDR']}:{environ['MASTER_PORT']}",
            rank=rank,
            world_size=world,
            timeout=timedelta(seconds=timeout_s),
        )
    return DistContext(rank, world, local_rank, backend)


def shutdown(ctx: DistContext) -> None:
    if ctx.active and dist.is_initialized():
        dist.destroy_process_group()


def _collective(what: str, fn, *args, **kwargs):
    """Run a collective; a dead or hung peer becomes one clear `PeerLostError`."""
    try:
        return fn(*args, **kwargs)
    except PeerLostError:
        raise
    except (RuntimeError, dist.DistError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise PeerLostError(
            f"distributed {what} failed on rank {dist.get_rank()} of {dist.get_world_size()}: "
            f"another rank died or stopped responding ({first})"
        ) from exc


def _all_reduce(tensor: torch.Tensor, what: str, op=dist.ReduceOp.SUM) -> torch.Tensor:
    _collective(what, dist.all_reduce, tensor, op=op)
    return tensor


# -- gradients and weights ----------------------------------------------------------------
def all_reduce_gradients(parameters: Iterable[nn.Parameter], ctx: DistContext) -> int:
    """Average ``.grad`` over ranks through one flattened buffer; returns its size in bytes.

    Parameters without a gradient contribute zeros, so every rank sends the same layout
    (a head unused on one rank still gets the other ranks' gradient).
    """
    params = [p for p in parameters if p.requires_grad]
    if not ctx.active or not params:
        return 0
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    _all_reduce(flat, "gradient all-reduce")
    flat /= ctx.world_size
    offset = 0
    for p in params:
        n = p.numel()
        p.grad = flat[offset : offset + n].view_as(p).clone()
        offset += n
    return flat.numel() * flat.element_size()


def broadcast_parameters(module: nn.Module, ctx: DistContext) -> None:
    """Copy rank 0's parameters and buffers to every rank."""
    if not ctx.active:
        return
    with torch.no_grad():
        for tensor in [*module.parameters(), *module.buffers()]:
            _collective("weight broadcast", dist.broadcast, tensor.data, src=0)


def parameter_checksum(module: nn.Module) -> torch.Tensor:
    """float64 [sum, sum of squares, position-weighted sum] of all parameters."""
    flat = torch.cat([p.detach().reshape(-1).double() for p in module.parameters()])
    ramp = torch.linspace(1.0, 2.0, flat.numel(), dtype=torch.float64, device=flat.device)
    return torch.stack([flat.sum(), flat.square().sum(), (flat * ramp).sum()])


def check_in_sync(module: nn.Module, ctx: DistContext) -> None:
    """Raise `PeerLostError` unless every rank holds bit-identical parameters."""
    if not ctx.active:
        return
    local = parameter_checksum(module)
    low, high = local.clone(), local.clone()
    _all_reduce(low, "weight check", dist.ReduceOp.MIN)
    _all_reduce(high, "weight check", dist.ReduceOp.MAX)
    if not torch.equal(low, high):
        raise PeerLostError(
            f"ranks hold different weights (rank {ctx.rank} checksum {local.tolist()}, "
            f"min {low.tolist()}, max {high.tolist()})"
        )


# -- statistics ---------------------------------------------------------------------------
def mean_across_ranks(values: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """Element-wise mean over ranks (identity in a single process)."""
    if not ctx.active:
        return values
    out = values.detach().clone()
    _all_reduce(out, "mean")
    return out / ctx.world_size


def sum_across_ranks(values: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    if not ctx.active:
        return values
    out = values.detach().clone()
    return _all_reduce(out, "sum")


def min_across_ranks(value: int, ctx: DistContext) -> int:
    if not ctx.active:
        return value
    out = torch.tensor([value], dtype=torch.int64)
    return int(_all_reduce(out, "min", dist.ReduceOp.MIN))


def merge_moments(
    count: torch.Tensor, mean: torch.Tensor, m2: torch.Tensor, ctx: DistContext
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Exact pooled (count, mean, M2) of every rank's batch (Chan et al.), in float64.

    ``M2`` is the sum of squared deviations from the batch mean; ranks with no rows pass
    count 0 and contribute nothing.
    """
    if not ctx.active:
        return count, mean, m2
    count, mean, m2 = count.double(), mean.double(), m2.double()
    total = sum_across_ranks(count.reshape(1), ctx)[0]
    global_mean = sum_across_ranks(mean * count, ctx) / total.clamp_min(1.0)
    spread = m2 + count * (mean - global_mean).square()
    return total, global_mean, sum_across_ranks(spread, ctx)


def global_mean_std(values: torch.Tensor, ctx: DistContext) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and population std of ``values`` pooled over all ranks."""
    if not ctx.active:
        return values.mean(), values.std(unbiased=False)
    count = torch.tensor(float(values.numel()), dtype=torch.float64, device=values.device)
    mean = values.double().mean() if values.numel() else torch.zeros((), dtype=torch.float64)
    m2 = (values.double() - mean).square().sum()
    total, g_mean, g_m2 = merge_moments(count, mean.reshape(1), m2.reshape(1), ctx)
    std = (g_m2 / total.clamp_min(1.0)).sqrt()
    return g_mean[0].to(values.dtype), std[0].to(values.dtype)


def gather_objects(obj, ctx: DistContext) -> list:
    """Every rank's ``obj`` in rank order (pickled; for small per-round records)."""
    if not ctx.active:
        return [obj]
    out: list = [None] * ctx.world_size
    _collective("record gather", dist.all_gather_object, out, obj)
    return out


def barrier(ctx: DistContext) -> None:
    if ctx.active:
        _collective("barrier", dist.barrier)
