"""Training runs with a run folder, checkpoints and resume; evaluation of checkpoints.

Run folder (``runs/<name>/``)::

    config.toml      the resolved config (what --resume reads back)
    provenance.json  versions, git commit, device, threads, command line of each session
    events.jsonl     typed telemetry events, each with a ``time`` stamp
    metrics.csv      one row per finished episode
    checkpoints/     last.pt after every round, best.pt, round_XXXXXX.pt periodically
    *.png, summary.md  the report (`esper.telemetry.report`)

A checkpoint is written after every round (atomically), so Ctrl-C loses at most the
round in flight; `--resume` truncates the telemetry of that partial round and goes on.

Under ``torchrun`` (`esper.distributed`) each rank steps its share of the ``envs`` global
envs; rank 0 alone writes the run folder, with every rank's episodes and events, and
every rank resumes from the same checkpoint.
"""

from __future__ import annotations

import contextlib
import dataclasses
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from esper.checkpointing import (
    CheckpointError,
    atomic_torch_save,
    atomic_write_bytes,
    atomic_write_text,
    safe_torch_load,
)
from esper.config_io import ConfigError, load_toml
from esper.distributed import SINGLE, DistContext, barrier, env_shard, gather_objects
from esper.env import DEFAULT_SCHEMA, GLOBAL_DIM, SLOT_DIM, ObservationSchema, SchemaMismatchError
from esper.env.vector import VectorMorphogenesisEnv
from esper.experiment import (
    EpisodeRecord,
    Progress,
    ProgressClock,
    make_scripted,
    run_round,
    static_round,
    summarize,
)
from esper.rl import PPOAgent
from esper.rl.checkpoint import check_envelope, save_checkpoint
from esper.run_config import (
    RunConfig,
    check_devices_available,
    check_episodes,
    check_run_limits,
)
from esper.seeding import MAX_ROUNDS
from esper.slots import SlotConfig
from esper.speed import build_envs
from esper.telemetry import CheckpointSaved, PPOUpdate, RunStarted, Telemetry, provenance
from esper.telemetry.events import BaselineEpisodeEnded, RoundEnded, RunFinished
from esper.telemetry.sinks import tensorboard_writer, truncate_telemetry

RUN_STATE_FORMAT = "esper.run_state"


class RunDirError(ValueError):
    """A run folder cannot be created or resumed as asked."""


@dataclass
class RunState:
    """Counters that a resumed run continues from."""

    round: int = 0
    best_objective: float = float("-inf")

    def to_dict(self) -> dict[str, Any]:
        return {"round": self.round, "best_objective": self.best_objective}


@dataclass
class TrainResult:
    run_dir: Path
    rounds_done: int
    last: dict[str, float]
    best_objective: float
    interrupted: bool = False


def check_run_dir(run_dir: Path, *, resume: bool, force: bool) -> None:
    """Refuse to overwrite a run (or resume a missing one) before any work starts."""
    run_dir = Path(run_dir)
    # The nearest existing path decides whether the folder can be made at all: a file
    # there would otherwise surface as a raw "[Errno 20] Not a directory" mid-start.
    existing = next((p for p in (run_dir, *run_dir.parents) if p.exists()), None)
    if existing is not None and not existing.is_dir():
        if existing == run_dir:
            raise RunDirError(
                f"run directory {str(run_dir)!r} is a file, not a folder; pass --run-dir a "
                "folder path (a new one, or a run's to --resume)"
            )
        raise RunDirError(
            f"cannot make run directory {str(run_dir)!r}: {str(existing)!r} is a file, not a folder"
        )
    if resume:
        if not (run_dir / "config.toml").is_file():
            raise RunDirError(f"cannot resume: {str(run_dir)!r} has no config.toml")
    elif run_dir.exists() and any(run_dir.iterdir()) and not force:
        raise RunDirError(
            f"run directory {str(run_dir)!r} already exists; pass --resume to continue "
            "it or --force to overwrite it"
        )


