"""Masked recurrent PPO: the config, GAE and the update loop as plain functions.

Read top to bottom against Schulman et al. (2017) and the "37 implementation details"
list: GAE(λ) with bootstrap at truncation, advantage normalisation, clipped surrogate,
value loss on normalised returns, entropy bonus per head, global gradient clipping, and
an approximate-KL early stop checked *before* each optimiser step (so a step that would
push the policy too far is never taken). Each minibatch is a set of whole sequences
replayed with one batched LSTM call from their stored initial states.

Data parallel (DD-PPO, `esper.distributed`): with an active ``ctx`` every rank runs this
same loop on its own rollouts. The ranks pool the advantage statistics, use the mean
count per rank as the denominator of every masked mean (so averaging their gradients
gives the gradient of the loss over all ranks' steps), agree on the approximate KL before
the early-stop check, and average their gradients right after ``backward()``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from esper.actions import ActionMasks
from esper.distributed import (
    SINGLE,
    DistContext,
    all_reduce_gradients,
    global_mean_std,
    mean_across_ranks,
    min_across_ranks,
)
from esper.policy.network import HEADS, FactoredRecurrentActorCritic, two_length_split
from esper.rl.buffer import SequenceBatch


@dataclass(frozen=True)
class PPOConfig:
    """Hyperparameters of the learned controller. Defaults follow CleanRL's LSTM PPO."""

    learning_rate: float = 3e-4
    adam_eps: float = 1e-5  # CleanRL/SB3 default; 1e-8 makes early updates jumpy
    gamma: float = 0.99
    gae_lambda: float = 0.95
    n_epochs: int = 4  # passes over the buffer per update
    num_minibatches: int = 4  # minibatches of whole sequences per pass (capped at #sequences)
    clip_coef: float = 0.2  # surrogate clip range: ratio kept in [1 - clip, 1 + clip]
    vf_coef: float = 0.5
    ent_coef: float = 0.01
    # Relative weight of each head's entropy (op, slot, blueprint, blend) in the bonus.
    head_entropy_weights: tuple[float, float, float, float] = (1.0, 1.0, 1.0, 1.0)
    max_grad_norm: float = 0.5  # global L2 norm over all parameters
    # Stop the update (before stepping) when approx KL exceeds 1.5 * target_kl (SB3 rule).
    target_kl: float | None = 0.03
    normalize_advantages: bool = True
    # Minibatches of sequences of similar length (random among equal lengths), so a
    # minibatch pads few LSTM rows when episodes end mid-rollout; False: uniformly random.
    group_by_length: bool = True
    normalize_observations: bool = True
    # When the observation statistics change: "update" freezes them between PPO updates
    # and folds in the rollout's observations (pooled over DD-PPO ranks: one merge per
    # update, no collective per env step); "step" updates them at every act (under DD-PPO
    # one all-reduce per env step). With "update" a rollout is normalised by the
    # statistics of all earlier rollouts, so what an env sees does not depend on the rank
    # count or on the other envs of its rank.
    obs_normalizer_sync: str = "update"
    normalize_returns: bool = True  # critic predicts normalised returns
    obs_clip: float = 10.0
    # Initial op-head logits (WAIT, GERMINATE, FOSSILIZE, PRUNE). A seed needs ~6 quiet
    # steps (TRAINING, blend gate, BLENDING, HOLDING) before it can be fossilized; a
    # uniform initial policy prunes its own seeds long before (91 % of all prunes in the
    # README main job), so it rarely sees a fossil to learn from. E.g. (0, 0, 0, -3).
    initial_op_bias: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0)
    # Guard for fine-tuning a cloned policy (esper.rl.cloning): adds
    # prior_kl_coef · KL(π ‖ π_prior) to the loss, where π_prior is the frozen network of
    # `PPOAgent.set_prior` (the clone). KL is the k3 estimator on the rollout's actions,
    # E[(ρ − 1) − log ρ] with ρ = π_prior(a) / π(a), summed over the heads an action uses;
    # the prior replays each sequence from a zero state (sequences start at episode starts
    # when one round is one episode, as in `esper train`). 0 = off.
    prior_kl_coef: float = 0.0
    hidden: int = 128  # LSTM size
    embed: int = 64  # encoder width
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.prior_kl_coef >= 0:
            raise ValueError(f"PPOConfig.prior_kl_coef must be >= 0, got {self.prior_kl_coef!r}")
        positive = ("learning_rate", "n_epochs", "num_minibatches", "clip_coef", "max_grad_norm")
        for name in positive:
            if not getattr(self, name) > 0:
                raise ValueError(f"PPOConfig.{name} must be > 0, got {getattr(self, name)!r}")
        for name in ("gamma", "gae_lambda"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"PPOConfig.{name} must be in [0, 1], got {getattr(self, name)!r}")
        if len(self.head_entropy_weights) != len(HEADS):
            raise ValueError(
                f"head_entropy_weights needs one weight per head {HEADS}, "
                f"got {self.head_entropy_weights!r}"
            )
        object.__setattr__(self, "head_entropy_weights", tuple(self.head_entropy_weights))
        if len(self.initial_op_bias) != len(HEADS):
            raise ValueError(
                "initial_op_bias needs one logit per op (WAIT, GERMINATE, FOSSILIZE, PRUNE), "
                f"got {self.initial_op_bias!r}"
            )
        object.__setattr__(self, "initial_op_bias", tuple(self.initial_op_bias))
        if self.obs_normalizer_sync not in ("update", "step"):
            raise ValueError(
                "PPOConfig.obs_normalizer_sync must be 'update' or 'step', "
                f"got {self.obs_normalizer_sync!r}"
            )


