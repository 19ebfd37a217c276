"""Reinforcement learning for the controller: rollout buffer, masked recurrent PPO, agent."""

from esper.rl.agent import AgentStep, PPOAgent
from esper.rl.buffer import RolloutBuffer, SequenceBatch
from esper.rl.checkpoint import CHECKPOINT_VERSION, CheckpointError
from esper.rl.normalizers import ObservationNormalizer, RunningMeanStd
from esper.rl.ppo import PPOConfig, compute_gae, explained_variance, ppo_update

__all__ = [
    "CHECKPOINT_VERSION",
    "AgentStep",
    "CheckpointError",
    "ObservationNormalizer",
    "PPOAgent",
    "PPOConfig",
    "RolloutBuffer",
    "RunningMeanStd",
    "SequenceBatch",
    "compute_gae",
    "explained_variance",
    "ppo_update",
]
