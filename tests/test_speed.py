"""Fast by default (`esper.speed`): what "auto" resolves to, that forcing a setting is
obeyed, that a run records every choice, and that bad values are refused."""

from __future__ import annotations

import json
import os

import pytest
import torch

from esper.config_io import ConfigError
from esper.run import evaluate, train
from esper.run_config import EnvSection, RunConfig, RunSection, config_from_dict
from esper.speed import (
    THREAD_MIN_FLOATS,
    channels_last_choice,
    cpu_busy,
    idle_cores,
    threads_choice,
)

SMALL = {"shape": [3, 32, 32], "n_train": 64, "n_val": 32, "batch_size": 32}


def test_channels_last_auto_follows_the_image_size_and_a_setting_forces_it():
    big = channels_last_choice("synthetic", SMALL)
    assert (big.value, big.mode) == (True, "auto") and "32x32" in big.why
    digits = channels_last_choice("digits", {})
    assert (digits.value, digits.mode) == (False, "auto") and "8x8" in digits.why
    forced = channels_last_choice("digits", {"channels_last": True})
    assert (forced.value, forced.mode) == (True, "forced")
    assert channels_last_choice("synthetic", {**SMALL, "channels_last": False}).value is False
    assert channels_last_choice("synthetic", {"shape": [16]}) is None  # an MLP host
    assert channels_last_choice("text", {}) is None
    with pytest.raises(ValueError, match='task.channels_last must be true, false or "auto"'):
        channels_last_choice("digits", {"channels_last": "yes"})


def test_auto_threads_use_idle_cores_only_for_big_batches(monkeypatch):
    monkeypatch.setattr("os.cpu_count", lambda: 8)
    monkeypatch.setattr("esper.speed.cpu_busy", lambda window: 0.2)  # 1.6 of 8 cores busy
    assert threads_choice(3, None).value == 3 and threads_choice(3, None).mode == "forced"
    big = threads_choice(0, THREAD_MIN_FLOATS)
    assert (big.value, big.mode) == (4, "auto") and "6 idle of 8 cores" in big.why  # at most 4
    assert threads_choice(0, THREAD_MIN_FLOATS - 1).value == 1  # tiny hosts: one thread
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # torchrun: 4 ranks share the 6 idle cores
    assert threads_choice(0, THREAD_MIN_FLOATS).value == 1
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    monkeypatch.setattr("esper.speed.cpu_busy", lambda window: 0.94)
    assert threads_choice(0, THREAD_MIN_FLOATS).value == 1  # busy: a second thread costs ~10x


def test_idle_cores_fall_back_to_the_load_average_without_proc_stat(monkeypatch):
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    monkeypatch.setattr("esper.speed.cpu_busy", lambda window: None)
    monkeypatch.setattr("os.getloadavg", lambda: (0.9, 0.0, 0.0))
    assert idle_cores() == (1, 2, "1-min load 0.90")  # load rounds up: no CPU figures


def test_cpu_busy_reads_a_share_of_this_machine():
    busy = cpu_busy(0.05)
    if os.path.exists("/proc/stat"):  # Linux: measured, a share of all CPUs' time
        assert busy is not None and 0.0 <= busy <= 1.0
    else:
        assert busy is None


def test_bad_batched_envs_values_are_refused_with_the_allowed_ones():
    with pytest.raises(ValueError, match='batched_envs must be true, false or "auto", got 1'):
        RunSection(batched_envs=1)
    with pytest.raises(ConfigError, match="batched_envs must be true, false or \"auto\", got 'on'"):
        config_from_dict({"run": {"batched_envs": "on"}})
    assert config_from_dict({"run": {"batched_envs": "auto"}}).run.batched_envs == "auto"
    with pytest.raises(ValueError, match='keep_freed_memory must be true, false or "auto"'):
        RunSection(keep_freed_memory="always")
    assert RunSection().batched_envs == "auto"


def _config(**run):
    return RunConfig(
        run=RunSection(controller="heuristic", envs=2, episodes=2, baseline=False, **run),
        env=EnvSection(max_epochs=2, batches_per_step=1),
        task={"width": 1},
    )


def test_a_run_records_what_it_chose_and_says_so_when_it_starts(tmp_path):
    lines: list[str] = []
    before = torch.get_num_threads()
    try:
        train(_config(), tmp_path / "auto", log=lines.append)
        train(_config(batched_envs=False, threads=1), tmp_path / "forced", tune_process=True)
    finally:
        torch.set_num_threads(before)
    sessions = json.loads((tmp_path / "auto" / "provenance.json").read_text())["sessions"]
    speed = sessions[-1]["speed"]
    assert speed["batched_envs"] == {
        "value": True, "mode": "auto", "why": "2 envs train as one grouped computation",
    }  # fmt: skip
    assert speed["channels_last"]["value"] is False and speed["channels_last"]["mode"] == "auto"
    assert speed["threads"]["mode"] == "caller"  # a library call leaves torch's threads alone
    assert any(line.startswith("speed: batched envs on (auto), NCHW (auto), ") for line in lines), (
        lines
    )
    forced = json.loads((tmp_path / "forced" / "provenance.json").read_text())["sessions"][-1]
    assert forced["speed"]["batched_envs"]["value"] is False
    assert forced["speed"]["batched_envs"]["mode"] == "forced"
    assert forced["speed"]["threads"] == {"value": 1, "mode": "forced", "why": "run.threads set"}
    assert forced["torch_threads"] == 1
    assert forced["speed"]["keep_freed_memory"]["mode"] in ("auto", "forced")  # CLI-tuned


def test_auto_plays_exactly_what_the_forced_settings_it_resolved_to_play():
    auto = evaluate(_config(), episodes=2)
    forced = evaluate(
        RunConfig(
            run=RunSection(controller="heuristic", envs=2, batched_envs=True),
            env=EnvSection(max_epochs=2, batches_per_step=1),
            task={"width": 1, "channels_last": False},
        ),
        episodes=2,
    )
    assert [r.objective for r in auto] == [r.objective for r in forced]
    assert [r.counts for r in auto] == [r.counts for r in forced]
