"""LightningModules for training: the AR backbone (embedded default) and denoiser fine-tuning.

`DenoiserFineTuning` (docs/design.md, section 3): the context tower is frozen (eval mode, no grad, weights
never change) and runs once per batch over the clean sequences, exporting K,V of every position and
Mamba states at every block boundary; the denoiser runs over all noisy blocks at once. Loss is the
masked-diffusion NELBO: cross-entropy on masked positions weighted by 1 / (fraction of the block
actually masked), summed and averaged over all tokens. What a position is scored against (the clean
token, or the AR model's softmax) and per-block-position weights are plug-ins (`twotower.objectives`). Training checkpoints hold only the
trainable side; the frozen tower is referenced by its path.

`ARPretraining` (in `twotower.pretraining`, re-exported here): next-token training of a small
NemotronH from scratch, used to make the embedded default backbone.

Scale (distributed engines, activation checkpointing, per-sample noise seeds) is in
`twotower.distributed`; `DenoiserFineTuning` builds its towers in `configure_model` so that
Lightning's `ModelParallelStrategy` can shard them as they are made.
"""

from __future__ import annotations

import json
import warnings
from functools import partial
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics import SumMetric

from .objectives import HardLabelCE, PositionWeighting, TokenObjective, UniformPositions
from .schedules import LinearSchedule, NoiseSchedule, TimeSampler, UniformTime, mask_blocks
from .optim import adamw_with_schedule, attached_trainer
from .pretraining import ARPretraining  # noqa: F401  (recipes name it twotower.training.ARPretraining)
from .validation import check_positive
from .towers.checkpoints import CKPT_META_KEY, restore_frozen, training_checkpoint
from .distributed import apply_activation_checkpointing, sample_seed, shard_towers
from .hardware import warn_if_slow_bf16
from .hub import resolve_model
from .model import TwoTowerLM
from .tokenizers import DEFAULT_MASK_TOKEN_ID, tokenizer_spec
from .towers.adapters import DenoiserBuilder, FullCopy, builder_from_spec, dense_state_dict, is_adapter
from .towers.base import ContextTowerBase, run_block

# Lightning warns at the start of fit about every module left in eval mode ("may lead to unexpected
# behavior"). Here that is the frozen context tower, kept in eval mode on purpose by
# `DenoiserFineTuning.train` (no dropout, no batch statistics); the warning would greet every run.
EVAL_MODE_WARNING = r"Found \d+ module\(s\) in eval mode at the start of training"
warnings.filterwarnings("ignore", message=EVAL_MODE_WARNING)


# ---- denoiser fine-tuning ---------------------------------------------------------------------

