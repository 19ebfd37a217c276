"""The user chooses whether a token-sequence slot is causal (a decoder) or not (an
encoder); the choice builds the attention seeds and travels with the checkpoint."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from esper.grow import AttachError, attach, load_slotted
from esper.lifecycle import SeedStage


class Tokens(nn.Module):
    """Per-token layers only: whatever mixes tokens here is the seed."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(11, 16)
        self.blocks = nn.ModuleList([nn.Linear(16, 16), nn.Linear(16, 16)])
        self.pool = nn.Linear(16, 16)
        self.head = nn.Linear(16, 11)

    def forward(self, x):
        h = self.embed(x)
        for block in self.blocks:
            h = torch.relu(block(h))
        return self.head(h), self.pool(h.mean(dim=1))  # per-token logits, and [N, D]


def _grown(causal, blueprint: str, sid: str = "r0c0"):
    torch.manual_seed(0)
    sample = torch.randint(0, 11, (2, 6))
    slotted = attach(Tokens(), ["blocks.0", "blocks.1", "pool"], sample, causal=causal)
    slotted.germinate(sid, blueprint)
    with torch.no_grad():  # a trained-looking seed: its output is no longer zero
        for p in slotted.seed_parameters(sid):
            p.add_(0.3 * torch.randn_like(p))
    return slotted.eval()


def _first_token_sees_the_last(slotted, sid: str = "r0c0") -> bool:
    x = torch.randint(0, 11, (3, 6))
    changed = x.clone()
    changed[:, -1] = (x[:, -1] + 1) % 11
    with torch.no_grad():
        a = slotted(x, alpha_override={sid: 1.0})[0][:, 0]
        b = slotted(changed, alpha_override={sid: 1.0})[0][:, 0]
    return not torch.allclose(a, b)


@pytest.mark.parametrize("blueprint", ["attention", "layer"])
def test_a_non_causal_seed_sees_future_tokens_and_a_causal_one_does_not(blueprint):
    assert _first_token_sees_the_last(_grown(False, blueprint))
    assert not _first_token_sees_the_last(_grown(True, blueprint))
    assert not _first_token_sees_the_last(_grown(True, "mlp"))  # per-token blueprints


def test_causal_is_chosen_per_point_and_defaults_to_causal():
    default = _grown(True, "attention")
    assert [p.causal for p in default.points] == [True, True, None]  # pool: [N, D]
    mixed = _grown({"blocks.1": False}, "attention", sid="r0c1")
    assert [p.causal for p in mixed.points] == [True, False, None]
    assert _first_token_sees_the_last(mixed, "r0c1")


def test_bad_causal_choices_name_the_value():
    sample = torch.randint(0, 11, (2, 6))
    names = ["blocks.0", "pool"]
    with pytest.raises(AttachError, match=r"causal must be True, False or a mapping.*'yes'"):
        attach(Tokens(), names, sample, causal="yes")
    with pytest.raises(AttachError, match=r"causal\['blocks.0'\] must be True or False, got 1"):
        attach(Tokens(), names, sample, causal={"blocks.0": 1})
    with pytest.raises(AttachError, match=r"causal names 'blocks.1', which is not an attached"):
        attach(Tokens(), names, sample, causal={"blocks.1": False})
    with pytest.raises(AttachError, match=r"causal names 'pool', whose output \(2, 16\) is not"):
        attach(Tokens(), names, sample, causal={"pool": False})


def test_load_slotted_restores_the_choice_and_old_files_load_as_causal(tmp_path):
    slotted = _grown(False, "attention")
    x = torch.randint(0, 11, (3, 6))
    with torch.no_grad():
        expected = slotted(x, alpha_override={"r0c0": 1.0})[0]
    torch.save(slotted.state_dict(), tmp_path / "encoder.pt")
    loaded = load_slotted(Tokens(), tmp_path / "encoder.pt").eval()
    assert [p.causal for p in loaded.points] == [False, False, None]
    assert loaded.slot_state("r0c0").stage == SeedStage.TRAINING
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, alpha_override={"r0c0": 1.0})[0], expected)
    with pytest.raises(AttachError, match=r"differ from this model's .*causal=True"):
        attach(Tokens(), ["blocks.0", "blocks.1", "pool"], x).load_state_dict(
            torch.load(tmp_path / "encoder.pt", weights_only=True)
        )
    # A file written before the choice existed: its points carry no "causal" key.
    old = _grown(True, "attention").state_dict()
    for point in old["_extra_state"]["points"]:
        del point["causal"]
    restored = load_slotted(Tokens(), old).eval()
    assert [p.causal for p in restored.points] == [True, True, None]
    assert not _first_token_sees_the_last(restored)
