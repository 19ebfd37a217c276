"""The shared-prefix counterfactual pass equals one full validation pass per seed."""

from __future__ import annotations

import dataclasses
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from esper.lifecycle import SeedStage
from esper.model import CNNHost, LifecycleConfig, MorphogeneticModel, TransformerHost
from esper.training import (
    Trainer,
    fast_counterfactuals,
    get_task,
    reference_counterfactuals,
    variants_to_measure,
)
from esper.training.counterfactual import (
    sample_variants,
    sampled_counterfactuals,
)
from esper.training.flops import FlopMeter, count_flops
from esper.training.objective import evaluate, quality

FAST_LIFECYCLE = LifecycleConfig(min_train_epochs=1, blend_epochs=2)


def advance_to(model: MorphogeneticModel, slot_id: str, stage: SeedStage) -> None:
    """Drive one seed through the real lifecycle to ``stage`` (others stay where they are)."""
    model.record_contribution(slot_id, 1.0)
    while model.slot_state(slot_id).stage < stage:
        if stage == SeedStage.FOSSILIZED and model.slot_state(slot_id).stage == SeedStage.HOLDING:
            model.fossilize(slot_id)
            break
        model.slots[slot_id].step_epoch()
    assert model.slot_state(slot_id).stage == stage


def randomise_seeds(model: MorphogeneticModel, gen: torch.Generator) -> None:
    """Seeds start as the identity; give them weights so that switching them matters."""
    with torch.no_grad():
        for sid in model.slot_config.slot_ids:
            for p in model.seed_parameters(sid):
                p.copy_(0.3 * torch.randn(p.shape, generator=gen, dtype=p.dtype))


def grown_model(host, plan: dict[str, tuple[str, str, SeedStage]]) -> MorphogeneticModel:
    model = MorphogeneticModel(host, lifecycle=FAST_LIFECYCLE).double()
    for sid, (blueprint, blend, stage) in plan.items():
        model.germinate(sid, blueprint, blend)
        advance_to(model, sid, stage)
    randomise_seeds(model, torch.Generator().manual_seed(7))
    return model.eval()


def assert_same(fast, ref):
    assert fast.val_loss == pytest.approx(ref.val_loss, abs=1e-5)
    assert fast.val_acc == pytest.approx(ref.val_acc, abs=1e-5)
    assert fast.contributions.keys() == ref.contributions.keys()
    for sid in ref.contributions:
        assert fast.contributions[sid] == pytest.approx(ref.contributions[sid], abs=1e-5)
        assert fast.variant_losses[sid] == pytest.approx(ref.variant_losses[sid], abs=1e-5)
    assert fast.prospective == ref.prospective


CNN_PLAN = {
    "r0c0": ("conv_light", "linear", SeedStage.BLENDING),
    "r0c1": ("attention", "gated", SeedStage.HOLDING),
    "r0c2": ("conv_heavy", "sigmoid", SeedStage.TRAINING),
    "r0c3": ("norm", "linear", SeedStage.FOSSILIZED),
}


@pytest.mark.parametrize(("eval_batch_size", "max_rows"), [(1024, None), (7, None), (64, 10)])
def test_fast_equals_reference_on_cnn_with_seeds_in_every_stage(eval_batch_size, max_rows):
    torch.manual_seed(0)
    model = grown_model(CNNHost(3, 10, width=4, depth=5, image_size=16), CNN_PLAN)
    x = torch.rand(40, 3, 16, 16, dtype=torch.float64)
    y = torch.randint(0, 10, (40,))
    variants = variants_to_measure(model)
    assert variants == {"r0c0": 0.0, "r0c1": 0.0, "r0c2": 1.0, "r0c3": 0.0}
    fast = fast_counterfactuals(model, x, y, "classification", variants, eval_batch_size, max_rows)
    ref = reference_counterfactuals(model, x, y, "classification", variants, eval_batch_size)
    assert_same(fast, ref)
    assert any(abs(v) > 0.01 for v in fast.variant_losses.values())  # seeds really matter
    assert fast.variant_losses["r0c1"] != pytest.approx(fast.val_loss)


def test_fast_equals_reference_on_transformer_lm():
    torch.manual_seed(1)
    host = TransformerHost(vocab_size=11, d_model=16, n_heads=2, n_layers=4, max_seq_len=12)
    plan = {
        "r0c0": ("lora", "linear", SeedStage.HOLDING),
        "r0c1": ("mlp", "sigmoid", SeedStage.TRAINING),
        "r0c3": ("attention", "gated", SeedStage.BLENDING),
    }
    model = grown_model(host, plan)
    x = torch.randint(0, 11, (9, 12))
    y = torch.randint(0, 11, (9, 12))
    variants = variants_to_measure(model)
    fast = fast_counterfactuals(model, x, y, "lm", variants, eval_batch_size=8)
    ref = reference_counterfactuals(model, x, y, "lm", variants, eval_batch_size=8)
    assert_same(fast, ref)
    assert fast.quality == pytest.approx(-fast.val_loss)
    assert fast.prospective == {"r0c1"}


