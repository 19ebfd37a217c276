"""Runs people can trust and read: bad input is one line (exit 2), resume is honest and
byte-identical, the run folder carries provenance and timings, progress is live."""

import json
import sys

import pytest
import torch

from cli_helpers import TINY, TINY_PPO
from cli_helpers import run_cli as _run
from esper.cli import main
from esper.telemetry import read_events


def _one_line_error(code, err, message):
    assert code == 2, err
    assert err.count("\n") == 1 and err.startswith("esper: error: "), err
    assert "Traceback" not in err and message in err, err


@pytest.fixture(scope="module")
def ppo_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("runs") / "ppo"
    assert main(["train", "ppo", *TINY_PPO, "--episodes", "4", "--run-dir", str(run_dir)]) == 0
    return run_dir


def test_a_missing_cuda_device_is_one_line(capsys, tmp_path):
    devices = ["cuda:99"] + ([] if torch.cuda.is_available() else ["cuda"])
    for device in devices:
        code, _, err = _run(capsys, "train", "ppo", "--device", device, "--run-dir", tmp_path / "r")
        _one_line_error(code, err, f"device {device!r} is not available")
        assert not (tmp_path / "r").exists()


def test_eval_of_a_file_that_is_not_a_checkpoint_or_a_folder(ppo_run, capsys):
    code, _, err = _run(capsys, "eval", ppo_run / "metrics.csv", "--episodes", "1")
    _one_line_error(code, err, "metrics.csv' is not a checkpoint")
    code, _, err = _run(capsys, "eval", ppo_run / "checkpoints", "--episodes", "1")
    _one_line_error(code, err, "is a folder; pass a checkpoint file in it")
    assert "best.pt" in err and "last.pt" in err


def test_resume_of_a_finished_run_says_there_is_nothing_to_do(ppo_run, capsys):
    before = (ppo_run / "events.jsonl").read_bytes()
    code, _, err = _run(capsys, "train", "ppo", "--resume", "--run-dir", ppo_run)
    _one_line_error(code, err, "nothing to do")
    assert "--episodes N with N > 4" in err
    code, _, err = _run(capsys, "train", "ppo", "--resume", "--episodes", "2", "--run-dir", ppo_run)
    _one_line_error(code, err, "nothing to do")
    code, _, err = _run(capsys, "train", "ppo", "--resume", "--force", "--run-dir", ppo_run)
    _one_line_error(code, err, "--resume continues a run and --force overwrites it")
    assert (ppo_run / "events.jsonl").read_bytes() == before


def test_extending_a_run_updates_its_config_and_keeps_line_endings(tmp_path, capsys):
    run_dir = tmp_path / "h"
    args = ["train", "heuristic", *TINY, "--no-report", "--run-dir", run_dir]
    assert _run(capsys, *args, "--episodes", "2")[0] == 0
    code, _, err = _run(capsys, "train", "heuristic", "--resume", "--episodes", "4", "--no-report",
                        "--run-dir", run_dir)  # fmt: skip
    assert code == 0, err
    assert "episodes = 4" in (run_dir / "config.toml").read_text()
    straight = tmp_path / "straight"
    assert _run(capsys, *args[:-1], straight, "--episodes", "4")[0] == 0
    data = (run_dir / "metrics.csv").read_bytes()
    assert b"\r" not in data and data == (straight / "metrics.csv").read_bytes()


def test_missing_tensorboard_leaves_no_folder_and_a_retry_works(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails
    run_dir = tmp_path / "tb"
    args = ["train", "heuristic", *TINY, "--episodes", "2", "--no-report", "--run-dir", run_dir]
    code, _, err = _run(capsys, *args, "--set", "run.tensorboard=true")
    _one_line_error(code, err, "needs the tensorboard package")
    assert "pip install -e '.[tensorboard]'" in err
    assert not run_dir.exists()
    code, _, err = _run(capsys, *args)
    assert code == 0, err


def test_episodes_must_fill_whole_rounds(capsys, tmp_path):
    code, _, err = _run(capsys, "train", "ppo", "--episodes", "3", "--envs", "4",
                        "--run-dir", tmp_path / "r")  # fmt: skip
    _one_line_error(code, err, "episodes 3 is not a multiple of envs 4")
    assert "--episodes 4" in err and not (tmp_path / "r").exists()


def test_eval_table_counts_rollbacks_and_shows_progress(ppo_run, capsys):
    code, out, err = _run(capsys, "eval", ppo_run / "checkpoints" / "last.pt", "--episodes", "2")
    assert code == 0, err
    assert "rollbacks" in out and "evaluation seeds" in out
    assert "eval round 1/1 step 3/3" in err and "steps/s" in err and "eta" in err


def test_run_folder_holds_provenance_timings_and_live_progress(tmp_path, capsys):
    run_dir = tmp_path / "h"
    code, _, err = _run(capsys, "train", "heuristic", *TINY, "--episodes", "4", "--no-report",
                        "--run-dir", run_dir)  # fmt: skip
    assert code == 0, err
    assert "round 2/2 done | env steps 12/12" in err
    assert "baseline round 1/1" in err
    session = json.loads((run_dir / "provenance.json").read_text())["sessions"][0]
    assert session["torch"] == torch.__version__ and session["device"] == "cpu"
    assert session["command"][:3] == ["esper", "train", "heuristic"]
    assert {"esper", "python", "torch_threads", "started"} <= set(session)
    events = read_events(run_dir / "events.jsonl")
    assert all(isinstance(e["time"], float) for e in events)
    rounds = [e for e in events if e["kind"] == "round_ended"]
    assert [r["round"] for r in rounds] == [0, 1] and all(r["wall_s"] > 0 for r in rounds)
    finished = [e for e in events if e["kind"] == "run_finished"]
    assert len(finished) == 1 and finished[0]["episodes"] == 4
    assert finished[0]["env_steps_per_s"] > 0
    baseline = [e for e in events if e["kind"] == "baseline_episode_ended"]
    assert [b["env"] for b in baseline] == [0, 1]
    assert events[0]["kind"] == "run_started" and events[0]["provenance"] == session


def test_help_shows_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    for text in ("(default: 4)", "(default: 96)", "(default: cpu)", "(default: digits)"):
        assert text in out


def test_library_hints_are_given_in_cli_form(capsys, tmp_path):
    code, _, err = _run(capsys, "train", "heuristic", "--task", "text", "--run-dir", tmp_path)
    _one_line_error(code, err, "--set task.path=")


def test_the_baseline_round_changes_nothing_in_the_run(ppo_run, tmp_path, capsys):
    other = tmp_path / "no-baseline"
    code, _, err = _run(capsys, "train", "ppo", *TINY_PPO, "--episodes", "4", "--no-report",
                        "--set", "run.baseline=false", "--run-dir", other)  # fmt: skip
    assert code == 0, err
    assert (other / "metrics.csv").read_bytes() == (ppo_run / "metrics.csv").read_bytes()
    assert "baseline_episode_ended" not in (other / "events.jsonl").read_text()