class DenoiserFineTuning(L.LightningModule):
    """Trains the denoiser tower, its LM head and the time modules against a frozen context tower.

    Args:
        backbone: a local AR checkpoint directory of any registered tower family (NemotronH, Llama;
            the frozen context tower, and the denoiser's initial weights), or a built-in model name
            (`twotower.hub`, e.g. "embedded-backbone").
        block_size: S, tokens per block; training sequences must be multiples of it.
        mask_token_id: the [MASK] id (`tokenizers.DEFAULT_MASK_TOKEN_ID`, the id NemotronH vocabularies and
            the byte tokenizer reserve).
        schedule: how a block's time maps to a mask probability.
        time_sampler: how block times are drawn (uniform, stratified, antithetic).
        exact_mask_count: mask exactly max(1, round(p S)) positions per block instead of i.i.d.
        loss_weighting: "nelbo" (1 / realised mask fraction: the any-order NELBO, weight <= S),
            "schedule" (the schedule's continuous-time weight at the sampled t) or "none" (plain CE).
        objective: what each masked position is scored against, by class_path (a
            `twotower.objectives.TokenObjective`; None: `HardLabelCE`, the clean token). `ARDistillation`
            distils the frozen AR model's softmax at the same position (needs shifted=True).
        position_weighting: per-block-position loss weights, by class_path (a
            `twotower.objectives.PositionWeighting`, mean 1 over the maskable positions; None:
            `UniformPositions`, the unweighted loss). `GeometricPositions` favours early positions,
            the prefix a speculative draft gets accepted.
        time_init: "identity" (the denoiser starts as the AR model) or "pixart" (AdaLNSingle's init).
        time_conditioning: the time conditioning by class_path, {"class_path": ..., "init_args": {...}}
            (a `twotower.time_embedding.TimeConditioning`; None: AdaLNSingle(init=time_init)).
            Recorded in the checkpoint and, on export, in config.json.
        shifted: train the AR-aligned variant: block position 0 is never masked (at inference it is
            the context tower's own next-token prediction) and the denoiser output at position i
            is scored against the token at i + 1, the offset the copied AR layers already use.
            Exported models record it; generation reads it from there.
        init_from: a released-layout two-tower directory (or built-in name, e.g. "embedded") whose
            denoiser (tower, head, time modules) starts this run instead of a copy of the backbone; its
            context tower must equal `backbone`. An adapter (LoRA) denoiser can start a full copy (the
            default builder): the copy starts from its merged weights (`towers.adapters.dense_state_dict`),
            and every weight then trains; a full denoiser cannot start adapters (refused by name).
        context_sharding: under `ModelParallelStrategy` (FSDP2), "replicate" the frozen context tower
            on every rank (default: no communication, 1x its weights per rank) or "shard" it block by
            block like the denoiser (1/N per rank, an all-gather per block per step); the denoiser is
            always sharded per block. Ignored by other strategies. See `twotower.distributed`.
        activation_checkpointing: recompute each denoiser block's activations in backward
            (torch.utils.checkpoint per block): less activation memory for about a third more compute.
        denoiser: how the denoiser is made from the backbone, by class_path (a
            `twotower.towers.adapters.DenoiserBuilder`; None: `FullCopy`, the released design).
            `LoRA(rank, alpha, targets)` trains low-rank adapters over the frozen backbone's own
            projections plus the time conditioning: a fraction of the memory and of the checkpoint.
            Recorded in the checkpoint; `export` then writes an adapter folder that references the backbone.
        noise_seed: batches that carry an "index" (the data modules here do) draw each sample's times
            and masks from a generator seeded by (noise_seed, epoch, index): the noise of a sample does
            not depend on its rank or batch, so N processes with batch B/N train exactly as one with B.

    The towers are built in `configure_model` (Lightning calls it under the strategy, so FSDP2 shards
    them as they are made); outside a Trainer they are built on first access of `context` / `denoiser`.

    Batches are (B, L) token tensors, or dicts {"input_ids": (B, L), "loss_mask": (B, L) bool}
    where only positions with loss_mask True are training targets (see `twotower.data.distill`).
    """

    def __init__(self, backbone: str, block_size: int = 16, mask_token_id: int = DEFAULT_MASK_TOKEN_ID,
                 schedule: NoiseSchedule | None = None, time_sampler: TimeSampler | None = None,
                 exact_mask_count: bool = False, loss_weighting: str = "nelbo", time_init: str = "identity",
                 lr: float = 1e-3, weight_decay: float = 0.0, betas: tuple[float, float] = (0.9, 0.95),
                 warmup_steps: int = 50, min_lr_ratio: float = 0.1, val_seed: int = 1234,
                 init_from: str | None = None, shifted: bool = False, time_conditioning: dict | None = None,
                 context_sharding: str = "replicate", activation_checkpointing: bool = False, noise_seed: int = 0,
                 objective: TokenObjective | None = None, position_weighting: PositionWeighting | None = None,
                 denoiser: DenoiserBuilder | None = None):
        super().__init__()
        if loss_weighting not in ("nelbo", "schedule", "none"):
            raise ValueError(f"loss_weighting must be 'nelbo', 'schedule' or 'none', got {loss_weighting!r}")
        if not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"block_size must be an integer >= 1, got {block_size!r}")
        if shifted and block_size < 2:
            raise ValueError("shifted training needs block_size >= 2 (position 0 of a block is never masked)")
        check_positive("lr", lr)
        self.save_hyperparameters()
        if context_sharding not in ("replicate", "shard"):
            raise ValueError(f"context_sharding must be 'replicate' or 'shard', got {context_sharding!r}")
        self.schedule = schedule or LinearSchedule()
        self.time_sampler = time_sampler or UniformTime()
        self.objective = objective or HardLabelCE()
        if not isinstance(self.objective, TokenObjective):
            raise TypeError(f"objective must be a twotower.objectives.TokenObjective (e.g. HardLabelCE, ARDistillation), "
                            f"got {type(self.objective).__name__}")
        if self.objective.needs_teacher and not shifted:
            raise ValueError(f"objective {self.objective!r} distils the AR model's next-token distribution, which is "
                             "where a denoiser reads its tokens only with shifted=True; set shifted: true")
        position_weighting = position_weighting or UniformPositions()
        if not isinstance(position_weighting, PositionWeighting):
            raise TypeError(f"position_weighting must be a twotower.objectives.PositionWeighting (e.g. UniformPositions, "
                            f"GeometricPositions), got {type(position_weighting).__name__}")
        self.position_weighting = position_weighting
        # (S,) weights; a plain attribute, not a buffer: checkpoints of earlier runs stay loadable.
        self._position_w = position_weighting.weights(block_size, shifted=shifted)
        self._uniform_positions = bool((self._position_w[1 if shifted else 0:] == 1).all())
        path = resolve_model(backbone, kind="backbone checkpoint")
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"backbone checkpoint not found: {path / 'config.json'} "
                                    "(give a local AR checkpoint directory; see recipes/backbone.yaml)")
        vocab = json.loads((path / "config.json").read_text()).get("vocab_size")
        if vocab is not None and not 0 <= mask_token_id < vocab:
            raise ValueError(f"mask_token_id {mask_token_id} is outside the vocabulary [0, {vocab})")
        if init_from is not None:  # the cheap checks now; the context tower comparison when the towers are built
            cfg = resolve_model(init_from, kind="init_from checkpoint") / "config.json"
            if not cfg.exists():
                raise FileNotFoundError(f"init_from checkpoint not found: {cfg}")
            theirs = bool(json.loads(cfg.read_text()).get("shifted", False))
            if theirs != shifted:
                raise ValueError(f"init_from {init_from} was trained with shifted={theirs}, this run has "
                                 f"shifted={shifted}; the two read the denoiser's outputs at different offsets")
        self.builder = builder_from_spec(denoiser)
        if context_sharding == "shard" and not isinstance(self.builder, FullCopy):
            # FSDP gathers a sharded block's weights only when that block runs; an adapter denoiser
            # calls the context's modules directly, so it would meet the shards.
            raise ValueError(f"denoiser={self.builder!r} borrows the frozen context tower's modules, which "
                             "context_sharding='shard' would split across ranks; use context_sharding='replicate'")
        self._sharded = False
        self.metrics = torch.nn.ModuleDict({
            split: torch.nn.ModuleDict({"nelbo": SumMetric(), "ce": SumMetric(), "correct": SumMetric(),
                                        "masked": SumMetric(), "tokens": SumMetric()})
            for split in ("train_", "val_")})

    def configure_model(self) -> None:
        """Build the towers (once), then apply activation checkpointing and, under
        ModelParallelStrategy, FSDP2 (`twotower.distributed.shard_towers`)."""
        h = self.hparams
        if "context" not in self._modules:
            pair = self._build_pair(ContextTowerBase.from_pretrained(h.backbone))
            self.context, self.denoiser = pair.context.eval(), pair.denoiser
            if h.init_from is not None:
                self._init_denoiser(resolve_model(h.init_from, kind="init_from checkpoint"))
            if h.activation_checkpointing:
                apply_activation_checkpointing(self.denoiser)
        mesh = self.device_mesh  # set by ModelParallelStrategy; None otherwise (and outside a Trainer)
        if mesh is not None and not self._sharded:
            names = mesh.mesh_dim_names or ()
            if "tensor_parallel" in names and mesh["tensor_parallel"].size() > 1:
                raise ValueError(f"ModelParallelStrategy has tensor_parallel_size={mesh['tensor_parallel'].size()}, but "
                                 "DenoiserFineTuning shards with FSDP2 only; set ModelParallelStrategy("
                                 "data_parallel_size=<devices x nodes>, tensor_parallel_size=1)")
            dp = mesh["data_parallel"] if "data_parallel" in names else mesh
            shard_towers(self.context, self.denoiser, dp, context_sharding=h.context_sharding)
            self._sharded = True

    def _build_pair(self, context: ContextTowerBase) -> TwoTowerLM:
        """The towers this run trains, made as every `TwoTowerLM` is (`from_backbone`: the builder's
        denoiser, then the family's precision matching, e.g. NemotronH's float32 routers), so a
        trained pair is the pair `export` and generation rebuild. The context comes frozen."""
        h = self.hparams
        return TwoTowerLM.from_backbone(context, block_size=h.block_size, mask_token_id=h.mask_token_id,
                                        shifted=h.shifted, time_init=h.time_init, time=h.time_conditioning,
                                        denoiser=self.builder)

    def __getattr__(self, name: str):
        # Outside a Trainer (tests, scripts) the towers appear on first use.
        if name in ("context", "denoiser") and "_hparams" in self.__dict__ \
                and "context" not in self.__dict__["_modules"]:
            self.configure_model()
        return super().__getattr__(name)

    # The frozen tower stays in eval mode whatever Lightning does with train().
    def train(self, mode: bool = True):
        super().train(mode)
        if "context" in self._modules:
            self.context.eval()
        return self

    def _init_denoiser(self, path: Path) -> None:
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"init_from checkpoint not found: {path / 'config.json'}")
        start = TwoTowerLM.from_pretrained(path)
        mine, theirs = self.context.state_dict(), start.context.state_dict()
        if mine.keys() != theirs.keys() or any(mine[k].shape != theirs[k].shape or not torch.equal(mine[k], theirs[k].to(mine[k].dtype))
                                               for k in mine):
            raise ValueError(f"init_from {path}: its context tower differs from the backbone {self.hparams.backbone}; "
                             "a denoiser only makes sense with the context tower it was trained against")
        if start.shifted != self.hparams.shifted:
            raise ValueError(f"init_from {path} was trained with shifted={start.shifted}, this run has "
                             f"shifted={self.hparams.shifted}; the two read the denoiser's outputs at different offsets")
        theirs, ours = is_adapter(start.denoiser), is_adapter(self.denoiser)
        if ours and not theirs:
            raise ValueError(f"init_from {path} holds a full denoiser, but this run trains adapters "
                             f"({self.builder!r}); a full copy cannot be turned into low-rank updates. "
                             "Train it as a full copy (denoiser: null), or start the adapters from the backbone")
        if theirs and not ours:
            # A full fine-tune of an adapter model: the copy starts as the adapters' function (merged weights).
            self.denoiser.load_state_dict(dense_state_dict(start.denoiser))
            return
        self.denoiser.load_state_dict(start.denoiser.state_dict())

    @staticmethod
    def _unpack(batch) -> tuple[Tensor, Tensor | None]:
        if isinstance(batch, Tensor):
            return batch, None
        if isinstance(batch, dict) and "input_ids" in batch:
            return batch["input_ids"], batch.get("loss_mask")
        raise TypeError(f"a batch must be a (B, L) tensor or a dict with 'input_ids' (and 'loss_mask'), got {type(batch).__name__}")

    def forward_loss(self, x: Tensor, *, loss_mask: Tensor | None = None, generator: torch.Generator | None = None,
                     sample_seeds: list[int] | None = None, across_ranks: bool = False) -> dict[str, Tensor]:
        """x (B, L) clean tokens -> dict of loss (to optimise) and the summed statistics.

        loss_mask (B, L) bool: only these positions are targets (None: every position).
        sample_seeds: one noise seed per row (each row draws its own times and masks) instead of `generator`.
        across_ranks: normalise by the token (or mask) count of the whole global batch, so that the
            data-parallel mean of the ranks' gradients is exactly the one-process gradient.
        """
        S = self.hparams.block_size
        if x.shape[1] % S:
            raise ValueError(f"sequence length {x.shape[1]} is not a multiple of block_size {S}; "
                             f"set the data module's seq_len to a multiple of {S}")
        if loss_mask is not None and loss_mask.shape != x.shape:
            raise ValueError(f"loss_mask has shape {tuple(loss_mask.shape)} but the batch {tuple(x.shape)}")
        if sample_seeds is None:
            t, noisy, masked, t_act = self._noise(x, generator)
        else:
            if len(sample_seeds) != x.shape[0]:
                raise ValueError(f"{len(sample_seeds)} sample seeds for a batch of {x.shape[0]} rows")
            # Row by row: a row's noise then depends on its own seed only, not on its place in the batch
            # (so data-parallel splits and resumed runs draw the same masks).
            rows = [self._noise(x[i:i + 1], torch.Generator(device=x.device).manual_seed(int(seed)))
                    for i, seed in enumerate(sample_seeds)]
            t, noisy, masked, t_act = (torch.cat(part) for part in zip(*rows))
        if loss_mask is not None:
            masked = masked & loss_mask.bool()
        # The AR model's logits for the token at p are the context tower's at p - 1 (never across a row:
        # shifted training never masks a block's first position); only they pay for the head.
        teacher_at = masked.roll(-1, dims=1) if self.objective.needs_teacher else False
        with torch.no_grad():
            teacher, states = run_block(self.context, partial(self.context.forward_train, return_logits=teacher_at), x, S)

        def denoise(noisy, t_act, masked):  # one call of the denoiser (one FSDP2 root forward)
            hidden = self.denoiser.forward_train(noisy, states, t_act, return_hidden=True)
            if self.hparams.shifted:  # the token at p is read from the output at p - 1 (never a block's first)
                hidden = hidden.roll(1, dims=1)
            return self.denoiser.head(hidden[masked])  # (N, V): only masked positions pay for the head

        logits = run_block(self.denoiser, denoise, noisy, t_act.to(self.denoiser.lm_head.weight.dtype), masked)
        target = x[masked]
        ce = F.cross_entropy(logits, target, reduction="none")  # reported whatever the objective
        if type(self.objective) is HardLabelCE:
            per_token = ce
        elif self.objective.needs_blocks:  # objectives that score each block as a draft (issue 23)
            per_token = self.objective.loss(logits, target, teacher, blocks=self._block_ids(masked))
        else:
            per_token = self.objective.loss(logits, target, teacher)
        if not self._uniform_positions:  # uniform weights leave the loss untouched, bit for bit
            pos_w = self._position_w.to(x.device).repeat(x.shape[1] // S)
            per_token = per_token * pos_w.expand_as(masked)[masked]
        # 1 / t uses the realised fraction t_act (> 0 wherever a position is masked), not the drawn t.
        nelbo_w = (1.0 / t_act).repeat_interleave(S, dim=1)[masked]  # reported whatever the objective
        # A tensor, not an int: reading the mask's count back would sync the device on every step.
        n_tokens = torch.tensor(x.numel(), device=x.device) if loss_mask is None else loss_mask.sum()
        weighting = self.hparams.loss_weighting
        norm = self._across_ranks if across_ranks else (lambda n: n)
        if weighting == "none":
            # clamp: a batch with nothing masked has loss 0, not 0 / 0.
            loss = per_token.sum() / norm(masked.sum()).clamp(min=1)
        else:
            w = nelbo_w if weighting == "nelbo" else self.schedule.loss_weight(t).repeat_interleave(S, dim=1)[masked]
            loss = (w * per_token).sum() / norm(n_tokens).clamp(min=1)
        return {"loss": loss, "nelbo_sum": (nelbo_w * ce).sum().detach(), "ce_sum": ce.sum().detach(),
                "correct": (logits.argmax(-1) == target).sum(), "masked": masked.sum(), "tokens": n_tokens}

    def _block_ids(self, masked: Tensor) -> Tensor:
        """(N,) the block of each masked position of masked (B, L), in the order of x[masked] (row-major,
        so a block's positions come together and in order): row * blocks per row + position // S."""
        B, L = masked.shape
        S = self.hparams.block_size
        ids = torch.arange(B, device=masked.device)[:, None] * (L // S) + torch.arange(L, device=masked.device)[None] // S
        return ids[masked]

    def _noise(self, x: Tensor, generator: torch.Generator | None):
        """(t, noisy, masked, realised t) for clean x (B, L), every draw from `generator`."""
        S = self.hparams.block_size
        B, nB = x.shape[0], x.shape[1] // S
        t = self.time_sampler.sample((B, nB), generator=generator, device=x.device)
        shifted = self.hparams.shifted
        if shifted:  # positions 1 .. S-1 of each block are maskable; t is still a fraction of S (as at inference)
            tail = x.view(B, nB, S)[:, :, 1:].reshape(B, nB * (S - 1))
            noisy_tail, masked_tail, _ = mask_blocks(tail, S - 1, t, self.hparams.mask_token_id, schedule=self.schedule,
                                                     exact=self.hparams.exact_mask_count, generator=generator)
            noisy = x.clone().view(B, nB, S)
            noisy[:, :, 1:] = noisy_tail.view(B, nB, S - 1)
            masked = torch.zeros(B, nB, S, dtype=torch.bool, device=x.device)
            masked[:, :, 1:] = masked_tail.view(B, nB, S - 1)
            t_act = masked.sum(-1, dtype=torch.float32) / S
            noisy, masked = noisy.view(B, -1), masked.view(B, -1)
        else:
            noisy, masked, t_act = mask_blocks(x, S, t, self.hparams.mask_token_id, schedule=self.schedule,
                                               exact=self.hparams.exact_mask_count, generator=generator)
        return t, noisy, masked, t_act

    def _across_ranks(self, count: Tensor) -> Tensor:
        """count summed over the data-parallel ranks / their number (count itself in one process)."""
        trainer = attached_trainer(self)
        if trainer is None or trainer.world_size == 1:
            return count
        with torch.no_grad():
            # clone: the reduction runs in place, and `count` is still read by the caller.
            total = trainer.strategy.reduce(count.detach().float().clone(), reduce_op="sum")
        return total / trainer.world_size

    def _update(self, split: str, out: dict[str, Tensor]):
        m = self.metrics[split]
        m["nelbo"].update(out["nelbo_sum"])
        m["ce"].update(out["ce_sum"])
        m["correct"].update(out["correct"].float())
        m["masked"].update(out["masked"].float())
        m["tokens"].update(out["tokens"].float())

    def _log_epoch(self, split: str):
        m = self.metrics[split]
        masked, tokens = m["masked"].compute(), m["tokens"].compute()
        name = split.rstrip("_")
        # The sums are already global (torchmetrics syncs on compute); sync_dist keeps every rank's log equal.
        self.log(f"{name}/nelbo", m["nelbo"].compute() / tokens, prog_bar=name == "val", sync_dist=True)
        self.log(f"{name}/masked_ce", m["ce"].compute() / masked, sync_dist=True)
        self.log(f"{name}/masked_acc", m["correct"].compute() / masked, prog_bar=name == "val", sync_dist=True)
        for metric in m.values():
            metric.reset()

    def training_step(self, batch: Tensor, batch_idx: int):
        x, loss_mask = self._unpack(batch)
        index = batch.get("index") if isinstance(batch, dict) else None
        seeds = None if index is None else [sample_seed(self.hparams.noise_seed, self.current_epoch, int(i))
                                            for i in index.tolist()]
        out = self.forward_loss(x, loss_mask=loss_mask, sample_seeds=seeds, across_ranks=True)
        self.log("train/loss", out["loss"], prog_bar=True, sync_dist=True)
        self.log("train/masked_acc", out["correct"].float() / out["masked"].clamp(min=1), prog_bar=True)
        self._update("train_", out)
        return out["loss"]

    def on_fit_start(self) -> None:
        # bf16-mixed autocasts every matmul to bf16: on a CPU without a bf16 path the whole run crawls.
        precision = str(self.trainer.precision)
        if precision.startswith("bf16"):
            warn_if_slow_bf16(torch.bfloat16, self.device, f"training with precision {precision!r}")

    def on_train_epoch_end(self):
        self._log_epoch("train_")

    def validation_step(self, batch: Tensor, batch_idx: int):
        # A fixed generator per batch: every validation pass scores the same masks and times.
        x, loss_mask = self._unpack(batch)
        gen = torch.Generator(device=x.device).manual_seed(self.hparams.val_seed + batch_idx)
        self._update("val_", self.forward_loss(x, loss_mask=loss_mask, generator=gen))

    def on_validation_epoch_end(self):
        self._log_epoch("val_")

    def configure_optimizers(self):
        h = self.hparams
        params = [p for p in self.denoiser.parameters() if p.requires_grad]
        return adamw_with_schedule(self, params, h.lr, h.weight_decay, h.betas, h.warmup_steps, h.min_lr_ratio)

    # ---- checkpoints: only the trainable side -------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        h = self.hparams
        # The data module's tokenizer is the model's vocabulary: recorded so that `export` writes it.
        data = getattr(attached_trainer(self), "datamodule", None)
        checkpoint["state_dict"], checkpoint[CKPT_META_KEY] = training_checkpoint(
            checkpoint["state_dict"], context_source=h.backbone, block_size=h.block_size,
            mask_token_id=h.mask_token_id, shifted=h.shifted, time_conditioning=self.denoiser.time.spec(),
            denoiser=self.builder.spec(), tokenizer=tokenizer_spec(getattr(data, "tokenizer", None)))

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        # The frozen tower was left out on save; put back the weights this module loaded from its path.
        restore_frozen(checkpoint["state_dict"], self.context.state_dict())
