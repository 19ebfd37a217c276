"""End-to-end: `esper train / eval / report`, resume equivalence, Ctrl-C, bad input."""

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from cli_helpers import TINY, TINY_PPO
from cli_helpers import run_cli as _run
from esper.checkpointing import atomic_torch_save, safe_torch_load
from esper.cli import main
from esper.run import train
from esper.run_config import load_config


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("runs") / "ppo-tiny"
    code = main(["train", "ppo", *TINY_PPO, "--episodes", "4", "--run-dir", str(run_dir)])
    assert code == 0
    return run_dir


def test_train_writes_the_run_folder_and_report(trained_run):
    names = {p.name for p in trained_run.iterdir()}
    assert {"config.toml", "events.jsonl", "metrics.csv", "checkpoints", "summary.md"} <= names
    for png in ("learning_curves.png", "lifecycle.png", "action_mix.png", "ppo.png"):
        data = (trained_run / png).read_bytes()
        assert data[:4] == b"\x89PNG" and len(data) > 10_000
    assert {p.name for p in (trained_run / "checkpoints").iterdir()} >= {"last.pt", "best.pt"}
    rows = list(csv.DictReader((trained_run / "metrics.csv").open()))
    assert len(rows) == 4 and {r["env"] for r in rows} == {"0", "1"}
    saved = load_config(trained_run / "config.toml")
    assert saved.run.controller == "ppo" and saved.ppo.hidden == 16 and saved.env.max_epochs == 3


def test_eval_with_another_slot_count(trained_run, capsys):
    ckpt = trained_run / "checkpoints" / "last.pt"
    five = ["r0c0", "r0c1", "r0c2", "r0c3", "r0c4"]
    code, out, err = _run(
        capsys, "eval", ckpt, "--slots", *five, "--set", "task.depth=5", "--episodes", "2"
    )
    assert code == 0, err
    assert "evaluation of" in out and "quality" in out
    code, out, err = _run(capsys, "eval", ckpt, "--slots", "r0c1", "--episodes", "1")
    assert code == 0, err


def test_report_rebuilds(trained_run, capsys):
    (trained_run / "summary.md").unlink()
    code, out, _ = _run(capsys, "report", trained_run)
    assert code == 0 and "summary.md" in out and (trained_run / "summary.md").is_file()


def test_resume_equals_an_uninterrupted_run(tmp_path):
    overrides = {
        "run": {"envs": 2, "episodes": 8, "controller": "ppo"},
        "env": {"max_epochs": 3, "batches_per_step": 2},
        "ppo": {"hidden": 16, "embed": 16},
    }
    config = load_config(None, overrides)
    straight = train(config, tmp_path / "straight")
    first = train(config, tmp_path / "split", stop_after=2)
    assert first.rounds_done == 2
    resumed = train(config, tmp_path / "split", resume=True)
    assert straight.rounds_done == resumed.rounds_done == 4
    a = safe_torch_load(tmp_path / "straight" / "checkpoints" / "last.pt")
    b = safe_torch_load(tmp_path / "split" / "checkpoints" / "last.pt")
    for key, value in a["network"].items():
        assert torch.equal(value, b["network"][key]), key
    assert a["counters"] == b["counters"]
    data = [(tmp_path / d / "metrics.csv").read_bytes() for d in ("straight", "split")]
    assert data[0] == data[1] and data[0].count(b"\n") == 1 + 8 and b"\r" not in data[0]


