"""FactoredRecurrentActorCritic for any slot count: shapes, legality, recurrence, portability."""

import pytest
import torch

from esper.actions import ActionMasks, LifecycleOp
from esper.policy import FactoredRecurrentActorCritic, InvalidMaskError
from esper.policy.network import two_length_split

G, F, BP, L = 6, 5, 4, 3
SLOT_COUNTS = [1, 2, 3, 4, 5, 8, 16, 32]


def random_masks(shape: tuple[int, ...], s: int, gen: torch.Generator) -> ActionMasks:
    """Consistent random conditional masks: an op is legal only if some slot allows it."""
    slot = torch.rand(*shape, 4, s, generator=gen) < 0.5
    slot[..., LifecycleOp.WAIT, :] = False  # WAIT's slot row is irrelevant: leave it empty
    blueprint = torch.rand(*shape, s, BP, generator=gen) < 0.5
    blueprint[..., 0] |= ~blueprint.any(-1)
    # GERMINATE into a slot with no legal blueprint would be inconsistent: forbid such slots.
    slot[..., LifecycleOp.GERMINATE, :] &= blueprint.any(-1)
    op = slot.any(-1)
    op[..., LifecycleOp.WAIT] = True
    blend = torch.rand(*shape, L, generator=gen) < 0.6
    blend[..., 0] = True
    return ActionMasks(op, slot, blueprint, blend)


def legal(masks: ActionMasks, actions: torch.Tensor) -> torch.Tensor:
    """Batched `ActionMasks.allows`: [B] bool."""
    idx = torch.arange(actions.shape[0])
    op, slot, bp, blend = actions.unbind(-1)
    ok = masks.op[idx, op]
    uses_slot = op != LifecycleOp.WAIT
    ok &= ~uses_slot | masks.slot[idx, op, slot]
    germ = op == LifecycleOp.GERMINATE
    ok &= ~germ | (masks.blueprint[idx, slot, bp] & masks.blend[idx, blend])
    return ok


def make(s: int, seed: int = 0) -> FactoredRecurrentActorCritic:
    torch.manual_seed(seed)
    return FactoredRecurrentActorCritic(s, G, F, BP, L, hidden=32, embed=16)


