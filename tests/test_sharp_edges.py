"""Issue 23: the sharp edges a new user hit, each through the CLI or the public API.

Bad input exits with status 2 and one line that names the bad value and what is
allowed, with no traceback and no run folder left behind; sizes are refused before
anything is built.
"""

from __future__ import annotations

import ast
import importlib.util
import io
import re
from pathlib import Path

import pytest
import torch
from torch import nn

from cli_helpers import TINY
from cli_helpers import run_cli as _run
from esper.checkpointing import atomic_torch_save
from esper.config_io import dumps_toml

ROOT = Path(__file__).resolve().parents[1]


def _one_line_error(code: int, err: str, *messages: str) -> None:
    assert code == 2, err
    assert err.count("\n") == 1 and err.startswith("esper: error: "), err
    assert "Traceback" not in err, err
    for message in messages:
        assert message in err, err


# -- 1. seeds ---------------------------------------------------------------------------


def test_a_negative_seed_is_refused_before_a_run_folder_exists(capsys, tmp_path):
    run_dir = tmp_path / "r"
    for args in (["--seed", "-1"], ["--set", "run.seed=-5"]):
        code, _, err = _run(capsys, "train", "heuristic", *TINY, "--run-dir", run_dir, *args)
        got = args[-1].rpartition("=")[2]
        _one_line_error(code, err, "seed must be in 0..4294967295", f"got {got}")
        assert not run_dir.exists()


def test_build_policy_refuses_a_negative_seed_or_rounds(capsys, tmp_path):
    out = tmp_path / "p.pt"
    code, _, err = _run(capsys, "build-policy", "--out", out, "--quick", "--seed", "-1")
    _one_line_error(code, err, "--seed must be in 0..4294967295, got -1")
    code, _, err = _run(capsys, "build-policy", "--out", out, "--quick", "--ppo-rounds", "-3")
    _one_line_error(code, err, "--ppo-rounds must be >= 0 (0: ship the clone), got -3")
    assert not out.exists()


def test_a_fresh_run_that_fails_in_its_first_round_leaves_no_folder(tmp_path, monkeypatch):
    import esper.run
    from esper.run_config import config_from_dict

    def broken_round(*args, **kwargs):
        raise RuntimeError("a failure inside round 0")

    monkeypatch.setattr(esper.run, "_play_round", broken_round)
    config = config_from_dict({"run": {"controller": "static", "envs": 1, "episodes": 1,
                                       "baseline": False}, "env": {"max_epochs": 1}})  # fmt: skip
    with pytest.raises(RuntimeError, match="inside round 0"):
        esper.run.train(config, tmp_path / "r")
    assert not (tmp_path / "r").exists()  # so the rerun is a plain start, not "exists"


# -- 2. threads -------------------------------------------------------------------------


def test_more_threads_than_cores_is_refused_before_torch_starts_them(capsys, tmp_path):
    threads = torch.get_num_threads()
    code, _, err = _run(capsys, "train", "heuristic", *TINY, "--threads", "100000",
                        "--run-dir", tmp_path / "r")  # fmt: skip
    _one_line_error(code, err, "threads 100000 is more than this machine's", "allowed: 0 (auto)")
    assert torch.get_num_threads() == threads and not (tmp_path / "r").exists()


# -- 3. sizes ---------------------------------------------------------------------------


def test_a_host_too_wide_for_memory_is_refused_with_the_estimate(capsys, tmp_path):
    code, _, err = _run(capsys, "train", "heuristic", *TINY, "--set", "task.width=1000000",
                        "--run-dir", tmp_path / "r")  # fmt: skip
    _one_line_error(code, err, "too large for this machine", "(task.width=1000000)",
                    "need an estimated", "PB", "90,000,063,000,010 parameters")  # fmt: skip
    assert not (tmp_path / "r").exists()


def test_too_deep_a_host_is_refused_before_it_is_built(capsys, tmp_path):
    code, _, err = _run(capsys, "train", "heuristic", *TINY, "--set", "task.depth=100000",
                        "--run-dir", tmp_path / "r")  # fmt: skip
    _one_line_error(code, err, "depth must be an int in 1..256", "got 100000")