def create_run_dir(run_dir: Path, config: RunConfig) -> None:
    if run_dir.exists():
        shutil.rmtree(run_dir)
    (run_dir / "checkpoints").mkdir(parents=True)
    atomic_write_text(run_dir / "config.toml", config.to_toml())


def _agent_for(config: RunConfig, vec: VectorMorphogenesisEnv) -> PPOAgent:
    return PPOAgent(
        vec.slot_config, GLOBAL_DIM, SLOT_DIM, vec.action_spec.blueprints,
        config=config.ppo, device=config.run.device,
    )  # fmt: skip


def load_agent(
    path: str | Path, slot_config: SlotConfig, blueprints, device: str = "cpu"
) -> tuple[PPOAgent, dict[str, Any]]:
    """A PPO checkpoint for ``slot_config`` (any slot layout); checks the obs schema."""
    loaded = safe_torch_load(path)
    if isinstance(loaded, dict) and loaded.get("format") == RUN_STATE_FORMAT:
        raise CheckpointError(_run_state_message(Path(path), loaded))
    payload = check_envelope(loaded, path)
    try:
        ObservationSchema.from_dict(payload.get("observation_schema", {})).check_matches(
            DEFAULT_SCHEMA, what=f"checkpoint {path}"
        )
    except SchemaMismatchError as exc:
        raise CheckpointError(
            f"checkpoint {path}: incompatible observation schema: {exc}"
        ) from None
    expected = {"global_dim": GLOBAL_DIM, "slot_dim": SLOT_DIM, "blueprints": blueprints}
    agent = PPOAgent.from_checkpoint(payload, path, slot_config, device, expected)
    return agent, payload


def _run_state_message(path: Path, payload: dict[str, Any]) -> str:
    """What a scripted run's checkpoint is, and what to run instead of evaluating it."""
    controller = payload.get("controller")
    saved = path.parent.parent / "config.toml"
    if controller is None and saved.is_file():  # written before the controller was stored
        with contextlib.suppress(ConfigError):
            controller = load_toml(saved).get("run", {}).get("controller")
    run = f"a {controller!r} run" if controller else "a scripted-controller run"
    what = (
        f"checkpoint {str(path)!r} is the run state of {run} (round counters only), not a PPO agent"
    )
    if controller == "shipped":
        return f"{what}: to evaluate the shipped policy it played, run `esper eval shipped`"
    summary = path.parent.parent / "summary.md"
    results = f"; its results are in {summary}" if summary.is_file() else ""
    return (
        f"{what}: a scripted controller has no weights to evaluate{results}; to evaluate "
        "the trained policy shipped with Esper, run `esper eval shipped`"
    )


def _save(
    run_dir: Path, agent: PPOAgent | None, state: RunState, name: str, controller: str
) -> Path:
    path = run_dir / "checkpoints" / name
    run = state.to_dict()
    if agent is not None:
        save_checkpoint(
            {**agent.state_dict(), "observation_schema": DEFAULT_SCHEMA.to_dict(), "run": run},
            path,
        )
    else:  # the controller lets `esper eval` say what this file is (`load_agent`)
        atomic_torch_save({"format": RUN_STATE_FORMAT, "controller": controller, "run": run},
                          path)  # fmt: skip
    return path


def _load_state(run_dir: Path, config: RunConfig, vec) -> tuple[PPOAgent | None, RunState]:
    path = run_dir / "checkpoints" / "last.pt"
    if not path.is_file():  # interrupted before the first round finished
        agent = _agent_for(config, vec) if config.run.controller == "ppo" else None
        return agent, RunState()
    if config.run.controller == "ppo":
        agent, payload = load_agent(
            path, vec.slot_config, vec.action_spec.blueprints, config.run.device
        )
        run = payload.get("run", {})
    else:
        payload = safe_torch_load(path)
        if not isinstance(payload, dict) or payload.get("format") != RUN_STATE_FORMAT:
            raise CheckpointError(f"checkpoint {path}: not an Esper run-state file")
        agent, run = None, payload["run"]
    return agent, RunState(int(run.get("round", 0)), float(run.get("best_objective", -1e300)))


