"""Host networks: the models that seeds grow into.

A host is split into ``embed -> blocks[0] -> ... -> blocks[k-1] -> head``. The output of
``blocks[i]`` is where slot ``r0c{i}`` sits, so `MorphogeneticModel` can run the blocks
itself and insert seeds between them without knowing anything host-specific.

Width growth (`esper.model.width`) needs three more things from a host, all by block
index: `width_site` (sizes and builders of a width seed's fan-in/fan-out),
`block_forward` (a block that also takes a pending fan-out term for its first linear op
and returns the width input a seed at that block reads) and `width_layers` (the layers a
fold widens). A host without them offers no width blueprints.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from esper.model.width import GlobalAvgPool, WidthSite
from esper.slots import InjectionSpec, Topology, format_slot_id


class Host(nn.Module):
    """Base class: ``forward(x) == head(blocks[k-1](... blocks[0](embed(x))))``."""

    topology: Topology
    blocks: nn.ModuleList

    def embed(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def head(self, h: Tensor) -> Tensor:
        raise NotImplementedError

    def block_channels(self) -> list[int]:
        """Width of each block's output (the channels a seed at that slot sees)."""
        raise NotImplementedError

    def injection_specs(self) -> list[InjectionSpec]:
        widths = self.block_channels()
        k = len(widths)
        return [
            InjectionSpec(format_slot_id(0, i), c, self.topology, (i + 1) / k)
            for i, c in enumerate(widths)
        ]

    def forward(self, x: Tensor) -> Tensor:
        h = self.embed(x)
        for block in self.blocks:
            h = block(h)
        return self.head(h)

    # -- width growth ----------------------------------------------------------------
    def width_site(self, i: int) -> WidthSite | None:
        """How a width seed at block ``i`` is built; None: no width growth there."""
        return None

    def width_layers(self, i: int) -> tuple[list[nn.Module], nn.Module]:
        """(layers that make block ``i``'s grown units, the layer that reads them)."""
        raise NotImplementedError(f"{type(self).__name__} offers no width growth")

    def block_forward(
        self, i: int, h: Tensor, pre: Tensor | None = None, tap: bool = False
    ) -> tuple[Tensor, Tensor | None]:
        """``blocks[i](h)`` with ``pre`` added to its first linear op's output; also
        returns the width input of block ``i`` when ``tap`` (else None)."""
        if pre is not None:
            raise ValueError(f"{type(self).__name__} block {i} takes no width term")
        return self.blocks[i](h), (h if tap else None)

    def head_forward(self, h: Tensor, pre: Tensor | None = None) -> Tensor:
        """``head(h)``, plus a width term on the logits (units of the last block)."""
        logits = self.head(h)
        return logits if pre is None else logits + pre

    def _check_block(self, i: int) -> None:
        if not 0 <= i < len(self.blocks):
            raise IndexError(f"block {i} out of range: blocks are 0..{len(self.blocks) - 1}")