def test_too_many_envs_for_memory_and_too_many_rounds_are_refused(capsys, tmp_path, monkeypatch):
    import esper.run_config

    # The machine's size decides; pin it so the test does not depend on where it runs.
    monkeypatch.setattr(esper.run_config, "machine_memory", lambda device: 16 * 2**30)
    code, _, err = _run(capsys, "train", "heuristic", "--envs", "100000", "--episodes",
                        "100000", "--run-dir", tmp_path / "r")  # fmt: skip
    _one_line_error(code, err, "100000 env(s) of digits", "need an estimated", "GB on cpu",
                    "cpu has 16.0 GB", "use fewer --envs")  # fmt: skip
    code, _, err = _run(capsys, "train", "heuristic", "--envs", "4", "--episodes", "100000",
                        "--run-dir", tmp_path / "r")  # fmt: skip
    _one_line_error(code, err, "is 25000 rounds; at most 10000", "--episodes <= 40000")
    assert not (tmp_path / "r").exists()


def test_the_memory_estimate_is_near_the_measured_cost():
    from esper.training import get_task
    from esper.training.sizing import estimate_memory

    # Measured (VmRSS, 10 envs against 2 after two steps): 32 MB per env at width 128.
    per_env = estimate_memory(get_task("digits", width=128), 10).per_env
    assert 16 * 2**20 < per_env < 64 * 2**20


# -- 4. throughput ----------------------------------------------------------------------


def test_summary_throughput_is_total_steps_over_total_round_time(tmp_path):
    from esper.telemetry import RunStarted, Telemetry
    from esper.telemetry.events import RoundEnded, RunFinished
    from esper.telemetry.report import build_report

    with Telemetry(tmp_path) as tel:
        tel.emit(RunStarted("t", "heuristic", "digits", ["r0c0"], 2, 0, False, 4, {}))
        tel.emit(RoundEnded(0, 2, 10, 1.0, 10.0))  # a fast round and a slow one: the mean
        tel.emit(RoundEnded(1, 4, 10, 9.0, 10 / 9))  # of their rates (5.56) overstates
        tel.emit(RunFinished(2, 4, 2, 12.0, 2.0))
    build_report(tmp_path)
    summary = (tmp_path / "summary.md").read_text()
    assert "20 training env steps in 10 s = 2.00 env steps/s" in summary, summary
    assert "5.56" not in summary


def test_the_readme_throughput_is_its_steps_over_its_seconds():
    text = " ".join((ROOT / "README.md").read_text(encoding="utf-8").split())
    found = re.search(r"= ([\d,]+) env steps\) in (\d+) s: ([\d.]+) env steps/s", text)
    assert found, "the README's main-job throughput sentence is gone or reworded"
    steps, seconds, rate = int(found[1].replace(",", "")), int(found[2]), float(found[3])
    assert steps == 4 * 24 * 20 and round(steps / seconds, 1) == rate


# -- 5. progress after a resume ---------------------------------------------------------


def test_progress_after_resume_counts_rounds_over_the_whole_run(tmp_path):
    from esper.run import train
    from esper.run_config import config_from_dict
    from esper.telemetry.console import Console

    config = config_from_dict({
        "run": {"controller": "static", "envs": 1, "episodes": 2, "baseline": False},
        "env": {"max_epochs": 2, "batches_per_step": 1},
    })  # fmt: skip
    train(config, tmp_path / "r", stop_after=1)
    out = io.StringIO()
    console = Console(out)
    train(config, tmp_path / "r", resume=True, live=console.live, progress=console.round_done)
    lines = out.getvalue().splitlines()
    assert any(line.startswith("train round 2/2 step 1/2") for line in lines), lines
    assert not any("round 2/1" in line for line in lines), lines


# -- 6, 7. folders where files are expected ---------------------------------------------


def test_eval_of_a_run_folder_points_into_its_checkpoints(capsys, tmp_path):
    run_dir = tmp_path / "ppo-digits"
    (run_dir / "checkpoints").mkdir(parents=True)
    for name in ("best.pt", "last.pt"):
        (run_dir / "checkpoints" / name).write_bytes(b"")
    code, _, err = _run(capsys, "eval", run_dir)
    _one_line_error(code, err, f"e.g. {str(run_dir / 'checkpoints' / 'best.pt')!r}",
                    "it holds checkpoints/best.pt, checkpoints/last.pt")  # fmt: skip


def test_a_config_folder_is_named_as_a_folder(capsys, tmp_path):
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "small.toml").write_text("[run]\n")
    code, _, err = _run(capsys, "train", "heuristic", "--config", tmp_path / "configs",
                        "--run-dir", tmp_path / "r")  # fmt: skip
    _one_line_error(code, err, "is a folder; pass a .toml file; it holds small.toml")


