import csv
import random

import pytest

from esper.telemetry import (
    EpisodeEnded,
    EpisodeStep,
    PPOUpdate,
    RunStarted,
    Telemetry,
    read_events,
    seed_event,
)
from esper.telemetry.report import build_report

SLOTS = ["r0c0", "r0c1", "r0c2"]
STAGES = ["DORMANT", "TRAINING", "BLENDING", "HOLDING", "FOSSILIZED", "EMBARGOED"]


def _fake_run(run_dir, episodes=6, envs=2, steps=5):
    rng = random.Random(0)
    with Telemetry(run_dir) as tel:
        tel.emit(RunStarted("t", "ppo", "digits", SLOTS, envs, 0))
        for ep in range(episodes):
            for env in range(envs):
                for step in range(steps):
                    stages = [rng.choice(STAGES) for _ in SLOTS]
                    op = rng.choice(["WAIT", "GERMINATE", "FOSSILIZE", "PRUNE"])
                    tel.emit(EpisodeStep(ep, env, step, op, op, 0.1, 0.8, 0.05, stages))
                tel.emit(
                    seed_event(
                        episode=ep,
                        env=env,
                        step=1,
                        slot_id="r0c1",
                        source="DORMANT",
                        target="GERMINATED",
                        reason="policy",
                    )
                )
                tel.emit(EpisodeEnded(ep, env, 0.5 + 0.01 * ep, 0.8, 0.05, 0.79, 40, 1, 1, 0, 0, 0))
            tel.emit(PPOUpdate(ep, (ep + 1) * envs, {"approx_kl": 0.01 * ep, "clip_frac": 0.1}))
        return tel.counts


def test_events_metrics_and_report(tmp_path):
    counts = _fake_run(tmp_path)
    assert counts["seed_germinated"] == 12 and counts["episode_ended"] == 12
    records = read_events(tmp_path / "events.jsonl")
    assert records[0]["kind"] == "run_started" and records[0]["slot_ids"] == SLOTS
    rows = list(csv.DictReader((tmp_path / "metrics.csv").open()))
    assert len(rows) == 12 and float(rows[-1]["episode_return"]) == 0.55
    written = build_report(tmp_path)
    names = {p.name for p in written}
    assert names == {
        "learning_curves.png",
        "lifecycle.png",
        "action_mix.png",
        "ppo.png",
        "summary.md",
    }
    for p in written:
        if p.suffix == ".png":
            assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 5_000
    summary = (tmp_path / "summary.md").read_text()
    assert "controller: **ppo**" in summary and "| germinated | 12 |" in summary


def test_torn_last_line_is_skipped(tmp_path):
    _fake_run(tmp_path, episodes=1, envs=1)
    with (tmp_path / "events.jsonl").open("a") as f:
        f.write('{"kind": "episode_st')
    assert read_events(tmp_path / "events.jsonl")[-1]["kind"] == "ppo_update"


def test_rolling_mean_uses_only_points_seen_so_far():
    from esper.telemetry.report import _rolling

    assert _rolling([1, 2, 3, 4, 5], 2).tolist() == [1.0, 1.5, 2.5, 3.5, 4.5]
    assert _rolling([0.7, 0.9, 0.95], 10).tolist() == pytest.approx([0.7, 0.8, 0.85])


def test_report_states_baseline_timing_and_provenance(tmp_path):
    from esper.telemetry.events import BaselineEpisodeEnded, RoundEnded, RunFinished

    with Telemetry(tmp_path) as tel:
        origin = {"esper": "9.9", "torch": "2.x", "command": ["esper", "train"]}
        tel.emit(RunStarted("t", "heuristic", "digits", SLOTS, 2, 0, False, 4, origin))
        for env in range(2):
            tel.emit(BaselineEpisodeEnded(0, env, 0.4, 0.7, 0.0, 0.7, 0, 0, 0, 0, 0, 0))
        for ep in range(2):
            for env in range(2):
                tel.emit(EpisodeStep(ep, env, 0, "WAIT", "WAIT", 0.1, 0.8, 0.0, ["DORMANT"] * 3))
                tel.emit(EpisodeEnded(ep, env, 0.5, 0.8, 0.05, 0.79, 40, 1, 0, 1, 0, 1))
            tel.emit(RoundEnded(ep, 2 * ep + 2, 6, 1.5, 4.0))
        tel.emit(RunFinished(2, 4, 2, 4.0, 3.0))
    rows = list(csv.DictReader((tmp_path / "metrics.csv").open()))
    assert len(rows) == 4  # baseline episodes are not training episodes
    build_report(tmp_path)
    summary = (tmp_path / "summary.md").read_text()
    assert "| quality | 0.8000 ± 0.0000 | 0.7000 ± 0.0000 |" in summary
    assert "static host, round-0 seeds" in summary and "last 1 of 2 rounds: their 2" in summary
    assert "2 rounds: 1.5 s per round" in summary and "4.00 env steps/s" in summary
    assert "esper 9.9" in summary and "`esper train`" in summary
    assert "| governor rollbacks | 4 |" in summary


def test_console_heartbeat_reports_a_long_step():
    import io
    import time

    from esper.experiment import Progress
    from esper.telemetry.console import Console

    out = io.StringIO()
    console = Console(out)
    console.HEARTBEAT_S = 0.5
    with console:
        console.live(Progress("train", 0, 10, 1, 20, 4, 800, 2.0))
        time.sleep(1.6)  # the next step is slow: the heartbeat speaks meanwhile
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("train round 1/10 step 1/20 | env steps 4/800")
    assert any("step 2/20 running for" in line and "eta" in line for line in lines[1:])


def test_learning_progress_compares_the_last_third_of_rounds_with_the_first():
    from esper.telemetry.report import learning_progress

    # 9 rounds of 2 envs: the returns rise by 0.1 per third, ±0.01 between envs.
    rows = [
        {"episode": r, "episode_return": 0.5 + 0.1 * (r // 3) + (0.01 if e else -0.01) + 0.001 * r,
         "objective": 0.0}
        for r in range(9)
        for e in range(2)
    ]  # fmt: skip
    p = learning_progress(rows)
    assert p["rounds"] == 9 and p["per_third"] == 3
    assert p["first"] == pytest.approx(0.501) and p["last"] == pytest.approx(0.707)
    # SE from the rounds' means (0.001 apart within a third), not the envs' spread
    assert p["se"] == pytest.approx((2 * 0.001**2 / 3) ** 0.5) and p["z"] > 2
    assert learning_progress(rows[:10]) is None  # 5 rounds: under two rounds per third


def test_summary_states_the_improvement_with_its_standard_error(tmp_path):
    _fake_run(tmp_path, episodes=6, envs=2)  # returns 0.50 .. 0.55 over the rounds
    build_report(tmp_path)
    summary = (tmp_path / "summary.md").read_text()
    assert "## Learning" in summary and "last 2 of 6 rounds" in summary
    assert "first third: 0.5050" in summary and "last third: 0.5450" in summary
