"""The resolved configuration of an ``esper train`` run: one dataclass per TOML section.

    [run]        controller, task, slots, envs, episodes, seed, device, checkpointing
    [env]        episode length, reward, budget (`esper.env.EnvConfig` fields)
    [task]       task options and host-training overrides (free keys, checked by the task)
    [lifecycle]  seed lifecycle gates (`esper.model.LifecycleConfig`)
    [ppo]        learned controller (`esper.rl.PPOConfig`)
    [heuristic]  hand-written controller (`esper.policy.HeuristicConfig`)

Files are strict: an unknown section or key is an error naming the nearest valid one.
Command-line flags override the file; the resolved config is saved in the run folder.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from esper.config_io import ConfigError, dataclass_from_dict, dumps_toml, load_toml, nearest_hint
from esper.env import EnvConfig
from esper.model import LifecycleConfig
from esper.policy.controllers import HeuristicConfig
from esper.rl import PPOConfig
from esper.seeding import MAX_ENVS, MAX_ROUNDS, MAX_SEED
from esper.speed import check_switch

# "shipped": the trained policy packaged with Esper (esper.policies), run without learning
Controller = Literal["ppo", "heuristic", "random", "static", "shipped"]
CONTROLLERS: tuple[str, ...] = ("ppo", "heuristic", "random", "static", "shipped")


def _is_device(name: str) -> bool:
    try:
        torch.device(name)
    except (RuntimeError, TypeError):
        return False
    return True


@dataclass(frozen=True)
class RunSection:
    controller: Controller = "ppo"
    task: str = "digits"
    slots: tuple[str, ...] | None = None  # None: the task's default slots
    # envs stepped in lockstep; one PPO update = one episode of each. 16 envs x 12 rounds
    # was tried as the main job (less round noise) and measured worse on this 2-core
    # machine: 7 min of rounds, +0.9 SE of learning, ending below the static host; 4 x 24
    # took 2.3 min, +1.0 SE, ending above it (BENCHMARKS.md, "A main job that learns").
    envs: int = 4
    episodes: int = 96  # total episodes over all envs (rounded up to whole updates)
    seed: int = 0
    device: str = "cpu"  # the policy's device (and the envs', unless env_devices is set)
    env_devices: tuple[str, ...] | None = None  # envs placed round-robin, e.g. cuda:0 cuda:1
    # Train the envs' CNN hosts as one grouped computation (VectorMorphogenesisEnv
    # batched: same trajectories; 4.7x env steps/s for 16 digits envs on one thread).
    # "auto": wherever the envs can take that path, else the per-env loop (`esper.speed`);
    # true: refuse a run that cannot; false: always the per-env loop.
    batched_envs: bool | str = "auto"
    checkpoint_every: int = 10  # rounds between kept copies (last.pt is written every round)
    tensorboard: bool = False
    # torch intra-op threads of this process (set by the CLI); 0 = auto (`esper.speed`):
    # the idle cores (CPU time over 0.2 s; up to 4) when one training batch is big enough for a
    # second thread to pay, else 1. Idle cores, because a second thread costs 10-16x when
    # the cores are busy (measured on 2 cores at load 6: static digits, 1 env 3.2 -> 0.34
    # env steps/s, 4 envs 5.1 -> 0.31).
    threads: int = 0
    # "auto": the CLI asks glibc's malloc to keep freed memory for the next batch instead
    # of faulting it in afresh (`esper.speed.keep_freed_memory`); false: leave it alone.
    keep_freed_memory: bool | str = "auto"
    # play one round of the static host (no controller) on round 0's seeds first: the
    # baseline line of the learning curves (one round of extra time)
    baseline: bool = True

    def __post_init__(self) -> None:
        # One message per field, naming it: `esper eval` has no episodes or
        # checkpoint_every of its own, so a message listing them would mislead there.
        if not 0 <= self.seed <= MAX_SEED:
            raise ValueError(
                f"seed must be in 0..{MAX_SEED} (episode seeds are derived from it), "
                f"got {self.seed}"
            )
        if self.threads < 0:
            raise ValueError(f"threads must be >= 0 (0 = auto), got {self.threads}")
        check_switch("batched_envs", self.batched_envs)
        check_switch("keep_freed_memory", self.keep_freed_memory)
        if not 1 <= self.envs <= MAX_ENVS:
            raise ValueError(
                f"envs must be in 1..{MAX_ENVS} (each env's index is part of its episode "
                f"seeds), got {self.envs}"
            )
        for name in ("episodes", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.updates > MAX_ROUNDS:
            raise ValueError(
                f"episodes {self.episodes} over {self.envs} envs is {self.updates} rounds; "
                f"at most {MAX_ROUNDS} rounds (each round's index is part of its episode "
                f"seeds): use --episodes <= {MAX_ROUNDS * self.envs} or more --envs"
            )

        for name in (self.device, *(self.env_devices or ())):
            if not _is_device(name):
                raise ValueError(f"device {name!r} unknown; allowed: cpu, cuda, cuda:N, mps, ...")

    @property
    def updates(self) -> int:
        return -(-self.episodes // self.envs)


@dataclass(frozen=True)
class EnvSection:
    max_epochs: int | None = None  # steps per episode; None = the task's default
    batches_per_step: int | None = None  # None = the task's setting (often a full epoch)
    reward_mode: Literal["objective", "contribution", "twin"] = "objective"
    growth_penalty: float = 0.05  # λ in the objective q − λ·g
    # [lo, hi]: each episode draws its λ uniformly from it (the policy observes λ), so
    # the policy has to read λ: at 0.005 growing pays, at 0.2 it does not. It prices every
    # controller's episodes and `esper eval`'s (from the episode seed, so runs on the same
    # seeds stay paired). A config or --set that gives env.growth_penalty without a range
    # fixes λ at that value (config_from_dict).
    growth_penalty_range: tuple[float, float] | None = (0.005, 0.2)
    # [lo, hi]: each episode draws its host's width (depth) from lo..hi, from the episode
    # seed (a curriculum of hosts; the task must take a `width` / `depth` option). The
    # slots stay the task's default ones; hosts of several shapes do not batch.
    host_widths: tuple[int, int] | None = None
    host_depths: tuple[int, int] | None = None
    contribution_weight: float = 1.0
    max_growth: float | None = None  # parameter budget as a growth ratio; None = no budget
    data_root: str | None = None  # folder of the task's files (fashion-mnist, cifar10, text)
    data_seed: int = 0


@dataclass(frozen=True)
class RunConfig:
    run: RunSection = field(default_factory=RunSection)
    env: EnvSection = field(default_factory=EnvSection)
    task: dict[str, Any] = field(default_factory=dict)
    lifecycle: LifecycleConfig = field(default_factory=LifecycleConfig)
    ppo: PPOConfig = field(default_factory=lambda: PPOConfig(**MAIN_JOB_PPO))
    heuristic: HeuristicConfig = field(default_factory=HeuristicConfig)

    def env_config(self) -> EnvConfig:
        return EnvConfig(
            task=self.run.task,
            task_options=dict(self.task),
            slots=self.run.slots,
            max_epochs=self.env.max_epochs,
            batches_per_step=self.env.batches_per_step,
            reward_mode=self.env.reward_mode,
            growth_penalty=self.env.growth_penalty,
            growth_penalty_range=self.env.growth_penalty_range,
            host_ranges={
                name: bounds
                for name, bounds in (
                    ("width", self.env.host_widths),
                    ("depth", self.env.host_depths),
                )
                if bounds is not None
            },
            contribution_weight=self.env.contribution_weight,
            max_growth=self.env.max_growth,
            lifecycle=self.lifecycle,
            device=self.run.device,
            data_seed=self.env.data_seed,
            data_root=self.env.data_root,
        )

    def to_toml(self) -> str:
        sections = {name: getattr(self, name) for name in _SECTIONS}
        return dumps_toml(sections)


_SECTIONS: dict[str, type] = {
    "run": RunSection,
    "env": EnvSection,
    "task": dict,
    "lifecycle": LifecycleConfig,
    "ppo": PPOConfig,
    "heuristic": HeuristicConfig,
}


# `esper train`'s PPO settings where they differ from PPOConfig's (CleanRL's) defaults;
# a [ppo] table or --set ppo.KEY overrides them key by key. At 3e-4 the policy moved
# ~0.003 nats per update (approx KL), too slowly for a short run's updates to show; 8
# minibatches give more gradient steps per update (issue 22; BENCHMARKS.md "A main job
# that learns").
MAIN_JOB_PPO: dict[str, Any] = {"learning_rate": 1e-3, "num_minibatches": 8}


def config_from_dict(data: dict[str, Any]) -> RunConfig:
    sections: dict[str, Any] = {}
    for name, value in data.items():
        if name not in _SECTIONS:
            raise ConfigError(f"unknown section [{name}]{nearest_hint(name, list(_SECTIONS))}")
        if not isinstance(value, dict):
            raise ConfigError(f"[{name}] must be a table, got {value!r}")
        cls = _SECTIONS[name]
        if name == "ppo":  # the main job's PPO defaults, then the given keys
            value = {**MAIN_JOB_PPO, **value}
        if name == "env" and "growth_penalty" in value and "growth_penalty_range" not in value:
            # a λ given without a range is the λ of every episode (not overridden by the
            # default range: `--set env.growth_penalty=0.1` means λ = 0.1)
            value = {**value, "growth_penalty_range": None}
        sections[name] = dict(value) if cls is dict else dataclass_from_dict(cls, value, name)
    return RunConfig(**sections)


def load_config(path: str | Path | None, overrides: dict[str, dict[str, Any]] | None = None):
    """Read a TOML file (or defaults) and apply ``{section: {key: value}}`` overrides."""
    data = load_toml(path) if path is not None else {}
    for section, values in (overrides or {}).items():
        data.setdefault(section, {})
        if not isinstance(data[section], dict):
            raise ConfigError(f"[{section}] must be a table")
        data[section].update(values)
    return config_from_dict(data)


def check_devices_available(run: RunSection) -> None:
    """Refuse a device this machine lacks (before anything is built or written)."""
    for name in (run.device, *(run.env_devices or ())):
        device = torch.device(name)
        if device.type == "cuda":
            count = torch.cuda.device_count() if torch.cuda.is_available() else 0
            index = device.index or 0
            if count == 0:
                raise ConfigError(
                    f"device {name!r} is not available: this machine has no CUDA device "
                    "(torch.cuda.is_available() is False); use --device cpu"
                )
            if index >= count:
                raise ConfigError(
                    f"device {name!r} is not available: this machine has {count} CUDA "
                    f"device(s), cuda:0 .. cuda:{count - 1}"
                )
        elif device.type == "mps" and not torch.backends.mps.is_available():
            raise ConfigError(f"device {name!r} is not available on this machine; use --device cpu")
        elif device.type not in ("cpu", "cuda", "mps"):
            raise ConfigError(f"device {name!r} is not supported; allowed: cpu, cuda, cuda:N, mps")


def check_episodes(run: RunSection) -> None:
    """A round plays one episode in every env, so ``episodes`` must fill whole rounds."""
    if run.episodes % run.envs:
        down, up = run.episodes // run.envs * run.envs, run.updates * run.envs
        options = f"{down} or {up}" if down else f"{up}"
        raise ConfigError(
            f"episodes {run.episodes} is not a multiple of envs {run.envs} (one round plays "
            f"one episode in each env): use --episodes {options}, or --envs dividing it"
        )


def check_run_limits(config: RunConfig, envs_in_process: int) -> None:
    """Limits that depend on this machine, checked before anything is built: torch
    threads within its cores, and the estimated memory of ``envs_in_process`` envs
    (`esper.training.sizing`) within the memory of the devices they are placed on."""
    cores = os.cpu_count() or 1
    if config.run.threads > cores:
        raise ConfigError(
            f"threads {config.run.threads} is more than this machine's {cores} cores; "
            f"allowed: 0 (auto) .. {cores}"
        )
    from esper.training import get_task
    from esper.training.sizing import estimate_memory, format_bytes

    options = dict(config.task)
    if config.env.batches_per_step is not None:  # as the env passes it (it has no size)
        options["batches_per_step"] = config.env.batches_per_step
    task = get_task(config.run.task, **options)  # bad task options fail here, unbuilt
    devices = config.run.env_devices or (config.run.device,)
    for device in dict.fromkeys(devices):
        envs = sum(1 for i in range(envs_in_process) if devices[i % len(devices)] == device)
        have = machine_memory(device)
        if envs == 0 or have is None:
            continue
        # "auto" is sized as the per-env loop: the batched path groups envs within a fixed
        # activation budget (`esper.training.batched.ACTIVATION_BUDGET`).
        need = estimate_memory(
            task, envs, batched=config.run.batched_envs is True,
            twin=config.env.reward_mode == "twin",
        )  # fmt: skip
        if need.total > have:
            sizes = ", ".join(f"task.{k}={v!r}" for k, v in config.task.items()) or "defaults"
            raise ConfigError(
                f"too large for this machine: {envs} env(s) of {config.run.task} ({sizes}) "
                f"need an estimated {format_bytes(need.total)} on {device} ({envs} x "
                f"{format_bytes(need.per_env)} per env: a host of {need.host.params:,} "
                "parameters with its gradients, optimiser state and rollback copy, and the "
                f"env's own state; plus {format_bytes(need.step)} for one batch of "
                f"{task.hparams.batch_size}); {device} has {format_bytes(have)}: use fewer "
                "--envs, a smaller host (task.width, task.depth, ...) or batch_size"
            )


def machine_memory(device: str) -> int | None:
    """Bytes of memory behind ``device``: the GPU's own for CUDA, else this machine's RAM
    (None where the platform does not say)."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return int(torch.cuda.get_device_properties(dev.index or 0).total_memory)
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):  # e.g. Windows has no sysconf
        return None


def replace_section(config: RunConfig, section: str, **changes: Any) -> RunConfig:
    return dataclasses.replace(
        config, **{section: dataclasses.replace(getattr(config, section), **changes)}
    )
