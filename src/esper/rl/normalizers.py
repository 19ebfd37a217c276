"""Running mean/variance normalisers for observations and returns.

Statistics are float64 tensors on the device of the data (no host round-trip per step),
stored through ``state_dict`` so a checkpoint restores them exactly.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from esper.distributed import SINGLE, DistContext, merge_moments


class RunningMeanStd:
    """Mean and variance of a stream of vectors of shape ``[dim]`` (Chan et al. merge)."""

    def __init__(self, dim: int, device: torch.device | str = "cpu", epsilon: float = 1e-4):
        self.mean = torch.zeros(dim, dtype=torch.float64, device=device)
        self.var = torch.ones(dim, dtype=torch.float64, device=device)
        # A small prior count keeps the first batches from dividing by a zero variance.
        self.count = torch.tensor(epsilon, dtype=torch.float64, device=device)
        self._pending: tuple[float, torch.Tensor, torch.Tensor] | None = None
        self._rows: list[torch.Tensor] = []

    @property
    def dim(self) -> int:
        return self.mean.shape[0]

    def update(self, x: torch.Tensor, ctx: DistContext = SINGLE) -> None:
        """Fold in a batch ``[..., dim]``; rows are flattened. Under data parallelism the
        batch is every rank's rows (moments merged exactly), so all ranks stay identical."""
        if x.shape[-1] != self.dim:
            raise ValueError(f"expected last dim {self.dim}, got shape {tuple(x.shape)}")
        batch = x.detach().reshape(-1, self.dim).to(torch.float64)
        n = batch.shape[0]
        if ctx.active:
            count = torch.tensor(float(n), dtype=torch.float64, device=batch.device)
            mean = batch.mean(0) if n else torch.zeros_like(self.mean)
            m2 = (batch - mean).square().sum(0)
            count, mean, m2 = merge_moments(count, mean, m2, ctx)
            self._fold(count, mean, m2 / count.clamp_min(1.0))
            return
        if n == 0:
            return
        var, mean = torch.var_mean(batch, 0, correction=0)
        self._fold(n, mean, var)

    # -- deferred updates: statistics frozen between commits --------------------------------
    def accumulate(self, x: torch.Tensor) -> None:
        """Remember a batch ``[..., dim]`` for the next `commit`; the statistics (and so
        `normalize`) do not change until then. Local only: no collective. The rows are
        kept (a float64 copy) and reduced in blocks, so a step costs one copy."""
        if x.shape[-1] != self.dim:
            raise ValueError(f"expected last dim {self.dim}, got shape {tuple(x.shape)}")
        self._rows.append(x.detach().reshape(-1, self.dim).to(torch.float64, copy=True))
        if len(self._rows) >= 64:
            self._reduce_rows()

    def _reduce_rows(self) -> None:
        """Chan-merge the kept rows into the pending (count, mean, M2)."""
        if not self._rows:
            return
        batch = torch.cat(self._rows)
        self._rows = []
        n = batch.shape[0]
        if n == 0:
            return
        var, mean = torch.var_mean(batch, 0, correction=0)
        if self._pending is None:
            self._pending = (float(n), mean, var * n)
            return
        count, p_mean, p_m2 = self._pending
        total = count + n
        delta = mean - p_mean
        self._pending = (
            total,
            p_mean + delta * (n / total),
            p_m2 + var * n + delta.square() * (count * n / total),
        )

    def commit(self, ctx: DistContext = SINGLE) -> None:
        """Fold every batch accumulated since the last commit, pooled over all ranks
        (exact moments, one merge), into the statistics. Every rank must call it."""
        dev = self.mean.device
        self._reduce_rows()
        if self._pending is None:
            count, mean, m2 = 0.0, torch.zeros_like(self.mean), torch.zeros_like(self.mean)
        else:
            count, mean, m2 = self._pending
        self._pending = None
        count = torch.tensor(count, dtype=torch.float64, device=dev)
        if ctx.active:
            count, mean, m2 = merge_moments(count, mean, m2, ctx)
        self._fold(count, mean, m2 / count.clamp_min(1.0))

    @property
    def pending_count(self) -> int:
        kept = sum(rows.shape[0] for rows in self._rows)
        return kept + (0 if self._pending is None else int(self._pending[0]))

    def _fold(self, n: float | torch.Tensor, batch_mean: torch.Tensor, batch_var: torch.Tensor):
        if float(n) == 0.0:
            return
        delta = batch_mean - self.mean
        total = self.count + n
        weight = n / total  # the batch's share of the merged count
        self.mean = self.mean + delta * weight
        # Chan et al.: M2 / total = old share * (var + delta^2 * batch share) + batch share * var
        self.var = (1 - weight) * (self.var + delta.square() * weight) + weight * batch_var
        self.count = total

    @property
    def std(self) -> torch.Tensor:
        return torch.sqrt(self.var + 1e-8)

    def _cast(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, std) in ``dtype``, cached until the statistics change: acting normalises
        every step with statistics that change once per update."""
        cache = self.__dict__.get("_cast_cache")
        if cache is None or cache[0] is not self.mean or cache[1] is not self.var:
            cache = self.__dict__["_cast_cache"] = (self.mean, self.var, {})
        if dtype not in cache[2]:
            cache[2][dtype] = (self.mean.to(dtype), self.std.to(dtype))
        return cache[2][dtype]

    def normalize(self, x: torch.Tensor, clip: float | None = None) -> torch.Tensor:
        mean, std = self._cast(x.dtype)
        out = (x - mean) / std
        return out.clamp(-clip, clip) if clip is not None else out

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        mean, std = self._cast(x.dtype)
        return x * std + mean

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"mean": self.mean.clone(), "var": self.var.clone(), "count": self.count.clone()}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        mean, var, count = state["mean"], state["var"], state["count"]
        if tuple(mean.shape) != (self.dim,) or tuple(var.shape) != (self.dim,):
            raise ValueError(
                f"normaliser statistics have shape {tuple(mean.shape)}, expected ({self.dim},)"
            )
        device = self.mean.device
        self._pending, self._rows = None, []
        self.mean = mean.to(device, torch.float64)
        self.var = var.to(device, torch.float64)
        self.count = count.to(device, torch.float64).reshape(())


class ObservationNormalizer:
    """Normalises ``obs["global"]`` per feature and ``obs["slots"]`` per slot feature.

    Slot statistics are pooled over all slots, so they neither depend on the slot count nor
    on which slot a feature row belongs to: a checkpoint normalises the same at any N.
    """

    def __init__(
        self, global_dim: int, slot_dim: int, clip: float = 10.0, device: torch.device | str = "cpu"
    ):
        self.global_stats = RunningMeanStd(global_dim, device)
        self.slot_stats = RunningMeanStd(slot_dim, device)
        self.clip = clip

    def update(self, obs: Mapping[str, torch.Tensor], ctx: DistContext = SINGLE) -> None:
        self.global_stats.update(obs["global"], ctx)
        self.slot_stats.update(obs["slots"], ctx)

    def accumulate(self, obs: Mapping[str, torch.Tensor]) -> None:
        """Deferred update (see `RunningMeanStd.accumulate`): no collective per step."""
        self.global_stats.accumulate(obs["global"])
        self.slot_stats.accumulate(obs["slots"])

    def commit(self, ctx: DistContext = SINGLE) -> None:
        self.global_stats.commit(ctx)
        self.slot_stats.commit(ctx)

    def normalize(self, obs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {
            "global": self.global_stats.normalize(obs["global"].float(), self.clip),
            "slots": self.slot_stats.normalize(obs["slots"].float(), self.clip),
        }

    def state_dict(self) -> dict[str, dict[str, torch.Tensor]]:
        return {"global": self.global_stats.state_dict(), "slots": self.slot_stats.state_dict()}

    def load_state_dict(self, state: Mapping[str, Mapping[str, torch.Tensor]]) -> None:
        self.global_stats.load_state_dict(state["global"])
        self.slot_stats.load_state_dict(state["slots"])
