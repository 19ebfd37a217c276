"""One env's host training: train, validate, credit seeds, guard, advance the lifecycle.

`Trainer.train_step` is one env step:

1. sync optimisers with the slots (a new seed gets its own optimiser, a pruned one's
   is dropped; the host keeps one optimiser for the whole episode),
2. train on one epoch or ``batches_per_step`` batches in this env's own data order
   (`esper.training.step.train_phase`, the step the batched path shares too),
3. validate and compute every seed's contribution in one shared pass
   (`fast_counterfactuals`) and record them on the model,
4. let the governor judge the loss: roll back and penalise, or take a new snapshot,
5. ``model.step_epoch()`` (the lifecycle gates read the contributions from step 3).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from esper.lifecycle import SeedStage, is_live
from esper.training.config import TrainConfig
from esper.training.counterfactual import (
    CounterfactualResult,
    fast_counterfactuals,
    sample_variants,
    variants_to_measure,
)
from esper.training.data import BatchStream, TaskData
from esper.training.flops import FlopMeter
from esper.training.governor import ROLLBACK_VERDICTS, Governor, GovernorEvent
from esper.training.objective import EvalTotals, bits_per_char, task_loss
from esper.training.signals import TrainingSignals
from esper.training.step import (
    ClipSet,
    TrainPhase,
    make_optimizer,
    optimizer_params,
    train_phase,
)
from esper.training.surgery import carry_optimizer_state

if TYPE_CHECKING:
    from esper.model.fold import FoldPlan


@dataclass(frozen=True)
class StepResult:
    epoch: int  # index of this step in the episode (0-based)
    train_loss: float
    train_acc: float
    val_loss: float
    val_acc: float
    quality: float  # val accuracy (classification) or -val loss (lm)
    # Paired validation-loss contributions (> 0: the seed helps) and their standard
    # errors: what the lifecycle gates read (esper.training.counterfactual).
    contributions: dict[str, float] = field(default_factory=dict)
    prospective: frozenset[str] = frozenset()  # contributions measured with the seed on
    contribution_se: dict[str, float] = field(default_factory=dict)
    quality_contributions: dict[str, float] = field(default_factory=dict)  # accuracy units
    stage_changes: tuple = ()  # StageChange records, rollback first, then step_epoch
    governor_event: GovernorEvent | None = None
    penalty: float = 0.0
    seed_grad_norms: dict[str, float] = field(default_factory=dict)  # mean per batch
    bits_per_char: float | None = None  # lm tasks only
    samples: int = 0  # training samples seen in this step
    # FLOPs of this step (esper.training.flops): forward + backward on the training
    # samples (host and every training seed), and validation + counterfactual passes.
    train_flops: int = 0
    eval_flops: int = 0


class Trainer:
    """Trains one `MorphogeneticModel` on one task for one env."""

    def __init__(
        self,
        model: nn.Module,
        data: TaskData,
        config: TrainConfig | None = None,
        seed: int = 0,
        device: torch.device | str = "cpu",
    ) -> None:
        self.config = config if config is not None else TrainConfig()
        self.device = torch.device(device)
        self.model = model.to(self.device)
        self.data = data.to(self.device)
        self.kind = data.kind
        self.seed = int(seed)
        self.stream = BatchStream(data.n_train, self.config.batch_size, seed=self.seed)
        self.signals = TrainingSignals(self.config.history, self.config.plateau_tolerance)
        # A loss of twice a uniform guess's is divergence, whatever the recent history.
        self.governor = Governor(self.config.governor, chance_loss=math.log(data.num_classes))
        self.flops = FlopMeter()  # cumulative compute of this trainer (one episode)
        # Draws of sampled credit: this env's own stream, so other envs do not move it.
        self.credit_generator = torch.Generator().manual_seed(0x5EED_C4ED + self.seed)
        self.epoch = 0
        self.host_optimizer = self._new_host_optimizer()
        self.amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.config.amp)
        # Loss scaling keeps small fp16 gradients from flushing to zero (CUDA only).
        self.scaler = torch.amp.GradScaler(
            "cuda", enabled=self.config.amp == "fp16" and self.device.type == "cuda"
        )
        self.seed_optimizers: dict[str, tuple[tuple[int, ...], torch.optim.Optimizer]] = {}
        self.sync_seed_optimizers()
        self._judged_signature = self._function_signature()
        self.governor.snapshot(self.model, epoch=-1)  # the fresh host is the first good state

    # -- optimisers ------------------------------------------------------------------
    def _new_host_optimizer(self) -> torch.optim.Optimizer:
        return make_optimizer(self.model.host_parameters(), self.config, self.config.lr)

    def sync_seed_optimizers(self) -> None:
        """One optimiser per seed module that exists; rebuilt when the module changed."""
        seed_lr = self.config.seed_lr if self.config.seed_lr is not None else self.config.lr
        for slot_id in self.model.slot_config.slot_ids:
            params = [p for p in self.model.seed_parameters(slot_id) if p.requires_grad]
            if not params:
                self.seed_optimizers.pop(slot_id, None)
                continue
            key = tuple(id(p) for p in params)
            current = self.seed_optimizers.get(slot_id)
            if current is None or current[0] != key:
                self.seed_optimizers[slot_id] = (key, make_optimizer(params, self.config, seed_lr))

    def on_germinate(self, slot_id: str) -> None:
        """Call after germinating ``slot_id`` (train_step also notices on its own)."""
        self.sync_seed_optimizers()

    def on_prune(self, slot_id: str) -> None:
        self.sync_seed_optimizers()

    def reset_optimizers(self) -> None:
        """Fresh optimiser state for host and seeds (after a rollback)."""
        self.host_optimizer = self._new_host_optimizer()
        self.seed_optimizers.clear()
        self.sync_seed_optimizers()

    def _optimizers(self) -> list[torch.optim.Optimizer]:
        return [self.host_optimizer, *(opt for _, opt in self.seed_optimizers.values())]

    # -- one step --------------------------------------------------------------------
    def _train(self) -> TrainPhase:
        """The training phase of one step: `esper.training.step.train_phase` on this
        env's model, batches and optimisers."""
        model, data, cfg = self.model, self.data, self.config
        model.train()
        totals = EvalTotals()
        batches = self.stream.step_batches(cfg.batches_per_step)
        own_pass = getattr(model, "own_seed_pass", False)

        def batch_loss(k: int) -> Tensor:
            idx = batches[k].to(self.device, non_blocking=True)
            x, y = data.train_x[idx], data.train_y[idx]
            with torch.autocast(
                self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None
            ):
                logits = model(x)
                # TRAINING seeds learn in a pass of their own, host detached (issue 12).
                own = model.seed_forward(x) if own_pass else None
            logits = logits.float()
            totals.add(logits.detach(), y)
            loss = task_loss(logits, y)
            return loss if own is None else loss + task_loss(own.float(), y)

        optimizers = self._optimizers()
        grad_norms = train_phase(
            len(batches),
            batch_loss,
            optimizers,
            # One norm per optimiser (host, each seed): a seed's gradient must never
            # rescale the host's (docs/ARCHITECTURE.md, Seeds, isolation and blending).
            clip_sets=[ClipSet(optimizer_params(opt)) for opt in optimizers],
            seed_params={sid: model.seed_parameters(sid) for sid in self.seed_optimizers},
            grad_clip=cfg.grad_clip,
            scaler=self.scaler,
        )
        return TrainPhase(totals, grad_norms, sum(int(idx.numel()) for idx in batches))

    def validate(
        self, with_counterfactuals: bool = True, precomputed: CounterfactualResult | None = None
    ) -> CounterfactualResult:
        """Validation of the current model (and seed contributions), in eval mode.
        ``precomputed``: this very pass already run elsewhere (a batched validation of
        E envs, with the same variants)."""
        self.model.eval()
        variants = (
            variants_to_measure(self.model, self.config.measure_fossils)
            if with_counterfactuals
            else {}
        )
        wanted, prob = variants, 1.0
        if self.config.credit_samples is not None:
            variants, prob = sample_variants(
                wanted, self.config.credit_samples, self.credit_generator
            )

        def pass_() -> CounterfactualResult:
            return fast_counterfactuals(
                self.model,
                self.data.val_x,
                self.data.val_y,
                self.kind,
                variants,
                self.config.eval_batch_size,
            )

        # FLOPs composed from per-block counts (`esper.training.flops.BlockFlops`): no
        # pass runs under the counter, so a pass run elsewhere is always usable.
        result = precomputed if precomputed is not None else pass_()
        self.flops.add_counterfactuals(self.model, self.data.val_x, variants)
        self.model.train()
        if prob < 1.0:
            result = dataclasses.replace(
                result, inclusion_prob=prob, unmeasured=frozenset(wanted) - frozenset(variants)
            )
        return result

    def _function_signature(self) -> tuple:
        """What the host's function and training depend on, per slot: a changed
        signature excuses the next step's loss spike (`Governor.model_changed`)."""
        return tuple(
            (s.slot_id, s.stage, s.blueprint, s.alpha)
            if is_live(s.stage) or s.stage == SeedStage.FOSSILIZED
            else (s.slot_id,)
            for s in self.model.slot_states()
        )

    def train_step(
        self,
        trained: TrainPhase | None = None,
        validated: CounterfactualResult | None = None,
    ) -> StepResult:
        """One env step. ``trained`` / ``validated``: this step's training phase and its
        validation already done elsewhere, for E envs at once (`train_batched`,
        `validate_batched` of `esper.training.batched`)."""
        self.sync_seed_optimizers()
        signature = self._function_signature()
        if signature != self._judged_signature:  # germinated, pruned, alpha stepped...
            self.governor.model_changed()
        self._judged_signature = signature
        eval_before = self.flops.eval
        train, grad_norms, samples = trained if trained is not None else self._train()
        # Before any rollback: the structure that just trained is the one to count.
        train_flops = self.flops.add_training(self.model, self.data.train_x[:2], samples)
        result = self.validate(precomputed=validated)
        cfg = self.config.governor
        monitored = train.loss if cfg.monitor == "train_loss" else result.val_loss
        verdict = self.governor.observe(monitored)
        event, rollback_changes = None, []
        if verdict in ROLLBACK_VERDICTS:
            event, rollback_changes = self._rollback(verdict, monitored)
            result = self.validate(with_counterfactuals=False)
        else:
            for sid, value in result.contributions.items():
                self.model.record_contribution(sid, value, result.contribution_se.get(sid))
            for sid in result.unmeasured:  # stale: kept, but no gate may act on it
                last = self.model.slot_state(sid).contribution
                if last is not None:
                    self.model.record_contribution(sid, last, math.nan)
        changes = [*rollback_changes, *self.model.step_epoch()]
        if verdict == "ok":
            self.governor.snapshot(self.model, self.epoch)
        self.signals.update(
            train.loss, train.accuracy, result.val_loss, result.val_acc, result.quality
        )
        step = StepResult(
            epoch=self.epoch,
            train_loss=train.loss,
            train_acc=train.accuracy,
            val_loss=result.val_loss,
            val_acc=result.val_acc,
            quality=result.quality,
            contributions=dict(result.contributions),
            contribution_se=dict(result.contribution_se),
            quality_contributions=dict(result.quality_contributions),
            prospective=result.prospective,
            stage_changes=tuple(changes),
            governor_event=event,
            penalty=event.penalty if event is not None else 0.0,
            seed_grad_norms=grad_norms if event is None else {},
            bits_per_char=bits_per_char(result.val_loss) if self.kind == "lm" else None,
            samples=samples,
            train_flops=train_flops,
            eval_flops=self.flops.eval - eval_before,
        )
        self.epoch += 1
        return step

    def _rollback(self, reason: str, value: float) -> tuple[GovernorEvent, list]:
        from esper.model import StageChange  # lazy: esper.model imports are not free

        before = {s.slot_id: s.stage for s in self.model.slot_states()}
        event = self.governor.rollback(self.model, self.epoch, reason, value)  # type: ignore[arg-type]
        self.reset_optimizers()
        changes = [
            StageChange(s.slot_id, before[s.slot_id], s.stage, f"governor_{reason}")
            for s in self.model.slot_states()
            if s.stage != before[s.slot_id]
        ]
        return event, changes

    @torch.no_grad()
    def predict(self, x: Tensor) -> Tensor:
        """Logits of the live model in eval mode (for inspection and examples)."""
        self.model.eval()
        out = self.model(x.to(self.device))
        self.model.train()
        return out

    # -- structural changes ----------------------------------------------------------
    def fold(self, slot_id: str) -> FoldPlan:
        """Fold the FOSSILIZED width seed of ``slot_id`` into the host's layers, in place,
        and carry every optimiser through it: the fossil's seed-optimiser state moves into
        the host's optimiser (the fossil joins it), neighbouring width seeds' optimisers
        are resized (`esper.training.surgery`). The function is unchanged; the slot is
        DORMANT. The env must refresh what it derived from the model's shape (its
        blueprint cost table) afterwards."""
        plan = self.model.fold_in_place(slot_id)
        fossil = self.seed_optimizers.get(slot_id)
        carry_optimizer_state(self.host_optimizer, plan, donors=[fossil[1]] if fossil else [])
        for sid, (_, optimizer) in self.seed_optimizers.items():
            if sid != slot_id:
                carry_optimizer_state(optimizer, plan)
        self.after_structure_change()
        return plan

    def after_structure_change(self) -> None:
        """Bring the trainer in line with a model whose parameters changed shape or
        owner (a fold; call after carrying the optimisers through it).

        Seed optimisers follow the slots (the folded slot's is dropped). The governor's
        snapshot stays the last good state as it was taken: a rollback restores it,
        structure included (`esper.training.governor`). FLOP counts are cached by the
        model's structure (parameter shapes and slot stages), so the next step recounts
        the new structure and a rollback finds the old one's count again.
        """
        self.sync_seed_optimizers()
        held = {id(p) for group in self.host_optimizer.param_groups for p in group["params"]}
        missing = [
            name
            for name, p in self.model.host.named_parameters()
            if p.requires_grad and id(p) not in held
        ]
        if missing:
            raise RuntimeError(
                f"host parameters {missing} are not in the host optimiser after a structural "
                f"change: carry it with esper.training.surgery.carry_optimizer_state"
            )
