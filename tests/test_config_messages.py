"""Bad settings added with issues 12, 13 and 16: each error names the value and the rule."""

import pytest

from esper.env.masks import blueprint_cost_table
from esper.model import CNNHost, MorphogeneticModel
from esper.policies.build import BuildConfig
from esper.rl import PPOConfig
from esper.training.config import GovernorConfig, TrainConfig


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: TrainConfig(credit_samples=0), r"credit_samples must be >= 1 or None.*got 0"),
        (lambda: GovernorConfig(min_rise=-0.1), r"min_rise >= 0; got 3.0, 2, -0.1"),
        (lambda: GovernorConfig(divergence_factor=1.0), r"divergence_factor > 1.*got 1.0"),
        (lambda: PPOConfig(prior_kl_coef=-1.0), r"prior_kl_coef must be >= 0, got -1.0"),
        (lambda: BuildConfig(teacher="oracle"), r"unknown teacher 'oracle'; allowed: heuristic"),
        (lambda: BuildConfig(envs=0), r"envs must be >= 1, got 0"),
        (
            lambda: MorphogeneticModel(CNNHost(width=1), width_init="zeros"),
            r"width_init must be one of .*'random'.*got 'zeros'",
        ),
    ],
)
def test_bad_setting_is_named_in_the_error(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_width_costs_need_the_model():
    model = MorphogeneticModel(CNNHost(width=1))
    with pytest.raises(ValueError, match=r"width blueprint 'wide_x1'.*pass model="):
        blueprint_cost_table(model.slot_config, ("wide_x1",))


def test_folding_a_width_seed_that_is_not_fossilized_names_the_slot():
    model = MorphogeneticModel(CNNHost(width=1))
    model.germinate("r0c1", "wide_x1")
    with pytest.raises(ValueError, match=r"slot r0c1 holds one that is TRAINING"):
        model.fold_width()
