"""One growth step for the env and the Grower (esper.env.growth_step, issue 19).

The Grower inside a user's loop must show a policy the observation the env trained it
on, hold a seed whose credit reading is NaN as the env does, and every env must mask
with its own blueprint costs, rebuilt when its structure changes.
"""

import copy
import math

import pytest
import torch

from esper.actions import FactoredAction, LifecycleOp
from esper.env import DEFAULT_SCHEMA, EnvConfig, MorphogenesisEnv, VectorMorphogenesisEnv
from esper.grow import Grower, GrowerConfig, attach
from esper.lifecycle import SeedStage
from esper.model import LifecycleConfig, MorphogeneticModel
from esper.training import get_task
from esper.training.data import BatchStream
from esper.training.objective import EvalTotals, task_loss

G, W = LifecycleOp.GERMINATE, FactoredAction.wait()
# Every finite reading passes the blend gate and nothing is pruned: stages follow the
# script alone, whatever small float differences the two measurements have.
EASY = LifecycleConfig(
    min_train_epochs=1, blend_epochs=2, blend_threshold=-10.0, prune_threshold=-10.0
)


class Script:
    """A controller that plays fixed actions (then WAIT) and keeps what it was shown."""

    def __init__(self, actions):
        self.actions, self.seen = list(actions), []

    def initial_state(self):
        return 0

    def act(self, observation, masks, state):
        self.seen.append(({k: torch.as_tensor(v).clone() for k, v in observation.items()}, masks))
        return (self.actions[state] if state < len(self.actions) else W), state + 1


def _users_epoch(model, optimizer, stream, data, batches) -> EvalTotals:
    """The user's loop, written as the env's Trainer trains (SGD, TRAINING seeds in
    their own pass), so that both see the same model after every step."""
    totals = EvalTotals()
    model.train()
    for idx in stream.step_batches(batches):
        x, y = data.train_x[idx], data.train_y[idx]
        optimizer.zero_grad(set_to_none=True)
        logits = model(x)
        own = model.seed_forward(x)
        loss = task_loss(logits, y)
        if own is not None:
            loss = loss + task_loss(own, y)
        loss.backward()
        optimizer.step()
        totals.add(logits.detach(), y)
    return totals


def test_the_growers_observation_is_the_envs_for_the_same_model_data_lambda_and_budget():
    lam, budget = 0.12, 0.6
    env = MorphogenesisEnv(
        EnvConfig(
            task="digits", max_epochs=5, batches_per_step=3, growth_penalty=lam,
            max_growth=budget, lifecycle=EASY,
        )
    )  # fmt: skip
    env_obs = [env.reset(seed=4)[0]]
    # conv_light into r0c1, then a width seed into r0c0 (a bigger one would exceed the
    # budget, so the masks depend on it); both train in their
    # own pass, blend and hold, so the grad-norm and contribution features are exercised.
    bp = env.action_spec.blueprints
    script = [
        FactoredAction(G, 1, bp.index("conv_light"), 0),
        W,
        FactoredAction(G, 0, bp.index("wide_half"), 1),
        W,
    ]
    cfg, data = env.train_config, env.data
    model = copy.deepcopy(env.model)  # the same untrained host
    optimizer = torch.optim.SGD(
        model.host_parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
    )
    stream = BatchStream(data.n_train, cfg.batch_size, seed=env.episode_seed)
    val = [
        (data.val_x[i : i + cfg.eval_batch_size], data.val_y[i : i + cfg.eval_batch_size])
        for i in range(0, data.n_val, cfg.eval_batch_size)
    ]
    controller = Script(script)
    grower = Grower(
        model, optimizer, val, controller,
        GrowerConfig(
            max_steps=env.max_epochs, max_growth=budget, growth_penalty=lam,
            seed=env.episode_seed, plateau_tolerance=cfg.plateau_tolerance, blueprints=bp,
        ),
    )  # fmt: skip
    assert grower.action_space == env.action_spec
    env_masks = [env.conditional_masks()]
    for action in [W, *script]:  # the env's reset decision is the Grower's implicit WAIT
        obs, *_ = env.step(action)
        env_obs.append(obs)
        env_masks.append(env.conditional_masks())
        totals = _users_epoch(model, optimizer, stream, data, cfg.batches_per_step)
        grower.step(train_loss=totals.loss, train_metric=totals.accuracy)
    assert {s.stage for s in env.model.slot_states()} >= {SeedStage.BLENDING, SeedStage.HOLDING}
    assert [s.stage for s in model.slot_states()] == [s.stage for s in env.model.slot_states()]
    for t, (seen, masks) in enumerate(controller.seen, start=1):
        for key in ("global", "slots"):
            # Equal in practice; the tolerance leaves room for summation order (the env
            # measures all seeds in one shared pass, the Grower one pass per seed).
            mine, envs = seen[key], torch.as_tensor(env_obs[t][key])
            assert torch.allclose(mine, envs, rtol=0, atol=1e-6), (t, key, mine - envs)
        for a, b in zip(masks.as_tuple(), env_masks[t].as_tuple(), strict=True):
            assert torch.equal(a, b), t
    # What the old Grower got wrong is exercised: the first step's deltas, last op,
    # λ and budget inputs, and a seed's gradient norm.
    first, second = controller.seen[0][0], controller.seen[1][0]
    names = DEFAULT_SCHEMA.global_features
    assert first["global"][names.index("last_op_wait")] == 1.0
    assert first["global"][names.index("quality_delta")] != 0.0
    assert first["global"][names.index("max_growth")] < 1.0  # a budget, not "none"
    assert float(second["slots"][1, DEFAULT_SCHEMA.slot_index("grad_norm")]) > 0


