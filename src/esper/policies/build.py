"""Build a shipped policy from a fixed seed: clone a teacher, fine-tune with PPO, pick.

    esper build-policy --out src/esper/policies/digits_v1.pt --seed 0

1. **Demonstrations**: the teacher (the heuristic by default) plays ``demo_rounds``
   rounds of ``envs`` lockstep episodes; λ is drawn per episode from ``lambda_range``.
2. **Cloning** (`esper.rl.cloning.clone`), then ``dagger_rounds`` of DAgger: the clone
   plays (sampled), the teacher labels its states, the clone is refit on everything.
   The clone's agreement with the teacher on each DAgger round's states — states it
   was not trained on — is recorded.
3. **PPO fine-tuning** with twin credit (``reward_mode="twin"``) over the λ range, kept
   near the clone by ``PPOConfig.prior_kl_coef`` (the clone is `PPOAgent.set_prior`).
4. **Choice**: clone, fine-tuned policy and teacher play the same ``validation_envs``
   training-side seeds at the default λ (objective mode). The fine-tuned policy is
   shipped only if its mean objective beats the clone's; the record says which won.

Every episode seed comes from (``seed``, env, round) as in `esper.experiment.episode_seed`
(training side: disjoint from the evaluation seeds of `esper eval` and the benches).
"""

from __future__ import annotations

import copy
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from esper.env import GLOBAL_DIM, SLOT_DIM, EnvConfig
from esper.env.vector import VectorMorphogenesisEnv
from esper.experiment import episode_seed, run_round
from esper.policy import AlwaysGrowController, ControllerBatch, HeuristicController
from esper.rl import PPOAgent, PPOConfig
from esper.rl.checkpoint import save_checkpoint
from esper.rl.cloning import agreement, clone, collect_demonstrations

TEACHERS = ("heuristic", "always-grow")
# Rounds of the phases (seed = episode_seed(seed, env, round)): far apart, never equal.
_DAGGER_ROUND, _PPO_ROUND, _VALIDATION_ROUND = 100, 1_000, 50_000


# A small network (the shipped file stays ~0.3 MB) and a gentle fine-tune: low learning
# rate, KL guard to the clone, a little entropy.
FINE_TUNE = PPOConfig(
    hidden=64, embed=32, learning_rate=2e-4, ent_coef=0.003, prior_kl_coef=0.05,
    n_epochs=4, num_minibatches=2, target_kl=0.02,
)  # fmt: skip


