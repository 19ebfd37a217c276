"""A categorical distribution restricted to the valid actions of each row.

Invalid logits are replaced by the most negative *finite* float rather than ``-inf``:
``-inf`` turns into NaN as soon as it meets ``0 * -inf`` in the entropy or a fully masked
softmax, and NaN gradients are much harder to trace than the clear error raised here for
a row without any valid action. All arithmetic runs in float32 even under autocast, since
log-softmax over a bf16/fp16 row loses the small probability differences PPO ratios need.
"""

from __future__ import annotations

import functools

import torch


class InvalidMaskError(ValueError):
    """A mask row allows no action, or the mask does not fit the logits."""


def _masked_log_softmax(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    filled = logits.float().masked_fill(~mask, torch.finfo(torch.float32).min)
    return torch.log_softmax(filled, dim=-1)


class MaskedCategorical:
    """Categorical over the last dim of ``logits``, where ``mask`` is True for legal actions.

    ``entropy()`` is the entropy over valid actions only; ``normalized_entropy()`` divides
    it by ``log(#valid)`` so every head reads 1 when uniform and 0 when it has one choice.
    """

    def __init__(self, logits: torch.Tensor, mask: torch.Tensor) -> None:
        if mask.dtype != torch.bool:
            raise InvalidMaskError(f"mask must be a bool tensor, got dtype {mask.dtype}")
        if mask.shape != logits.shape:
            raise InvalidMaskError(
                f"mask shape {tuple(mask.shape)} does not match logits shape {tuple(logits.shape)}"
            )
        if not bool(mask.any(-1).all()):
            rows = torch.nonzero(~mask.any(-1)).tolist()
            raise InvalidMaskError(
                f"{len(rows)} mask row(s) allow no action (first at index {rows[0]}); "
                "every row must allow at least one of its "
                f"{logits.shape[-1]} actions"
            )
        self.mask = mask
        if torch.is_autocast_enabled(logits.device.type):
            with torch.autocast(device_type=logits.device.type, enabled=False):
                self.log_probs = _masked_log_softmax(logits, mask)
        else:  # entering the context costs more than the softmax at acting batch sizes
            self.log_probs = _masked_log_softmax(logits, mask)

    @functools.cached_property
    def probs(self) -> torch.Tensor:
        return self.log_probs.exp()

    @property
    def num_valid(self) -> torch.Tensor:
        return self.mask.sum(-1)

    def sample(
        self, generator: torch.Generator | None = None, uniform: torch.Tensor | None = None
    ) -> torch.Tensor:
        """A draw per row; with ``uniform`` (one U[0, 1) number per row) by inverse CDF, so
        a row's draw depends on its own number only, not on the other rows of the batch."""
        if uniform is not None:
            cdf = self.probs.cumsum(-1)
            target = (uniform.to(cdf.dtype) * cdf[..., -1]).unsqueeze(-1)
            # First index whose CDF exceeds the target: never a zero-probability entry.
            draws = torch.searchsorted(cdf.contiguous(), target.contiguous(), right=True)
            # Rounding can put the target at (or past) the total mass, which would land
            # after the last legal entry: cap at the last entry the mask allows.
            positions = torch.arange(self.mask.shape[-1], device=self.mask.device)
            last_legal = torch.where(self.mask, positions, 0).amax(-1)
            return torch.minimum(draws.squeeze(-1), last_legal)
        # multinomial never draws a zero-probability entry; masked entries underflow to 0.
        flat = self.probs.reshape(-1, self.probs.shape[-1])
        draws = torch.multinomial(flat, 1, generator=generator).squeeze(-1)
        return draws.reshape(self.probs.shape[:-1])

    def mode(self) -> torch.Tensor:
        return self.log_probs.argmax(-1)

    def log_prob(self, actions: torch.Tensor) -> torch.Tensor:
        return self.log_probs.gather(-1, actions.long().unsqueeze(-1)).squeeze(-1)

    def entropy(self) -> torch.Tensor:
        # Masked entries have p = 0 exactly; excluding them keeps 0 * log(tiny) out of it.
        terms = torch.where(self.mask, self.probs * self.log_probs, torch.zeros_like(self.probs))
        return -terms.sum(-1)

    def normalized_entropy(self) -> torch.Tensor:
        k = self.num_valid.to(self.probs.dtype)
        denom = torch.where(k > 1, torch.log(k.clamp_min(2.0)), torch.ones_like(k))
        return torch.where(k > 1, self.entropy() / denom, torch.zeros_like(k))
