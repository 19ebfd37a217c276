import itertools

import pytest

from esper.lifecycle import (
    IllegalTransitionError,
    SeedStage,
    can_transition,
    check_transition,
    is_live,
    is_terminal,
)

S = SeedStage
# The diagram in docs/ARCHITECTURE.md, Lifecycle: written out edge by edge.
DESIGN_EDGES = {
    (S.DORMANT, S.GERMINATED),
    (S.GERMINATED, S.TRAINING),
    (S.TRAINING, S.BLENDING),
    (S.BLENDING, S.HOLDING),
    (S.HOLDING, S.FOSSILIZED),
    (S.GERMINATED, S.PRUNED),
    (S.TRAINING, S.PRUNED),
    (S.BLENDING, S.PRUNED),
    (S.HOLDING, S.PRUNED),
    (S.PRUNED, S.EMBARGOED),
    (S.EMBARGOED, S.DORMANT),
}


@pytest.mark.parametrize(("source", "target"), list(itertools.product(SeedStage, SeedStage)))
def test_transition_table_matches_design_for_every_pair(source, target):
    legal = (source, target) in DESIGN_EDGES
    assert can_transition(source, target) == legal
    if legal:
        check_transition(source, target)
    else:
        with pytest.raises(IllegalTransitionError) as info:
            check_transition(source, target, slot_id="r0c1")
        message = str(info.value)
        assert source.name in message and target.name in message and "r0c1" in message


def test_error_lists_allowed_targets():
    with pytest.raises(IllegalTransitionError, match="allowed targets are: TRAINING, PRUNED"):
        check_transition(S.GERMINATED, S.HOLDING)
    with pytest.raises(IllegalTransitionError, match=r"none \(terminal\)"):
        check_transition(S.FOSSILIZED, S.PRUNED)


def test_helpers():
    assert {s for s in SeedStage if is_live(s)} == {S.GERMINATED, S.TRAINING, S.BLENDING, S.HOLDING}
    assert {s for s in SeedStage if is_terminal(s)} == {S.FOSSILIZED}