def _check_positive_int(name: str, value: object, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


# --------------------------------------------------------------------------------------
# CNN


class CNNHost(Host):
    """conv3x3-BN-ReLU blocks with widths w, 2w, 4w, 8w, 8w, ... and 2x2 max-pools.

    Pooling: by default after every block from the second on, while the spatial size
    before the pool is >= 4 (for 8x8 digits and depth 3: after blocks 1 and 2; see
    docs/ARCHITECTURE.md, Hosts and tasks). ``pool_at`` overrides the block indices;
    a pool that would shrink the map below 2x2 is refused. Global average pooling
    before the linear head lets one host accept any image size >= 8x8.
    """

    topology: Topology = "cnn"

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 10,
        width: int = 2,
        depth: int = 3,
        image_size: int | tuple[int, int] = 8,
        pool_at: tuple[int, ...] | list[int] | None = None,
        widths: tuple[int, ...] | list[int] | None = None,
    ) -> None:
        super().__init__()
        if in_channels not in (1, 3):
            raise ValueError(f"in_channels must be 1 or 3, got {in_channels!r}")
        _check_positive_int("num_classes", num_classes, 2)
        _check_positive_int("width", width)
        _check_positive_int("depth", depth)
        size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        if len(size) != 2 or min(size) < 8:
            raise ValueError(f"image_size must be >= 8 (or (H, W) both >= 8), got {image_size!r}")
        self.in_channels, self.image_size = in_channels, (int(size[0]), int(size[1]))
        spatial = min(size)
        if pool_at is None:
            pools: set[int] = set()
            for i in range(1, depth):
                if spatial >= 4:
                    pools.add(i)
                    spatial //= 2
        else:
            pools = set(pool_at)
            bad = [i for i in pools if not (isinstance(i, int) and 0 <= i < depth)]
            if bad:
                raise ValueError(
                    f"pool_at index {bad[0]!r} out of range: blocks are 0..{depth - 1}"
                )
            for i in sorted(pools):
                if spatial < 4:
                    raise ValueError(
                        f"pool_at={sorted(pools)}: pooling after block {i} would shrink a "
                        f"{spatial}x{spatial} map below 2x2"
                    )
                spatial //= 2
        self.pool_at = tuple(sorted(pools))
        if widths is None:
            widths = [width * 2 ** min(i, 3) for i in range(depth)]
        elif len(widths) != depth or not all(isinstance(w, int) and w >= 1 for w in widths):
            raise ValueError(f"widths must be {depth} ints >= 1 (one per block), got {widths!r}")
        self.widths = list(widths)
        blocks, c_in = [], in_channels
        for i, c_out in enumerate(self.widths):
            layers: list[nn.Module] = [
                nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
                nn.BatchNorm2d(c_out),
                nn.ReLU(),
            ]
            if i in pools:
                layers.append(nn.MaxPool2d(2))
            blocks.append(nn.Sequential(*layers))
            c_in = c_out
        self.blocks = nn.ModuleList(blocks)
        self.classifier = nn.Linear(c_in, num_classes)

    def block_channels(self) -> list[int]:
        # Read from the layers: a fold (or a bench) may have widened them.
        return [block[0].out_channels for block in self.blocks]

    def block_forward(
        self, i: int, h: Tensor, pre: Tensor | None = None, tap: bool = False
    ) -> tuple[Tensor, Tensor | None]:
        block = self.blocks[i]
        z = block[0](h)
        if pre is not None:
            z = z + pre
        for layer in block[1:]:
            z = layer(z)
        return z, (h if tap else None)

    def width_site(self, i: int) -> WidthSite:
        self._check_block(i)
        block = self.blocks[i]
        conv = block[0]
        pool = any(isinstance(m, nn.MaxPool2d) for m in block)
        if i + 1 < len(self.blocks):
            fan_out = partial(_conv3x3, out_channels=self.blocks[i + 1][0].out_channels)
        else:
            fan_out = partial(_pooled_linear, out_features=self.classifier.out_features)
        return WidthSite(
            units=conv.out_channels,
            target="next",
            unit_dim_last=False,
            fan_in=partial(_cnn_units, conv.in_channels, pool=pool),
            fan_out=fan_out,
        )

    def width_layers(self, i: int) -> tuple[list[nn.Module], nn.Module]:
        self._check_block(i)
        block = self.blocks[i]
        consumer = self.blocks[i + 1][0] if i + 1 < len(self.blocks) else self.classifier
        return [block[0], block[1]], consumer

    def embed(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_channels or min(x.shape[-2:]) < 8:
            raise ValueError(
                f"CNNHost expects images [N, {self.in_channels}, H>=8, W>=8], got {tuple(x.shape)}"
            )
        return x

    def head(self, h: Tensor) -> Tensor:
        return self.classifier(h.mean(dim=(-2, -1)))


# --------------------------------------------------------------------------------------
# Transformer


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
        _check_positive_int("vocab_size", vocab_size, 2)
        _check_positive_int("d_model", d_model)
        _check_positive_int("n_heads", n_heads)
        _check_positive_int("n_layers", n_layers)
        _check_positive_int("layers_per_slot", layers_per_slot)
        _check_positive_int("max_seq_len", max_seq_len)
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
        return [layer.mlp[0].out_features for block in self.blocks for layer in block]

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

    def width_site(self, i: int) -> WidthSite:
        self._check_block(i)
        mlp = self.blocks[i][-1].mlp
        return WidthSite(
            units=mlp[0].out_features,
            target="output",
            unit_dim_last=True,
            fan_in=partial(_linear_units, self.d_model, act=nn.GELU),
            fan_out=partial(_linear, out_features=self.d_model),
        )

    def width_layers(self, i: int) -> tuple[list[nn.Module], nn.Module]:
        self._check_block(i)
        mlp = self.blocks[i][-1].mlp
        return [mlp[0]], mlp[2]

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


# --------------------------------------------------------------------------------------
# MLP


class MLPHost(Host):
    """Flat/tabular inputs: ``depth`` Linear-ReLU hidden layers, a slot after each."""

    topology: Topology = "mlp"

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        hidden: int = 32,
        depth: int = 3,
        widths: tuple[int, ...] | list[int] | None = None,
    ):
        super().__init__()
        _check_positive_int("in_features", in_features)
        _check_positive_int("num_classes", num_classes, 2)
        _check_positive_int("hidden", hidden)
        _check_positive_int("depth", depth)
        if widths is None:
            widths = [hidden] * depth
        elif len(widths) != depth or not all(isinstance(w, int) and w >= 1 for w in widths):
            raise ValueError(f"widths must be {depth} ints >= 1 (one per block), got {widths!r}")
        self.in_features, self.hidden = in_features, hidden
        sizes = [in_features, *widths]
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Linear(sizes[i], sizes[i + 1]), nn.ReLU()) for i in range(depth)
        )
        self.classifier = nn.Linear(sizes[-1], num_classes)

    def block_channels(self) -> list[int]:
        return [block[0].out_features for block in self.blocks]

    def block_forward(
        self, i: int, h: Tensor, pre: Tensor | None = None, tap: bool = False
    ) -> tuple[Tensor, Tensor | None]:
        block = self.blocks[i]
        z = block[0](h)
        if pre is not None:
            z = z + pre
        for layer in block[1:]:
            z = layer(z)
        return z, (h if tap else None)

    def width_site(self, i: int) -> WidthSite:
        self._check_block(i)
        linear = self.blocks[i][0]
        consumer = self.blocks[i + 1][0] if i + 1 < len(self.blocks) else self.classifier
        return WidthSite(
            units=linear.out_features,
            target="next",
            unit_dim_last=True,
            fan_in=partial(_linear_units, linear.in_features, act=nn.ReLU),
            fan_out=partial(_linear, out_features=consumer.out_features),
        )

    def width_layers(self, i: int) -> tuple[list[nn.Module], nn.Module]:
        self._check_block(i)
        consumer = self.blocks[i + 1][0] if i + 1 < len(self.blocks) else self.classifier
        return [self.blocks[i][0]], consumer

    def embed(self, x: Tensor) -> Tensor:
        h = x.flatten(1)
        if h.shape[1] != self.in_features:
            raise ValueError(
                f"MLPHost expects {self.in_features} features per sample, got {tuple(x.shape)}"
            )
        return h

    def head(self, h: Tensor) -> Tensor:
        return self.classifier(h)