def test_contribution_signs_follow_the_definitions():
    """Off-variants: live minus off; on-variants (TRAINING): on minus live."""
    torch.manual_seed(2)
    host = CNNHost(1, 10, width=2, depth=3, image_size=8)
    model = grown_model(
        host,
        {
            "r0c0": ("conv_light", "linear", SeedStage.HOLDING),
            "r0c2": ("conv_light", "linear", SeedStage.TRAINING),
        },
    )
    x, y = torch.rand(30, 1, 8, 8, dtype=torch.float64), torch.randint(0, 10, (30,))
    fast = fast_counterfactuals(model, x, y, "lm", variants_to_measure(model))
    live = evaluate(model, x, y, 64)
    off = evaluate(model, x, y, 64, alpha_override={"r0c0": 0.0})
    on = evaluate(model, x, y, 64, alpha_override={"r0c2": 1.0})
    assert fast.contributions["r0c0"] == pytest.approx(-live.loss + off.loss, abs=1e-9)
    assert fast.contributions["r0c2"] == pytest.approx(-on.loss + live.loss, abs=1e-9)
    assert fast.quality == pytest.approx(quality("lm", live.loss, live.accuracy), abs=1e-9)


def test_no_seeds_means_plain_validation_and_no_contributions():
    model = MorphogeneticModel(CNNHost(1, 10, width=2, depth=3, image_size=8)).eval()
    x, y = torch.rand(20, 1, 8, 8), torch.randint(0, 10, (20,))
    assert variants_to_measure(model) == {}
    fast = fast_counterfactuals(model, x, y, "classification", {})
    plain = evaluate(model, x, y, 1024)
    assert fast.contributions == {} and fast.val_loss == pytest.approx(plain.loss, abs=1e-6)


def test_bench_quick_runs_and_reports_every_case():
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        [sys.executable, str(root / "bench" / "bench_counterfactual.py"), "--quick"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        check=True,
    ).stdout
    rows = [line.split() for line in out.splitlines() if line.startswith(("cnn", "transformer"))]
    assert len(rows) == 7
    assert all(float(r[-1]) > 0 and float(r[-2]) > 0 for r in rows)


# -- sampled credit (issue 16) ---------------------------------------------------------


def holding_model(num_slots: int, width: int = 1, image_size: int = 8) -> MorphogeneticModel:
    """A CNN host with a HOLDING seed (alpha 1, random weights) in every slot."""
    torch.manual_seed(3)
    host = CNNHost(1, 10, width=width, depth=num_slots, image_size=image_size)
    plan = {f"r0c{i}": ("conv_light", "linear", SeedStage.HOLDING) for i in range(num_slots)}
    return grown_model(host, plan)


def test_sampled_credit_is_unbiased_and_each_reading_exact():
    model = holding_model(8, width=2)
    x, y = torch.rand(48, 1, 8, 8, dtype=torch.float64), torch.randint(0, 10, (48,))
    variants = variants_to_measure(model)
    exact = fast_counterfactuals(model, x, y, "classification", variants)
    gen = torch.Generator().manual_seed(0)
    draws, counts = 400, dict.fromkeys(variants, 0)
    totals = []
    for _ in range(draws):
        res = sampled_counterfactuals(model, x, y, "classification", variants, 3, gen)
        assert len(res.contributions) == 3 and res.inclusion_prob == pytest.approx(3 / 8)
        assert res.unmeasured == frozenset(variants) - res.contributions.keys()
        for sid, c in res.contributions.items():
            counts[sid] += 1
            assert c == pytest.approx(exact.contributions[sid], abs=1e-9)
            assert res.contribution_se[sid] == pytest.approx(exact.contribution_se[sid])
        totals.append(res.total_contribution())
    t = torch.tensor(totals, dtype=torch.float64)
    mc_error = float(t.std()) / draws**0.5
    assert float(t.std()) > 0  # the estimator really varies from draw to draw
    assert abs(float(t.mean()) - exact.total_contribution()) < 4 * mc_error
    # Every seed is drawn with probability 3/8 (binomial, 4 sigma).
    for sid, k in counts.items():
        assert abs(k / draws - 3 / 8) < 4 * (3 / 8 * 5 / 8 / draws) ** 0.5, sid


