"""Host networks: the models that seeds grow into.

A host is split into ``embed -> blocks[0] -> ... -> blocks[k-1] -> head``. The output of
``blocks[i]`` is where slot ``r0c{i}`` sits, so `MorphogeneticModel` can run the blocks
itself and insert seeds between them without knowing anything host-specific.

Width growth (`esper.model.width`) needs two more things from a host: `sites()`, one
`UnitSite` per block (or None) built from references to the block's own layers, whose
sizes are read from those layers on every call (so a fold or a restore never leaves
them stale); and `block_forward`, the block's forward that also takes a pending width
term for its first linear op and returns the width input a seed at that block reads.
A host whose sites are all None offers no width blueprints.
"""

from __future__ import annotations

from torch import Tensor, nn

from esper.model.width import GlobalAvgPool, UnitSite
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
    def sites(self) -> list[UnitSite | None]:
        """One unit site per block (None: no width growth there), built afresh from the
        host's current modules; sizes are read live from those modules."""
        return [None] * len(self.blocks)

    def width_site(self, i: int) -> UnitSite | None:
        """The unit site of block ``i`` (None: no width growth there)."""
        self._check_block(i)
        return self.sites()[i]

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
        blocks, c_in = [], in_channels
        for i, c_out in enumerate(widths):
            layers: list[nn.Module] = [
                nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
                nn.BatchNorm2d(c_out),
                nn.ReLU(),
            ]
            if i in pools:
                layers.append(nn.MaxPool2d(2))
            blocks.append(CNNBlock(*layers))
            c_in = c_out
        self.blocks = nn.ModuleList(blocks)
        self.classifier = nn.Linear(c_in, num_classes)

    @property
    def widths(self) -> list[int]:
        """Each block's output channels, read from its conv (a fold widens them)."""
        return [int(block[0].weight.shape[0]) for block in self.blocks]

    def block_channels(self) -> list[int]:
        return self.widths

    def block_forward(
        self, i: int, h: Tensor, pre: Tensor | None = None, tap: bool = False
    ) -> tuple[Tensor, Tensor | None]:
        return self.blocks[i](h, pre), (h if tap else None)

    def sites(self) -> list[UnitSite | None]:
        # Block i's conv makes the units; BN, ReLU (and the pool) act per unit; the next
        # block's conv reads them, or, after the last block, the classifier reads their
        # spatial means (the head's global average pool).
        out: list[UnitSite | None] = []
        for i, block in enumerate(self.blocks):
            last = i + 1 == len(self.blocks)
            consumer = self.classifier if last else self.blocks[i + 1][0]
            out.append(
                UnitSite(
                    producer=block[0],
                    unit_ops=tuple(block[1:]),
                    consumer=consumer,
                    target="next",
                    consumer_ops=(GlobalAvgPool(),) if last else (),
                )
            )
        return out

    def embed(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_channels or min(x.shape[-2:]) < 8:
            raise ValueError(
                f"CNNHost expects images [N, {self.in_channels}, H>=8, W>=8], got {tuple(x.shape)}"
            )
        return x

    def head(self, h: Tensor) -> Tensor:
        return self.classifier(h.mean(dim=(-2, -1)))


class CNNBlock(nn.Sequential):
    """``conv3x3 -> BatchNorm -> ReLU [-> 2x2 max-pool]``, run as conv, BN, pool, ReLU.

    ReLU and max-pooling commute exactly (ReLU is monotone, so the max of the rectified
    values is the rectified max, and the gradient reaches the same element or none), so
    the block pools first and rectifies a quarter of the values: on the reference
    workload's host (3x32x32, width 8, batch 512, pool after every block) the
    full-resolution ReLU and its backward were ~20 % of a training batch
    (torch.profiler, 1 thread). The modules and their order are those of a plain
    ``nn.Sequential`` (state_dict keys, width sites and the grouped path read them).
    """

    def forward(self, h: Tensor, pre: Tensor | None = None) -> Tensor:  # type: ignore[override]
        """The block on ``h``; ``pre`` (a width term) joins its conv's output."""
        z = self[0](h)
        if pre is not None:
            z = z + pre
        z = self[1](z)
        if len(self) > 3:
            z = self[3](z)
        return self[2](z)


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
        return [int(block[0].weight.shape[0]) for block in self.blocks]

    def block_forward(
        self, i: int, h: Tensor, pre: Tensor | None = None, tap: bool = False
    ) -> tuple[Tensor, Tensor | None]:
        return _sequential_block_forward(self.blocks[i], h, pre), (h if tap else None)

    def sites(self) -> list[UnitSite | None]:
        return [
            UnitSite(
                producer=block[0],
                unit_ops=tuple(block[1:]),
                consumer=self.blocks[i + 1][0] if i + 1 < len(self.blocks) else self.classifier,
            )
            for i, block in enumerate(self.blocks)
        ]

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
# Shared by the hosts


def _sequential_block_forward(block: nn.Module, h: Tensor, pre: Tensor | None) -> Tensor:
    """A block whose first layer is its linear op: the width term joins right after it."""
    z = block[0](h)
    if pre is not None:
        z = z + pre
    for layer in block[1:]:
        z = layer(z)
    return z


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


__all__ = [
    "CNNBlock",
    "CNNHost",
    "Host",
    "MLPHost",
    "count_parameters",
]
