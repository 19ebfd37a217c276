"""One adapter from a trained policy to a per-env controller (`PolicyController`), and
the Grower's checks on what it is given."""

import pytest
import torch
from torch import nn

from esper.env.observations import GLOBAL_DIM, SLOT_DIM
from esper.grow import Grower, GrowerConfig, attach
from esper.policies import PolicyController as ShippedAdapter
from esper.policy import PolicyController
from esper.rl import PPOAgent
from esper.slots import SlotConfig


def _slotted():
    torch.manual_seed(0)
    x, y = torch.randn(16, 1, 8, 8), torch.randint(0, 10, (16,))
    net = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(),
        nn.Flatten(), nn.Linear(4 * 64, 10),
    )  # fmt: skip
    return attach(net, ["1", "3"], x[:2]), [(x, y)]


def test_the_grower_and_the_shipped_policies_use_the_one_adapter():
    assert ShippedAdapter is PolicyController
    slotted, val = _slotted()
    agent = PPOAgent(slotted.slot_config, GLOBAL_DIM, SLOT_DIM, ("conv_light", "norm"))
    grower = Grower(slotted, None, val, agent, GrowerConfig(max_steps=2))
    assert type(grower.controller) is PolicyController
    assert grower.action_space.blueprints == ("conv_light", "norm")
    grower.step()


def test_an_agent_for_other_slots_is_refused_naming_both():
    slotted, val = _slotted()
    agent = PPOAgent(SlotConfig.for_grid(1, 3), GLOBAL_DIM, SLOT_DIM, ("conv_light",))
    with pytest.raises(ValueError, match="r0c2"):
        Grower(slotted, None, val, agent)


def test_a_grower_state_without_the_growth_entry_is_refused():
    slotted, val = _slotted()
    grower = Grower(slotted, None, val, "static")
    with pytest.raises(ValueError, match=r"missing \['counts', 'growth'"):
        grower.load_state_dict({"episode_return": 0.0, "controller": None, "signals": {}})
