"""Export of a grown user model: plain module, equal outputs, runs without Esper."""

import subprocess
import sys
import textwrap

import torch
from torch import nn

from esper.grow import FoldedSeed, attach, export_model, save_portable
from esper.lifecycle import SeedStage
from esper.model import LifecycleConfig, SeedSlot

FAST = LifecycleConfig(min_train_epochs=1, blend_epochs=2, embargo_epochs=1)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.b1 = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
        self.blocks = nn.ModuleList([nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 8, 3, padding=1)])
        self.fc = nn.Linear(8, 16)
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        h = self.b1(x)
        for block in self.blocks:
            h = torch.relu(block(h))
        return self.head(torch.relu(self.fc(h.mean(dim=(2, 3)))))


def _advance(slotted, sid, stage):
    while slotted.slot_state(sid).stage != stage:
        slotted.record_contribution(sid, 1.0)
        if slotted.slot_state(sid).stage == SeedStage.HOLDING:
            slotted.fossilize(sid)
        else:
            slotted._slot(sid).step_epoch()


def _grown():
    torch.manual_seed(0)
    x = torch.randn(5, 1, 8, 8)
    # "b1.0" sits inside "b1": both fold, the inner one first.
    names = {"b1": "r0c0", "blocks.0": "r0c1", "blocks.1": "r0c2", "fc": "r0c3", "b1.0": "r0c4"}
    slotted = attach(Net(), names, x, FAST)
    plan = [
        ("r0c0", "conv_heavy", "linear", SeedStage.FOSSILIZED),
        ("r0c1", "attention", "gated", SeedStage.BLENDING),  # alpha 0.5 and a learned gate
        ("r0c2", "depthwise", "linear", SeedStage.TRAINING),  # invisible in eval: removed
        ("r0c3", "mlp", "sigmoid", SeedStage.PRUNED),  # dead: removed
        ("r0c4", "conv_light", "linear", SeedStage.FOSSILIZED),
    ]
    for sid, blueprint, blend, stage in plan:
        slotted.germinate(sid, blueprint, blend)
        with torch.no_grad():
            for p in slotted.seed_parameters(sid):
                p.normal_(0.0, 0.3)
        if stage == SeedStage.PRUNED:
            slotted.prune(sid)
        else:
            _advance(slotted, sid, stage)
    return slotted.eval(), x


def test_export_folds_fossils_removes_dead_seeds_and_equals_the_grown_model():
    slotted, x = _grown()
    assert slotted.slot_state("r0c1").alpha == 0.5
    live = slotted(x)
    plain = export_model(slotted)
    assert not any(isinstance(m, SeedSlot) for m in plain.modules())
    assert not any(m._forward_hooks for m in plain.modules())
    # Each seed's replacement is a torch GraphModule around the user's own submodule.
    for seeded in (plain.b1, plain.blocks[0], plain.b1.inner[0]):
        assert isinstance(seeded, torch.fx.GraphModule) and type(seeded).__name__ == "FoldedSeed"
    assert isinstance(plain.blocks[1], nn.Conv2d) and isinstance(plain.fc, nn.Linear)
    assert all(not type(m).__module__.startswith("esper") for m in plain.modules())
    torch.testing.assert_close(plain(x), live, rtol=0, atol=1e-6)
    assert torch.equal(slotted(x), live)  # the grown model is untouched
    kept = export_model(slotted, trace=False)  # for submodules called with several inputs
    assert isinstance(kept.b1, FoldedSeed) and isinstance(kept.b1.inner[0], FoldedSeed)
    torch.testing.assert_close(kept(x), live, rtol=0, atol=1e-6)


def test_the_torch_export_file_runs_where_esper_cannot_be_imported(tmp_path):
    slotted, x = _grown()
    path = save_portable(export_model(slotted), tmp_path / "grown.pt2", (x,))
    torch.save({"x": x, "y": slotted(x)}, tmp_path / "io.pt")
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["esper"] = None  # any import of esper now fails
        import torch
        program = torch.export.load({str(path)!r})
        io = torch.load({str(tmp_path / "io.pt")!r}, weights_only=True)
        out = program.module()(io["x"])
        assert torch.allclose(out, io["y"], rtol=0, atol=1e-6), (out - io["y"]).abs().max()
        assert not [m for m in sys.modules if m.startswith("esper.")]
        print("ok")
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"
