"""The transformer host: a small GPT-style decoder (`TransformerHost`).

Its unit sites are the MLPs of each block's last layer (hidden units grow); see
`esper.model.hosts` for the host protocol.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from esper.model.hosts import Host, check_positive_int
from esper.model.width import UnitSite
from esper.slots import Topology


class CausalSelfAttention(nn.Module):
    def __init__(self, d_model: int, n_heads: int) -> None:
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model={d_model} must be divisible by n_heads={n_heads}")
        self.n_heads = n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).split(d, dim=-1)
        shape = (b, t, self.n_heads, d // self.n_heads)
        q, k, v = (z.view(shape).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(b, t, d))


class DecoderLayer(nn.Module):
    """Pre-norm GPT layer: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, d_model: int, n_heads: int, mlp_hidden: int | None = None) -> None:
        super().__init__()
        hidden = 4 * d_model if mlp_hidden is None else mlp_hidden
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = CausalSelfAttention(d_model, n_heads)
        self.ln2 = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(nn.Linear(d_model, hidden), nn.GELU(), nn.Linear(hidden, d_model))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class TransformerHost(Host):
    """Small GPT-style decoder; a slot after each segment of ``layers_per_slot`` layers.

    Input: token ids ``[N, T]`` with T <= max_seq_len; output: logits ``[N, T, vocab]``.
    The output projection is tied to the token embedding. ``mlp_hidden`` gives each
    layer's MLP width (default ``4 * d_model``), e.g. to rebuild a folded host
    (`mlp_widths`).
    """

    topology: Topology = "transformer"

    def __init__(
        self,
        vocab_size: int,
        d_model: int = 64,
        n_heads: int = 4,
        n_layers: int = 2,
        layers_per_slot: int = 1,
        max_seq_len: int = 64,
        mlp_hidden: tuple[int, ...] | list[int] | None = None,
    ) -> None:
        super().__init__()
        check_positive_int("vocab_size", vocab_size, 2)
        check_positive_int("d_model", d_model)
        check_positive_int("n_heads", n_heads)
        check_positive_int("n_layers", n_layers)
        check_positive_int("layers_per_slot", layers_per_slot)
        check_positive_int("max_seq_len", max_seq_len)
        if n_layers % layers_per_slot:
            raise ValueError(
                f"n_layers={n_layers} must be a multiple of layers_per_slot={layers_per_slot}"
            )
        if mlp_hidden is None:
            mlp_hidden = [4 * d_model] * n_layers
        elif len(mlp_hidden) != n_layers or not all(
            isinstance(w, int) and w >= 1 for w in mlp_hidden
        ):
            raise ValueError(
                f"mlp_hidden must be {n_layers} ints >= 1 (one per layer), got {mlp_hidden!r}"
            )
        self.d_model, self.max_seq_len = d_model, max_seq_len
        self.token_embedding = nn.Embedding(vocab_size, d_model)
        self.position_embedding = nn.Embedding(max_seq_len, d_model)
        widths = iter(mlp_hidden)
        self.blocks = nn.ModuleList(
            nn.Sequential(
                *(DecoderLayer(d_model, n_heads, next(widths)) for _ in range(layers_per_slot))
            )
            for _ in range(n_layers // layers_per_slot)
        )
        self.ln_f = nn.LayerNorm(d_model)
        # GPT-2 style init: small embeddings keep the tied logits near uniform at start.
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.position_embedding.weight, std=0.02)

    def block_channels(self) -> list[int]:
        return [self.d_model] * len(self.blocks)

    def mlp_widths(self) -> list[int]:
        """Each layer's MLP hidden width (a fold widens the last layer of a block)."""
        return [int(layer.mlp[0].weight.shape[0]) for block in self.blocks for layer in block]

    def block_forward(
        self, i: int, h: Tensor, pre: Tensor | None = None, tap: bool = False
    ) -> tuple[Tensor, Tensor | None]:
        if pre is not None:
            raise ValueError(f"TransformerHost block {i} takes no width term (target 'output')")
        if not tap:
            return self.blocks[i](h), None
        *first, last = self.blocks[i]
        for layer in first:
            h = layer(h)
        x = h + last.attn(last.ln1(h))
        z = last.ln2(x)
        return x + last.mlp(z), z

    def sites(self) -> list[UnitSite | None]:
        # The MLP's hidden units grow; its output joins the residual stream of the block.
        return [
            UnitSite(
                producer=block[-1].mlp[0],
                unit_ops=(block[-1].mlp[1],),
                consumer=block[-1].mlp[2],
                target="output",
            )
            for block in self.blocks
        ]

    def embed(self, x: Tensor) -> Tensor:
        if x.dim() != 2 or x.dtype not in (torch.int64, torch.int32):
            raise ValueError(
                f"TransformerHost expects token ids [N, T] (int), got {x.dtype} {tuple(x.shape)}"
            )
        t = x.shape[1]
        if not 1 <= t <= self.max_seq_len:
            raise ValueError(f"sequence length {t} outside 1..max_seq_len={self.max_seq_len}")
        positions = torch.arange(t, device=x.device)
        return self.token_embedding(x) + self.position_embedding(positions)

    def head(self, h: Tensor) -> Tensor:
        return F.linear(self.ln_f(h), self.token_embedding.weight)


__all__ = ["CausalSelfAttention", "DecoderLayer", "TransformerHost"]
