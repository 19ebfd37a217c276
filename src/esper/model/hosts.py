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


def check_positive_int(name: str, value: object, minimum: int = 1) -> int:
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
        check_positive_int("num_classes", num_classes, 2)
        check_positive_int("width", width)
        check_positive_int("depth", depth)
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
        return _sequential_block_forward(self.blocks[i], h, pre), (h if tap else None)

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
        check_positive_int("in_features", in_features)
        check_positive_int("num_classes", num_classes, 2)
        check_positive_int("hidden", hidden)
        check_positive_int("depth", depth)
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
        return _sequential_block_forward(self.blocks[i], h, pre), (h if tap else None)

    def width_site(self, i: int) -> WidthSite:
        self._check_block(i)
        linear = self.blocks[i][0]
        consumer = self.blocks[i + 1][0] if i + 1 < len(self.blocks) else self.classifier
        return WidthSite(
            units=linear.out_features,
            target="next",
            unit_dim_last=True,
            fan_in=partial(linear_units, linear.in_features, act=nn.ReLU),
            fan_out=partial(linear_fan_out, out_features=consumer.out_features),
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


def _sequential_block_forward(block: nn.Module, h: Tensor, pre: Tensor | None) -> Tensor:
    """A block whose first layer is its linear op: the width term joins right after it."""
    z = block[0](h)
    if pre is not None:
        z = z + pre
    for layer in block[1:]:
        z = layer(z)
    return z


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


def linear_units(in_features: int, k: int, act: type[nn.Module]) -> nn.Module:
    return nn.Sequential(nn.Linear(in_features, k), act())


def linear_fan_out(k: int, out_features: int) -> nn.Module:
    return nn.Linear(k, out_features, bias=False)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


__all__ = [
    "CNNHost",
    "Host",
    "MLPHost",
    "count_parameters",
]
