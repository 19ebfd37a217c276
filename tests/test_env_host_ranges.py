"""A curriculum of hosts: width and depth drawn per episode from the episode seed
(EnvConfig.host_ranges, RunConfig's env.host_widths / env.host_depths)."""

import pytest

from esper.env import EnvConfig, MorphogenesisEnv
from esper.run_config import EnvSection, RunConfig

TINY = {"max_epochs": 2, "batches_per_step": 1}


def test_host_options_are_drawn_per_episode_from_the_seed_only():
    env = MorphogenesisEnv(**TINY, host_ranges={"width": (1, 3), "depth": (3, 5)})
    seen = {}
    for seed in range(16):
        _, info = env.reset(seed=seed)
        drawn = info["host_options"]
        assert 1 <= drawn["width"] <= 3 and 3 <= drawn["depth"] <= 5
        assert len(env.model.host.blocks) == drawn["depth"]  # the host built is the draw
        assert env.model.slot_config.slot_ids == ("r0c0", "r0c1", "r0c2")  # slots stay
        seen[seed] = drawn
    assert len({d["width"] for d in seen.values()}) == 3
    assert len({d["depth"] for d in seen.values()}) == 3
    # same seed, same host: in another env, and after other episodes
    other = MorphogenesisEnv(**TINY, host_ranges={"width": (1, 3), "depth": (3, 5)})
    assert other.reset(seed=7)[1]["host_options"] == seen[7]
    # the draw has its own generator: the λ draw of a seed does not move with it
    lam = MorphogenesisEnv(**TINY, growth_penalty_range=(0.0, 0.2))
    both = MorphogenesisEnv(**TINY, growth_penalty_range=(0.0, 0.2), host_ranges={"width": (1, 3)})
    assert lam.reset(seed=3)[1]["growth_penalty"] == both.reset(seed=3)[1]["growth_penalty"]


def test_without_ranges_the_host_is_the_tasks():
    env = MorphogenesisEnv(**TINY, task_options={"width": 1})
    _, info = env.reset(seed=0)
    assert info["host_options"] == {} and env.model.param_counts().host == 163


@pytest.mark.parametrize(
    "bad", [{"width": (0, 2)}, {"width": (3, 1)}, {"width": (1.5, 2)}, {"width": 2}]
)
def test_bad_ranges_are_refused_naming_the_option(bad):
    with pytest.raises(ValueError, match=r"host_ranges\['width'\]"):
        EnvConfig(host_ranges=bad)


def test_a_drawn_host_without_the_env_slots_is_refused_at_construction():
    with pytest.raises(ValueError, match="cannot hold the env's slots"):
        MorphogenesisEnv(**TINY, host_ranges={"depth": (2, 3)})


def test_run_config_passes_widths_and_depths_to_the_env():
    cfg = RunConfig(env=EnvSection(host_widths=(1, 3)))
    assert dict(cfg.env_config().host_ranges) == {"width": (1, 3)}
    assert dict(RunConfig().env_config().host_ranges) == {}


def test_train_defaults_draw_lambda_unless_a_lambda_is_given():
    from esper.run_config import load_config

    assert load_config(None).env.growth_penalty_range == (0.005, 0.2)
    # a λ without a range fixes λ (and an old run's config.toml, which omits a None
    # range, resumes with the λ it was trained at)
    fixed = load_config(None, {"env": {"growth_penalty": 0.1}})
    assert fixed.env.growth_penalty_range is None and fixed.env_config().growth_penalty == 0.1
    both = load_config(None, {"env": {"growth_penalty": 0.1, "growth_penalty_range": [0, 0.3]}})
    assert both.env.growth_penalty_range == (0.0, 0.3)
    # the main job's PPO settings survive setting another [ppo] key
    ppo = load_config(None, {"ppo": {"ent_coef": 0.02}}).ppo
    assert (ppo.learning_rate, ppo.num_minibatches, ppo.ent_coef) == (1e-3, 8, 0.02)
