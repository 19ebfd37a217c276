"""Episode seeds, and the limits within which they stay distinct and valid.

Env ``i`` in round ``k`` of a run with seed ``s`` resets with
``s·10⁹ + k·10⁵ + i`` (plus 10¹² for evaluation episodes), so what an env sees depends
on (s, i, k) alone, never on how many envs run. That map is one-to-one only while
``i < 10⁵`` and ``k < 10⁴``; a run config is held to those limits (`esper.run_config`)
instead of silently reusing one episode's seed for another.
"""

from __future__ import annotations

ROUND_STRIDE = 100_000  # seed step from one round to the next: env index < stride
SEED_STRIDE = 10**9  # seed step from one run seed to the next: round · stride < this
EVAL_OFFSET = 10**12  # evaluation episodes never reuse a training episode's seed

MAX_ENVS = ROUND_STRIDE  # env indices 0 .. 99,999
MAX_ROUNDS = SEED_STRIDE // ROUND_STRIDE  # rounds 0 .. 9,999
# Gymnasium takes seeds >= 0 and torch.Generator.manual_seed (the random controller)
# < 2**64; 2**32 - 1 keeps every episode seed, evaluation offset included, below that.
MAX_SEED = 2**32 - 1


def episode_seed(seed: int, env_index: int, round_index: int, evaluation: bool = False) -> int:
    """The reset seed of env ``env_index`` in round ``round_index`` of a run seeded ``seed``."""
    base = seed * SEED_STRIDE + round_index * ROUND_STRIDE + env_index
    return base + (EVAL_OFFSET if evaluation else 0)
