"""The Pareto protocol bench (issue 12): quick mode end to end, its statistics and the
always-grow schedule."""

import csv
import importlib
import math
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
TEXT = "In the beginning God created the heaven and the earth. " * 400


@pytest.fixture
def pareto(monkeypatch, tmp_path):
    monkeypatch.setenv("ESPER_BENCH_OUT", str(tmp_path / "out"))
    monkeypatch.syspath_prepend(str(BENCH))
    return importlib.import_module("bench_pareto")


@pytest.fixture
def lib(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    return importlib.import_module("paretolib")


def _rows(path: Path) -> list[dict]:
    with path.open() as handle:
        return list(csv.DictReader(handle))


def test_quick_run_pairs_every_arm_with_the_static_front(pareto, tmp_path, capsys):
    text = tmp_path / "text.txt"
    text.write_text(TEXT)
    pareto.main(["--quick", "--text-path", str(text)])
    out = capsys.readouterr().out
    for arm in (*pareto.ARMS, "static w=1", "static w=2"):
        assert f"| {arm} " in out
    assert "FLOPs to reach static-4 loss / static-4" in out
    root = Path(pareto.benchlib.out_dir())
    rows = _rows(root / "pareto_digits_quick_episodes.csv")
    by_arm: dict[tuple[str, str], list[dict]] = {}
    for row in rows:
        by_arm.setdefault((row["arm"], row["width"]), []).append(row)
    assert set(by_arm) == {("static", "1"), ("static", "2")} | {(a, "1") for a in pareto.ARMS}
    for arm_rows in by_arm.values():  # paired: the same seeds, in the same order
        assert [r["seed_index"] for r in arm_rows] == ["0", "1"]
    for row in rows:
        quality, objective = float(row["quality"]), float(row["objective"])
        assert 0.0 <= quality <= 1.0 and objective <= quality + 1e-9
        if row["arm"] == "static":  # training the host as it is = training it from scratch
            assert float(row["growth"]) == 0.0 and objective == pytest.approx(quality)
            assert float(row["train_flops"]) == pytest.approx(float(row["scratch_flops"]))
    assert any(int(r["germinated"]) > 0 for r in by_arm[("always-grow", "1")])
    curves = _rows(root / "pareto_text_quick_curves.csv")
    assert {r["run"] for r in curves} == {"static-2", "static-4", "grown 2→4"}
    for name in ("pareto_digits_quick.png", "pareto_text_quick.png"):
        assert (root / name).stat().st_size > 0
    # The front of one run serves the next one (only the grown arms train again).
    saved = root / "saved"
    saved.mkdir()
    (root / "pareto_digits_quick_episodes.csv").rename(saved / "pareto_digits_quick_episodes.csv")
    pareto.main(["--quick", "--tasks", "digits", "--reuse-static", str(saved)])
    again = _rows(root / "pareto_digits_quick_episodes.csv")
    assert [r for r in again if r["arm"] == "static"] == [r for r in rows if r["arm"] == "static"]
    assert "static front reused" in capsys.readouterr().out


def test_paired_difference_has_the_t_interval_of_its_standard_error(lib):
    d = lib.paired([1.0, 2.0, 3.0, 6.0], [0.0, 0.0, 0.0, 0.0])
    se = math.sqrt(((1 - 3) ** 2 + (2 - 3) ** 2 + 0 + (6 - 3) ** 2) / 3) / 2
    assert d["mean"] == pytest.approx(3.0) and d["se"] == pytest.approx(se)
    assert d["lo"] == pytest.approx(3.0 - 3.182 * se) and d["hi"] == pytest.approx(3.0 + 3.182 * se)
    with pytest.raises(ValueError, match="equal non-empty"):
        lib.paired([1.0], [1.0, 2.0])


def test_front_interpolates_in_log_params_and_flags_the_edges(lib):
    xs, ys = [100.0, 1000.0, 10_000.0], [0.5, 0.7, 0.8]
    assert lib.interp_log(xs, ys, 1000.0) == (pytest.approx(0.7), False)
    assert lib.interp_log(xs, ys, math.sqrt(1000.0 * 10_000.0))[0] == pytest.approx(0.75)
    assert lib.interp_log(xs, ys, 50.0) == (0.5, True)
    assert lib.interp_log(xs, ys, 20_000.0) == (0.8, True)


def test_always_grow_germinates_at_once_fossilizes_and_never_prunes(lib):
    from esper.actions import LifecycleOp
    from esper.env import MorphogenesisEnv
    from esper.policy import AlwaysGrowController

    env = MorphogenesisEnv(task="digits", task_options={"width": 1}, max_epochs=12,
                           batches_per_step=2)  # fmt: skip
    bp = lib.blueprint_index(env.action_spec.blueprints, ["conv_light"])
    controller = AlwaysGrowController(blueprint=bp)
    obs, _ = env.reset(seed=3)
    state, ops = controller.initial_state(), []
    for _ in range(env.max_epochs):
        masks = env.conditional_masks()
        action, state = controller.act(obs, masks, state)
        assert masks.allows(action)
        if action.op == LifecycleOp.FOSSILIZE:
            assert env.model.can_fossilize(env.slot_config.slot_id_for_index(action.slot))
        ops.append(action.op)
        obs, _, _, _, _ = env.step(action)
    assert ops[0] == LifecycleOp.GERMINATE and LifecycleOp.PRUNE not in ops
    assert ops.count(LifecycleOp.GERMINATE) >= env.slot_config.num_slots
    with pytest.raises(ValueError, match="none of"):
        lib.blueprint_index(env.action_spec.blueprints, ["nope"])


def test_waiting_until_start_step(lib):
    from esper.actions import LifecycleOp
    from esper.env import MorphogenesisEnv
    from esper.policy import AlwaysGrowController

    env = MorphogenesisEnv(task="digits", task_options={"width": 1}, max_epochs=3,
                           batches_per_step=1)  # fmt: skip
    controller = AlwaysGrowController(blueprint=0, start=2)
    obs, _ = env.reset(seed=0)
    state, ops = controller.initial_state(), []
    for _ in range(3):
        action, state = controller.act(obs, env.conditional_masks(), state)
        ops.append(action.op)
        obs, *_ = env.step(action)
    assert ops == [LifecycleOp.WAIT, LifecycleOp.WAIT, LifecycleOp.GERMINATE]


def test_lifecycle_overrides_parse_and_name_the_allowed_fields(lib):
    assert lib.lifecycle_overrides("min_train_epochs=1,blend_epochs=1") == {
        "min_train_epochs": 1,
        "blend_epochs": 1,
    }
    assert lib.lifecycle_overrides(None) == {}
    with pytest.raises(SystemExit, match="fields: min_train_epochs"):
        lib.lifecycle_overrides("min_train=1")


def test_heuristic_overrides_parse_and_name_the_allowed_fields(lib):
    assert lib.heuristic_overrides("underfit_accuracy=0.9") == {"underfit_accuracy": 0.9}
    with pytest.raises(SystemExit, match=r"--heuristic: bad item 'underfit=0.9'; fields: "):
        lib.heuristic_overrides("underfit=0.9")


def test_oracle_capture_is_a_ratio_of_paired_means_with_a_delta_method_se(lib):
    narrow = [0.70, 0.72, 0.68, 0.75]
    oracle = [0.80, 0.85, 0.79, 0.86]
    half = [n + 0.5 * (o - n) for n, o in zip(narrow, oracle, strict=True)]
    c = lib.capture(half, narrow, oracle)
    assert c["defined"] and c["ratio"] == pytest.approx(0.5)
    assert c["se"] == pytest.approx(0.0, abs=1e-8)
    # Against a brute-force check of the delta method: R = mean(d) / mean(e).
    grown = [0.74, 0.80, 0.70, 0.85]
    d = [g - n for g, n in zip(grown, narrow, strict=True)]
    e = [o - n for o, n in zip(oracle, narrow, strict=True)]
    r = sum(d) / sum(e)
    resid = [di - r * ei for di, ei in zip(d, e, strict=True)]
    mean_e = sum(e) / 4
    var = sum((x - sum(resid) / 4) ** 2 for x in resid) / 3 / (4 * mean_e**2)
    c = lib.capture(grown, narrow, oracle)
    assert c["ratio"] == pytest.approx(r) and c["se"] == pytest.approx(math.sqrt(var))
    # An oracle no better than the narrow host (gain under 2 SE): capture is undefined.
    flat = [n + s for n, s in zip(narrow, [0.01, -0.01, 0.02, -0.02], strict=True)]
    assert not lib.capture(grown, narrow, flat)["defined"]


def test_the_hindsight_oracle_is_the_best_static_width_at_each_lambda(lib):
    static = {
        1: [{"quality": 0.75, "params": 100}],
        2: [{"quality": 0.93, "params": 300}],
        3: [{"quality": 1.0, "params": 600}],
    }
    # objective = q − λ·(p − 100)/100: λ = 0.02 -> w3 (0.90), 0.05 -> w2 (0.83), 0.2 -> w1.
    assert lib.hindsight_oracle(static, 0.02, 100.0) == 3
    assert lib.hindsight_oracle(static, 0.05, 100.0) == 2
    assert lib.hindsight_oracle(static, 0.2, 100.0) == 1


def test_rightsize_quick_run_scores_every_arm_against_the_oracle(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("ESPER_BENCH_OUT", str(tmp_path / "out"))
    monkeypatch.syspath_prepend(str(BENCH))
    rightsize = importlib.import_module("bench_rightsize")
    rightsize.main(["--quick"])
    rows = _rows(tmp_path / "out" / "rightsize_digits_quick_episodes.csv")
    assert sorted({r["arm"] for r in rows}) == sorted(rightsize.ARMS)
    assert all(len([r for r in rows if r["arm"] == a]) == 2 for a in rightsize.ARMS)
    table = (tmp_path / "out" / "rightsize_digits_quick.md").read_text()
    assert table.count("| 1 | 0.05 |") == len(rightsize.ARMS)