def _poison(params) -> None:
    """A seed whose switched-on pass gives NaN (the live model does not run it)."""
    with torch.no_grad():
        for p in params:
            p.fill_(math.nan)


def test_a_nan_credit_reading_holds_a_seed_at_the_blend_gate_in_the_env():
    # Gate checked at the second step, where any finite reading would pass it.
    lifecycle = LifecycleConfig(min_train_epochs=2, blend_threshold=-10.0)
    env = MorphogenesisEnv(task="digits", max_epochs=3, batches_per_step=2, lifecycle=lifecycle)
    env.reset(seed=0)
    env.step(FactoredAction(G, 1, env.action_spec.blueprints.index("conv_light"), 0))
    _poison(env.model.seed_parameters("r0c1"))
    *_, info = env.step(W)
    assert math.isnan(info["contribution_se"]["r0c1"])
    assert env.model.slot_state("r0c1").stage == SeedStage.TRAINING


def _digits_model(lifecycle):
    task = get_task("digits")
    data = task.make_data(seed=0)
    torch.manual_seed(0)
    return MorphogeneticModel(task.make_host(data), lifecycle=lifecycle), [(data.val_x, data.val_y)]


def _users_cnn(lifecycle):
    torch.manual_seed(0)
    x, y = torch.randn(32, 1, 8, 8), torch.randint(0, 10, (32,))
    net = torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(),
        torch.nn.Linear(4 * 64, 10),
    )  # fmt: skip
    return attach(net, ["0"], x[:2], lifecycle), [(x, y)]


@pytest.mark.parametrize("make", [_digits_model, _users_cnn], ids=["host", "user"])
def test_a_nan_credit_reading_holds_a_seed_at_the_blend_gate_in_the_grower(make):
    model, val = make(LifecycleConfig(min_train_epochs=1, blend_threshold=-10.0))
    grower = Grower(model, None, val, "static", GrowerConfig(max_steps=3))
    sid = model.slot_config.slot_ids[0]
    model.germinate(sid, "conv_light")
    _poison(model.seed_parameters(sid))
    step = grower.step()  # the old Grower read NaN as 0.0 +- 1e6 and let the seed blend
    assert step.contributions[sid] == 0.0 and not step.changes
    assert math.isnan(model.slot_state(sid).contribution_se)
    assert model.slot_state(sid).stage == SeedStage.TRAINING


def test_every_env_masks_with_its_own_costs_rebuilt_after_a_structural_change(monkeypatch):
    vec = VectorMorphogenesisEnv(
        2, EnvConfig(task="digits", max_epochs=4, batches_per_step=1, max_growth=0.5)
    )
    vec.reset(seed=0)
    # Stands in for growth sites whose costs follow the model's structure (a seed that
    # widens a layer widens the seeds after it): each live seed doubles every cost.
    for env in vec.envs:
        original = env.model.seed_param_count

        def doubled(sid, bp, blend=None, model=env.model, original=original):
            live = sum(s.stage == SeedStage.TRAINING for s in model.slot_states())
            cost = original(sid, bp, blend)
            return None if cost is None else cost * 2**live

        monkeypatch.setattr(env.model, "seed_param_count", doubled)
    norm = vec.action_spec.blueprints.index("norm")
    before = vec.envs[1].blueprint_costs.clone()
    vec.step([W, FactoredAction(G, 0, norm, 0)])  # env 1 grows, env 0 does not
    costs = [env.blueprint_costs for env in vec.envs]
    assert torch.equal(costs[0], before) and torch.equal(costs[1], 2 * before)
    masks, each = vec.masks(), [env.conditional_masks() for env in vec.envs]
    for e in range(2):
        for a, b in zip(masks[e].as_tuple(), each[e].as_tuple(), strict=True):
            assert torch.equal(a, b), e
    # The budget (248 params) takes conv_light in r0c1 at 1x cost (152), not at 2x.
    light = vec.action_spec.blueprints.index("conv_light")
    assert masks.blueprint[0, 1, light] and not masks.blueprint[1, 1, light]
    vec.close()
