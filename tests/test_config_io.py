from dataclasses import dataclass, field
from typing import Literal

import pytest

from esper.config_io import ConfigError, dataclass_from_dict, dumps_toml, load_toml


@dataclass(frozen=True)
class Inner:
    lr: float = 0.1
    steps: int = 3
    mode: Literal["a", "b"] = "a"
    slots: tuple[str, ...] = ("r0c0",)
    device: str | None = None
    flag: bool = False


@dataclass(frozen=True)
class Outer:
    inner: Inner = field(default_factory=Inner)
    name: str = "x"


def test_round_trip_through_toml(tmp_path):
    cfg = Inner(lr=0.5, steps=7, mode="b", slots=("r0c0", "r0c2"), flag=True)
    path = tmp_path / "c.toml"
    path.write_text(dumps_toml({"inner": cfg}))
    assert dataclass_from_dict(Inner, load_toml(path)["inner"], "inner") == cfg


def test_ints_are_accepted_for_floats_and_nested_tables():
    out = dataclass_from_dict(Outer, {"inner": {"lr": 1}, "name": "y"})
    assert out.inner.lr == 1.0 and isinstance(out.inner.lr, float) and out.name == "y"


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"lrr": 0.1}, "unknown key inner.lrr; did you mean 'lr'?; valid keys: device, flag"),
        ({"steps": 1.5}, "inner.steps: expected an integer, got 1.5"),
        ({"steps": True}, "inner.steps: expected an integer, got True"),
        ({"mode": "c"}, "inner.mode: 'c' is not allowed; allowed: 'a', 'b'"),
        ({"slots": "r0c0"}, "inner.slots: expected a list"),
        ({"flag": 1}, "inner.flag: expected true or false"),
    ],
)
def test_bad_values_name_the_key(data, message):
    with pytest.raises(ConfigError) as info:
        dataclass_from_dict(Inner, data, "inner")
    assert message in str(info.value)


def test_missing_or_invalid_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_toml(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[run\nx=")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_toml(bad)
