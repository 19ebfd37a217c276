"""Slots on a user's own nn.Module: attachment, function preservation, errors, persistence."""

import copy
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

from esper.grow import AttachError, attach, load_slotted
from esper.lifecycle import SeedStage
from esper.model import LifecycleConfig, blueprints_for, get_blueprint

FAST = LifecycleConfig(min_train_epochs=1, blend_epochs=1)


class Net(nn.Module):
    """A user's CNN with a conv map, a feature vector and a tuple-returning LSTM."""

    def __init__(self) -> None:
        super().__init__()
        self.b1 = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
        self.b2 = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        self.fc = nn.Linear(8 * 4 * 4, 16)
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        return self.head(torch.relu(self.fc(self.b2(self.b1(x)).flatten(1))))


class Tokens(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(11, 16)
        self.blocks = nn.ModuleList([nn.Linear(16, 16), nn.Linear(16, 16)])
        self.rnn = nn.LSTM(16, 16, batch_first=True)
        self.argmax = ArgMax()
        self.score = Score()
        self.head = nn.Linear(16, 11)

    def forward(self, x):
        h = self.embed(x)
        for block in self.blocks:
            h = torch.relu(block(h))
        h = self.rnn(h)[0]
        return self.head(h) + 0 * self.argmax(h).unsqueeze(-1) + 0 * self.score(h)[:, None, None]


class ArgMax(nn.Module):
    def forward(self, h):
        return h.argmax(-1)


class Score(nn.Module):
    def forward(self, h):
        return h.sum(dim=(1, 2))  # [N]: one number per sample


def _grow_to(slotted, sid, blueprint, stage, blend="linear"):
    slotted.germinate(sid, blueprint, blend)
    with torch.no_grad():  # a trained-looking seed: its output is no longer zero
        for p in slotted.seed_parameters(sid):
            p.normal_(0.0, 0.3)
    while slotted.slot_state(sid).stage != stage:
        slotted.record_contribution(sid, 1.0)
        if slotted.slot_state(sid).stage == SeedStage.HOLDING:
            slotted.fossilize(sid)
        else:
            slotted.step_epoch()


def test_ids_topologies_and_channels_come_from_names_and_one_sample():
    x = torch.randn(2, 1, 8, 8)
    slotted = attach(Net(), ["b1", "b2", "fc"], x)
    got = [(p.name, p.spec.slot_id, p.spec.topology, p.spec.channels) for p in slotted.points]
    assert got == [("b1", "r0c0", "cnn", 4), ("b2", "r0c1", "cnn", 8), ("fc", "r0c2", "mlp", 16)]
    tokens = attach(
        Tokens(), {"blocks.1": "r0c3", "blocks.0": "r0c1"}, torch.randint(0, 11, (2, 5))
    )
    assert [(p.name, p.spec.slot_id, p.spec.topology) for p in tokens.points] == [
        ("blocks.0", "r0c1", "transformer"),
        ("blocks.1", "r0c3", "transformer"),
    ]


def test_attaching_leaves_outputs_and_gradients_exactly_unchanged_until_a_seed_blends():
    torch.manual_seed(0)
    model, x, y = Net(), torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,))
    reference = copy.deepcopy(model)
    slotted = attach(model, ["b1", "b2", "fc"], x, FAST)
    _grow_to(slotted, "r0c1", "conv_light", SeedStage.TRAINING)  # nonzero, not blended

    def grads(net, m):
        m.zero_grad()
        out = net(x)
        nn.functional.cross_entropy(out, y).backward()
        return out.detach(), [p.grad.clone() for p in m.parameters()]

    out_ref, g_ref = grads(reference, reference)
    out, g = grads(slotted, model)
    assert torch.equal(out, out_ref)
    assert all(torch.equal(a, b) for a, b in zip(g, g_ref, strict=True))
    assert any(p.grad is not None for p in slotted.seed_parameters("r0c1"))  # it learns
    slotted.record_contribution("r0c1", 1.0)
    slotted.step_epoch()  # TRAINING -> BLENDING: now the seed shows
    assert slotted.slot_state("r0c1").stage == SeedStage.BLENDING
    assert not torch.allclose(slotted(x), reference(x))


@pytest.mark.parametrize(
    ("make", "names", "sample"),
    [
        (Net, ["b1", "b2", "fc"], torch.randn(4, 1, 8, 8)),
        (Tokens, ["blocks.0", "blocks.1"], torch.randint(0, 11, (4, 6))),
    ],
)
def test_a_germinated_seed_preserves_the_function_for_every_blueprint(make, names, sample):
    torch.manual_seed(1)
    slotted = attach(make(), names, sample)
    slotted.eval()
    reference = slotted(sample)
    for point in slotted.points:
        sid, topology = point.spec.slot_id, point.spec.topology
        for name in blueprints_for(topology):
            if get_blueprint(topology, name).factory is None:
                continue  # width blueprints are not offered on user models
            slotted.germinate(sid, name, "gated")
            out = slotted(sample, alpha_override={sid: 1.0})
            torch.testing.assert_close(out, reference, rtol=0, atol=0)
            slotted.prune(sid)
            slotted.step_epoch()
            slotted.step_epoch()
            slotted.step_epoch()


