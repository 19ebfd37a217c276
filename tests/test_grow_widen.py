"""Width sites on a user's own layers: tracing, birth, fold, optimiser, resume, errors."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from esper.grow import AttachError, Grower, GrowerConfig, attach, export_model, load_slotted
from esper.lifecycle import SeedStage
from esper.model import LifecycleConfig
from esper.training.surgery import carry_optimizer_state

FAST = LifecycleConfig(min_train_epochs=1, blend_epochs=1, embargo_epochs=1)


class ConvBN(nn.Module):
    """conv-BN-ReLU-pool, a functional conv block, a flatten into a Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 3, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(3)
        self.conv2 = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 2 * 2, 5)

    def forward(self, x):
        h = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 2)
        h = F.dropout(F.relu(self.conv2(h)), 0.1, self.training)
        h = F.max_pool2d(h, 2)
        return self.fc(h.view(h.size(0), -1))


class NormMLP(nn.Module):
    """LayerNorm on the input, a hidden Linear-ReLU-Dropout, a head."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(6)
        self.fc1 = nn.Linear(6, 3)
        self.drop = nn.Dropout(0.2)
        self.fc2 = nn.Linear(3, 4)

    def forward(self, x):
        return self.fc2(self.drop(torch.relu(self.fc1(self.norm(x)))))


class Block(nn.Module):
    """A GPT block: pre-norm causal attention and MLP, both residual."""

    def __init__(self, d: int = 8) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, 2, batch_first=True)
        self.fc1, self.fc2 = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)
        self.register_buffer("mask", torch.triu(torch.ones(5, 5, dtype=torch.bool), 1))

    def forward(self, x):
        h = self.ln1(x)
        x = x + self.attn(h, h, h, attn_mask=self.mask, need_weights=False)[0]
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class MaskedBlock(nn.Module):
    """The GPT example's block: a causal mask built from the input's shape, which fx
    cannot trace (``torch.ones(t, t)``), around an MLP ``Sequential`` that it can."""

    def __init__(self, d: int = 8) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, 2, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))

    def forward(self, h):
        t = h.shape[1]
        mask = torch.triu(torch.ones(t, t, dtype=torch.bool), 1)
        a = self.ln1(h)
        h = h + self.attn(a, a, a, attn_mask=mask, need_weights=False)[0]
        return h + self.mlp(self.ln2(h))


CASES = [
    (ConvBN, (6, 1, 8, 8), ["conv1", "conv2"], {"conv1": "conv2", "conv2": "fc"}),
    (NormMLP, (6, 6), ["fc1"], {"fc1": "fc2"}),
    (Block, (3, 5, 8), ["fc1"], {"fc1": "fc2"}),
    (MaskedBlock, (3, 5, 8), ["mlp.0"], {"mlp.0": "mlp.2"}),
]


def _advance_to_holding(slotted, sid):
    """TRAINING -> BLENDING (alpha 1 in one blend epoch) -> HOLDING, contributions high."""
    for _ in range(2):
        slotted.record_contribution(sid, 1.0, 0.0)
        slotted.step_epoch()
    assert slotted.slots[sid].stage == SeedStage.HOLDING


@pytest.mark.parametrize(("cls", "shape", "widen", "consumers"), CASES)
def test_function_is_kept_at_birth_and_through_the_fold(cls, shape, widen, consumers):
    torch.manual_seed(0)
    model = cls().double()
    x = torch.randn(*shape, dtype=torch.float64)
    slotted = attach(model, [], x, FAST, widen=widen)
    assert {w.name: w.consumer for w in slotted.widen_points} == consumers
    slotted.eval()
    before = model(x)
    sids = [w.spec.slot_id for w in slotted.widen_points]
    for sid in sids:
        slotted.germinate(sid, "wide_x1")
        assert slotted.slots[sid].holds_width
    assert torch.equal(slotted(x), before)  # zero fan-out: germination changes nothing
    # Train mode, a TRAINING seed: the host's output bit for bit (its own pass aside).
    slotted.train()
    torch.manual_seed(1)
    host_out = model(x)
    slotted.eval()
    for sid in sids:
        _advance_to_holding(slotted, sid)
        for p in slotted.slots[sid].seed.fan_out.parameters():
            nn.init.normal_(p, std=0.5)  # a learned fan-out, so the fold has work to do
        slotted.fossilize(sid)
    grown = slotted(x)
    assert not torch.allclose(grown, before)
    units = {w.name: slotted.width_site(w.spec.slot_id).units for w in slotted.widen_points}
    counts = slotted.param_counts()
    for sid in sids:
        slotted.fold_in_place(sid)
        assert slotted.slots[sid].stage == SeedStage.DORMANT
    torch.testing.assert_close(slotted(x), grown, atol=1e-6, rtol=0)
    after = slotted.param_counts()
    assert after.host == counts.host and after.live_seeds == 0
    assert after.total == sum(p.numel() for p in model.parameters())
    if len(sids) == 1:  # neighbours' folds add the zero block between their new units
        assert after == counts
    for name, n in units.items():
        layer = model.get_submodule(name)
        width = layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels
        assert width == 2 * n == layer.weight.shape[0]  # the user's own layer is wider
    # Export: the user's own module, wider, with no Esper class and no hook in it.
    plain = export_model(slotted)
    torch.testing.assert_close(plain(x), grown, atol=1e-6, rtol=0)
    assert all(not type(m).__module__.startswith("esper") for m in plain.modules())
    assert host_out.shape == before.shape


def test_users_optimiser_state_is_carried_through_the_fold():
    torch.manual_seed(0)
    model = NormMLP().double()
    x, y = torch.randn(16, 6, dtype=torch.float64), torch.randint(0, 4, (16,))
    slotted = attach(model, [], x, FAST, widen=["fc1"])
    slotted.germinate("r1c0", "wide_x1")
    _advance_to_holding(slotted, "r1c0")
    slotted.fossilize("r1c0")
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    opt.add_param_group({"params": slotted.seed_parameters("r1c0"), "esper_slot": "r1c0"})
    slotted.eval()  # no dropout: two models, one function

    def step(m, o):
        o.zero_grad()
        loss = F.cross_entropy(m(x), y)
        loss.backward()
        o.step()
        return loss  # kept alive across the fold, as a user's loop keeps its last loss

    for _ in range(3):
        last = step(slotted, opt)
    twin = copy.deepcopy(slotted)
    twin_opt = torch.optim.SGD(twin.model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    twin_opt.add_param_group({"params": twin.seed_parameters("r1c0"), "esper_slot": "r1c0"})
    twin_opt.load_state_dict(copy.deepcopy(opt.state_dict()))  # own buffers
    plan = slotted.fold_in_place("r1c0")
    carry_optimizer_state(opt, plan)
    assert opt.param_groups[1]["params"] == []  # the fossil's parameters left the optimiser
    step(slotted, opt)  # folded, with carried momentum (and the last graph alive)
    assert last.grad_fn is not None
    step(twin, twin_opt)  # unfolded
    twin.fold_in_place("r1c0")
    for (name, a), b in zip(model.named_parameters(), twin.model.parameters(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0, msg=name)


def _mlp():
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 2), nn.ReLU(), nn.Linear(2, 3))


def _data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 16, generator=g)
    y = (x[:, :3].argmax(1) + (x[:, 3] > 0).long()) % 3
    return x, y


def _run(slotted, optimizer, grower, x, y, n):
    out = []
    for _ in range(n):
        for _ in range(4):
            optimizer.zero_grad()
            F.cross_entropy(slotted(x), y).backward()
            optimizer.step()
        s = grower.step()
        out.append((s.action, s.quality, s.val_loss, s.changes))
    return out


def test_grower_widens_folds_and_resumes_exactly(tmp_path):
    torch.manual_seed(0)
    x, y = _data()
    model = _mlp()
    slotted = attach(model, [], x[:4], FAST, widen=["1"])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
    val = [(x[:32], y[:32]), (x[32:], y[32:])]
    config = GrowerConfig(max_steps=20, growth_penalty=0.0)
    grower = Grower(slotted, optimizer, val, "heuristic", config)
    folded_at = None
    for i in range(12):
        _run(slotted, optimizer, grower, x, y, 1)
        tagged = [g for g in optimizer.param_groups if "esper_slot" in g]
        live = slotted.slots["r1c0"].seed is not None
        assert len(tagged) == int(live)  # a group per live seed, none after a fold / prune
        if model[1].out_features > 2:
            folded_at = i
            break
    assert folded_at is not None, "the heuristic never fossilized a width seed"
    width = model[1].out_features
    assert model[3].in_features == width
    held = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert all(id(p) in held for p in model.parameters())
    torch.save(
        {"model": slotted.state_dict(), "opt": optimizer.state_dict(), "grow": grower.state_dict()},
        tmp_path / "ckpt.pt",
    )
    expected = _run(slotted, optimizer, grower, x, y, 4)

    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    fresh = _mlp()  # the narrow model as written: loading widens it to the checkpoint's
    resumed = load_slotted(fresh, ckpt["model"])
    assert fresh[1].out_features == width
    optimizer = torch.optim.SGD(fresh.parameters(), lr=0.2, momentum=0.9)
    grower = Grower(resumed, optimizer, val, "heuristic", config)
    optimizer.load_state_dict(ckpt["opt"])
    grower.load_state_dict(ckpt["grow"])
    assert _run(resumed, optimizer, grower, x, y, 4) == expected


class Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x):
        return self.fc2(x + self.fc1(x))


class Mixing(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 6), nn.Linear(3, 2)

    def forward(self, x):
        return self.fc2(self.fc1(x).view(-1, 2, 3)).flatten(1)


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.out = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 2)
        self.fc2.weight = self.fc1.weight

    def forward(self, x):
        return self.out(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


class Twice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 4), nn.Linear(4, 2)

    def forward(self, x):
        return self.fc2(self.fc1(torch.relu(self.fc1(x))))


class Normed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.ln, self.fc2 = nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 2)

    def forward(self, x):
        return self.fc2(self.ln(self.fc1(x)))


class Branching(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 2), nn.Linear(4, 2)

    def forward(self, x):
        h = torch.relu(self.fc1(x))
        return self.a(h) + self.b(h)


class Last(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 4), nn.Linear(4, 2)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


class Untraceable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 4), nn.Linear(4, 2)

    def forward(self, x):
        h = self.fc1(x)
        return self.fc2(h if h.sum() > 0 else -h)


@pytest.mark.parametrize(
    ("cls", "name", "message"),
    [
        (Residual, "fc1", "'fc1': .*add.* a residual add would need both sides widened"),
        (Mixing, "fc1", "'fc1': call_method 'view' may mix its units"),
        (Tied, "fc1", "'fc1': its weight is tied to 'fc2.weight'"),
        (Twice, "fc1", "'fc1' ran 2 times in one forward"),
        (Normed, "fc1", "'fc1': submodule 'ln' is a LayerNorm normalises across the units"),
        (Branching, "fc1", "'fc1': its units are read by 2 operations"),
        (Last, "fc2", "'fc2': its units reach the model's output"),
        (Last, "nope", "has no submodule 'nope'"),
        (Untraceable, "fc1", "width sites need a model torch.fx can trace"),
    ],
)
def test_unwidenable_layers_give_one_attach_error_naming_them(cls, name, message):
    with pytest.raises(AttachError, match=message):
        attach(cls(), [], torch.randn(2, 4), widen=[name])


def test_depth_slots_and_width_sites_on_one_model():
    torch.manual_seed(0)
    model = ConvBN()
    x = torch.randn(4, 1, 8, 8)
    with pytest.raises(AttachError, match="depth point 'bn1' outputs the units of width site"):
        attach(model, ["bn1"], x, FAST, widen=["conv1"])
    slotted = attach(model, ["bn1"], x, FAST, widen=["conv2"])
    assert list(slotted.slot_config.slot_ids) == ["r0c0", "r1c0"]
    assert slotted.seed_param_count("r0c0", "wide_x1") is None  # depth point: no units
    assert slotted.seed_param_count("r1c0", "conv_light") is None  # width site: no residual
    slotted.germinate("r0c0", "conv_light")
    slotted.germinate("r1c0", "wide_half")
    assert slotted.seed_param_count("r1c0", "wide_half") == sum(
        p.numel() for p in slotted.seed_parameters("r1c0")
    )
    slotted.train()
    out = slotted(x)
    own = slotted.seed_forward(x)
    (F.cross_entropy(out, torch.zeros(4, dtype=torch.long)) * 0 + own.sum()).backward()
    assert all(p.grad is not None for p in slotted.seed_parameters("r1c0"))
    twin = load_slotted(ConvBN(), slotted.state_dict())
    slotted.eval(), twin.eval()
    on = {"r1c0": 1.0}
    assert torch.equal(twin(x, alpha_override=on), slotted(x, alpha_override=on))


@pytest.mark.parametrize(
    ("topology", "shape"), [("cnn", (2, 8, 6, 6)), ("transformer", (2, 5, 8)), ("mlp", (2, 8))]
)
def test_every_residual_blueprint_exports_as_torch_modules_only(topology, shape):
    from esper.grow.export import FoldedSeed, plain_seed
    from esper.model import blueprints_for, get_blueprint
    from esper.model.slot import LearnedGate

    torch.manual_seed(0)
    x = torch.randn(*shape)
    for name in blueprints_for(topology):
        blueprint = get_blueprint(topology, name)
        if blueprint.is_width:
            continue
        seed = blueprint.build(8)
        for p in seed.parameters():
            nn.init.normal_(p, std=0.1)  # zero-initialised last layers would hide the seed
        gate = LearnedGate(8, topology != "cnn")
        folded = FoldedSeed(nn.Linear(shape[-1], shape[-1]), seed, 0.5, gate).eval()
        plain = plain_seed(folded).eval()
        kinds = {f"{type(m).__module__}.{type(m).__name__}" for m in plain.modules()}
        assert all(k.startswith("torch.") for k in kinds), (name, kinds)
        assert torch.equal(plain(x), folded(x)), name


def test_export_of_depth_and_width_growth_holds_only_torch_and_user_modules():
    torch.manual_seed(0)
    model = ConvBN()
    x = torch.randn(4, 1, 8, 8)
    slotted = attach(model, ["bn1"], x, FAST, widen=["conv2"])
    for sid, bp in (("r0c0", "conv_light"), ("r1c0", "wide_x1")):
        slotted.germinate(sid, bp, "gated")
        _advance_to_holding(slotted, sid)
        for p in slotted.seed_parameters(sid):
            nn.init.normal_(p, std=0.3)
    slotted.fossilize("r0c0")  # r1c0 stays HOLDING: it folds at alpha × gate
    slotted.eval()
    plain = export_model(slotted)
    torch.testing.assert_close(plain(x), slotted(x), atol=1e-6, rtol=0)
    assert plain.conv2.out_channels == 8 and plain.fc.in_features == 32
    kinds = {type(m) for m in plain.modules()}
    assert all(k is ConvBN or k.__module__.startswith("torch.") for k in kinds), kinds
    assert model.conv2.out_channels == 4  # the live model is untouched


def test_random_growth_of_depth_and_width_keeps_the_optimiser_in_step_with_the_model():
    torch.manual_seed(0)
    model = ConvBN()
    x, y = torch.randn(32, 1, 8, 8), torch.randint(0, 5, (32,))
    slotted = attach(model, ["fc"], x[:2], FAST, widen=["conv1", "conv2"])
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    grower = Grower(slotted, optimizer, [(x, y)], "random", GrowerConfig(max_steps=16, seed=3))
    moves = set()
    for _ in range(16):
        for _ in range(2):
            optimizer.zero_grad()
            F.cross_entropy(slotted(x), y).backward()
            optimizer.step()
        step = grower.step()
        moves |= {(c.source.name, c.target.name) for c in step.changes}
        live = {s.slot_id for s in slotted.slot_states() if s.seed_params > 0}
        tagged = {g["esper_slot"] for g in optimizer.param_groups if "esper_slot" in g}
        assert tagged == live
        held = {id(p) for g in optimizer.param_groups for p in g["params"]}
        assert all(id(p) in held for p in slotted.parameters() if p.requires_grad)
        assert {id(p) for p in optimizer.state} <= held
    assert ("TRAINING", "PRUNED") in moves or ("HOLDING", "PRUNED") in moves