def rounds_done(run_dir: str | Path) -> int:
    """Complete rounds recorded in ``run_dir/checkpoints/last.pt`` (0 when absent)."""
    path = Path(run_dir) / "checkpoints" / "last.pt"
    if not path.is_file():
        return 0
    payload = safe_torch_load(path)
    run = payload.get("run", {}) if isinstance(payload, dict) else {}
    return int(run.get("round", 0))


def _check_before_start(config: RunConfig, run_dir: Path, resume: bool, force: bool, dist) -> None:
    """Every check that can fail without building anything: bad input never leaves a
    half-made run folder behind."""
    if resume and force:
        raise RunDirError("--resume continues a run and --force overwrites it: pass one")
    check_devices_available(config.run)
    check_episodes(config.run)
    check_run_limits(config, env_shard(config.run.envs, dist).count)
    if config.run.tensorboard and dist.is_main:
        tensorboard_writer(None)
    if dist.is_main or resume:  # other ranks would race with rank 0 creating the folder
        check_run_dir(run_dir, resume=resume, force=force)
    if resume:
        done = rounds_done(run_dir)
        if done >= config.run.updates:
            raise RunDirError(
                f"nothing to do: {str(run_dir)!r} has finished {done * config.run.envs} "
                f"episodes ({done} rounds of {config.run.envs} envs); pass --episodes N with "
                f"N > {done * config.run.envs} to extend it"
            )


