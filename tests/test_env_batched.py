"""Batched host training (``VectorMorphogenesisEnv(batched=True)``): an env's trajectory
is the one it has alone, with seeds in different slots per env and one env rolled back.

Float64 throughout: the comparison is then exact to ~1e-12, where float32 differences
(grouped kernels sum in another order) can grow chaotically on a width-2 host.
"""

import dataclasses
import math

import pytest
import torch

from esper.actions import FactoredAction, LifecycleOp
from esper.env import EnvConfig, VectorMorphogenesisEnv, lockstep
from esper.model import LifecycleConfig
from esper.training import batched as batched_module
from esper.training import get_task
from esper.training import grouped as grouped_module

STEPS = 6
SEEDS = [11, 22, 33, 44, 55]
G, F, W = LifecycleOp.GERMINATE, LifecycleOp.FOSSILIZE, FactoredAction.wait()
# (op, slot, blueprint, blend) per env and step; blueprints: 3 conv_light, 0 norm, 7 wide_x1.
SCRIPT = {
    0: {0: FactoredAction(G, 0, 3, 0), 4: FactoredAction(F, 0)},
    # At step 3 env 1's new seed trains in front of its blending width seed: its own
    # pass crosses another seed, so it runs alone (envs 0, 2, 4 run theirs grouped).
    1: {1: FactoredAction(G, 2, 7, 2), 3: FactoredAction(G, 0, 3, 0)},
    2: {0: FactoredAction(G, 1, 0, 1)},
    # Env 3's conv_light seed at slot 0 lives beside env 0's (sigmoid vs linear blend):
    # the two run as one grouped convolution, in their own passes and while blending.
    3: {0: FactoredAction(G, 0, 3, 1)},
    4: {4: FactoredAction(G, 0, 0, 0)},  # seedless until step 4: validation runs batched
}
NAN_AT = (2, 2)  # env 2's host weights turn NaN before step 2: the governor rolls it back


def _config():
    lifecycle = LifecycleConfig(
        min_train_epochs=1,
        blend_epochs=2,
        blend_threshold=-10.0,
        prune_threshold=-10.0,
        fossilize_threshold=-10.0,
    )
    return EnvConfig(
        task="digits",
        # Clipping is per env (and per seed) and weight decay elementwise: both covered.
        task_options={"grad_clip": 1.0, "weight_decay": 1e-3},
        batches_per_step=3,
        max_epochs=STEPS + 1,
        lifecycle=lifecycle,
    )


def _data():
    data = get_task("digits").make_data(seed=0)
    return dataclasses.replace(data, train_x=data.train_x.double(), val_x=data.val_x.double())


def _run(env_ids, batched, data):
    vec = VectorMorphogenesisEnv(len(env_ids), _config(), batched=batched, data=data)
    vec.reset(seeds=[SEEDS[i] for i in env_ids])
    trace = {i: [] for i in env_ids}
    for t in range(STEPS):
        for k, i in enumerate(env_ids):
            if (i, t) == NAN_AT:
                with torch.no_grad():
                    vec.envs[k].model.host.blocks[0][0].weight.fill_(math.nan)
        step = vec.step([SCRIPT[i].get(t, W) for i in env_ids])
        assert vec.last_step_batched == (batched and len(env_ids) > 1)
        for k, i in enumerate(env_ids):
            info = step.infos[k]
            trace[i].append(
                {
                    "reward": float(step.rewards[k]),
                    "obs": step.obs["slots"][k].clone(),
                    **{key: info[key] for key in ("train_loss", "val_loss", "quality", "flops")},
                    **{key: info[key] for key in ("contributions", "contribution_se")},
                    **{key: info[key] for key in ("stages", "events", "governor_event")},
                }
            )
    states = {i: vec.envs[k].model.state_dict() for k, i in enumerate(env_ids)}
    vec.close()
    return trace, states