def test_scripted_controllers_run_and_resume(tmp_path, capsys):
    run_dir = tmp_path / "heur"
    args = ["train", "heuristic", *TINY, "--episodes", "2", "--run-dir", run_dir, "--no-report"]
    code, _out, err = _run(capsys, *args)
    assert code == 0, err
    code, _, err = _run(capsys, "train", "heuristic", "--resume", "--run-dir", run_dir,
                        "--episodes", "4", "--no-report")  # fmt: skip
    assert code == 0, err
    rows = list(csv.DictReader((run_dir / "metrics.csv").open()))
    assert [int(r["episode"]) for r in rows] == [0, 0, 1, 1]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["train", "ppo", "--task", "nope"], "unknown task 'nope'; available: digits"),
        (["train", "ppo", "--slots", "r0c0", "early"], "invalid slot id 'early'"),
        (["train", "ppo", "--slots", "r0c0", "r0c0"], "duplicate slot id 'r0c0'"),
        (["train", "ppo", "--slots", "r0c7"], "slot 'r0c7' is not offered by this host"),
        (["train", "ppo", "--set", "ppo.lerning_rate=1"], "did you mean 'learning_rate'"),
        (["train", "ppo", "--set", "bogus.x=1"], "unknown section [bogus]"),
        (["train", "ppo", "--set", "ppo.n_epochs=0"], "n_epochs must be > 0"),
        (["train", "ppo", "--set", "noequals"], "--set expects SECTION.KEY=VALUE"),
        (["train", "ppo", "--config", "/nonexistent/c.toml"], "does not exist"),
        (
            ["train", "ppo", "--task", "fashion-mnist", "--set", 'env.data_root="/nonexistent"'],
            "apt-get install dataset-fashion-mnist",
        ),
        (["eval", "/nonexistent/ck.pt"], "does not exist"),
        (["report", "/nonexistent"], "is not a run directory"),
        (["train", "ppo", "--resume"], "cannot resume"),
    ],
)
def test_bad_input_exits_2_with_one_line(argv, message, capsys, tmp_path):
    if argv[0] == "train":
        argv = [*argv, "--run-dir", str(tmp_path / "run")]
    code, _out, err = _run(capsys, *argv)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("esper: error: ")
    assert message in err
    assert not (tmp_path / "run").exists() or argv[2:3] == ["--resume"]


def test_unknown_config_key_in_a_file(tmp_path, capsys):
    config = tmp_path / "c.toml"
    config.write_text("[run]\nenvz = 3\n")
    code, _, err = _run(capsys, "train", "ppo", "--config", config, "--run-dir", tmp_path / "r")
    assert code == 2 and "unknown key run.envz; did you mean 'envs'?" in err


def test_existing_run_is_never_overwritten(trained_run, capsys):
    before = (trained_run / "metrics.csv").read_bytes()
    code, _, err = _run(capsys, "train", "ppo", "--run-dir", trained_run, "--task", "nope",
                        "--force")  # fmt: skip
    assert code == 2 and "unknown task" in err  # validated before anything is removed
    code, _, err = _run(capsys, "train", "ppo", "--run-dir", trained_run)
    assert code == 2 and "--resume" in err and "--force" in err
    assert (trained_run / "metrics.csv").read_bytes() == before


def test_corrupt_and_incompatible_checkpoints(trained_run, tmp_path, capsys):
    good = trained_run / "checkpoints" / "last.pt"
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[:1000])
    code, _, err = _run(capsys, "eval", truncated, "--episodes", "1")
    assert code == 2 and "truncated.pt" in err and "corrupt" in err
    payload = safe_torch_load(good)
    payload["observation_schema"]["version"] = 999
    other = tmp_path / "other_schema.pt"
    atomic_torch_save(payload, other)
    code, _, err = _run(capsys, "eval", other, "--episodes", "1")
    assert code == 2 and "observation schema" in err and "v999" in err


def _esper(*argv, **kwargs):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "esper", *map(str, argv)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, **kwargs,
    )  # fmt: skip


def test_bad_input_prints_no_traceback():
    proc = _esper("train", "ppo", "--slots", "R0C0")
    _out, err = proc.communicate(timeout=120)
    assert proc.returncode == 2 and "Traceback" not in err and "invalid slot id 'R0C0'" in err


def test_ctrl_c_leaves_a_checkpoint_and_resume_finishes(tmp_path):
    run_dir = tmp_path / "run"
    proc = _esper("train", "ppo", *TINY_PPO, "--episodes", "40", "--run-dir", run_dir,
                  "--no-report")  # fmt: skip
    metrics = run_dir / "metrics.csv"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 3:  # one round done
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "interrupted after" in err and "--resume" in err and "Traceback" not in err
    state = safe_torch_load(run_dir / "checkpoints" / "last.pt")
    done = state["run"]["round"]
    assert done >= 1
    code = main(["train", "ppo", "--resume", "--run-dir", str(run_dir), "--episodes",
                 str(2 * done + 2), "--no-report"])  # fmt: skip
    assert code == 0
    rows = list(csv.DictReader(metrics.open()))
    assert [int(r["episode"]) for r in rows] == [k for k in range(done + 1) for _ in range(2)]
    assert Path(run_dir / "checkpoints" / "last.pt").is_file()