def train(
    config: RunConfig,
    run_dir: str | Path,
    *,
    resume: bool = False,
    force: bool = False,
    progress: Callable[[int, int, dict[str, float]], None] | None = None,
    live: Callable[[Progress], None] | None = None,
    log: Callable[[str], None] | None = None,
    stop_after: int | None = None,
    dist: DistContext = SINGLE,
    command: list[str] | None = None,
    tune_process: bool = False,
) -> TrainResult:
    """Train (or, for scripted controllers, just run) ``config`` into ``run_dir``.

    ``progress(done, total, last)`` is called after every round, ``live`` after every
    lockstep env step (`Progress`). ``stop_after`` ends the run after that many rounds
    in this call (tests use it to interrupt and resume). Ctrl-C ends it cleanly after
    saving what was complete. ``dist``: this process's rank in a data-parallel job (see
    the module docstring). ``command`` is recorded in the provenance (default sys.argv).
    ``tune_process``: this process is the caller's to tune (the CLI): torch's threads are
    set from ``run.threads`` and the allocator keeps freed memory (`esper.speed`); else
    both stay as they are.
    """
    run_dir = Path(run_dir)
    started = time.monotonic()
    _check_before_start(config, run_dir, resume, force, dist)
    shard = env_shard(config.run.envs, dist)
    # Building the envs validates task, slots and data before anything is written; the
    # speed settings (batched envs, layout, threads) are resolved with them.
    vec, speed = build_envs(config, shard.count, tune_process=tune_process)
    created = False
    try:
        agent, state = (
            _load_state(run_dir, config, vec)
            if resume
            else (_agent_for(config, vec) if config.run.controller == "ppo" else None, RunState())
        )
        record = provenance.collect(config.run.device, config.run.env_devices, command)
        record["speed"] = speed.to_dict()
        if dist.is_main:
            if not resume:
                create_run_dir(run_dir, config)
                created = True
                # Ctrl-C in round 0 leaves one too
                _save(run_dir, agent, state, "last.pt", config.run.controller)
            else:  # --episodes may have grown: config.toml says what this run now is
                atomic_write_text(run_dir / "config.toml", config.to_toml())
                truncate_telemetry(run_dir, state.round)
            provenance.append(run_dir, record)
        writer_dir = run_dir if dist.is_main else None
        telemetry = Telemetry(writer_dir, tensorboard=config.run.tensorboard and dist.is_main)
    except Exception:
        vec.close()
        if created:  # a failed start leaves nothing behind, so a retry is a plain start
            shutil.rmtree(run_dir, ignore_errors=True)
        raise
    if agent is not None:
        agent.distribute(dist, shard)  # rank 0's weights everywhere
    if not dist.is_main:
        log = progress = live = None
    if log is not None:
        log(
            f"{'resuming' if resume else 'training'} {config.run.controller} on "
            f"{config.run.task} (slots {' '.join(vec.slot_config.slot_ids)}; "
            f"{config.run.envs} envs x {config.run.updates} rounds of {vec.max_epochs} steps, "
            f"from round {state.round}) -> {run_dir}"
        )
        log(f"speed: {speed.summary()} (provenance.json says why)")
    barrier(dist)
    total = config.run.updates
    last: dict[str, float] = {}
    interrupted = False
    done_here, round_time = 0, 0.0
    try:
        with telemetry:
            telemetry.emit(
                RunStarted(
                    run_dir.name, config.run.controller, config.run.task,
                    list(vec.slot_config.slot_ids), config.run.envs, config.run.seed, resume,
                    config.run.episodes, record,
                )
            )  # fmt: skip
            try:
                if config.run.baseline and config.run.controller != "static" and state.round == 0:
                    _baseline_round(vec, config, telemetry, dist, shard.offset, live)
                rounds_here = total - state.round
                if stop_after is not None:
                    rounds_here = min(rounds_here, stop_after)
                clock = ProgressClock("train", rounds_here, vec.max_epochs, config.run.envs, live,
                                      run_rounds=total)  # fmt: skip
                while state.round < total and (stop_after is None or done_here < stop_after):
                    k = state.round
                    t0 = time.monotonic()
                    on_step = clock.on_step(k, done_here)
                    records = _play_round(vec, k, config, agent, telemetry, dist, shard.offset,
                                          on_step)  # fmt: skip
                    if agent is not None:
                        diagnostics = agent.update()
                        telemetry.emit(PPOUpdate(k, (k + 1) * config.run.envs, diagnostics))
                    last = summarize(records)
                    state.round = k + 1
                    done_here += 1
                    if dist.is_main:
                        _checkpoint(run_dir, agent, state, last, config, telemetry)
                    wall = time.monotonic() - t0
                    round_time += wall
                    steps = config.run.envs * vec.max_epochs
                    telemetry.emit(RoundEnded(k, state.round * config.run.envs, steps, wall,
                                              steps / wall if wall > 0 else 0.0))  # fmt: skip
                    telemetry.flush()
                    if progress is not None:
                        progress(state.round, total, last)
            except KeyboardInterrupt:
                interrupted = True
            steps_here = done_here * config.run.envs * vec.max_epochs
            telemetry.emit(
                RunFinished(
                    state.round, state.round * config.run.envs, done_here,
                    time.monotonic() - started,
                    steps_here / round_time if round_time > 0 else 0.0, interrupted,
                )
            )  # fmt: skip
    except Exception:
        vec.close()
        if created and done_here == 0:
            # A fresh run that failed before finishing one round has nothing to resume:
            # leave no folder, so that fixing the input and rerunning is a plain start.
            shutil.rmtree(run_dir, ignore_errors=True)
        raise
    vec.close()
    return TrainResult(run_dir, state.round, last, state.best_objective, interrupted)


def _baseline_round(vec, config: RunConfig, telemetry, dist, offset: int, live) -> None:
    """The static host on round 0's seeds: what the learning curve is compared with."""
    clock = ProgressClock("baseline", 1, vec.max_epochs, config.run.envs, live)
    records = static_round(vec, config.run.seed, offset, clock.on_step(0, 0))
    for part in gather_objects(records, dist):
        for r in part:
            telemetry.emit(BaselineEpisodeEnded(**dataclasses.asdict(r.event())))


class _EventList:
    """Holds a rank's events of one round until rank 0 writes them."""

    def __init__(self) -> None:
        self.events: list[Any] = []

    def emit(self, event: Any) -> None:
        self.events.append(event)