def compute_gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    next_values: torch.Tensor,
    valid: torch.Tensor,
    gamma: float,
    gae_lambda: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """GAE over time-major ``[T, M]`` segments; returns (advantages, returns).

    ``next_values[t]`` is V(s_{t+1}) inside a segment, the bootstrap value at its last
    step when the episode was truncated or cut by the rollout end, and 0 after a true
    termination. Segments end at episode ends, so the λ-recursion simply stops at the
    segment's last valid step. Padded steps get advantage 0.
    """
    mask = valid.to(values.dtype)
    deltas = (rewards + gamma * next_values - values) * mask
    advantages = torch.zeros_like(values)
    running = torch.zeros_like(values[0])
    for t in range(values.shape[0] - 1, -1, -1):
        running = deltas[t] + gamma * gae_lambda * running * (
            mask[t + 1] if t + 1 < len(mask) else 0
        )
        advantages[t] = running
    return advantages, (advantages + values) * mask


def explained_variance(predicted: torch.Tensor, target: torch.Tensor) -> float:
    """1 - Var(target - predicted) / Var(target); NaN when the target is constant."""
    var = target.var(unbiased=False)
    if float(var) == 0.0:
        return float("nan")
    return float(1.0 - (target - predicted).var(unbiased=False) / var)


def minibatch_columns(
    lengths: torch.Tensor,
    num_minibatches: int,
    group_by_length: bool,
    generator: torch.Generator | None = None,
) -> list[torch.Tensor]:
    """Split sequence indices into ``num_minibatches`` non-empty minibatches.

    Uniformly random, or grouped by length: a random permutation stably sorted by
    length (so equal lengths stay in random order), cut into runs of about equal step
    counts (so no step weighs more in the loss than in a random split), preferably where
    the length changes, visited in random order. A minibatch then pads its sequences only
    up to the longest of similar ones. With all lengths equal both give the same split.
    """
    num = lengths.shape[0]
    if not 1 <= num_minibatches <= num:
        raise ValueError(
            f"num_minibatches must be in [1, {num}] (#sequences), got {num_minibatches}"
        )
    perm = torch.randperm(num, generator=generator).to(lengths.device)
    if not group_by_length:
        return list(torch.tensor_split(perm, num_minibatches))
    order = perm[torch.sort(lengths[perm], stable=True).indices]
    cum = torch.cumsum(lengths[order], 0).tolist()
    total = cum[-1]
    sorted_lengths = lengths[order].tolist()
    # Cutting where the length changes leaves no padding across the cut; such a cut is
    # taken when it moves the cut by at most a quarter of a minibatch's steps.
    changes = [i for i in range(1, num) if sorted_lengths[i] != sorted_lengths[i - 1]]
    cuts, prev = [], 0
    for k in range(1, num_minibatches):
        target = k * total / num_minibatches
        at = next((i + 1 for i, c in enumerate(cum) if c >= target), num)
        near = [i for i in changes if abs(cum[i - 1] - target) <= 0.25 * total / num_minibatches]
        if near:
            at = min(near, key=lambda i: abs(cum[i - 1] - target))
        # Every minibatch keeps at least one sequence.
        at = min(max(at, prev + 1), num - (num_minibatches - k))
        cuts.append(at)
        prev = at
    groups = torch.tensor_split(order, cuts)
    visit = torch.randperm(num_minibatches, generator=generator).tolist()
    return [groups[i] for i in visit]


