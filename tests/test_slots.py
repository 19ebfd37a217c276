import pytest
from hypothesis import given
from hypothesis import strategies as st

from esper.slots import (
    InjectionSpec,
    SlotConfig,
    SlotIdError,
    SlotMismatchError,
    format_slot_id,
    parse_slot_id,
    sort_slot_ids,
)

coords = st.integers(min_value=0, max_value=10_000)


@given(coords, coords)
def test_format_parse_round_trip(row, col):
    sid = format_slot_id(row, col)
    assert parse_slot_id(sid) == (row, col)
    assert format_slot_id(*parse_slot_id(sid)) == sid


@given(st.text(max_size=12))
def test_parse_accepts_only_canonical_ids(text):
    try:
        row, col = parse_slot_id(text)
    except SlotIdError as exc:
        assert repr(text) in str(exc)
    else:
        assert format_slot_id(row, col) == text


@pytest.mark.parametrize(
    "bad", ["early", "r0c", "R0C0", "r-1c0", "r00c1", "r0c01", " r0c0", "c0r0", ""]
)
def test_invalid_ids_are_named_in_the_error(bad):
    with pytest.raises(SlotIdError) as info:
        parse_slot_id(bad)
    assert repr(bad) in str(info.value)
    assert "r0c0" in str(info.value)  # says what is allowed


@given(st.integers(1, 8), st.integers(1, 8))
def test_for_grid_order_and_size(rows, cols):
    config = SlotConfig.for_grid(rows, cols)
    assert config.num_slots == rows * cols
    assert config.slot_ids == sort_slot_ids(config.slot_ids)
    assert config.slot_ids[0] == "r0c0"
    assert config.slot_ids[-1] == f"r{rows - 1}c{cols - 1}"
    for i, sid in enumerate(config.slot_ids):
        assert config.index_of(sid) == i
        assert config.slot_id_for_index(i) == sid
        assert parse_slot_id(sid) == divmod(i, cols)


def test_canonical_sort_is_numeric_not_lexical():
    assert sort_slot_ids(["r0c10", "r1c0", "r0c2"]) == ("r0c2", "r0c10", "r1c0")


def _specs(ids):
    return [
        InjectionSpec(sid, channels=4 + i, topology="cnn", position=i / len(ids))
        for i, sid in enumerate(ids)
    ]


@given(
    st.lists(
        st.tuples(st.integers(0, 3), st.integers(0, 12)), min_size=1, max_size=20, unique=True
    ),
    st.data(),
)
def test_from_specs_keeps_canonical_order_and_rejects_unknown(coords_list, data):
    ids = [format_slot_id(r, c) for r, c in coords_list]
    specs = _specs(ids)
    full = SlotConfig.from_specs(specs)
    assert full.slot_ids == sort_slot_ids(ids)
    subset = data.draw(st.lists(st.sampled_from(ids), min_size=1, unique=True))
    config = SlotConfig.from_specs(specs, enabled=subset)
    assert config.slot_ids == sort_slot_ids(subset)
    by_id = {s.slot_id: s for s in specs}
    for sid in subset:
        assert config.channels_for(sid) == by_id[sid].channels
    missing = format_slot_id(99, 99)
    with pytest.raises(SlotIdError) as info:
        SlotConfig.from_specs(specs, enabled=[*subset, missing])
    assert missing in str(info.value)
    assert full.slot_ids[0] in str(info.value)  # lists what the host offers


def test_config_rejects_empty_duplicates_and_unsorted():
    with pytest.raises(SlotIdError, match="at least one"):
        SlotConfig(())
    with pytest.raises(SlotIdError, match="duplicate slot id 'r0c1'"):
        SlotConfig.from_ids(["r0c0", "r0c1", "r0c1"])
    with pytest.raises(SlotIdError, match="canonical"):
        SlotConfig(("r0c1", "r0c0"))
    with pytest.raises(SlotIdError, match="'early'"):
        SlotConfig.from_ids(["r0c0", "early"])
    with pytest.raises(SlotIdError, match="no injection points"):
        SlotConfig.from_specs([])
    with pytest.raises(SlotIdError, match="duplicate"):
        SlotConfig.from_specs(_specs(["r0c0", "r0c0"]))


def test_equality_is_by_ordered_ids():
    a = SlotConfig.from_specs(_specs(["r0c0", "r0c1"]))
    b = SlotConfig(("r0c0", "r0c1"))
    assert a == b and hash(a) == hash(b)
    assert a != SlotConfig(("r0c0", "r0c2"))
    a.check_matches(b)
    with pytest.raises(SlotMismatchError) as info:
        a.check_matches(["r0c1", "r0c0"], what="checkpoint")
    assert "['r0c0', 'r0c1']" in str(info.value) and "checkpoint has ['r0c1', 'r0c0']" in str(
        info.value
    )


def test_lookup_errors_name_the_value():
    config = SlotConfig.for_grid(1, 3)
    with pytest.raises(SlotIdError, match="unknown slot 'r0c7'.*r0c0, r0c1, r0c2"):
        config.index_of("r0c7")
    with pytest.raises(IndexError, match="3.*0..2"):
        config.slot_id_for_index(3)
    with pytest.raises(ValueError, match="no injection specs"):
        config.channels_for("r0c0")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"channels": 0}, "channels must be a positive int, got 0"),
        ({"topology": "rnn"}, "unknown topology 'rnn'"),
        ({"position": 1.5}, r"position must be in \[0, 1\], got 1.5"),
    ],
)
def test_injection_spec_validation(kwargs, message):
    args = {"slot_id": "r0c0", "channels": 8, "topology": "cnn", "position": 0.5} | kwargs
    with pytest.raises(ValueError, match=message):
        InjectionSpec(**args)