def _play_round(
    vec: VectorMorphogenesisEnv,
    k: int,
    config: RunConfig,
    agent: PPOAgent | None,
    telemetry: Telemetry,
    dist: DistContext,
    offset: int,
    on_step: Callable[[int], None] | None = None,
) -> list[EpisodeRecord]:
    """Round ``k`` on this rank's envs; returns the episodes of every rank's envs."""
    sink: Any = _EventList() if dist.active else telemetry
    if agent is not None:
        records = run_round(vec, k, config.run.seed, agent=agent, learn=True, telemetry=sink,
                            env_offset=offset, on_step=on_step)  # fmt: skip
    else:
        scripted = make_scripted(config, k, vec.num_envs, env_offset=offset,
                                 action_spec=vec.action_spec)  # fmt: skip
        records = run_round(vec, k, config.run.seed, scripted=scripted, telemetry=sink,
                            env_offset=offset, on_step=on_step)  # fmt: skip
    if not dist.active:
        return records
    parts = gather_objects((sink.events, records), dist)
    for events, _ in parts:
        for event in events:
            telemetry.emit(event)  # rank 0 writes; elsewhere telemetry is in memory only
    return [record for _, part in parts for record in part]


def _checkpoint(run_dir, agent, state, last, config, telemetry) -> None:
    k = state.round
    best = last["objective"] > state.best_objective
    if best:
        state.best_objective = last["objective"]
    path = _save(run_dir, agent, state, "last.pt", config.run.controller)
    telemetry.emit(CheckpointSaved(str(path), k - 1, k * config.run.envs, False))
    if best:
        atomic_write_bytes(run_dir / "checkpoints" / "best.pt", path.read_bytes())
        telemetry.emit(CheckpointSaved(str(run_dir / "checkpoints" / "best.pt"), k - 1,
                                       k * config.run.envs, True))  # fmt: skip
    if k % config.run.checkpoint_every == 0:
        atomic_write_bytes(run_dir / "checkpoints" / f"round_{k:06d}.pt", path.read_bytes())


def evaluate(
    config: RunConfig,
    *,
    checkpoint: str | Path | None = None,
    episodes: int = 8,
    deterministic: bool = True,
    live: Callable[[Progress], None] | None = None,
    tune_process: bool = False,
) -> list[EpisodeRecord]:
    """Play ``episodes`` evaluation episodes (seeds disjoint from training) with the
    checkpoint's agent, or with ``config.run.controller`` when no checkpoint is given;
    ``live`` is called after every lockstep env step; ``tune_process`` as in `train`."""
    if episodes < 1:
        raise ConfigError(f"episodes must be >= 1, got {episodes}")
    check_devices_available(config.run)
    num_envs = min(config.run.envs, episodes)
    if -(-episodes // num_envs) > MAX_ROUNDS:
        raise ConfigError(
            f"episodes {episodes} over {num_envs} envs is {-(-episodes // num_envs)} rounds; "
            f"at most {MAX_ROUNDS} (each round's index is part of its episode seeds): use "
            f"--episodes <= {MAX_ROUNDS * num_envs} or more --envs"
        )
    check_run_limits(config, num_envs)
    vec, _ = build_envs(config, num_envs, tune_process=tune_process)
    agent = None
    if checkpoint is not None:
        agent, _ = load_agent(checkpoint, vec.slot_config, vec.action_spec.blueprints,
                              config.run.device)  # fmt: skip
    records: list[EpisodeRecord] = []
    k = 0
    clock = ProgressClock("eval", -(-episodes // num_envs), vec.max_epochs, num_envs, live)
    while len(records) < episodes:
        on_step = clock.on_step(k, k)
        if agent is not None:
            out = run_round(vec, k, config.run.seed, agent=agent, deterministic=deterministic,
                            evaluation=True, on_step=on_step)  # fmt: skip
        else:
            scripted = make_scripted(config, k, num_envs, evaluation=True,
                                     action_spec=vec.action_spec)  # fmt: skip
            out = run_round(vec, k, config.run.seed, scripted=scripted, evaluation=True,
                            on_step=on_step)  # fmt: skip
        records += out
        k += 1
    vec.close()
    return records[:episodes]