def _close(a, b, path=""):
    if isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for key in a:
            _close(a[key], b[key], f"{path}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for k, (x, y) in enumerate(zip(a, b, strict=True)):
            _close(x, y, f"{path}[{k}]")
    elif isinstance(a, torch.Tensor):
        # Observations are float32 (one rounding of the float64 values).
        tol = {"rtol": 1e-5, "atol": 1e-6} if a.dtype == torch.float32 else {"rtol": 1e-9}
        assert torch.allclose(a.double(), b.double(), equal_nan=True, **tol), path
    elif isinstance(a, float):
        # The training loss is summed in float32 (the trainer's loss runs on float32
        # logits), in another order when batched.
        rel = 1e-6 if path.endswith("train_loss") else 1e-9
        assert a == pytest.approx(b, rel=rel, abs=1e-10, nan_ok=True), path
    else:
        assert a == b, path


@pytest.mark.parametrize("budget", [None, 1], ids=["one group", "groups of one env"])
def test_batched_trajectories_equal_each_env_alone(float64, budget, monkeypatch):
    if budget is not None:  # every env in a grouped pass of its own
        monkeypatch.setattr(batched_module, "ACTIVATION_BUDGET", budget)
    validated = []  # results of the grouped validation pass

    def counting(trainers, inner=lockstep.validate_batched):
        out = inner(trainers)
        validated.extend(r for r in out if r is not None)
        return out

    monkeypatch.setattr(lockstep, "validate_batched", counting)
    seed_passes = []  # (grouped, alone) own seed passes of each step's plan
    plan_init = grouped_module.Plan.__init__

    def recording(plan, models):
        plan_init(plan, models)
        seed_passes.append((len(plan.grouped), len(plan.alone)))

    monkeypatch.setattr(grouped_module.Plan, "__init__", recording)
    conv_groups = []  # envs per grouped convolution of conv_light seeds

    def conv_seeds(members, z, G, inner=grouped_module._grouped_conv_seeds):
        conv_groups.append(len(members))
        return inner(members, z, G)

    monkeypatch.setattr(grouped_module, "_grouped_conv_seeds", conv_seeds)
    data = _data()
    ids = list(SCRIPT)
    batched, batched_states = _run(ids, True, data)
    assert len(validated) == len(ids) * STEPS  # every env, seeds and variants included
    grouped = 2 if budget is None else 1  # several envs in one own seed pass
    assert max(g for g, _ in seed_passes) >= grouped and max(a for _, a in seed_passes) >= 1
    assert max(conv_groups) >= (2 if budget is None else 1)
    for i in ids:
        alone, alone_states = _run([i], False, data)
        _close(alone[i], batched[i], f"env{i}")
        _close(alone_states[i], batched_states[i], f"env{i}.state")
    # The script did what it is meant to: seeds trained and blended in three different
    # slots, a width seed among them, and env 2 alone was rolled back (its seed pruned).
    assert [s["governor_event"] for s in batched[2]][NAN_AT[1]] == "non_finite"
    assert all(s["governor_event"] is None for i in (0, 1, 3, 4) for s in batched[i])
    seen = {i: {stage for s in batched[i] for stage in s["stages"].values()} for i in range(3)}
    assert {"BLENDING", "FOSSILIZED"} <= seen[0] and "BLENDING" in seen[1]
    assert "PRUNED" in seen[2] or "EMBARGOED" in seen[2]


def test_batched_refuses_what_it_cannot_make_exact():
    with pytest.raises(ValueError, match="sgd"):
        VectorMorphogenesisEnv(2, task="digits", batched=True, task_options={"optimizer": "adam"})
    with pytest.raises(ValueError, match="CNNHost"):
        options = {"shape": (16,), "n_train": 64, "n_val": 32}  # an MLP host
        VectorMorphogenesisEnv(2, task="synthetic", batched=True, task_options=options)
    with pytest.raises(ValueError, match="float32"):
        VectorMorphogenesisEnv(2, task="digits", batched=True, task_options={"amp": "bf16"})


def test_run_config_flag_plays_the_same_episodes():
    from esper.run import evaluate
    from esper.run_config import EnvSection, RunConfig, RunSection

    records = []
    for batched in (False, True):
        config = RunConfig(
            run=RunSection(controller="heuristic", envs=2, batched_envs=batched),
            env=EnvSection(max_epochs=3, batches_per_step=2),
        )
        records.append(evaluate(config, episodes=2))
    for alone, batched in zip(*records, strict=True):
        assert batched.objective == pytest.approx(alone.objective, rel=1e-5)
        assert batched.counts == alone.counts and batched.params_added == alone.params_added


def _same(a, b, path=""):
    """Bit-identical nested results (NaN equal to NaN)."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for key in a:
            _same(a[key], b[key], f"{path}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for k, (x, y) in enumerate(zip(a, b, strict=True)):
            _same(x, y, f"{path}[{k}]")
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b) or torch.allclose(a, b, rtol=0, atol=0, equal_nan=True), path
    elif isinstance(a, float) and math.isnan(a):
        assert math.isnan(b), path
    else:
        assert a == b, path


def test_auto_batching_is_the_forced_path_and_equals_each_env_alone(float64):
    # batched="auto" takes the batched path here (digits, SGD, one device): its
    # trajectories are exactly those of batched=True, and each env's is its own alone.
    data = _data()
    ids = [0, 3]
    auto, auto_states = _run(ids, "auto", data)
    forced, forced_states = _run(ids, True, data)
    for i in ids:
        _same(auto[i], forced[i], f"env{i}")
        _same(auto_states[i], forced_states[i], f"env{i}.state")
        alone, alone_states = _run([i], False, data)
        _close(alone[i], auto[i], f"env{i}")
        _close(alone_states[i], auto_states[i], f"env{i}.state")


def test_auto_batching_falls_back_to_the_loop_where_the_envs_cannot_batch():
    vec = VectorMorphogenesisEnv(
        2, task="digits", batched="auto", task_options={"optimizer": "adam"}
    )
    assert not vec.batched and "sgd" in vec.batched_reason
    assert VectorMorphogenesisEnv(1, task="digits", batched="auto").batched_reason == "one env"
    assert VectorMorphogenesisEnv(2, task="digits", batched="auto").batched
    with pytest.raises(ValueError, match="True, False or \"auto\", got 'yes'"):
        VectorMorphogenesisEnv(2, task="digits", batched="yes")
