"""A purpose-made vectorised task that needs memory and respects masks (tests, benchmarks).

`CueRecallEnv`: at ``t = 0`` one slot is cued; for the next steps only WAIT is legal and
the cue is gone from the observation; at the last step GERMINATE becomes legal in every
slot except one forbidden non-cued slot. GERMINATE into the cued slot earns 0.5, plus 0.5
when the blueprint matches the target shown at that step. Everything else earns 0, so a
memoryless or mask-ignoring policy cannot reach the maximum return of 1.

Layout matches what `PPOAgent` reads: ``obs = {"global": [N, 5], "slots": [N, S, 3]}``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from esper.actions import NUM_OPS, ActionMasks, LifecycleOp
from esper.slots import SlotConfig

GLOBAL_DIM = 5  # first-step flag, cue position, time fraction, final-step flag, target blueprint
SLOT_DIM = 3  # slot position, cued flag (t = 0 only), forbidden flag (last step only)


@dataclass
class EnvStep:
    obs: dict[str, torch.Tensor]
    masks: ActionMasks
    rewards: torch.Tensor  # [N]
    terminated: torch.Tensor  # [N] bool
    truncated: torch.Tensor  # [N] bool


class CueRecallEnv:
    """N lockstep episodes of ``length`` steps over ``num_slots`` slots (auto-reset)."""

    def __init__(
        self,
        num_envs: int,
        num_slots: int = 3,
        num_blueprints: int = 2,
        length: int = 3,
        seed: int = 0,
        device: torch.device | str = "cpu",
    ) -> None:
        if length < 2:
            raise ValueError(f"length must be >= 2 (cue step + decision step), got {length}")
        self.num_envs, self.num_slots = num_envs, num_slots
        self.num_blueprints, self.length = num_blueprints, length
        self.slot_config = SlotConfig.for_grid(1, num_slots)
        self.blueprints = tuple(f"bp{i}" for i in range(num_blueprints))
        self.device = torch.device(device)
        self.generator = torch.Generator(device=self.device).manual_seed(seed)
        self.t = 0
        self._new_episodes()

    def _randint(self, high: int) -> torch.Tensor:
        return torch.randint(high, (self.num_envs,), generator=self.generator, device=self.device)

    def _new_episodes(self) -> None:
        n, s = self.num_envs, self.num_slots
        self.cue = self._randint(s)
        self.target = self._randint(self.num_blueprints)
        # A forbidden slot different from the cue (none when there is a single slot).
        self.forbidden = (self.cue + 1 + self._randint(max(s - 1, 1))) % s
        self.has_forbidden = torch.full((n,), s > 1, device=self.device)
        self.t = 0

    def _observe(self) -> tuple[dict[str, torch.Tensor], ActionMasks]:
        n, s, b, dev = self.num_envs, self.num_slots, self.num_blueprints, self.device
        first, final = float(self.t == 0), float(self.t == self.length - 1)
        pos = torch.arange(s, device=dev) / max(s - 1, 1)
        g = torch.zeros(n, GLOBAL_DIM, device=dev)
        g[:, 0] = first
        g[:, 1] = first * pos[self.cue]
        g[:, 2] = self.t / (self.length - 1)
        g[:, 3] = final
        g[:, 4] = final * self.target / max(b - 1, 1)
        slot_index = torch.arange(s, device=dev)[None, :]
        forbidden = (slot_index == self.forbidden[:, None]) & self.has_forbidden[:, None]
        slots = torch.zeros(n, s, SLOT_DIM, device=dev)
        slots[..., 0] = pos
        slots[..., 1] = first * (slot_index == self.cue[:, None]).float()
        slots[..., 2] = final * forbidden.float()

        op = torch.zeros(n, NUM_OPS, dtype=torch.bool, device=dev)
        op[:, LifecycleOp.WAIT] = True
        slot = torch.zeros(n, NUM_OPS, s, dtype=torch.bool, device=dev)
        blueprint = torch.zeros(n, s, b, dtype=torch.bool, device=dev)
        if final:
            op[:, LifecycleOp.GERMINATE] = True
            slot[:, LifecycleOp.GERMINATE] = ~forbidden
            blueprint[:] = True
        blend = torch.tensor([True, True, False], device=dev).expand(n, 3).clone()
        return {"global": g, "slots": slots}, ActionMasks(op, slot, blueprint, blend)

    def reset(self) -> tuple[dict[str, torch.Tensor], ActionMasks]:
        self._new_episodes()
        return self._observe()

    def step(self, actions: torch.Tensor) -> EnvStep:
        n = self.num_envs
        rewards = torch.zeros(n, device=self.device)
        done = self.t == self.length - 1
        if done:
            germ = actions[:, 0] == LifecycleOp.GERMINATE
            hit = germ & (actions[:, 1] == self.cue)
            rewards = hit.float() * (0.5 + 0.5 * (actions[:, 2] == self.target).float())
            self._new_episodes()
        else:
            self.t += 1
        obs, masks = self._observe()
        flags = torch.full((n,), done, dtype=torch.bool, device=self.device)
        return EnvStep(obs, masks, rewards, flags, torch.zeros_like(flags))