def flat_gradients(params: list[nn.Parameter]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """A zeroed buffer that every parameter's ``.grad`` is a view of (returned with the
    views): backward accumulates into the views in place, so zeroing, the global norm and
    clipping each take one op on the buffer instead of one per parameter."""
    first = params[0]
    grads = torch.zeros(sum(p.numel() for p in params), dtype=first.dtype, device=first.device)
    views, offset = [], 0
    for param in params:
        if param.dtype != grads.dtype or param.device != grads.device:
            raise ValueError(
                f"all parameters must share one dtype and device for the flat gradient "
                f"buffer, got {param.dtype} on {param.device} and {grads.dtype} on {grads.device}"
            )
        views.append(grads[offset : offset + param.numel()].view_as(param))
        param.grad = views[-1]
        offset += param.numel()
    return grads, views


def ppo_update(
    network: FactoredRecurrentActorCritic,
    optimizer: torch.optim.Optimizer,
    batch: SequenceBatch,
    advantages: torch.Tensor,
    value_targets: torch.Tensor,
    config: PPOConfig,
    generator: torch.Generator | None = None,
    ctx: DistContext = SINGLE,
    prior: FactoredRecurrentActorCritic | None = None,
) -> dict[str, float]:
    """``n_epochs`` passes over minibatches of whole sequences; returns diagnostics.

    ``value_targets`` are in the critic's units (normalised returns when the agent
    normalises returns). Diagnostics: mean approx KL, clip fraction, losses, per-head
    entropy, last grad norm, steps taken, whether KL stopped the update early, and the
    largest |ratio - 1| per head in the very first minibatch (0 up to float rounding).
    """
    valid = batch.valid
    if config.normalize_advantages:
        adv_mean, adv_std = global_mean_std(advantages[valid], ctx)
        advantages = (advantages - adv_mean) / (adv_std + 1e-8) * valid
    horizon, num_seq = valid.shape
    lengths = valid.sum(0)
    # Every stored step as a flat row of the [T, M] grid, built once per update; each
    # minibatch gathers its rows (one index per tensor, no re-packing of sequences), and
    # the head masks of the stored actions are derived once, not per minibatch.
    grid = torch.arange(horizon * num_seq, device=valid.device).view(horizon, num_seq)
    flat_actions = batch.actions.reshape(-1, 4).long()
    head_masks = network.head_masks(
        flat_actions, ActionMasks(*(m.flatten(0, 1) for m in batch.masks.as_tuple()))
    )
    flat_obs = (batch.obs["global"].flatten(0, 1), batch.obs["slots"].flatten(0, 1))
    flat_log_probs = batch.log_probs.reshape(-1, 4)
    flat_advantages, flat_targets = advantages.reshape(-1), value_targets.reshape(-1)
    # Every rank must take the same number of steps (each one is a collective).
    num_mb = min(config.num_minibatches, min_across_ranks(num_seq, ctx))
    kl_limit = None if config.target_kl is None else 1.5 * config.target_kl
    head_w = torch.tensor(config.head_entropy_weights, device=advantages.device)
    stats: dict[str, list[float]] = {k: [] for k in ("kl", "clip", "pg", "v", "grad", "prior")}
    head_entropy = torch.zeros(len(HEADS), device=advantages.device)
    first_dev: torch.Tensor | None = None
    steps, early_stopped = 0, False
    lstm_rows = real_rows = 0
    params = [p for p in network.parameters() if p.requires_grad]
    grads, views = flat_gradients(params)

    for _ in range(config.n_epochs):
        for columns in minibatch_columns(lengths, num_mb, config.group_by_length, generator):
            mb_lengths = lengths[columns]
            length, shortest = int(mb_lengths.max()), int(mb_lengths.min())
            mb_grid = grid[:length, columns]
            if shortest == length:  # no padding: the rows feed the LSTM as they are
                mb_valid, rows = None, mb_grid.reshape(-1)
                lstm_rows += rows.shape[0]
            else:
                mb_valid = valid[:length, columns]
                rows = mb_grid[mb_valid]
                lstm_rows += two_length_split(mb_lengths, length)[2]
            real_rows += rows.shape[0]
            mb_actions, mb_masks = flat_actions[rows], head_masks.rows(rows)
            mb_obs = (flat_obs[0][rows], flat_obs[1][rows])
            mb_hidden = (batch.hidden0[0][:, columns], batch.hidden0[1][:, columns])
            shape = (length, columns.shape[0])
            out = network.evaluate_rows(*mb_obs, mb_actions, mb_masks, mb_hidden, mb_valid, shape)
            head_logratio = out.log_probs - flat_log_probs[rows]
            if first_dev is None:
                first_dev = (head_logratio.exp() - 1).abs().detach().amax(dim=0)
            logratio = head_logratio.sum(-1)
            ratio = logratio.exp()
            used = out.head_used
            # Denominators of the means: real steps, and steps that used each head.
            counts = torch.cat([torch.tensor([float(ratio.shape[0])]), used.sum(0).cpu()])
            counts = mean_across_ranks(counts.to(ratio), ctx).clamp_min(1.0)
            n_valid, n_used = counts[0], counts[1:]
            with torch.no_grad():
                approx_kl = ((ratio - 1) - logratio).sum() / n_valid
                clip_frac = ((ratio - 1).abs() > config.clip_coef).float().sum() / n_valid
                # Averaged over ranks before the check: all ranks stop at the same step.
                approx_kl, clip_frac = mean_across_ranks(torch.stack([approx_kl, clip_frac]), ctx)
            stats["kl"].append(float(approx_kl))
            stats["clip"].append(float(clip_frac))
            if kl_limit is not None and float(approx_kl) > kl_limit:
                early_stopped = True
                break

            adv = flat_advantages[rows]
            clipped = ratio.clamp(1 - config.clip_coef, 1 + config.clip_coef)
            pg_loss = torch.maximum(-adv * ratio, -adv * clipped).sum() / n_valid
            v_err = out.values - flat_targets[rows]
            v_loss = 0.5 * v_err.square().sum() / n_valid
            per_head = (out.entropies * used).sum(0) / n_used
            entropy_bonus = (head_w * per_head).sum()
            loss = pg_loss + config.vf_coef * v_loss - config.ent_coef * entropy_bonus
            if prior is not None and config.prior_kl_coef > 0:
                with torch.no_grad():
                    zero = prior.get_initial_hidden(shape[1], rows.device)
                    prior_lp = prior.evaluate_rows(
                        *mb_obs, mb_actions, mb_masks, zero, mb_valid, shape
                    ).log_probs
                log_rho = prior_lp - out.log_probs  # 0 on unused heads
                prior_kl = ((log_rho.exp() - 1) - log_rho).sum() / n_valid
                loss = loss + config.prior_kl_coef * prior_kl
                stats["prior"].append(float(prior_kl.detach()))

            grads.zero_()
            loss.backward()
            if ctx.active:  # DD-PPO: averaged through a buffer of its own, then back here
                all_reduce_gradients(params, ctx)
                for param, view in zip(params, views, strict=True):
                    view.copy_(param.grad)
                    param.grad = view
            # clip_grad_norm_ on the one buffer: the global L2 norm and the scaling are one
            # op each instead of one per parameter.
            grad_norm = torch.linalg.vector_norm(grads)
            grads.mul_((config.max_grad_norm / (grad_norm + 1e-6)).clamp(max=1.0))
            optimizer.step()
            steps += 1
            head_entropy += per_head.detach()
            stats["pg"].append(float(pg_loss.detach()))
            stats["v"].append(float(v_loss.detach()))
            stats["grad"].append(float(grad_norm))
        if early_stopped:
            break

    def mean(key: str) -> float:
        return sum(stats[key]) / len(stats[key]) if stats[key] else float("nan")

    if ctx.active:  # each rank's losses are its share: report the mean over ranks
        shares = torch.tensor([mean("pg"), mean("v"), *head_entropy.tolist()], dtype=torch.float64)
        shares = mean_across_ranks(shares, ctx)
        stats["pg"], stats["v"] = [float(shares[0])], [float(shares[1])]
        head_entropy = shares[2:].to(head_entropy)

    result = {
        "approx_kl": mean("kl"),
        "clip_frac": mean("clip"),
        "policy_loss": mean("pg"),
        "value_loss": mean("v"),
        "grad_norm": stats["grad"][-1] if stats["grad"] else float("nan"),
        "n_minibatch_steps": float(steps),
        "early_stopped": float(early_stopped),
        # LSTM rows run beyond the real steps, per real step (0: no padding).
        "padded_rows_per_step": (lstm_rows - real_rows) / max(real_rows, 1),
        "prior_kl": mean("prior"),
    }
    for i, head in enumerate(HEADS):
        result[f"entropy/{head}"] = float(head_entropy[i] / max(steps, 1))
        result[f"first_ratio_dev/{head}"] = float(first_dev[i]) if first_dev is not None else 0.0
    return result
