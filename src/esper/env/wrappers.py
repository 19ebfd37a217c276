"""`JointActionWrapper`: the factored action as one `Discrete` space with an exact mask.

Per-head flat masks cannot express "slot 2 is legal for PRUNE but not for GERMINATE";
the joint space can. Heads an op does not use are collapsed, so the space stays small:

    index 0                          WAIT
    1 + (s·B + b)·L + l              GERMINATE slot s, blueprint b, blend l
    1 + S·B·L + s                    FOSSILIZE slot s
    1 + S·B·L + S + s                PRUNE slot s

``N = 1 + S·B·L + 2·S`` (e.g. 100 for 3 slots x 5 blueprints x 3 blends).
``action_masks()`` is exact: every index it allows is legal, so an agent that samples
under it never triggers the env's illegal-action fallback.
"""

from __future__ import annotations

from dataclasses import dataclass

import gymnasium as gym
import numpy as np
import torch

from esper.actions import ActionIndexError, ActionMasks, FactoredAction, LifecycleOp


@dataclass(frozen=True)
class JointActionLayout:
    """Index arithmetic of the joint space for S slots, B blueprints, L blends."""

    num_slots: int
    num_blueprints: int
    num_blends: int

    @property
    def _germinate_size(self) -> int:
        return self.num_slots * self.num_blueprints * self.num_blends

    @property
    def size(self) -> int:
        return 1 + self._germinate_size + 2 * self.num_slots

    def encode(self, action: FactoredAction) -> int:
        op = LifecycleOp(action.op)
        if op == LifecycleOp.WAIT:
            return 0
        if op == LifecycleOp.GERMINATE:
            return (
                1
                + (action.slot * self.num_blueprints + action.blueprint) * self.num_blends
                + (action.blend)
            )
        offset = 1 + self._germinate_size + (0 if op == LifecycleOp.FOSSILIZE else self.num_slots)
        return offset + action.slot

    def decode(self, index: int) -> FactoredAction:
        if isinstance(index, bool) or not 0 <= index < self.size:
            raise ActionIndexError(
                f"joint action {index!r} out of range: allowed 0..{self.size - 1}"
            )
        if index == 0:
            return FactoredAction.wait()
        index -= 1
        if index < self._germinate_size:
            slot_bp, blend = divmod(index, self.num_blends)
            slot, blueprint = divmod(slot_bp, self.num_blueprints)
            return FactoredAction(LifecycleOp.GERMINATE, slot, blueprint, blend)
        index -= self._germinate_size
        op = LifecycleOp.FOSSILIZE if index < self.num_slots else LifecycleOp.PRUNE
        return FactoredAction(op, index % self.num_slots)

    def mask(self, masks: ActionMasks) -> torch.Tensor:
        """Exact joint mask ``[..., N]`` from conditional masks (batched or not)."""
        slot, blueprint, blend = masks.slot, masks.blueprint, masks.blend
        lead = slot.shape[:-2]
        germinate = (
            slot[..., int(LifecycleOp.GERMINATE), :, None, None]
            & blueprint[..., :, :, None]
            & blend[..., None, None, :]
        ).reshape(*lead, -1)
        wait = masks.op[..., int(LifecycleOp.WAIT) : int(LifecycleOp.WAIT) + 1]
        fossilize = slot[..., int(LifecycleOp.FOSSILIZE), :] & masks.op[..., 2:3]
        prune = slot[..., int(LifecycleOp.PRUNE), :] & masks.op[..., 3:4]
        germinate = germinate & masks.op[..., 1:2]
        return torch.cat([wait, germinate, fossilize, prune], dim=-1)


class JointActionWrapper(gym.ActionWrapper):
    """Wraps a `MorphogenesisEnv`: ``Discrete(N)`` actions, exact ``action_masks()``."""

    def __init__(self, env: gym.Env) -> None:
        super().__init__(env)
        sizes = env.unwrapped.action_spec.head_sizes
        self.layout = JointActionLayout(sizes[1], sizes[2], sizes[3])
        self.action_space = gym.spaces.Discrete(self.layout.size)

    def action(self, action) -> FactoredAction:
        array = np.asarray(action)
        if array.shape != () or not np.issubdtype(array.dtype, np.integer):
            raise ActionIndexError(
                f"joint action must be one integer in 0..{self.layout.size - 1}, got {action!r}"
            )
        return self.layout.decode(int(array))

    def action_masks(self) -> np.ndarray:
        return self.layout.mask(self.env.unwrapped.conditional_masks()).numpy()