@dataclass(frozen=True)
class BuildConfig:
    task: str = "digits"
    task_options: dict[str, Any] = field(default_factory=lambda: {"width": 1})
    max_epochs: int | None = None  # None: the task's episode (digits: 20 epochs)
    batches_per_step: int | None = None
    # Past λ ≈ 0.1 growing barely pays on digits width 1, below it it does: a range across
    # that point gives the policy a reason to read λ.
    lambda_range: tuple[float, float] = (0.01, 0.15)
    default_lambda: float = 0.05  # validation λ
    teacher: str = "heuristic"
    envs: int = 8
    demo_rounds: int = 3
    dagger_rounds: int = 1
    clone_epochs: int = 150
    ppo_rounds: int = 20
    validation_envs: int = 8
    ppo: PPOConfig = field(default_factory=lambda: FINE_TUNE)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.teacher not in TEACHERS:
            raise ValueError(f"unknown teacher {self.teacher!r}; allowed: {', '.join(TEACHERS)}")
        for name in ("envs", "demo_rounds", "clone_epochs", "validation_envs"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


QUICK = BuildConfig(
    max_epochs=4, batches_per_step=2, envs=2, demo_rounds=2, dagger_rounds=1,
    clone_epochs=20, ppo_rounds=1, validation_envs=2,
)  # fmt: skip


def make_teacher(name: str, blueprints: tuple[str, ...]) -> Callable[[], object]:
    if name == "heuristic":
        return HeuristicController
    # Always-grow plants the layer-doubling width seed where the host offers one.
    preferred = next((b for b in ("wide_x1", "conv_heavy", "mlp") if b in blueprints), None)
    if preferred is None:
        raise ValueError(f"always-grow needs wide_x1, conv_heavy or mlp among {blueprints}")
    return lambda: AlwaysGrowController(blueprints.index(preferred))


def _env_config(config: BuildConfig, **changes: Any) -> EnvConfig:
    base = EnvConfig(
        task=config.task,
        task_options=dict(config.task_options),
        max_epochs=config.max_epochs,
        batches_per_step=config.batches_per_step,
        growth_penalty_range=config.lambda_range,
        reward_mode="twin",
    )
    return replace(base, **changes)


def _seeds(config: BuildConfig, round_index: int) -> list[int]:
    return [episode_seed(config.seed, i, round_index) for i in range(config.envs)]


def _export(agent: PPOAgent, path: Path, build: dict[str, Any]) -> Path:
    """Weights and normalisers only: fresh optimiser state, no prior, no KL guard."""
    config = replace(agent.config, prior_kl_coef=0.0)
    out = PPOAgent(agent.slot_config, agent.global_dim, agent.slot_dim, agent.blueprints,
                   config=config, blends=agent.blends)  # fmt: skip
    out.network.load_state_dict(agent.network.state_dict())
    out.obs_normalizer.load_state_dict(agent.obs_normalizer.state_dict())
    out.return_normalizer.load_state_dict(agent.return_normalizer.state_dict())
    out.counters.update(agent.counters)
    path.parent.mkdir(parents=True, exist_ok=True)
    return save_checkpoint({**out.state_dict(), "build": build}, path)


def _validate(vec, config: BuildConfig, agent=None, teacher=None) -> list[float]:
    """Objectives of one lockstep round on the validation seeds (argmax actions)."""
    if agent is not None:
        records = run_round(vec, _VALIDATION_ROUND, config.seed, agent=agent, deterministic=True)
    else:
        scripted = ControllerBatch(lambda i: teacher(), vec.num_envs)
        records = run_round(vec, _VALIDATION_ROUND, config.seed, scripted=scripted)
    return [r.objective for r in records]


def build_policy(
    config: BuildConfig,
    out: str | Path,
    log: Callable[[str], None] = print,
    command: str = "",
    clone_out: str | Path | None = None,
) -> dict[str, Any]:
    """Build, choose and write the policy to ``out``; returns the build record.
    ``clone_out`` also keeps the clone before fine-tuning (to compare the two)."""
    start = time.perf_counter()
    timings: dict[str, float] = {}
    vec = VectorMorphogenesisEnv(config.envs, _env_config(config))
    teacher = make_teacher(config.teacher, vec.action_spec.blueprints)
    ppo = replace(config.ppo, seed=config.seed)
    agent = PPOAgent(vec.slot_config, GLOBAL_DIM, SLOT_DIM, vec.action_spec.blueprints, ppo)

    t = time.perf_counter()
    seeds = [s for r in range(config.demo_rounds) for s in _seeds(config, r)]
    demos = collect_demonstrations(vec, teacher, seeds)
    timings["demonstrations_s"] = time.perf_counter() - t
    log(f"{demos.num_episodes} {config.teacher} episodes in {timings['demonstrations_s']:.0f} s")
    t = time.perf_counter()
    losses = clone(agent, demos, epochs=config.clone_epochs, seed=config.seed)
    dagger_agreement = []
    for k in range(config.dagger_rounds):
        seeds = _seeds(config, _DAGGER_ROUND + k)
        more = collect_demonstrations(vec, teacher, seeds, learner=agent)
        dagger_agreement.append(agreement(agent, more))  # states it never trained on
        demos = demos + more
        losses = clone(agent, demos, epochs=config.clone_epochs, seed=config.seed + k + 1,
                       update_normalizer=False)  # fmt: skip
        log(f"DAgger round {k}: agreement on the clone's own states {dagger_agreement[-1]}")
    timings["cloning_s"] = time.perf_counter() - t
    agent.set_prior()
    prior = copy.deepcopy(agent)

    t = time.perf_counter()
    ppo_log = []
    for r in range(config.ppo_rounds):
        records = run_round(vec, _PPO_ROUND + r, config.seed, agent=agent, learn=True)
        diag = agent.update()
        ppo_log.append({
            "return": statistics.fmean(rec.episode_return for rec in records),
            "objective": statistics.fmean(rec.objective for rec in records),
            "prior_kl": diag["prior_kl"], "approx_kl": diag["approx_kl"],
        })  # fmt: skip
        log(f"PPO round {r}: {ppo_log[-1]}")
    timings["ppo_s"] = time.perf_counter() - t
    vec.close()

    t = time.perf_counter()
    val = VectorMorphogenesisEnv(
        config.validation_envs,
        _env_config(config, growth_penalty_range=None, growth_penalty=config.default_lambda,
                    reward_mode="objective"),
    )  # fmt: skip
    scores = {
        "clone": _validate(val, config, agent=prior),
        "fine_tuned": _validate(val, config, agent=agent),
        "teacher": _validate(val, config, teacher=teacher),
    }
    val.close()
    timings["validation_s"] = time.perf_counter() - t
    means = {k: statistics.fmean(v) for k, v in scores.items()}
    chosen = "fine_tuned" if means["fine_tuned"] > means["clone"] else "clone"
    timings["total_s"] = time.perf_counter() - start
    build = {
        "command": command,
        "config": _primitive(asdict(config)),
        "torch": str(torch.__version__),
        "machine": f"{platform.machine()} {torch.get_num_threads()} torch thread(s)",
        "timings": timings,
        "clone_losses": losses,
        "dagger_agreement": dagger_agreement,
        "ppo": ppo_log,
        "validation_objective": scores,
        "validation_mean": means,
        "chosen": chosen,
    }
    _export(agent if chosen == "fine_tuned" else prior, Path(out), _primitive(build))
    if clone_out is not None:
        _export(prior, Path(clone_out), _primitive({**build, "chosen": "clone"}))
    log(f"validation (λ {config.default_lambda}) mean objective {means}; shipped: {chosen}")
    return build


def _primitive(value: Any) -> Any:
    """Tuples to lists, so the record loads with ``torch.load(weights_only=True)``."""
    if isinstance(value, dict):
        return {str(k): _primitive(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_primitive(v) for v in value]
    return value
