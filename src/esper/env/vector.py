"""`VectorMorphogenesisEnv`: E envs in lockstep in one process, batched tensors out.

* Env ``i`` is seeded with ``seed + i`` on the first reset, owns its own host, trainer
  and data order, so what env ``i`` sees does not depend on ``E``.
* Outputs are tensors with a leading ``E``: observations ``{"global": [E, G],
  "slots": [E, S, F]}``, conditional `ActionMasks` ``[E, ...]`` (built in one batched
  call from the envs' stage tensors), rewards ``[E]``, terminated / truncated ``[E]``.
* **Autoreset, same step**: when env ``i``'s episode ends, `step` resets it at once
  (with a seed drawn from that env's own generator). ``VectorStep.obs`` and ``.masks``
  are then the first observation / masks of the new episode, while
  ``VectorStep.final_obs`` holds the observation the finished episode ended on (for
  bootstrapping a truncated episode). For envs that did not finish, ``final_obs`` and
  ``obs`` rows are equal. ``infos[i]`` is the step info; ``infos[i]["reset_info"]`` is
  present when env ``i`` was reset.
* **Devices**: ``env_devices=["cuda:0", "cuda:1"]`` places env ``i`` on
  ``env_devices[i % len]`` (round-robin; default: the config's device). The data set is
  copied once per device, and each env on a GPU runs its step on its own CUDA stream, so
  one env's kernels need not queue behind another's. On CPU there are no streams.
* **Batched host training** (``batched=True``, or ``"auto"``: on wherever the envs
  can take it, else the per-env loop, silently): the envs' training phases run
  as one grouped computation per optimiser step (`esper.training.batched`, driven by
  `esper.env.lockstep` through the phases of `MorphogenesisEnv.step`); everything else
  (actions, validation and credit, governor, lifecycle, rewards) stays per env. An
  env's trajectory is the same, to float tolerance, as when it runs alone. CNN hosts
  with SGD in float32 on one device only (``True`` is refused otherwise, at
  construction; ``batched_reason`` says why ``"auto"`` chose the loop); a step whose
  envs cannot be batched (e.g. batch streams out of line) runs the per-env loop, and
  ``last_step_batched`` says which path the last step took.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

from esper.actions import ActionMasks, FactoredAction
from esper.env.environment import EnvConfig, MorphogenesisEnv
from esper.env.lockstep import LockstepStepper
from esper.env.masks import compute_batch_masks, stage_tensors


@dataclass
class VectorStep:
    obs: dict[str, torch.Tensor]
    masks: ActionMasks
    rewards: torch.Tensor  # [E] float32
    terminated: torch.Tensor  # [E] bool
    truncated: torch.Tensor  # [E] bool
    final_obs: dict[str, torch.Tensor]
    infos: list[dict[str, Any]]

    @property
    def dones(self) -> torch.Tensor:
        return self.terminated | self.truncated


def _stack(observations: Sequence[dict[str, np.ndarray]]) -> dict[str, torch.Tensor]:
    return {
        key: torch.from_numpy(np.stack([obs[key] for obs in observations]))
        for key in observations[0]
    }


class VectorMorphogenesisEnv:
    """E `MorphogenesisEnv` instances sharing one loaded data set, stepped together."""

    def __init__(
        self,
        num_envs: int,
        config: EnvConfig | None = None,
        *,
        seed: int = 0,
        env_devices: Sequence[str | torch.device] | None = None,
        batched: bool | str = False,
        **options: Any,
    ) -> None:
        if not isinstance(num_envs, int) or num_envs < 1:
            raise ValueError(f"num_envs must be an int >= 1, got {num_envs!r}")
        if not (isinstance(batched, bool) or batched == "auto"):
            raise ValueError(f'batched must be True, False or "auto", got {batched!r}')
        first = MorphogenesisEnv(config, **options)
        if not env_devices:
            self.envs = [first] + [
                MorphogenesisEnv(first.config, data=first.data) for _ in range(num_envs - 1)
            ]
        else:
            devices = [torch.device(d) for d in env_devices]
            data = {d: first.data.to(d) for d in dict.fromkeys(devices)}
            self.envs = [
                MorphogenesisEnv(replace(first.config, device=str(d)), data=data[d])
                for d in (devices[i % len(devices)] for i in range(num_envs))
            ]
        self.devices = [env.device for env in self.envs]
        self._streams = [
            torch.cuda.Stream(device=d) if d.type == "cuda" else None for d in self.devices
        ]
        self.num_envs = num_envs
        self.seed = seed
        self.config = first.config
        self.slot_config = first.slot_config
        self.action_spec = first.action_spec
        self.single_observation_space = first.observation_space
        self.single_action_space = first.action_space
        self._last_obs: list[dict[str, np.ndarray]] | None = None
        # Why these envs train one by one (None: they train batched).
        self.batched_reason: str | None = "batched=False"
        if batched is True:
            _check_batchable(first, self.devices)
            self.batched_reason = None
        elif batched == "auto":
            self.batched_reason = (
                "one env" if num_envs == 1 else _why_not_batchable(first, self.devices)
            )
        self._stepper = LockstepStepper() if self.batched_reason is None else None

    @property
    def batched(self) -> bool:
        return self._stepper is not None

    @property
    def last_step_batched(self) -> bool:
        """Whether the last `step` trained the hosts as one batched computation."""
        return self._stepper is not None and self._stepper.last_batched

    @property
    def max_epochs(self) -> int:
        """Steps per episode (the same for every env)."""
        return self.envs[0].max_epochs

    def reset(
        self, seed: int | None = None, *, seeds: Sequence[int] | None = None
    ) -> tuple[dict[str, torch.Tensor], ActionMasks, list[dict[str, Any]]]:
        """Reset every env; env i gets ``seeds[i]``, else ``seed + i`` (default: the
        constructor's seed)."""
        if seeds is None:
            base = self.seed if seed is None else seed
            seeds = [base + i for i in range(self.num_envs)]
        elif seed is not None or len(seeds) != self.num_envs:
            raise ValueError(
                f"pass either seed or one seed per env ({self.num_envs}), got seed={seed!r}, "
                f"{len(seeds)} seeds"
            )
        results = [env.reset(seed=s) for env, s in zip(self.envs, seeds, strict=True)]
        self._last_obs = [obs for obs, _ in results]
        return _stack(self._last_obs), self.masks(), [info for _, info in results]

    def masks(self) -> ActionMasks:
        """Conditional masks of every env, ``[E, ...]``, in one batched computation (each
        env with its own blueprint cost table)."""
        envs = self._started()
        stages, contributions = zip(
            *(stage_tensors(env.model.slot_states()) for env in envs), strict=True
        )
        env0 = envs[0]
        return compute_batch_masks(
            torch.stack(stages),
            torch.stack(contributions),
            torch.stack([env.blueprint_costs for env in envs]),
            torch.tensor([env.budget_left() for env in envs], dtype=torch.float64),
            fossilize_threshold=env0.lifecycle.fossilize_threshold,
            num_blends=len(env0.action_spec.blends),
        )

    def step(self, actions: torch.Tensor | np.ndarray | Sequence[FactoredAction]) -> VectorStep:
        """Step every env with its action (``[E, 4]`` indices or `FactoredAction`s)."""
        self._started()
        if isinstance(actions, torch.Tensor):
            actions = actions.detach().cpu().numpy()
        if len(actions) != self.num_envs:
            raise ValueError(f"got {len(actions)} actions for {self.num_envs} envs")
        final, current, infos = [], [], []
        rewards, terminated, truncated = [], [], []
        if self._stepper is not None:
            for env, action in zip(self.envs, actions, strict=True):
                env.parse_action(action)  # a bad action raises before any env steps
            steps = self._stepper.run(self.envs, actions)
        else:
            steps = [None] * self.num_envs
        for env, action, stream, done in zip(self.envs, actions, self._streams, steps, strict=True):
            with _on_stream(stream):
                obs, reward, term, trunc, info = env.step(action) if done is None else done
                final.append(obs)
                if term or trunc:
                    obs, info["reset_info"] = env.reset()
            current.append(obs)
            infos.append(info)
            rewards.append(reward)
            terminated.append(term)
            truncated.append(trunc)
        self._last_obs = current
        return VectorStep(
            obs=_stack(current),
            masks=self.masks(),
            rewards=torch.tensor(rewards, dtype=torch.float32),
            terminated=torch.tensor(terminated, dtype=torch.bool),
            truncated=torch.tensor(truncated, dtype=torch.bool),
            final_obs=_stack(final),
            infos=infos,
        )

    def synchronize(self) -> None:
        """Wait for the work queued on every env's stream (no-op on CPU)."""
        for stream in self._streams:
            if stream is not None:
                stream.synchronize()

    def _started(self) -> list[MorphogenesisEnv]:
        if self._last_obs is None:
            raise RuntimeError("call reset() before step() or masks()")
        return self.envs

    def close(self) -> None:
        for env in self.envs:
            env.close()


def _why_not_batchable(env: MorphogenesisEnv, devices: Sequence[torch.device]) -> str | None:
    """Why batched training cannot equal the per-env loop for these envs (None: it can)."""
    from esper.training.batched import supports_host

    if len(set(devices)) != 1:
        return f"batched=True needs every env on one device, got {sorted(map(str, set(devices)))}"
    cfg = env.train_config
    host = env.task.make_host(env.data)
    reason = supports_host(host)
    if reason is None and not all(p.is_contiguous() for p in host.parameters()):
        # The grouped network stacks the hosts' parameters and views their gradients flat.
        reason = "the grouped path takes NCHW hosts only, got channels_last (task.channels_last)"
    if reason is None and cfg.optimizer != "sgd":
        reason = f"batched=True supports optimizer 'sgd' only, got {cfg.optimizer!r}"
    if reason is None and cfg.amp != "off":
        reason = f"batched=True trains in float32 only, got amp={cfg.amp!r}"
    return None if reason is None else f"task {env.config.task!r} cannot run batched: {reason}"


def _check_batchable(env: MorphogenesisEnv, devices: Sequence[torch.device]) -> None:
    """Refuse ``batched=True`` where batched training cannot equal the per-env loop."""
    reason = _why_not_batchable(env, devices)
    if reason is not None:
        raise ValueError(reason)


def _on_stream(stream: torch.cuda.Stream | None) -> contextlib.AbstractContextManager:
    """Run on ``stream`` after the work already queued on its device's current stream
    (e.g. the env's reset, issued there); a no-op context on CPU."""
    if stream is None:
        return contextlib.nullcontext()
    stream.wait_stream(torch.cuda.current_stream(stream.device))
    return torch.cuda.stream(stream)
