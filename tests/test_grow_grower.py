"""The Grower inside a user's own training loop: controllers, optimiser groups, telemetry."""

import pytest
import torch
from torch import nn

from esper.env.observations import GLOBAL_DIM, SLOT_DIM
from esper.grow import Grower, GrowerConfig, attach
from esper.lifecycle import SeedStage
from esper.model import LifecycleConfig
from esper.telemetry import Telemetry, read_events

FAST = LifecycleConfig(min_train_epochs=1, blend_epochs=1, embargo_epochs=1)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.b1 = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU())
        self.b2 = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        self.fc = nn.Linear(8 * 4 * 4, 10)

    def forward(self, x):
        return self.fc(self.b2(self.b1(x)).flatten(1))


def _setup(controller="random", optimizer_cls=torch.optim.SGD, **config):
    torch.manual_seed(0)
    x, y = torch.randn(32, 1, 8, 8), torch.randint(0, 10, (32,))
    model = Net()
    slotted = attach(model, ["b1", "b2"], x[:2], FAST)
    optimizer = optimizer_cls(model.parameters(), lr=0.05)
    grower = Grower(
        slotted, optimizer, [(x[:16], y[:16]), (x[16:], y[16:])], controller,
        GrowerConfig(max_steps=8, **config),
    )  # fmt: skip
    return slotted, optimizer, grower, x, y


def _epoch(slotted, optimizer, x, y, autocast=None):
    for _ in range(2):
        optimizer.zero_grad()
        with torch.autocast("cpu", dtype=autocast, enabled=autocast is not None):
            loss = nn.functional.cross_entropy(slotted(x), y)
        loss.backward()
        optimizer.step()
    return loss.item()


def test_seeds_join_and_leave_the_users_optimiser_with_their_lifecycle():
    slotted, optimizer, grower, x, y = _setup(controller="random")
    host_groups = len(optimizer.param_groups)
    seen_seed_group = False
    for _ in range(10):
        _epoch(slotted, optimizer, x, y)
        step = grower.step()
        seeds = {
            s.slot_id
            for s in slotted.slot_states()
            if s.stage not in (SeedStage.DORMANT, SeedStage.PRUNED, SeedStage.EMBARGOED)
        }
        tagged = {g["esper_slot"]: g for g in optimizer.param_groups if "esper_slot" in g}
        assert set(tagged) == seeds, step
        assert len(optimizer.param_groups) == host_groups + len(seeds)
        for sid, group in tagged.items():
            assert [id(p) for p in group["params"]] == [id(p) for p in slotted.seed_parameters(sid)]
        seen_seed_group |= bool(seeds)
        in_state = {id(p) for p in optimizer.state}
        owned = {id(p) for g in optimizer.param_groups for p in g["params"]}
        assert in_state <= owned  # a pruned seed leaves no optimiser state behind
    assert seen_seed_group
    assert sum(grower.counts.values()) > 0


def test_a_seed_is_trained_by_the_users_optimiser_step():
    slotted, optimizer, grower, x, y = _setup(controller="static")
    slotted.germinate("r0c1", "conv_light")
    grower._sync_param_groups()
    before = [p.detach().clone() for p in slotted.seed_parameters("r0c1")]
    _epoch(slotted, optimizer, x, y)
    after = slotted.seed_parameters("r0c1")
    assert any(not torch.equal(a, b) for a, b in zip(before, after, strict=True))


def test_contributions_use_the_validation_batches_with_per_call_overrides():
    slotted, _, grower, x, _ = _setup(controller="static")
    slotted.germinate("r0c1", "conv_light")
    with torch.no_grad():
        for p in slotted.seed_parameters("r0c1"):
            p.normal_(0.0, 2.0)  # a seed that wrecks the function
    slotted.record_contribution("r0c1", 1.0)
    slotted.step_epoch()  # BLENDING at alpha 1 (blend_epochs=1)
    slotted.eval()
    live = slotted(x)
    _, contributions, stderrs = grower.measure()
    assert 0 < stderrs["r0c1"] < -contributions["r0c1"]
    assert contributions["r0c1"] < -0.1  # switching it off lowers the loss a lot
    assert torch.equal(slotted(x), live)  # no override was left behind
    step = grower.step()
    assert slotted.slot_state("r0c1").stage == SeedStage.PRUNED  # the lifecycle's prune
    assert step.changes[0].reason == "negative_contribution"