def test_bad_attachment_points_give_one_clear_error_each():
    tokens, sample = Tokens(), torch.randint(0, 11, (2, 5))
    with pytest.raises(AttachError, match=r"no submodule 'blocks\.7'.*blocks\.0"):
        attach(tokens, ["blocks.7"], sample)
    with pytest.raises(AttachError, match=r"'rnn' returns a tuple, not a tensor"):
        attach(tokens, ["rnn"], sample)
    with pytest.raises(AttachError, match=r"'argmax' returns a torch.int64 tensor .*no blueprint"):
        attach(tokens, ["argmax"], sample)
    with pytest.raises(
        AttachError, match=r"'score' returns a torch.float32 tensor of shape \(2,\)"
    ):
        attach(tokens, ["score"], sample)
    with pytest.raises(AttachError, match=r"named twice"):
        attach(tokens, ["blocks.0", "blocks.0"], sample)


def test_alpha_override_is_per_call_and_detach_restores_the_model():
    torch.manual_seed(2)
    model, x = Net(), torch.randn(4, 1, 8, 8)
    reference = copy.deepcopy(model).eval()
    slotted = attach(model, ["b2"], x, FAST)
    _grow_to(slotted, "r0c0", "conv_light", SeedStage.HOLDING)
    slotted.eval()
    live = slotted(x)
    assert torch.equal(slotted(x, alpha_override={"r0c0": 0.0}), reference(x))
    assert torch.equal(slotted(x), live)  # the override was not stored
    with pytest.raises(ValueError, match=r"must be in \[0, 1\]"):
        slotted(x, alpha_override={"r0c0": 2.0})
    assert slotted.detach() is model
    assert torch.equal(model(x), reference(x))


USER_CODE = textwrap.dedent(
    """
    import torch
    from torch import nn

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.b1 = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
            self.b2 = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
            self.fc = nn.Linear(8 * 4 * 4, 16)
            self.head = nn.Linear(16, 10)

        def forward(self, x):
            return self.head(torch.relu(self.fc(self.b2(self.b1(x)).flatten(1))))
    """
)


def test_a_grown_model_saves_and_loads_in_a_new_process_with_the_same_outputs(tmp_path):
    (tmp_path / "user_net.py").write_text(USER_CODE)
    sys.path.insert(0, str(tmp_path))
    try:
        from user_net import Net as UserNet
    finally:
        sys.path.remove(str(tmp_path))
    torch.manual_seed(3)
    x = torch.randn(6, 1, 8, 8)
    slotted = attach(UserNet(), ["b1", "b2", "fc"], x, FAST)
    _grow_to(slotted, "r0c0", "inverted", SeedStage.FOSSILIZED)
    _grow_to(slotted, "r0c1", "attention", SeedStage.BLENDING, blend="gated")
    _grow_to(slotted, "r0c2", "mlp", SeedStage.TRAINING)
    slotted.eval()
    torch.save(slotted.state_dict(), tmp_path / "grown.pt")
    torch.save({"x": x, "y": slotted(x)}, tmp_path / "io.pt")
    script = textwrap.dedent(
        f"""
        import sys, torch
        sys.path.insert(0, {str(tmp_path)!r})
        from user_net import Net
        from esper.grow import load_slotted
        slotted = load_slotted(Net(), {str(tmp_path / "grown.pt")!r}).eval()
        io = torch.load({str(tmp_path / "io.pt")!r}, weights_only=True)
        assert torch.allclose(slotted(io["x"]), io["y"], rtol=0, atol=1e-6)
        print([s.stage.name for s in slotted.slot_states()])
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "['FOSSILIZED', 'BLENDING', 'TRAINING']" in done.stdout
    with pytest.raises(AttachError, match="differ from this model's"):
        attach(UserNet(), ["b1", "b2"], x).load_state_dict(
            torch.load(tmp_path / "grown.pt", weights_only=True)
        )
    assert isinstance(load_slotted(UserNet(), tmp_path / "grown.pt"), nn.Module)


def test_a_deep_copy_runs_its_own_slots():
    torch.manual_seed(4)
    x = torch.randn(4, 1, 8, 8)
    slotted = attach(Net(), ["b1", "b2"], x, FAST)
    _grow_to(slotted, "r0c1", "conv_light", SeedStage.HOLDING)
    twin = copy.deepcopy(slotted).eval()
    slotted.eval()
    assert torch.equal(twin(x), slotted(x))
    assert twin.slot_state("r0c1").stage == SeedStage.HOLDING
    with torch.no_grad():
        for p in twin.seed_parameters("r0c1"):
            p.zero_()
    twin.germinate("r0c0", "norm")
    assert slotted.slot_state("r0c0").stage == SeedStage.DORMANT
    assert not torch.equal(twin(x), slotted(x))  # the copy's seed, not the original's
    assert torch.equal(twin(x), twin.model(x))