# -- 8. files that are not checkpoints --------------------------------------------------


def test_eval_of_a_toml_or_text_file_says_what_it_looks_like(capsys, tmp_path):
    config = tmp_path / "config.toml"
    config.write_text('[run]\ntask = "digits"\n')
    notes = tmp_path / "notes.pt"
    notes.write_text("every run of the week\n")
    code, _, err = _run(capsys, "eval", config)
    _one_line_error(code, err, "config.toml' is not a checkpoint (it looks like a TOML file")
    code, _, err = _run(capsys, "eval", notes)
    _one_line_error(code, err, "notes.pt' is not a checkpoint (it looks like a text file)")


# -- 9, 10. messages that name only the field at fault ----------------------------------


def test_eval_envs_zero_names_envs_only(capsys):
    code, _, err = _run(capsys, "eval", "shipped", "--envs", "0")
    _one_line_error(code, err, "envs must be in 1..100000", "got 0")
    assert "episodes" not in err and "checkpoint_every" not in err


def test_a_negative_learning_rate_is_named_alone(capsys, tmp_path):
    code, _, err = _run(capsys, "train", "heuristic", *TINY, "--set", "task.lr=-0.1",
                        "--run-dir", tmp_path / "r")  # fmt: skip
    _one_line_error(code, err, "lr must be > 0, got -0.1")
    assert "None" not in err and not (tmp_path / "r").exists()


# -- 11. a run folder that is a file ----------------------------------------------------


def test_run_dir_on_a_file_is_one_clear_line(capsys, tmp_path):
    blocker = tmp_path / "notes.txt"
    blocker.write_text("x")
    code, _, err = _run(capsys, "train", "heuristic", *TINY, "--run-dir", blocker)
    _one_line_error(code, err, "notes.txt' is a file, not a folder")
    code, _, err = _run(capsys, "train", "heuristic", *TINY, "--run-dir", blocker / "run")
    _one_line_error(code, err, "cannot make run directory", "notes.txt' is a file")
    assert "Errno" not in err


# -- 12. --set keys the command ignores -------------------------------------------------


def test_set_keys_that_would_be_ignored_are_refused(capsys, tmp_path):
    code, _, err = _run(capsys, "eval", "shipped", "--set", "run.episodes=4")
    _one_line_error(code, err, "--set run.episodes=4 has no effect here", "use --episodes N")
    cases = [
        (["--set", 'run.controller="ppo"'], "the controller is train's first argument"),
        (["--set", "ppo.learning_rate=0.1"], "a heuristic run has no PPO"),
        (["--seed", "1", "--set", "run.seed=2"], "--seed sets it too; pass one of the two"),
    ]
    for args, message in cases:
        code, _, err = _run(capsys, "train", "heuristic", *TINY, *args,
                            "--run-dir", tmp_path / "r")  # fmt: skip
        _one_line_error(code, err, "has no effect here", message)
        assert not (tmp_path / "r").exists()


# -- 13. checkpoints of scripted runs ---------------------------------------------------


def test_eval_of_a_scripted_run_says_what_the_file_is(capsys, tmp_path):
    run_dir = tmp_path / "h"
    code, _, err = _run(capsys, "train", "heuristic", *TINY, "--episodes", "2",
                        "--run-dir", run_dir)  # fmt: skip
    assert code == 0, err
    code, _, err = _run(capsys, "eval", run_dir / "checkpoints" / "best.pt")
    _one_line_error(code, err, "is the run state of a 'heuristic' run", "not a PPO agent",
                    f"results are in {run_dir / 'summary.md'}", "esper eval shipped")  # fmt: skip
    # a run-state file written before the controller was stored: the run's config says it
    old = tmp_path / "s"
    atomic_torch_save({"format": "esper.run_state", "run": {"round": 1}},
                      old / "checkpoints" / "last.pt")  # fmt: skip
    (old / "config.toml").write_text(dumps_toml({"run": {"controller": "shipped"}}))
    code, _, err = _run(capsys, "eval", old / "checkpoints" / "last.pt")
    _one_line_error(code, err, "run state of a 'shipped' run", "run `esper eval shipped`")


# -- 14. portable export with any batch size --------------------------------------------