def test_sampled_equals_exact_when_samples_cover_every_seed():
    model = holding_model(4, width=2)
    x, y = torch.rand(30, 1, 8, 8, dtype=torch.float64), torch.randint(0, 10, (30,))
    variants = variants_to_measure(model)
    exact = fast_counterfactuals(model, x, y, "classification", variants)
    for m in (4, 9):
        gen = torch.Generator().manual_seed(1)
        res = sampled_counterfactuals(model, x, y, "classification", variants, m, gen)
        assert res == exact and res.inclusion_prob == 1.0 and res.unmeasured == frozenset()
    with pytest.raises(ValueError, match="credit samples must be >= 1, got 0"):
        sample_variants(variants, 0, torch.Generator())


def test_sampled_cost_is_linear_in_samples_not_in_seeds():
    """FLOPs counted: m sampled seeds add at most m validation passes, at 16 or 32 seeds;
    the exact pass at 32 seeds costs far more than that."""
    x, y = torch.rand(64, 1, 8, 8), torch.randint(0, 10, (64,))
    for num_slots in (16, 32):
        model = holding_model(num_slots).float()
        variants = variants_to_measure(model)
        _, plain = count_flops(lambda: evaluate(model, x, y, 1024))  # noqa: B023
        gen = torch.Generator().manual_seed(2)
        for m in (1, 2, 4):
            for _ in range(3):
                _, cost = count_flops(
                    lambda: sampled_counterfactuals(model, x, y, "classification", variants, m, gen)  # noqa: B023
                )
                assert plain < cost <= (1 + m) * plain
        if num_slots == 32:
            _, exact = count_flops(
                lambda: fast_counterfactuals(model, x, y, "classification", variants)  # noqa: B023
            )
            assert exact > 8 * plain


def test_sampled_pass_flops_equal_the_counted_pass():
    model = holding_model(8).float()
    x, y = torch.rand(37, 1, 8, 8), torch.randint(0, 10, (37,))
    variants = variants_to_measure(model)
    meter = FlopMeter()
    for subset in ({}, {"r0c0": 0.0}, {"r0c1": 0.0, "r0c5": 0.0, "r0c7": 0.0}, variants):
        _, counted = count_flops(
            lambda: fast_counterfactuals(model, x, y, "classification", subset, 16)  # noqa: B023
        )
        summed = meter.add_counterfactuals(model.eval(), x, subset)
        assert summed == counted > 0


def test_trainer_sampled_credit_keeps_stale_readings_out_of_the_gates():
    task = get_task("synthetic", shape=(1, 8, 8), n_train=64, n_val=32, batches_per_step=1)
    data = task.make_data()

    def trainer(seed: int) -> tuple[Trainer, list[str]]:
        torch.manual_seed(0)
        model = MorphogeneticModel(
            task.make_host(data), task.default_slots, lifecycle=FAST_LIFECYCLE
        )
        slots = list(model.slot_config.slot_ids)
        for sid in slots:
            model.germinate(sid, "conv_light")
        config = dataclasses.replace(task.hparams, credit_samples=1)
        return Trainer(model, data, config, seed=seed), slots

    t, slots = trainer(0)
    assert len(slots) >= 2
    for sid in slots:  # a reading high enough for the blend gate, taken "long ago"
        t.model.record_contribution(sid, 5.0, 0.1)
    step = t.train_step()
    assert len(step.contributions) == 1
    measured = next(iter(step.contributions))
    for sid in slots:
        state = t.model.slot_state(sid)
        if sid != measured:  # not drawn: last value kept, no error, no gate acted
            assert state.contribution == 5.0 and math.isnan(state.contribution_se)
            assert state.stage == SeedStage.TRAINING
        else:
            assert math.isfinite(state.contribution_se)

    # FLOPs of a sampled validation: summed per variant, equal to the counted pass.
    for _ in range(3):
        before = t.flops.eval
        res = t.validate()
        wanted = variants_to_measure(t.model.eval())
        subset = {sid: wanted[sid] for sid in res.contributions}
        _, counted = count_flops(
            lambda: fast_counterfactuals(t.model, data.val_x, data.val_y, t.kind, subset)  # noqa: B023
        )
        t.model.train()
        assert t.flops.eval - before == counted and res.unmeasured

    # The draws are this env's own: the same seed draws the same, another seed differs.
    def draws(seed: int) -> list[str]:
        tr, _ = trainer(seed)
        return [next(iter(tr.train_step().contributions)) for _ in range(6)]

    assert draws(0) == draws(0)
    assert draws(0) != draws(1)
