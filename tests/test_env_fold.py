"""Fold at fossilize through the env (issue 20): a width seed the controller fossilizes
becomes part of the host's layers at once (`LifecycleConfig.fold_on_fossilize`), with
the optimisers carried, the function unchanged, and masks and budgets exact as the
costs of neighbouring slots change with the folded widths."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from esper.actions import FactoredAction, LifecycleOp
from esper.env import EnvConfig, MorphogenesisEnv
from esper.lifecycle import SeedStage
from esper.model import CNNHost, LifecycleConfig

F, G, W = LifecycleOp.FOSSILIZE, LifecycleOp.GERMINATE, LifecycleOp.WAIT
# Gates that pass every seed: the test is about folding, not about the gates' verdicts.
OPEN = dict(
    min_train_epochs=1,
    blend_epochs=1,
    gate_z=0.0,
    blend_threshold=-1e9,
    fossilize_threshold=-1e9,
    prune_threshold=-1e9,
)


def make_env(depth: int = 3, max_growth: float | None = None, fold: bool = True, **kw):
    lifecycle = LifecycleConfig(**OPEN, fold_on_fossilize=fold)
    # A 64-block host diverges at the task's lr 0.05 and the governor's rollback would
    # undo the fold under test: a small lr keeps every depth healthy.
    config = EnvConfig(
        task="digits",
        task_options={"width": 1, "depth": depth, "lr": 0.005},
        slots=tuple(f"r0c{i}" for i in range(depth)),
        max_epochs=40,
        batches_per_step=1,
        lifecycle=lifecycle,
        max_growth=max_growth,
        **kw,
    )
    return MorphogenesisEnv(config)


def eval_outputs(model, x: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        out = model(x)
    model.train()
    return out


def test_fold_on_fossilize_must_be_a_bool() -> None:
    with pytest.raises(ValueError, match="fold_on_fossilize must be a bool, got 1"):
        LifecycleConfig(fold_on_fossilize=1)  # type: ignore[arg-type]


def grow_each_slot_once(env: MorphogenesisEnv, check_fold) -> set[str]:
    """Germinate ``wide_x1`` into every slot once, fossilize each when legal; returns
    the slots that were folded. ``check_fold(before_model, step_result)`` runs at each
    fossilize (before_model: a copy of the model just before it)."""
    wide = env.action_spec.blueprints.index("wide_x1")
    planted: set[int] = set()
    folded: set[str] = set()
    for _ in range(env.max_epochs):
        masks = env.conditional_masks()
        fossilizable = [i for i, ok in enumerate(masks.slot[F].tolist()) if ok]
        free = [
            i
            for i, ok in enumerate(masks.slot[G].tolist())
            if ok and i not in planted and bool(masks.blueprint[i, wide])
        ]
        if bool(masks.op[F]) and fossilizable:
            action = FactoredAction(F, fossilizable[0])
        elif bool(masks.op[G]) and free:
            action = FactoredAction(G, free[0], wide, 0)
            planted.add(free[0])
        else:
            action = FactoredAction.wait()
        before = copy.deepcopy(env.model) if action.op == F else None
        begun = env.begin_step(action)
        if before is not None:
            sid = env.slot_config.slot_id_for_index(action.slot)
            check_fold(before, sid)
            folded.add(sid)
        env.end_step(begun, env.train_phase())
        if len(folded) == env.slot_config.num_slots:
            break
    return folded


def test_widening_every_slot_through_the_env_and_folding_gives_the_static_wider_host():
    env = make_env()
    env.reset(seed=5)
    x = env.data.val_x[:16]

    def check_fold(before, sid):
        model = env.model
        # Same function as the unfolded fossil just before the fold (1e-6).
        torch.testing.assert_close(
            eval_outputs(model, x), eval_outputs(before, x), atol=1e-6, rtol=1e-6
        )
        assert model.slot_state(sid).stage == SeedStage.DORMANT
        # The fossil's parameters are counted as fossils still (growth, budget and reward
        # do not move); a live neighbour seed gains zero weights to the folded units.
        after, was = model.param_counts(), before.param_counts()
        assert after.host == was.host
        assert after.fossils == was.fossils + sum(p.numel() for p in before.seed_parameters(sid))
        assert after.live_seeds >= was.live_seeds - sum(
            p.numel() for p in before.seed_parameters(sid)
        )
        # The host optimiser holds every host parameter with state of its shape.
        opt = env.trainer.host_optimizer
        held = {id(p) for g in opt.param_groups for p in g["params"]}
        for p in model.host.parameters():
            assert id(p) in held
            buf = opt.state.get(p, {}).get("momentum_buffer")
            assert buf is None or buf.shape == p.shape

    folded = grow_each_slot_once(env, check_fold)
    assert folded == set(env.slot_config.slot_ids)
    model = env.model
    static = CNNHost(width=2, depth=3)
    assert model.host.widths == static.widths
    assert sum(p.numel() for p in model.host.parameters()) == 496
    assert model.param_counts().total == 496  # 163 as built + 333 folded fossil params
    assert all(s.stage == SeedStage.DORMANT for s in model.slot_states())
    static.load_state_dict(model.host.state_dict())  # same architecture, tensor for tensor
    torch.testing.assert_close(
        eval_outputs(static, x), eval_outputs(model, x), atol=1e-6, rtol=1e-6
    )
    # ...and it trains on as that host: a further env step runs and stays finite.
    _, _, _, _, info = env.step(FactoredAction.wait())
    assert math.isfinite(info["val_loss"])


def test_without_fold_on_fossilize_the_fossils_stay_seeds() -> None:
    env = make_env(fold=False)
    env.reset(seed=5)
    grow_each_slot_once(env, lambda before, sid: None)
    assert all(s.stage == SeedStage.FOSSILIZED for s in env.model.slot_states())
    assert sum(p.numel() for p in env.model.host.parameters()) == 163


def true_cost(env: MorphogenesisEnv, slot: int, blueprint: str) -> int:
    """Parameters germinating ``blueprint`` in ``slot`` really adds (on a copy), with the
    learned gate, as the cost table counts it (the gated blend is offered)."""
    model = copy.deepcopy(env.model)
    sid = env.slot_config.slot_id_for_index(slot)
    before = model.param_counts().total
    model.germinate(sid, blueprint, "gated")
    return model.param_counts().total - before


@pytest.mark.parametrize("depth", [1, 3, 8, 64])
def test_masks_and_budget_stay_exact_as_folds_change_neighbours_costs(depth: int) -> None:
    env = make_env(depth=depth, max_growth=2.0)
    env.reset(seed=1)
    names = env.action_spec.blueprints
    wide = names.index("wide_x1")
    width_bps = [j for j, n in enumerate(names) if n.startswith("wide_")]
    targets = sorted({0, depth // 2})  # slots grown and folded
    neighbour = 1 if depth > 1 else None
    cost_before = int(env.blueprint_costs[neighbour, wide]) if neighbour is not None else None
    folded: set[int] = set()
    for _ in range(env.max_epochs):
        masks = env.conditional_masks()
        fossilizable = [i for i, ok in enumerate(masks.slot[F].tolist()) if ok]
        plant = [i for i in targets if bool(masks.slot[G][i]) and i not in folded]
        plant = [i for i in plant if env.model.slot_states()[i].stage == SeedStage.DORMANT]
        if bool(masks.op[F]) and fossilizable:
            action = FactoredAction(F, fossilizable[0])
            folded.add(fossilizable[0])
        elif plant and bool(masks.blueprint[plant[0], wide]):
            action = FactoredAction(G, plant[0], wide, 0)
        else:
            action = FactoredAction.wait()
        _, _, _, _, info = env.step(action)
        assert info["governor_event"] is None  # a rollback would undo the fold under test
        # After every step (germinate, fossilize + fold): exact costs and budget masks.
        masks, costs, left = env.conditional_masks(), env.blueprint_costs, env.budget_left()
        checked = {0, 1, 2, depth // 2 - 1, depth // 2, depth // 2 + 1, depth - 1}
        for i, state in enumerate(env.model.slot_states()):
            if state.stage != SeedStage.DORMANT or i not in checked:
                continue
            for j in width_bps:
                cost = true_cost(env, i, names[j])
                assert int(costs[i, j]) == cost, (depth, i, names[j])
                assert bool(masks.blueprint[i, j]) == (cost <= left), (depth, i, names[j])
        if folded >= set(targets) and all(
            env.model.slot_states()[i].stage == SeedStage.DORMANT for i in targets
        ):
            break
    assert folded >= set(targets)
    if neighbour is not None and 0 in folded:
        # The next slot's fan-in now reads the folded unit too: its cost grew.
        assert int(env.blueprint_costs[neighbour, wide]) > cost_before


def test_a_fold_in_a_batched_vector_env_keeps_each_envs_lone_trajectory() -> None:
    """Env 0 folds at step 3 (its host is wider from then on), env 1 stays narrow: with
    batched host training each env's trajectory is still the one it has alone (float64)."""
    from esper.env import VectorMorphogenesisEnv
    from esper.training import get_task

    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        data = get_task("digits").make_data(seed=0)
        data = type(data)(
            **{**vars(data), "train_x": data.train_x.double(), "val_x": data.val_x.double()}
        )
        config = EnvConfig(
            task="digits",
            task_options={"width": 1},
            batches_per_step=2,
            max_epochs=7,
            lifecycle=LifecycleConfig(**OPEN, fold_on_fossilize=True),
        )
        wide = MorphogenesisEnv(config, data=data).action_spec.blueprints.index("wide_x1")
        script = {0: {0: FactoredAction(G, 0, wide, 0), 3: FactoredAction(F, 0)}, 1: {}}

        def run(env_ids: list[int], batched: bool) -> dict[int, list[tuple]]:
            vec = VectorMorphogenesisEnv(len(env_ids), config, batched=batched, data=data)
            vec.reset(seeds=[100 + i for i in env_ids])
            trace: dict[int, list[tuple]] = {i: [] for i in env_ids}
            for t in range(6):
                step = vec.step([script[i].get(t, FactoredAction.wait()) for i in env_ids])
                for k, i in enumerate(env_ids):
                    info = step.infos[k]
                    trace[i].append((info["val_loss"], info["quality"], str(info["events"])))
            widths = {i: vec.envs[k].model.host.widths for k, i in enumerate(env_ids)}
            vec.close()
            return trace, widths

        together, widths = run([0, 1], batched=True)
        assert widths[0] == [2, 2, 4] and widths[1] == [1, 2, 4]  # env 0 folded
        assert "folded" in " ".join(e for _, _, e in together[0])
        for i in (0, 1):
            alone, _ = run([i], batched=False)
            for (a_loss, a_q, a_ev), (b_loss, b_q, b_ev) in zip(together[i], alone[i], strict=True):
                assert a_loss == pytest.approx(b_loss, rel=1e-9) and a_q == b_q and a_ev == b_ev
    finally:
        torch.set_default_dtype(before)
