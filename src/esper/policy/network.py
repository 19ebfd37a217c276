"""The learned controller's network: factored, masked, recurrent actor-critic.

Layout of the data it reads (``B`` = batch of envs, ``T`` = time, ``S`` = slots):

- one step: ``obs = {"global": [B, G], "slots": [B, S, F]}``, masks `ActionMasks` with a
  leading ``[B]`` dim, actions ``LongTensor [B, 4]`` (op, slot, blueprint, blend);
- sequences are **time-major**, like `torch.nn.LSTM`: ``global [T, B, G]``,
  ``slots [T, B, S, F]``, masks ``[T, B, ...]``, actions ``[T, B, 4]``;
- the recurrent state is ``(h, c)``, each ``[1, B, hidden]``.

Slots pass through one shared encoder and are pooled (mean and max) before the LSTM, and
the slot head scores every slot from its own embedding plus the LSTM output, so no
parameter shape depends on the number of slots: weights trained with one slot count act
with another.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from esper.actions import NUM_OPS, ActionMasks, LifecycleOp
from esper.policy.distributions import InvalidMaskError

Hidden = tuple[torch.Tensor, torch.Tensor]
HEADS: tuple[str, ...] = ("op", "slot", "blueprint", "blend")


@dataclass
class PolicyStep:
    """One decision for a batch of envs. Unused heads carry action 0 and log-prob 0."""

    actions: torch.Tensor  # [B, 4] long
    log_probs: torch.Tensor  # [B, 4] per head
    values: torch.Tensor  # [B] critic output (in the critic's own, normalised, units)
    hidden: Hidden  # state after this step


@dataclass
class SequenceEvaluation:
    """Re-evaluation of stored actions over ``[T, B]`` sequences."""

    log_probs: torch.Tensor  # [T, B, 4], 0 where the head is unused
    values: torch.Tensor  # [T, B]
    entropies: torch.Tensor  # [T, B, 4], normalised by log(#valid), 0 where unused
    head_used: torch.Tensor  # [T, B, 4] bool


@dataclass
class HeadMasks:
    """What the heads of stored steps need besides the network: built once per PPO update
    from the stored actions and masks, then indexed per minibatch (`rows`).

    The four heads are laid side by side, padded to ``K`` = the widest head, so one masked
    log-softmax serves all of them; padded entries are never legal."""

    legal: torch.Tensor  # [N, 4, K] bool: legal entries of each head (action 0 on unused heads)
    used: torch.Tensor  # [N, 4] bool: the op uses the head
    entropy_denom: torch.Tensor  # [N, 4] log(#legal), 1 where fewer than 2 are legal
    no_entropy: torch.Tensor  # [N, 4] bool: unused head or a single legal choice

    def rows(self, index: torch.Tensor) -> HeadMasks:
        return HeadMasks(*(t.index_select(0, index) for t in self.as_tuple()))

    def as_tuple(self) -> tuple[torch.Tensor, ...]:
        return (self.legal, self.used, self.entropy_denom, self.no_entropy)


def _mlp(in_dim: int, out_dim: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(in_dim, out_dim), nn.ReLU(), nn.Linear(out_dim, out_dim), nn.ReLU()
    )


def _masked_log_softmax(logits: torch.Tensor, legal: torch.Tensor) -> torch.Tensor:
    """Log-probs over the legal entries, in float32 (as `MaskedCategorical`): illegal
    entries get the most negative finite float, so they have probability exactly 0."""
    if torch.is_autocast_enabled(logits.device.type):
        with torch.autocast(device_type=logits.device.type, enabled=False):
            return _masked_log_softmax(logits.float(), legal)
    filled = torch.where(legal, logits.float(), torch.finfo(torch.float32).min)
    return torch.log_softmax(filled, dim=-1)


def two_length_split(lengths: torch.Tensor, horizon: int) -> tuple[torch.Tensor, int, int]:
    """How to run sequences of ``lengths`` padded to ``horizon`` through the LSTM.

    Returns (order by length, cut, LSTM rows): the ``cut`` shortest sequences run as a
    second, shorter batched call when that saves at least a quarter of the rows (``cut``
    is 0 when one call is cheaper overall: each call has a per-step cost of its own)."""
    b = lengths.shape[0]
    ordered, order = torch.sort(lengths, stable=True)
    full = horizon * b
    if b < 2:
        return order, 0, full
    counts = torch.arange(1, b, device=lengths.device)
    rows = ordered[:-1] * counts + horizon * (b - counts)  # split after the i shortest
    best = int(rows.min())
    if 4 * best > 3 * full:
        return order, 0, full
    return order, int(rows.argmin()) + 1, best


class FactoredRecurrentActorCritic(nn.Module):
    """Global encoder + shared per-slot encoder → LSTM → op/slot/blueprint/blend heads + critic.

    Heads are sampled in order op → slot → blueprint → blend; the slot head sees the chosen
    op, the blueprint and blend heads see the chosen slot's embedding.
    """

    def __init__(
        self,
        num_slots: int,
        global_dim: int,
        slot_dim: int,
        num_blueprints: int,
        num_blends: int = 3,
        hidden: int = 128,
        embed: int = 64,
        op_bias: tuple[float, ...] = (0.0,) * NUM_OPS,
    ) -> None:
        super().__init__()
        for name, value in (
            ("num_slots", num_slots),
            ("global_dim", global_dim),
            ("slot_dim", slot_dim),
            ("num_blueprints", num_blueprints),
            ("num_blends", num_blends),
            ("hidden", hidden),
            ("embed", embed),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        self.num_slots = num_slots
        self.global_dim, self.slot_dim = global_dim, slot_dim
        self.num_blueprints, self.num_blends = num_blueprints, num_blends
        self.hidden_size, self.embed_size = hidden, embed

        self.global_encoder = _mlp(global_dim, embed)
        self.slot_encoder = _mlp(slot_dim, embed)
        self.lstm = nn.LSTM(3 * embed, hidden)
        self.op_head = nn.Linear(hidden, NUM_OPS)
        self.op_embedding = nn.Embedding(NUM_OPS, embed)
        # Additive attention: score(slot) = v . tanh(W_q [core, op] + W_k slot_embedding).
        self.slot_query = nn.Linear(hidden + embed, embed)
        self.slot_key = nn.Linear(embed, embed)
        # No bias: a shift common to all slots cannot change a softmax over them.
        self.slot_score = nn.Linear(embed, 1, bias=False)
        self.choice_trunk = nn.Sequential(nn.Linear(hidden + embed, hidden), nn.ReLU())
        self.blueprint_head = nn.Linear(hidden, num_blueprints)
        self.blend_head = nn.Linear(hidden, num_blends)
        self.value_head = nn.Linear(hidden, 1)
        if len(op_bias) != NUM_OPS:
            raise ValueError(
                "op_bias needs one value per op (WAIT, GERMINATE, FOSSILIZE, PRUNE), "
                f"got {op_bias!r}"
            )
        self._init_weights(op_bias)
        # The heads side by side, each padded to the widest: entry j of head h reads
        # column _pad_index[h, j] of [op | slot | blueprint | blend] logits (padding
        # repeats a real column and is never legal). Not saved: derived from the sizes.
        sizes = (NUM_OPS, num_slots, num_blueprints, num_blends)
        width = max(sizes)
        starts = torch.tensor([sum(sizes[:h]) for h in range(len(sizes))])
        cols = torch.minimum(torch.arange(width)[None, :], torch.tensor(sizes)[:, None] - 1)
        self.register_buffer("_pad_index", starts[:, None] + cols, persistent=False)
        self.register_buffer("_positions", torch.arange(width), persistent=False)
        # The same layout for masks: padding reads an extra column that is always False.
        in_head = torch.arange(width)[None, :] < torch.tensor(sizes)[:, None]
        pad_mask = torch.where(in_head, starts[:, None] + cols, sum(sizes))
        self.register_buffer("_pad_mask_index", pad_mask, persistent=False)
        # Acting draws blueprint and blend together: their columns within the pair.
        pair_start = NUM_OPS + num_slots
        self.register_buffer("_pair_index", self._pad_index[2:] - pair_start, persistent=False)
        self.register_buffer("_pair_mask_index", pad_mask[2:] - pair_start, persistent=False)

    def _init_weights(self, op_bias: tuple[float, ...]) -> None:
        # CleanRL/SB3 convention: orthogonal init, near-uniform initial policy (gain 0.01).
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.orthogonal_(module.weight, gain=2**0.5)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        for head in (self.op_head, self.slot_score, self.blueprint_head, self.blend_head):
            nn.init.orthogonal_(head.weight, gain=0.01)
        nn.init.orthogonal_(self.value_head.weight, gain=1.0)
        with torch.no_grad():  # a prior over ops; see PPOConfig.initial_op_bias
            self.op_head.bias.copy_(torch.tensor(op_bias, dtype=self.op_head.bias.dtype))
        for name, param in self.lstm.named_parameters():
            if "bias" in name:
                nn.init.zeros_(param)
            else:
                nn.init.orthogonal_(param)

    # -- state --------------------------------------------------------------------------
    def get_initial_hidden(self, batch: int, device: torch.device | str | None = None) -> Hidden:
        device = device if device is not None else self.value_head.weight.device
        zeros = torch.zeros(1, batch, self.hidden_size, device=device)
        return zeros, zeros.clone()

    # -- trunk --------------------------------------------------------------------------
    def _check_obs(self, obs: Mapping[str, torch.Tensor], time_major: bool) -> None:
        g, s = obs["global"], obs["slots"]
        lead = 2 if time_major else 1
        if g.dim() != lead + 1 or g.shape[-1] != self.global_dim:
            raise ValueError(
                f"obs['global'] must have shape {'[T, B' if time_major else '[B'}, "
                f"{self.global_dim}], got {tuple(g.shape)}"
            )
        if s.dim() != lead + 2 or s.shape[-1] != self.slot_dim or s.shape[-2] != self.num_slots:
            raise ValueError(
                f"obs['slots'] must have shape {'[T, B' if time_major else '[B'}, "
                f"{self.num_slots}, {self.slot_dim}] (num_slots, slot_dim), got {tuple(s.shape)}"
            )
        if s.shape[:lead] != g.shape[:lead]:
            raise ValueError(
                f"obs['global'] {tuple(g.shape)} and obs['slots'] {tuple(s.shape)} "
                "disagree on the leading dims"
            )

    def forward(
        self, obs_seq: Mapping[str, torch.Tensor], hidden: Hidden
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Hidden]:
        """Time-major trunk: returns (core [T,B,H], slot_emb [T,B,S,E], values [T,B], hidden).

        One `nn.LSTM` call covers the whole sequence. Sequences never cross an episode
        boundary (the buffer cuts them there), so no mid-sequence state reset is needed.
        """
        self._check_obs(obs_seq, time_major=True)
        _, slot_emb, pooled = self._encode(obs_seq["global"], obs_seq["slots"])
        if pooled.shape[0] == 1:
            # One step (acting): the plain cell skips the sequence kernel's setup, about
            # half the cost of a 64-env step on CPU; same weights, same math.
            lstm = self.lstm
            h, c = torch.lstm_cell(
                pooled[0],
                (hidden[0][0], hidden[1][0]),
                lstm.weight_ih_l0,
                lstm.weight_hh_l0,
                lstm.bias_ih_l0,
                lstm.bias_hh_l0,
            )
            core, new_hidden = h.unsqueeze(0), (h.unsqueeze(0), c.unsqueeze(0))
        else:
            core, new_hidden = self.lstm(pooled, hidden)
        values = self.value_head(core).squeeze(-1)
        return core, slot_emb, values, new_hidden

    def _lstm_two_lengths(
        self, pooled: torch.Tensor, hidden0: Hidden, lengths: torch.Tensor
    ) -> torch.Tensor:
        """LSTM outputs [T, B, H] for sequences of ``lengths`` (see `two_length_split`)."""
        t = pooled.shape[0]
        order, cut, _ = two_length_split(lengths, t)
        if cut == 0:
            return self.lstm(pooled, hidden0)[0]
        short, long = order[:cut], order[cut:]
        short_len = int(lengths[short].max())
        out_short = self.lstm(
            pooled[:short_len, short], (hidden0[0][:, short], hidden0[1][:, short])
        )[0]
        out_long = self.lstm(pooled[:, long], (hidden0[0][:, long], hidden0[1][:, long]))[0]
        pad = out_short.new_zeros(t - short_len, cut, out_short.shape[-1])
        return torch.cat([torch.cat([out_short, pad]), out_long], dim=1)[:, torch.argsort(order)]

    def _encode(
        self, global_obs: torch.Tensor, slot_obs: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        global_emb = self.global_encoder(global_obs.float())
        slot_emb = self.slot_encoder(slot_obs.float())
        pooled = torch.cat([global_emb, slot_emb.mean(-2), slot_emb.amax(-2)], dim=-1)
        return global_emb, slot_emb, pooled

    # -- heads --------------------------------------------------------------------------
    def _step(self, obs: Mapping[str, torch.Tensor], hidden: Hidden):
        """One step for ``[B]`` envs: (core [B, H], slot_emb [B, S, E], values [B], hidden).
        The plain cell skips the sequence kernel's setup, about half the cost of a 64-env
        step on CPU; same weights, same math as `forward`."""
        _, slot_emb, pooled = self._encode(obs["global"], obs["slots"])
        lstm = self.lstm
        h, c = torch.lstm_cell(
            pooled,
            (hidden[0][0], hidden[1][0]),
            lstm.weight_ih_l0,
            lstm.weight_hh_l0,
            lstm.bias_ih_l0,
            lstm.bias_hh_l0,
        )
        return h, slot_emb, self.value_head(h).squeeze(-1), (h.unsqueeze(0), c.unsqueeze(0))

    def _draw(
        self,
        log_p: torch.Tensor,
        legal: torch.Tensor,
        deterministic: bool,
        generator: torch.Generator | None,
        uniform: torch.Tensor | None,
    ) -> torch.Tensor:
        """A legal draw per row of masked log-probs ``[..., K]`` (the mode if deterministic).

        With ``uniform`` (one U[0, 1) number per row) by inverse CDF, so a row's draw
        depends on its own number only, not on the other rows of the batch."""
        if deterministic:
            return log_p.argmax(-1)
        probs = log_p.exp()
        if uniform is None:  # multinomial never draws a zero-probability entry
            flat = torch.multinomial(probs.reshape(-1, probs.shape[-1]), 1, generator=generator)
            return flat.reshape(probs.shape[:-1])
        cdf = probs.cumsum(-1)
        target = (uniform.to(cdf.dtype) * cdf[..., -1]).unsqueeze(-1)
        # First index whose CDF exceeds the target: never a zero-probability entry.
        draws = torch.searchsorted(cdf, target, right=True).squeeze(-1)
        # Rounding can put the target at (or past) the total mass, which would land after
        # the last legal entry: cap at the last entry the mask allows.
        positions = self._positions[: legal.shape[-1]]
        return torch.minimum(draws, (legal * positions).amax(-1))

    def _sample_heads(
        self,
        core: torch.Tensor,
        slot_emb: torch.Tensor,
        masks: ActionMasks,
        deterministic: bool,
        generator: torch.Generator | None,
        noise: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Acting: actions [B, 4] and their log-probs [B, 4] (0 on heads the op does not
        use, whose action is 0), drawn op -> slot -> (blueprint, blend). The blueprint and
        blend heads read the same input and are drawn together as one padded pair."""
        rows, num_slots = slot_emb.shape[:2]
        uniform = (None,) * 3 if noise is None else (noise[:, 0], noise[:, 1], noise[:, 2:])

        op_legal = masks.op
        op_log_p = _masked_log_softmax(self.op_head(core), op_legal)
        op = self._draw(op_log_p, op_legal, deterministic, generator, uniform[0])
        not_slot = op == LifecycleOp.WAIT
        not_choice = op != LifecycleOp.GERMINATE

        # Heads the op does not use may have empty mask rows: allowing their action 0
        # keeps them valid; their action is set to 0 and their log-prob to 0.
        slot_legal = masks.slot.gather(1, op.view(-1, 1, 1).expand(-1, 1, num_slots)).squeeze(1)
        slot_legal[:, 0] |= not_slot
        query = self.slot_query(torch.cat([core, self.op_embedding(op)], dim=-1))
        scores = self.slot_score(torch.tanh(self.slot_key(slot_emb) + query.unsqueeze(1)))
        slot_log_p = _masked_log_softmax(scores.squeeze(-1), slot_legal)
        slot = self._draw(slot_log_p, slot_legal, deterministic, generator, uniform[1])
        slot = slot.masked_fill(not_slot, 0)

        width = slot_emb.shape[-1]
        chosen = slot_emb.gather(1, slot.view(-1, 1, 1).expand(-1, 1, width)).squeeze(1)
        trunk = self.choice_trunk(torch.cat([core, chosen], dim=-1))
        num_bp = self.num_blueprints
        bp_legal = masks.blueprint.gather(1, slot.view(-1, 1, 1).expand(-1, 1, num_bp))
        pair_logits = torch.cat([self.blueprint_head(trunk), self.blend_head(trunk)], dim=-1)
        never = masks.blend.new_zeros(rows, 1)  # what padding reads: never legal
        pair_legal = torch.cat([bp_legal.squeeze(1), masks.blend, never], dim=-1)
        pair_legal = pair_legal[:, self._pair_mask_index]
        pair_legal[:, :, 0] |= not_choice.unsqueeze(1)
        pair_log_p = _masked_log_softmax(pair_logits[:, self._pair_index], pair_legal)
        pair = self._draw(pair_log_p, pair_legal, deterministic, generator, uniform[2])
        pair = pair.masked_fill(not_choice.unsqueeze(1), 0)

        if not bool((op_legal.any(-1) & slot_legal.any(-1) & pair_legal.any(-1).all(-1)).all()):
            raise InvalidMaskError(
                "a mask row allows no action: every env needs a legal op, a legal slot for "
                "an op that uses one, and a legal blueprint and blend for GERMINATE"
            )
        actions = torch.cat([op.unsqueeze(1), slot.unsqueeze(1), pair], dim=1)
        log_probs = torch.cat(
            [
                op_log_p.gather(1, op.unsqueeze(1)),
                slot_log_p.gather(1, slot.unsqueeze(1)).masked_fill(not_slot.unsqueeze(1), 0.0),
                pair_log_p.gather(2, pair.unsqueeze(2))
                .squeeze(2)
                .masked_fill(not_choice.unsqueeze(1), 0.0),
            ],
            dim=1,
        )
        return actions, log_probs

    def _check_masks(self, masks: ActionMasks, lead: tuple[int, ...]) -> None:
        expected = {
            "op": (*lead, NUM_OPS),
            "slot": (*lead, NUM_OPS, self.num_slots),
            "blueprint": (*lead, self.num_slots, self.num_blueprints),
            "blend": (*lead, self.num_blends),
        }
        for name, tensor in masks.as_dict().items():
            if tuple(tensor.shape) != expected[name]:
                raise ValueError(
                    f"masks.{name} must have shape {list(expected[name])}, got {list(tensor.shape)}"
                )

    @staticmethod
    def _flat_masks(masks: ActionMasks, lead: int) -> ActionMasks:
        return ActionMasks(*(t.reshape(-1, *t.shape[lead:]) for t in masks.as_tuple()))

    def get_action(
        self,
        obs: Mapping[str, torch.Tensor],
        hidden: Hidden,
        masks: ActionMasks,
        deterministic: bool = False,
        generator: torch.Generator | None = None,
        noise: torch.Tensor | None = None,
    ) -> PolicyStep:
        """Sample (or take the mode of) one factored action per env; always legal under masks.

        ``noise`` (``[B, 4]`` uniforms in [0, 1), one per head) makes each env's draw depend
        on its own row only, so envs split over processes sample as in one process."""
        self._check_obs(obs, time_major=False)
        batch = obs["global"].shape[0]
        self._check_masks(masks, (batch,))
        if noise is not None and tuple(noise.shape) != (batch, len(HEADS)):
            raise ValueError(f"noise must have shape [{batch}, 4], got {list(noise.shape)}")
        core, slot_emb, values, new_hidden = self._step(obs, hidden)
        actions, log_probs = self._sample_heads(
            core, slot_emb, masks, deterministic, generator, noise
        )
        return PolicyStep(actions, log_probs, values, new_hidden)

    def get_value(self, obs: Mapping[str, torch.Tensor], hidden: Hidden) -> torch.Tensor:
        """Critic output [B] for one step from ``hidden`` (used to bootstrap truncations)."""
        self._check_obs(obs, time_major=False)
        return self._step(obs, hidden)[2]

    def head_masks(self, actions: torch.Tensor, masks: ActionMasks) -> HeadMasks:
        """`HeadMasks` of stored steps: ``actions [N, 4]`` and flat masks with leading ``[N]``.

        Raises `InvalidMaskError` when a head the action uses allows nothing."""
        rows = actions.shape[0]
        idx = torch.arange(rows, device=actions.device)
        op, slot = actions[:, 0].long(), actions[:, 1].long()
        not_slot = op == LifecycleOp.WAIT
        not_choice = op != LifecycleOp.GERMINATE
        width = self._pad_index.shape[1]
        legal = torch.zeros(rows, len(HEADS), width, dtype=torch.bool, device=actions.device)
        parts = (masks.op, masks.slot[idx, op], masks.blueprint[idx, slot], masks.blend)
        unused_rows = (None, not_slot, not_choice, not_choice)
        for head, (part, unused) in enumerate(zip(parts, unused_rows, strict=True)):
            legal[:, head, : part.shape[-1]] = part
            if unused is not None:  # action 0 keeps an unused head valid
                legal[:, head, 0] |= unused
        if not bool(legal.any(-1).all()):
            bad = torch.nonzero(~legal.any(-1))[0].tolist()
            raise InvalidMaskError(
                f"{int((~legal.any(-1)).sum())} mask row(s) allow no action (first: step "
                f"{bad[0]}, head {HEADS[bad[1]]}); every row must allow at least one action"
            )
        used = torch.stack([torch.ones_like(not_slot), ~not_slot, ~not_choice, ~not_choice], -1)
        k = legal.sum(-1)
        denom = torch.where(k > 1, torch.log(k.clamp_min(2).float()), torch.ones_like(k).float())
        return HeadMasks(legal, used, denom, ~used | (k <= 1))

    def _evaluate_heads(
        self, core: torch.Tensor, slot_emb: torch.Tensor, actions: torch.Tensor, hm: HeadMasks
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Log-probs [N, 4] and normalised entropies [N, 4] (0 on unused heads) of stored
        actions: all heads at once, since the stored op and slot are known up front."""
        op, slot = actions[:, 0], actions[:, 1]
        query = self.slot_query(torch.cat([core, self.op_embedding(op)], dim=-1))
        scores = self.slot_score(torch.tanh(self.slot_key(slot_emb) + query.unsqueeze(1)))
        chosen = slot_emb.gather(1, slot.view(-1, 1, 1).expand(-1, 1, slot_emb.shape[-1]))
        trunk = self.choice_trunk(torch.cat([core, chosen.squeeze(1)], dim=-1))
        heads = (self.op_head(core), scores.squeeze(-1), self.blueprint_head(trunk))
        logits = torch.cat([*heads, self.blend_head(trunk)], dim=-1)[:, self._pad_index]
        if torch.is_autocast_enabled(logits.device.type):  # fp32 softmax, as MaskedCategorical
            with torch.autocast(device_type=logits.device.type, enabled=False):
                return self._masked_head_math(logits, actions, hm)
        return self._masked_head_math(logits, actions, hm)

    @staticmethod
    def _masked_head_math(
        logits: torch.Tensor, actions: torch.Tensor, hm: HeadMasks
    ) -> tuple[torch.Tensor, torch.Tensor]:
        illegal = ~hm.legal
        log_p = torch.log_softmax(
            logits.float().masked_fill(illegal, torch.finfo(torch.float32).min), dim=-1
        )
        log_probs = log_p.gather(-1, actions.unsqueeze(-1)).squeeze(-1).masked_fill(~hm.used, 0.0)
        # Illegal entries have p = 0 exactly; excluding them keeps 0 * log(tiny) out.
        entropy = -(log_p.exp() * log_p).masked_fill(illegal, 0.0).sum(-1)
        return log_probs, (entropy / hm.entropy_denom).masked_fill(hm.no_entropy, 0.0)

    def evaluate_rows(
        self,
        global_rows: torch.Tensor,
        slot_rows: torch.Tensor,
        actions: torch.Tensor,
        hm: HeadMasks,
        hidden0: Hidden,
        valid: torch.Tensor | None,
        shape: tuple[int, int],
    ) -> SequenceEvaluation:
        """Re-evaluate stored steps given as flat rows (the training hot path).

        The rows are the steps where ``valid [T, B]`` holds, in its row-major (time-major)
        order; ``valid=None`` means every step of the ``shape = (T, B)`` grid is real, so
        the rows feed the LSTM as they are. Encoders and heads run on the rows only; the
        LSTM (one batched call, or two, see `two_length_split`) also on padding.
        ``actions [N, 4]`` long, ``hm`` from `head_masks`. Returns flat ``[N]`` rows."""
        t, b = shape
        _, slot_emb, rows = self._encode(global_rows, slot_rows)
        if valid is None:
            core = self.lstm(rows.view(t, b, -1), hidden0)[0].reshape(t * b, -1)
        else:
            pooled = rows.new_zeros(t, b, rows.shape[-1]).index_put((valid,), rows)
            core = self._lstm_two_lengths(pooled, hidden0, valid.sum(0))[valid]
        log_probs, entropies = self._evaluate_heads(core, slot_emb, actions, hm)
        return SequenceEvaluation(log_probs, self.value_head(core).squeeze(-1), entropies, hm.used)

    def evaluate_actions(
        self,
        obs_seq: Mapping[str, torch.Tensor],
        actions: torch.Tensor,
        masks: ActionMasks,
        hidden0: Hidden,
    ) -> SequenceEvaluation:
        """Log-probs, values and normalised entropies of stored actions over [T, B] sequences."""
        self._check_obs(obs_seq, time_major=True)
        t, b = obs_seq["global"].shape[:2]
        self._check_masks(masks, (t, b))
        if tuple(actions.shape) != (t, b, 4):
            raise ValueError(f"actions must have shape [{t}, {b}, 4], got {list(actions.shape)}")
        flat = actions.reshape(t * b, 4).long()
        out = self.evaluate_rows(
            obs_seq["global"].reshape(t * b, -1),
            obs_seq["slots"].reshape(t * b, self.num_slots, -1),
            flat,
            self.head_masks(flat, self._flat_masks(masks, 2)),
            hidden0,
            None,
            (t, b),
        )
        return SequenceEvaluation(
            out.log_probs.reshape(t, b, 4),
            out.values.reshape(t, b),
            out.entropies.reshape(t, b, 4),
            out.head_used.reshape(t, b, 4),
        )

    def evaluate_valid(
        self,
        obs_seq: Mapping[str, torch.Tensor],
        actions: torch.Tensor,
        masks: ActionMasks,
        hidden0: Hidden,
        valid: torch.Tensor,
    ) -> SequenceEvaluation:
        """`evaluate_actions` on the steps where ``valid [T, B]`` holds, as flat ``[N]`` rows
        in ``valid``'s row-major order. Encoders and heads skip the padded steps; only the
        LSTM (one batched call) runs over them, so padding costs LSTM rows only."""
        self._check_obs(obs_seq, time_major=True)
        t, b = obs_seq["global"].shape[:2]
        self._check_masks(masks, (t, b))
        if tuple(actions.shape) != (t, b, 4) or tuple(valid.shape) != (t, b):
            raise ValueError(
                f"actions must have shape [{t}, {b}, 4] and valid [{t}, {b}], "
                f"got {list(actions.shape)} and {list(valid.shape)}"
            )
        flat = actions[valid].long()
        return self.evaluate_rows(
            obs_seq["global"][valid],
            obs_seq["slots"][valid],
            flat,
            self.head_masks(flat, ActionMasks(*(m[valid] for m in masks.as_tuple()))),
            hidden0,
            None if bool(valid.all()) else valid,
            (t, b),
        )