def test_heuristic_run_emits_the_typed_events_of_esper_train(tmp_path):
    torch.manual_seed(0)
    slotted, optimizer, grower, x, y = _setup(controller="heuristic")
    grower.telemetry = Telemetry(tmp_path)
    for _ in range(6):
        loss = _epoch(slotted, optimizer, x, y)
        grower.step(train_loss=loss)
    summary = grower.finish()
    grower.telemetry.close()
    kinds = [e["kind"] for e in read_events(tmp_path / "events.jsonl")]
    assert kinds[0] == "run_started"
    assert kinds.count("episode_step") == 6
    assert "seed_germinated" in kinds and kinds[-1] == "episode_ended"
    assert summary.germinated >= 1
    assert (tmp_path / "metrics.csv").read_text().count("\n") == 2


def test_growth_resumes_from_saved_model_optimiser_and_grower_states(tmp_path):
    from esper.grow import load_slotted

    def steps(slotted, optimizer, grower, x, y, n):
        out = []
        for _ in range(n):
            _epoch(slotted, optimizer, x, y)
            step = grower.step()
            out.append((step.action, step.quality, step.val_loss, step.changes))
        return out

    slotted, optimizer, grower, x, y = _setup(controller="heuristic")
    assert steps(slotted, optimizer, grower, x, y, 2)[-1][0].startswith("GERMINATE")
    torch.save(
        {"model": slotted.state_dict(), "opt": optimizer.state_dict(), "grow": grower.state_dict()},
        tmp_path / "ckpt.pt",
    )
    expected = steps(slotted, optimizer, grower, x, y, 4)
    assert any(changes for *_, changes in expected)  # the seed moves on after the save

    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    model = Net()
    resumed = load_slotted(model, ckpt["model"])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    grower = Grower(resumed, optimizer, grower.val_data, "heuristic", grower.config)
    optimizer.load_state_dict(ckpt["opt"])  # the grower re-added the seeds' groups
    grower.load_state_dict(ckpt["grow"])
    assert steps(resumed, optimizer, grower, x, y, 4) == expected
    resumed.prune("r0c1")
    grower._sync_param_groups()
    assert [g.get("esper_slot") for g in optimizer.param_groups] == [None]


def test_a_ppo_checkpoint_drives_the_grower(tmp_path):
    from esper.rl import PPOAgent
    from esper.slots import SlotConfig

    agent = PPOAgent(SlotConfig.for_grid(1, 3), GLOBAL_DIM, SLOT_DIM, ("conv_light", "norm"))
    path = agent.save(tmp_path / "policy.pt")
    slotted, optimizer, grower, x, y = _setup(controller=str(path))
    assert grower.controller_name == "ppo"
    assert grower.action_space.blueprints == ("conv_light", "norm")
    for _ in range(3):
        _epoch(slotted, optimizer, x, y)
        grower.step()


def test_amp_autocast_in_the_users_loop_and_the_validation_passes():
    slotted, optimizer, grower, x, y = _setup(controller="static")
    grower.autocast = torch.bfloat16
    slotted.germinate("r0c0", "conv_heavy")
    grower._sync_param_groups()
    _epoch(slotted, optimizer, x, y, autocast=torch.bfloat16)
    step = grower.step()
    assert step.val_loss == step.val_loss and "r0c0" in step.contributions


def test_config_and_controller_errors_name_the_bad_value():
    with pytest.raises(ValueError, match="unknown kind 'regression'"):
        GrowerConfig(kind="regression")
    with pytest.raises(ValueError, match="'attention_xl' fits none of this model's slots"):
        _setup(blueprints=("attention_xl",))
    with pytest.raises(ValueError, match="neither one of heuristic, static, random"):
        _setup(controller="no/such/policy.pt")
    with pytest.raises(TypeError, match="SlottedModel"):
        Grower(Net(), None, [])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_fp16_loop_with_grad_scaler_grows_and_exports():
    from esper.grow import export_model

    torch.manual_seed(0)
    device = torch.device("cuda")
    x, y = torch.randn(64, 1, 8, 8, device=device), torch.randint(0, 10, (64,), device=device)
    model = Net().to(device)
    slotted = attach(model, ["b1", "b2"], x[:2], FAST)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    scaler = torch.amp.GradScaler("cuda")
    grower = Grower(
        slotted, optimizer, [(x, y)], "random", GrowerConfig(max_steps=6), autocast=torch.float16
    )
    for _ in range(6):
        for _ in range(2):
            optimizer.zero_grad()
            with torch.autocast("cuda", dtype=torch.float16):
                loss = nn.functional.cross_entropy(slotted(x), y)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        grower.step(train_loss=float(loss))
    assert all(p.device.type == "cuda" for p in slotted.parameters())
    slotted.eval()
    torch.testing.assert_close(export_model(slotted)(x), slotted(x), rtol=0, atol=1e-6)