def test_save_portable_runs_on_any_batch_size(tmp_path):
    from esper.grow import save_portable

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3),
    ).eval()  # fmt: skip
    path = save_portable(model, tmp_path / "m.pt2", (torch.randn(32, 1, 8, 8),))
    program = torch.export.load(path).module()
    for batch in (1, 7):
        x = torch.randn(batch, 1, 8, 8)
        torch.testing.assert_close(program(x), model(x), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="has a batch of 1; pass at least 2 rows"):
        save_portable(model, tmp_path / "one.pt2", (torch.randn(1, 1, 8, 8),))


# -- 15. discoverability ----------------------------------------------------------------


def test_tasks_lists_each_tasks_options_with_defaults(capsys):
    code, out, _ = _run(capsys, "tasks")
    assert code == 0
    digits = out.split("fashion-mnist")[0]
    for option, default in (("width", "2"), ("depth", "3"), ("val_fraction", "0.2"),
                            ("pool_at", "unset"), ("channels_last", "auto")):  # fmt: skip
        assert re.search(rf"^\s+{option}\s+{re.escape(default)}\s+\S", digits, re.M), digits
    assert re.search(r"^\s+d_model\s+64\s", out, re.M) and "training options" in out


def test_train_help_explains_the_controller_argument(capsys):
    with pytest.raises(SystemExit):
        _run(capsys, "train", "--help")
    out = " ".join(capsys.readouterr().out.split())
    assert "ppo: train the learned controller with PPO" in out
    assert "shipped: run the trained policy packaged with Esper" in out


@pytest.mark.parametrize("name", ["cnn_fashion_mnist", "gpt_text"])
def test_examples_warm_up_before_timing_the_first_model(name, monkeypatch):
    spec = importlib.util.spec_from_file_location(f"ex_{name}", ROOT / "examples" / f"{name}.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    calls: list[str] = []
    assert callable(getattr(example, "warm_up", None)), "no warm-up before the timed runs"
    monkeypatch.setattr(example, "warm_up", lambda *a: calls.append("warm_up"))

    def fake_run(args, data, grow, width=None):  # the table's row, without training
        calls.append("run")
        return {"model": "grown" if grow else "not grown", "params": 1, "test_acc": 0.0,
                "test_loss": 0.0, "val_loss": 0.0, "seconds": 0.0, "seeds": "-",
                "export": (1, 0.0), "export_diff": 0.0}  # fmt: skip

    monkeypatch.setattr(example, "run", fake_run)
    example.main(["--tiny"])
    assert calls[0] == "warm_up" and calls.count("run") == 2


# -- also noticed -----------------------------------------------------------------------


def _module_imports(path: Path, name: str, modules: set[str]) -> set[str]:
    """esper modules that ``path`` imports at module level (TYPE_CHECKING blocks included:
    a cycle there is still a cycle for type checkers and readers)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    tree = ast.parse(path.read_text(encoding="utf-8"))
    body = [n for node in tree.body for n in (node.body if isinstance(node, ast.If) else [node])]
    for node in body:
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            for alias in node.names:
                full = f"{base}.{alias.name}"
                found.add(full if full in modules else base)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return (found & modules) - {name}


def test_the_package_has_no_import_cycle():
    src = ROOT / "src"
    paths = {}
    for path in (src / "esper").rglob("*.py"):
        parts = path.relative_to(src).with_suffix("").parts
        paths[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph = {name: _module_imports(path, name, set(paths)) for name, path in paths.items()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(name: str, trail: list[str]) -> None:
        state[name] = 1
        for dep in sorted(graph[name]):
            if state.get(dep) == 1:
                cycle = [*trail[trail.index(dep) :], dep] if dep in trail else [name, dep]
                raise AssertionError(f"import cycle: {' -> '.join(cycle)}")
            if dep not in state:
                visit(dep, [*trail, dep])
        state[name] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])


def test_the_ppo_entropy_legend_covers_no_data():
    from esper.telemetry.report import _plt, ppo_figure

    heads = ("op", "slot", "blueprint", "blend")
    # values spread over [0, 1] at every update: a legend inside that box covers some
    updates = [
        {
            "update": u,
            "diagnostics": {f"entropy/{h}": (u / 7 + i / 4) % 1.0 for i, h in enumerate(heads)},
        }
        for u in range(8)
    ]
    fig = ppo_figure(updates)
    try:
        fig.canvas.draw()
        ax = next(a for a in fig.axes if a.get_title().startswith("entropy"))
        box = ax.get_legend().get_window_extent()
        for line in ax.get_lines():
            for x, y in ax.transData.transform(line.get_xydata()):
                assert not box.contains(x, y), f"the legend covers {line.get_label()}"
    finally:
        _plt().close(fig)
