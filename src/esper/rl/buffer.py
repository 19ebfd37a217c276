"""Rollout storage cut into per-env sequences that never cross an episode boundary.

Envs run in lockstep: every `add` holds one step of all N envs. Each env's steps are cut
into *segments* at episode ends (terminated or truncated) and at the end of the rollout.
A segment starts from the recurrent state the policy had at its first step (stored
here), so PPO replays it with one batched LSTM call and gets back exactly the
log-probabilities the rollout saw; no hidden-state reset inside a sequence is needed.

`build` pads segments to a common length into time-major ``[T, M]`` tensors. Padded steps
repeat the segment's last real step (so their masks stay valid) and are excluded
through ``valid``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields

import torch

from esper.actions import ActionMasks
from esper.policy.network import Hidden
from esper.slots import SlotConfig

_MASK_HEADS = ("op", "slot", "blueprint", "blend")


@dataclass
class SequenceBatch:
    """Padded time-major sequences: ``[T, M, ...]`` for M segments of length <= T."""

    obs: dict[str, torch.Tensor]  # normalised, as the policy saw them
    masks: ActionMasks
    actions: torch.Tensor  # [T, M, 4]
    log_probs: torch.Tensor  # [T, M, 4] per head at collection time
    values: torch.Tensor  # [T, M] critic estimate in reward units (de-normalised)
    rewards: torch.Tensor  # [T, M]
    next_values: torch.Tensor  # [T, M] V(s_{t+1}); bootstrap at truncation/cut, 0 if terminal
    valid: torch.Tensor  # [T, M] bool
    hidden0: Hidden  # each [1, M, H]

    @property
    def num_sequences(self) -> int:
        return self.valid.shape[1]

    def select(self, columns: torch.Tensor) -> SequenceBatch:
        """The sequences ``columns``, trimmed to the longest of them."""
        length = int(self.valid[:, columns].sum(0).max())
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "obs":
                out[f.name] = {k: v[:length, columns] for k, v in value.items()}
            elif f.name == "masks":
                out[f.name] = ActionMasks(*(t[:length, columns] for t in value.as_tuple()))
            elif f.name == "hidden0":
                out[f.name] = (value[0][:, columns], value[1][:, columns])
            else:
                out[f.name] = value[:length, columns]
        return SequenceBatch(**out)


class RolloutBuffer:
    """Steps of N lockstep envs, cut into episode-bounded segments for recurrent PPO."""

    def __init__(self, slot_config: SlotConfig, num_envs: int) -> None:
        if isinstance(num_envs, bool) or not isinstance(num_envs, int) or num_envs < 1:
            raise ValueError(f"num_envs must be a positive int, got {num_envs!r}")
        self.slot_config = slot_config
        self.num_envs = num_envs
        self.clear()

    def clear(self) -> None:
        self._steps: list[dict[str, object]] = []
        self._open_start = [0] * self.num_envs
        # (env, start, stop, bootstrap value or None when terminal)
        self._segments: list[tuple[int, int, int, torch.Tensor | None]] = []

    @property
    def num_steps(self) -> int:
        return len(self._steps)

    @property
    def num_segments(self) -> int:
        return len(self._segments)

    @property
    def has_open_segments(self) -> bool:
        return any(start < self.num_steps for start in self._open_start)

    def add(
        self,
        *,
        slot_ids: Sequence[str],
        obs: Mapping[str, torch.Tensor],
        masks: ActionMasks,
        actions: torch.Tensor,
        log_probs: torch.Tensor,
        values: torch.Tensor,
        hidden_in: Hidden,
        rewards: torch.Tensor,
        terminated: torch.Tensor,
        truncated: torch.Tensor,
        bootstrap_values: torch.Tensor | None = None,
    ) -> None:
        """One lockstep step of all envs; ``bootstrap_values[e]`` = V(final obs) if truncated."""
        self.slot_config.check_matches(slot_ids, what="the rollout step")
        n, s = self.num_envs, self.slot_config.num_slots
        checks = {
            "actions": (actions, (n, 4)),
            "log_probs": (log_probs, (n, 4)),
            "values": (values, (n,)),
            "rewards": (rewards, (n,)),
            "terminated": (terminated, (n,)),
            "truncated": (truncated, (n,)),
            "masks.slot": (masks.slot, (n, masks.slot.shape[1], s)),
            "obs['slots']": (obs["slots"], (n, s, obs["slots"].shape[-1])),
        }
        for name, (tensor, shape) in checks.items():
            if tuple(tensor.shape) != shape:
                raise ValueError(f"{name} must have shape {list(shape)}, got {list(tensor.shape)}")
        truncated = truncated.bool() & ~terminated.bool()
        if bool(truncated.any()) and bootstrap_values is None:
            raise ValueError("some envs were truncated: pass bootstrap_values (V of final obs)")
        t = len(self._steps)
        self._steps.append(
            {
                "obs": {k: obs[k].detach() for k in ("global", "slots")},
                **{f"mask_{head}": m.detach() for head, m in masks.as_dict().items()},
                "actions": actions.detach().long(),
                "log_probs": log_probs.detach().float(),
                "values": values.detach().float(),
                "rewards": rewards.detach().float(),
                "h": hidden_in[0].detach()[0],
                "c": hidden_in[1].detach()[0],
            }
        )
        for env in torch.nonzero(terminated.bool() | truncated).flatten().tolist():
            boot = bootstrap_values[env].detach().float() if truncated[env] else None
            self._segments.append((env, self._open_start[env], t + 1, boot))
            self._open_start[env] = t + 1

    def close_open_segments(self, bootstrap_values: torch.Tensor) -> None:
        """Cut every unfinished episode at the rollout end, bootstrapping from V(next obs)."""
        for env, start in enumerate(self._open_start):
            if start < self.num_steps:
                self._segments.append(
                    (env, start, self.num_steps, bootstrap_values[env].detach().float())
                )
                self._open_start[env] = self.num_steps

    def build(self) -> SequenceBatch:
        if self.has_open_segments:
            raise RuntimeError("close_open_segments() first: some episodes are still running")
        if not self._segments:
            raise RuntimeError("the buffer holds no finished sequence")
        steps = self._steps
        device = steps[0]["actions"].device
        env = torch.tensor([seg[0] for seg in self._segments], device=device)
        start = torch.tensor([seg[1] for seg in self._segments], device=device)
        length = torch.tensor([seg[2] - seg[1] for seg in self._segments], device=device)
        horizon = int(length.max())
        offs = torch.arange(horizon, device=device)[:, None]
        valid = offs < length[None, :]
        t_idx = start[None, :] + torch.minimum(offs, length[None, :] - 1)
        e_idx = env[None, :].expand_as(t_idx)

        def gather(key: str, sub: str | None = None) -> torch.Tensor:
            items = [st[key][sub] if sub else st[key] for st in steps]  # type: ignore[index]
            return torch.stack(items)[t_idx, e_idx]

        masks = ActionMasks(*(gather(f"mask_{head}") for head in _MASK_HEADS))
        values = gather("values")
        boot = torch.stack(
            [
                seg[3] if seg[3] is not None else torch.zeros((), device=device)
                for seg in self._segments
            ]
        ).to(values)
        next_values = torch.cat([values[1:], torch.zeros_like(values[:1])])
        last = torch.nn.functional.one_hot(length - 1, horizon).T.bool()
        next_values = torch.where(last, boot[None, :].expand_as(values), next_values)
        h0 = torch.stack([st["h"] for st in steps])[start, env].unsqueeze(0)
        c0 = torch.stack([st["c"] for st in steps])[start, env].unsqueeze(0)
        return SequenceBatch(
            obs={"global": gather("obs", "global"), "slots": gather("obs", "slots")},
            masks=masks,
            actions=gather("actions"),
            log_probs=gather("log_probs"),
            values=values,
            rewards=gather("rewards"),
            next_values=next_values * valid,
            valid=valid,
            hidden0=(h0.contiguous(), c0.contiguous()),
        )
