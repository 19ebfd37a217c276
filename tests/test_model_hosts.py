"""Hosts: shapes, injection specs, parameter counts, causality, bad input."""

from __future__ import annotations

import itertools

import pytest
import torch

from esper.model import CNNHost, MLPHost, MorphogeneticModel, TransformerHost, count_parameters


@pytest.mark.parametrize(("width", "params"), [(1, 163), (2, 496), (4, 1702), (8, 6274)])
def test_cnn_param_counts_match_design_table(width: int, params: int) -> None:
    assert count_parameters(CNNHost(width=width)) == params


@pytest.mark.parametrize(
    ("in_channels", "size", "depth"),
    [(1, (8, 8), 3), (3, (32, 32), 5), (3, (12, 9), 4), (1, (8, 8), 16)],
)
def test_cnn_shapes_and_specs(in_channels: int, size: tuple[int, int], depth: int) -> None:
    host = CNNHost(in_channels=in_channels, num_classes=7, width=2, depth=depth, image_size=size)
    x = torch.randn(3, in_channels, *size)
    assert host(x).shape == (3, 7)
    specs = host.injection_specs()
    assert [s.slot_id for s in specs] == [f"r0c{i}" for i in range(depth)]
    assert specs[-1].position == 1.0
    assert all(a.position < b.position for a, b in itertools.pairwise(specs))
    h = host.embed(x)
    for block, spec in zip(host.blocks, specs, strict=True):
        h = block(h)
        assert spec.topology == "cnn" and h.shape[1] == spec.channels
        assert min(h.shape[-2:]) >= 2  # pooling stops before the map vanishes


def test_cnn_default_pooling_for_digits() -> None:
    assert CNNHost().pool_at == (1, 2)
    assert CNNHost(depth=16).pool_at == (1, 2)
    assert CNNHost(depth=16, width=1).widths[-1] == 8


@pytest.mark.parametrize(
    "kwargs",
    [{"in_channels": 2}, {"image_size": 7}, {"width": 0}, {"depth": 3, "pool_at": (3,)}],
)
def test_cnn_rejects_bad_config(kwargs: dict) -> None:
    with pytest.raises(ValueError, match=str(next(iter(kwargs.values())))):
        CNNHost(**kwargs)


def test_cnn_rejects_wrong_input_shape() -> None:
    with pytest.raises(ValueError, match=r"\[N, 1, H>=8"):
        CNNHost()(torch.randn(2, 3, 8, 8))


def test_transformer_shapes_tied_head_and_causality() -> None:
    torch.manual_seed(0)
    host = TransformerHost(vocab_size=11, d_model=16, n_heads=2, n_layers=4, layers_per_slot=2)
    assert [s.slot_id for s in host.injection_specs()] == ["r0c0", "r0c1"]
    assert {s.channels for s in host.injection_specs()} == {16}
    x = torch.randint(0, 11, (2, 9))
    logits = host(x)
    assert logits.shape == (2, 9, 11)
    # Tied head: the output projection is the token embedding itself.
    assert not any(
        p.shape == (11, 16) and p is not host.token_embedding.weight for p in host.parameters()
    )
    x2 = x.clone()
    x2[:, 5:] = (x2[:, 5:] + 1) % 11
    torch.testing.assert_close(host(x2)[:, :5], logits[:, :5])
    assert not torch.allclose(host(x2)[:, 5:], logits[:, 5:])


def test_transformer_bad_input() -> None:
    with pytest.raises(ValueError, match="layers_per_slot=2"):
        TransformerHost(vocab_size=5, n_layers=3, layers_per_slot=2)
    host = TransformerHost(vocab_size=5, d_model=8, n_heads=2, max_seq_len=4)
    with pytest.raises(ValueError, match="max_seq_len=4"):
        host(torch.zeros(1, 5, dtype=torch.long))


def test_mlp_host() -> None:
    host = MLPHost(in_features=12, num_classes=3, hidden=8, depth=2)
    assert host(torch.randn(4, 3, 4)).shape == (4, 3)  # flattened
    assert [(s.slot_id, s.channels, s.topology) for s in host.injection_specs()] == [
        ("r0c0", 8, "mlp"),
        ("r0c1", 8, "mlp"),
    ]
    with pytest.raises(ValueError, match="12 features"):
        host(torch.randn(4, 5))


@pytest.mark.parametrize(
    "make",
    [
        lambda: (CNNHost(width=2), torch.randn(5, 1, 8, 8)),
        lambda: (TransformerHost(7, d_model=8, n_heads=2), torch.randint(0, 7, (2, 6))),
        lambda: (MLPHost(6, 3), torch.randn(5, 6)),
    ],
)
def test_model_without_seeds_equals_host(make) -> None:
    host, x = make()
    model = MorphogeneticModel(host).eval()
    assert torch.equal(model(x), host(x))
    h = host.embed(x)
    n = len(host.blocks)
    split = model.run_blocks(model.run_blocks(h, 0, 1), 1, n)
    assert torch.equal(host.head(split), model(x))


@pytest.mark.parametrize("channels_last", [False, True])
def test_cnn_block_pools_before_relu_with_the_plain_order_function_and_gradients(
    channels_last: bool,
) -> None:
    # CNNBlock runs conv, BN, pool, ReLU: the output and every gradient must be those
    # of the plain conv-BN-ReLU-pool order, bit for bit (ReLU and max-pool commute).
    torch.manual_seed(0)
    host = CNNHost(3, 10, width=2, depth=3, image_size=16, pool_at=[0, 2])
    x = torch.randn(6, 3, 16, 16)
    if channels_last:
        host = host.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)

    def run(plain: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
        host.zero_grad()
        h = x
        for block in host.blocks:
            h = torch.nn.Sequential.forward(block, h) if plain else block(h)
        out = host.head(h)
        (out * torch.arange(10.0)).sum().backward()
        return out.detach(), [p.grad.clone() for p in host.parameters()]

    out, grads = run(plain=False)
    ref_out, ref_grads = run(plain=True)
    assert torch.equal(out, ref_out)
    assert all(torch.equal(g, r) for g, r in zip(grads, ref_grads, strict=True))
    kinds = [type(m).__name__ for m in host.blocks[0]]
    assert kinds == ["Conv2d", "BatchNorm2d", "ReLU", "MaxPool2d"]  # the modules' order