# --------------------------------------------------------------------------------------
# Width-seed builders (module-level so a `WidthSite` holds sizes, never host layers)


def _cnn_units(in_channels: int, k: int, pool: bool) -> nn.Module:
    """k new output channels of a CNN block: the block's own layer structure."""
    layers: list[nn.Module] = [
        nn.Conv2d(in_channels, k, 3, padding=1, bias=False),
        nn.BatchNorm2d(k),
        nn.ReLU(),
    ]
    if pool:
        layers.append(nn.MaxPool2d(2))
    return nn.Sequential(*layers)


def _conv3x3(k: int, out_channels: int) -> nn.Module:
    return nn.Conv2d(k, out_channels, 3, padding=1, bias=False)


def _pooled_linear(k: int, out_features: int) -> nn.Module:
    return nn.Sequential(GlobalAvgPool(), nn.Linear(k, out_features, bias=False))


def _linear_units(in_features: int, k: int, act: type[nn.Module]) -> nn.Module:
    return nn.Sequential(nn.Linear(in_features, k), act())


def _linear(k: int, out_features: int) -> nn.Module:
    return nn.Linear(k, out_features, bias=False)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


__all__ = [
    "CNNHost",
    "Host",
    "MLPHost",
    "TransformerHost",
    "count_parameters",
]
