"""Every example in examples/ runs at a tiny size (the --tiny flag)."""

import importlib.util
import sys
import types
from pathlib import Path

import pytest
import torch
from torch import nn

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _example(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cnn_example_prints_grown_against_not_grown(capsys):
    rows = _example("cnn_fashion_mnist").main(["--tiny"])
    assert [r["model"] for r in rows] == ["not grown", "grown"]
    assert rows[1]["export"][1] <= 1e-6
    out = capsys.readouterr().out
    assert "not grown" in out and "test acc" in out and "exported plain nn.Module" in out


def test_mlp_example_grows_the_users_sequential_and_prints_paired_differences(capsys):
    rows = _example("mlp_fashion_mnist").main(["--tiny"])
    assert list(rows)[:2] == ["grown", "not grown"]
    assert all(len(rs) == 2 for rs in rows.values())
    # Growth happened in the user's own layer (the tiny run grows it once at least).
    assert max(r["hidden"] for r in rows["grown"]) > rows["not grown"][0]["hidden"]
    out = capsys.readouterr().out
    assert "grown - not grown" in out and "± " in out


def test_gpt_example_runs_on_text(capsys):
    rows = _example("gpt_text").main(["--tiny"])
    assert [r["model"] for r in rows] == ["not grown", "grown"]
    assert rows[1]["export_diff"] <= 1e-6
    assert "bits/char" in capsys.readouterr().out


class _Basic(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x):
        out = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
        return torch.relu(out + (x if self.down is None else self.down(x)))


class _NarrowResNet18(nn.Module):
    """torchvision's ResNet-18 layout (stem, layer1..layer4 of two basic blocks, fc) at
    1/8 width: stands in for torchvision where it is not installed."""

    def __init__(self, weights=None, num_classes: int = 1000) -> None:
        super().__init__()
        w = [8, 16, 32, 64]
        self.conv1 = nn.Conv2d(3, w[0], 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(w[0])
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        cin = w[0]
        for i, cout in enumerate(w):
            stride = 1 if i == 0 else 2
            setattr(
                self,
                f"layer{i + 1}",
                nn.Sequential(_Basic(cin, cout, stride), _Basic(cout, cout, 1)),
            )
            cin = cout
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        h = self.maxpool(torch.relu(self.bn1(self.conv1(x))))
        h = self.layer4(self.layer3(self.layer2(self.layer1(h))))
        return self.fc(h.mean(dim=(2, 3)))


def test_resnet_example_runs_or_skips_cleanly(capsys, monkeypatch):
    example = _example("resnet18")
    try:
        import torchvision  # noqa: F401
    except ImportError:
        assert example.main(["--tiny"]) == []
        assert example.SKIP in capsys.readouterr().out
        fake = types.ModuleType("torchvision")
        fake.models = types.SimpleNamespace(resnet18=_NarrowResNet18)
        monkeypatch.setitem(sys.modules, "torchvision", fake)
    rows = example.main(["--tiny", "--device", "cpu"])
    assert len(rows) == 1 and rows[0]["export_diff"] <= 1e-6
    assert "slots: r0c0=layer1" in capsys.readouterr().out


@pytest.mark.parametrize("name", ["cnn_fashion_mnist", "gpt_text", "resnet18"])
def test_examples_document_their_tiny_flag(name):
    assert "--tiny" in (EXAMPLES / f"{name}.py").read_text()