def obs_batch(*lead: int, s: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    return {
        "global": torch.randn(*lead, G, generator=gen),
        "slots": torch.randn(*lead, s, F, generator=gen),
    }


@pytest.mark.parametrize("s", SLOT_COUNTS)
def test_shapes_gradients_legality_and_determinism(s):
    gen = torch.Generator().manual_seed(s)
    net = make(s)
    b = 256
    obs, masks = obs_batch(b, s=s, gen=gen), random_masks((b,), s, gen)
    h0 = net.get_initial_hidden(b)
    assert all(bool((t == 0).all()) and t.shape == (1, b, 32) for t in h0)

    step = net.get_action(obs, h0, masks, generator=gen)
    assert step.actions.shape == (b, 4) and step.actions.dtype == torch.long
    assert step.log_probs.shape == (b, 4) and step.values.shape == (b,)
    assert bool(legal(masks, step.actions).all())
    # Thousands of draws: a masked choice is never taken.
    for _ in range(12):
        assert bool(legal(masks, net.get_action(obs, h0, masks, generator=gen).actions).all())

    # Irrelevant heads: no log-prob.
    op = step.actions[:, 0]
    assert bool((step.log_probs[op == LifecycleOp.WAIT, 1:] == 0).all())
    assert bool((step.log_probs[op != LifecycleOp.GERMINATE, 2:] == 0).all())

    det1 = net.get_action(obs, h0, masks, deterministic=True).actions
    det2 = net.get_action(obs, h0, masks, deterministic=True).actions
    assert torch.equal(det1, det2) and bool(legal(masks, det1).all())

    # Gradients reach every head and the recurrence (two steps, so W_hh matters too).
    two = {k: torch.stack([v, v]) for k, v in obs.items()}
    out = net.evaluate_actions(
        two, torch.stack([step.actions] * 2), ActionMasks.stack([masks, masks]), h0
    )
    loss = out.log_probs.sum() + out.values.sum() + out.entropies.sum()
    loss.backward()
    for name, p in net.named_parameters():
        if name.startswith(("blueprint_head", "blend_head", "choice_trunk")) and not bool(
            (op == LifecycleOp.GERMINATE).any()
        ):
            continue
        if s == 1 and name.startswith(("slot_query", "slot_key", "slot_score", "op_embedding")):
            continue  # with one slot the slot head has a single choice: log-prob 0, no gradient
        assert p.grad is not None and float(p.grad.abs().sum()) > 0, name


def test_no_parameter_shape_depends_on_the_slot_count():
    shapes = {s: {k: v.shape for k, v in make(s).state_dict().items()} for s in (1, 3, 32)}
    assert shapes[1] == shapes[3] == shapes[32]
    net3 = make(3)
    net8 = make(8)
    net8.load_state_dict(net3.state_dict())  # a checkpoint carries over between N


@pytest.mark.parametrize("s", [1, 3, 8])
def test_evaluate_actions_matches_stepping_get_action(s):
    gen = torch.Generator().manual_seed(10 + s)
    net = make(s)
    t, b = 7, 5
    obs = obs_batch(t, b, s=s, gen=gen)
    masks = random_masks((t, b), s, gen)
    hidden = h0 = net.get_initial_hidden(b)
    acts, lps, vals = [], [], []
    with torch.no_grad():
        for i in range(t):
            step = net.get_action(
                {k: v[i] for k, v in obs.items()}, hidden, masks[i], generator=gen
            )
            acts.append(step.actions)
            lps.append(step.log_probs)
            vals.append(step.values)
            hidden = step.hidden
        out = net.evaluate_actions(obs, torch.stack(acts), masks, h0)
    torch.testing.assert_close(out.log_probs, torch.stack(lps), atol=1e-5, rtol=0)
    torch.testing.assert_close(out.values, torch.stack(vals), atol=1e-5, rtol=0)
    assert out.entropies.shape == (t, b, 4)
    assert bool(((out.entropies >= 0) & (out.entropies <= 1 + 1e-5)).all())
    assert bool((out.entropies[~out.head_used] == 0).all())


def test_recurrent_state_carries_information():
    gen = torch.Generator().manual_seed(3)
    net = make(4)
    b = 6
    masks = random_masks((b,), 4, gen)
    first, later = obs_batch(b, s=4, gen=gen), obs_batch(b, s=4, gen=gen)
    h0 = net.get_initial_hidden(b)
    with torch.no_grad():
        carried = net.get_action(first, h0, masks).hidden
        v_fresh = net.get_action(later, h0, masks).values
        v_carried = net.get_action(later, carried, masks).values
    assert not torch.allclose(v_fresh, v_carried)


def test_bad_inputs_raise_clear_errors():
    net = make(3)
    gen = torch.Generator().manual_seed(0)
    obs, masks = obs_batch(2, s=3, gen=gen), random_masks((2,), 3, gen)
    h0 = net.get_initial_hidden(2)
    with pytest.raises(ValueError, match=r"obs\['slots'\].*\[B, 3, 5\]"):
        net.get_action(obs_batch(2, s=4, gen=gen), h0, masks)
    with pytest.raises(ValueError, match="masks.slot"):
        net.get_action(obs, h0, random_masks((2,), 4, gen))
    with pytest.raises(ValueError, match="num_slots"):
        FactoredRecurrentActorCritic(0, G, F, BP)


def test_op_bias_is_a_prior_on_the_first_decision():
    gen = torch.Generator().manual_seed(0)
    masks = random_masks((256,), 3, gen)
    masks.op[:] = True  # all four ops legal
    masks.slot[:, 1:, :] = True
    obs = obs_batch(256, s=3, gen=gen)
    shares = {}
    for bias in ((0.0, 0.0, 0.0, 0.0), (2.0, 0.0, 0.0, 0.0), (0.0, 0.0, 0.0, -4.0)):
        torch.manual_seed(0)
        net = FactoredRecurrentActorCritic(3, G, F, BP, L, hidden=32, embed=16, op_bias=bias)
        ops = net.get_action(obs, net.get_initial_hidden(256), masks, generator=gen).actions[:, 0]
        shares[bias] = [float((ops == op).float().mean()) for op in LifecycleOp]
    uniform, wait_prior, no_prune = shares.values()
    # Near-uniform heads give each op ~1/4; +2 on WAIT gives e^2 / (e^2 + 3) ~ 0.71.
    assert all(0.15 < p < 0.35 for p in uniform), uniform
    assert 0.6 < wait_prior[LifecycleOp.WAIT] < 0.82, wait_prior
    assert no_prune[LifecycleOp.PRUNE] < 0.03, no_prune
    with pytest.raises(ValueError, match="one value per op"):
        FactoredRecurrentActorCritic(3, G, F, BP, L, op_bias=(1.0,))


@pytest.mark.parametrize("lengths", [[7, 7, 7], [7, 1, 2, 7, 3], [1, 1, 1, 7], [2, 5, 7, 4, 1, 6]])
def test_evaluate_valid_equals_evaluate_actions_on_the_real_steps(lengths):
    gen = torch.Generator().manual_seed(sum(lengths))
    s, t, b = 3, max(lengths), len(lengths)
    net = make(s)
    obs = obs_batch(t, b, s=s, gen=gen)
    masks = random_masks((t, b), s, gen)
    hidden0 = tuple(torch.randn(1, b, 32, generator=gen) for _ in range(2))
    with torch.no_grad():
        actions = torch.stack(
            [
                net.get_action({k: v[i] for k, v in obs.items()}, hidden0, masks[i]).actions
                for i in range(t)
            ]
        )
        full = net.evaluate_actions(obs, actions, masks, hidden0)
        valid = torch.arange(t)[:, None] < torch.tensor(lengths)[None, :]
        flat = net.evaluate_valid(obs, actions, masks, hidden0, valid)
    for name in ("log_probs", "values", "entropies", "head_used"):
        torch.testing.assert_close(
            getattr(flat, name), getattr(full, name)[valid], atol=1e-6, rtol=0
        )


def test_two_length_split_runs_short_sequences_apart_only_when_it_saves_rows():
    order, cut, rows = two_length_split(torch.tensor([8, 1, 8, 2]), 8)
    assert cut == 2 and rows == 2 * 2 + 2 * 8 and order[:2].tolist() == [1, 3]
    assert two_length_split(torch.tensor([8, 7, 8, 7]), 8)[1:] == (0, 32)
    assert two_length_split(torch.tensor([3]), 8)[1:] == (0, 8)


def test_mask_rows_that_allow_nothing_raise_invalid_mask_error():
    net = make(3)
    gen = torch.Generator().manual_seed(3)
    obs, masks = obs_batch(4, s=3, gen=gen), random_masks((4,), 3, gen)
    masks.op[2] = False  # env 2 has no legal op
    with pytest.raises(InvalidMaskError, match="allows no action"):
        net.get_action(obs, net.get_initial_hidden(4), masks)
    # Re-evaluating a stored GERMINATE whose slot allows no blueprint is caught too.
    seq_obs = obs_batch(1, 2, s=3, gen=gen)
    masks = random_masks((1, 2), 3, gen)
    actions = torch.tensor([[[int(LifecycleOp.GERMINATE), 1, 0, 0], [0, 0, 0, 0]]])
    masks.op[:], masks.slot[:], masks.blueprint[:] = True, True, True
    masks.blueprint[0, 0, 1] = False
    with pytest.raises(InvalidMaskError, match="head blueprint"):
        net.evaluate_actions(seq_obs, actions, masks, net.get_initial_hidden(2))
