"""LightningModules for training: the AR backbone (embedded default) and denoiser fine-tuning.

`DenoiserFineTuning` (docs/design.md, section 3): the context tower is frozen (eval mode, no grad, weights
never change) and runs once per batch over the clean sequences, exporting K,V of every position and
Mamba states at every block boundary; the denoiser runs over all noisy blocks at once. Loss is the
masked-diffusion NELBO: cross-entropy on masked positions weighted by 1 / (fraction of the block
actually masked), summed and averaged over all tokens. Training checkpoints hold only the
trainable side; the frozen tower is referenced by its path.

`ARPretraining`: next-token training of a small NemotronH from scratch, used to make the embedded
default backbone; it saves the result in transformers' NemotronH format at the end of `fit`.
"""

from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics import MeanMetric, SumMetric

from .schedules import LinearSchedule, NoiseSchedule, TimeSampler, UniformTime, mask_blocks
from .towers.checkpoints import CKPT_META_KEY, from_tower_names, restore_frozen, training_checkpoint
from .towers.base import ContextTowerBase, family_for
from .towers.context import ContextTower


# ---- shared optimisation pieces ---------------------------------------------------------------

def warmup_cosine(step: int, *, warmup: int, total: int, min_ratio: float) -> float:
    """LR multiplier: linear warm-up to 1, then cosine decay to `min_ratio` at `total` steps."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if total <= warmup:
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def _optimizer(module: L.LightningModule, params, lr, weight_decay, betas, warmup_steps, min_lr_ratio):
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=tuple(betas))
    total = module.trainer.estimated_stepping_batches if module._trainer is not None else 10**9
    total = int(total) if math.isfinite(total) else 10**9
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: warmup_cosine(s, warmup=warmup_steps, total=total, min_ratio=min_lr_ratio))
    return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def _check_positive(**values):
    for name, v in values.items():
        if v is None or v <= 0:
            raise ValueError(f"{name} must be > 0, got {v!r}")


# ---- the AR backbone --------------------------------------------------------------------------

def tiny_nemotron_config(*, pattern: str, vocab_size: int, hidden_size: int, num_attention_heads: int,
                         num_key_value_heads: int, head_dim: int, intermediate_size: int,
                         mamba_num_heads: int, mamba_head_dim: int, ssm_state_size: int, n_groups: int,
                         n_routed_experts: int, num_experts_per_tok: int, moe_intermediate_size: int,
                         moe_shared_expert_intermediate_size: int, max_position_embeddings: int,
                         chunk_size: int = 64, pad_token_id: int = 0, bos_token_id: int = 1, eos_token_id: int = 2):
    """A NemotronHConfig from the handful of sizes a small recipe sets."""
    from transformers import NemotronHConfig

    bad = set(pattern) - set("M*-E")
    if bad or not pattern:
        raise ValueError(f"pattern {pattern!r}: use the letters M (Mamba-2), * (attention), - (MLP), E (MoE)")
    return NemotronHConfig(
        vocab_size=vocab_size, hidden_size=hidden_size, hybrid_override_pattern=pattern,
        num_attention_heads=num_attention_heads, num_key_value_heads=num_key_value_heads, head_dim=head_dim,
        intermediate_size=intermediate_size, mamba_num_heads=mamba_num_heads, mamba_head_dim=mamba_head_dim,
        ssm_state_size=ssm_state_size, n_groups=n_groups, conv_kernel=4, chunk_size=chunk_size,
        n_routed_experts=n_routed_experts, num_experts_per_tok=num_experts_per_tok,
        moe_intermediate_size=moe_intermediate_size,
        moe_shared_expert_intermediate_size=moe_shared_expert_intermediate_size,
        max_position_embeddings=max_position_embeddings, pad_token_id=pad_token_id,
        bos_token_id=bos_token_id, eos_token_id=eos_token_id, tie_word_embeddings=False,
    )


@torch.no_grad()
def init_weights(tower: ContextTower, *, std: float = 0.02, seed: int | None = None) -> None:
    """Fresh-model init: N(0, std) linears and embeddings, residual outputs scaled by 1/sqrt(2 layers),
    Mamba A = 1..heads, dt log-uniform in [time_step_min, time_step_max] (through inverse softplus), D = 1."""
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    cfg = tower.config
    n_layers = len(cfg.layers_block_type)
    for name, p in tower.named_parameters():
        if name.endswith("norm.weight") or name.endswith("norm_f.weight"):
            p.fill_(1.0)
        elif name.endswith(".bias"):
            p.zero_()
        elif name.endswith("A_log"):
            p.copy_(torch.log(torch.arange(1, p.numel() + 1, dtype=p.dtype)))
        elif name.endswith(".D"):
            p.fill_(1.0)
        elif name.endswith("dt_bias"):
            lo, hi = math.log(cfg.time_step_min), math.log(cfg.time_step_max)
            dt = torch.exp(torch.rand(p.shape, generator=gen) * (hi - lo) + lo).clamp(min=cfg.time_step_floor)
            p.copy_(dt + torch.log(-torch.expm1(-dt)))
        elif name.endswith("conv1d.weight"):
            bound = 1 / math.sqrt(p.shape[-1])
            p.copy_((torch.rand(p.shape, generator=gen) * 2 - 1) * bound)
        else:
            scale = std / math.sqrt(2 * n_layers) if name.endswith(("out_proj.weight", "o_proj.weight", "down_proj.weight", "down_proj")) else std
            p.copy_(torch.randn(p.shape, generator=gen) * scale)


class ARPretraining(L.LightningModule):
    """Next-token training of a NemotronH hybrid from scratch (the embedded default's backbone).

    Batches are LongTensors (B, T) of packed token ids. At the end of `fit`, the model is written
    to `save_dir` in transformers' NemotronH format (config.json + model.safetensors).
    """

    def __init__(self, pattern: str = "M*-EM*E", vocab_size: int = 260, hidden_size: int = 128,
                 num_attention_heads: int = 4, num_key_value_heads: int = 2, head_dim: int = 32,
                 intermediate_size: int = 384, mamba_num_heads: int = 8, mamba_head_dim: int = 32,
                 ssm_state_size: int = 32, n_groups: int = 2, n_routed_experts: int = 4,
                 num_experts_per_tok: int = 2, moe_intermediate_size: int = 192,
                 moe_shared_expert_intermediate_size: int = 128, max_position_embeddings: int = 4096,
                 lr: float = 3e-3, weight_decay: float = 0.1, betas: tuple[float, float] = (0.9, 0.95),
                 warmup_steps: int = 100, min_lr_ratio: float = 0.1, init_seed: int = 0,
                 save_dir: str | None = None):
        super().__init__()
        _check_positive(lr=lr, hidden_size=hidden_size, vocab_size=vocab_size)
        self.save_hyperparameters()
        config = tiny_nemotron_config(
            pattern=pattern, vocab_size=vocab_size, hidden_size=hidden_size,
            num_attention_heads=num_attention_heads, num_key_value_heads=num_key_value_heads, head_dim=head_dim,
            intermediate_size=intermediate_size, mamba_num_heads=mamba_num_heads, mamba_head_dim=mamba_head_dim,
            ssm_state_size=ssm_state_size, n_groups=n_groups, n_routed_experts=n_routed_experts,
            num_experts_per_tok=num_experts_per_tok, moe_intermediate_size=moe_intermediate_size,
            moe_shared_expert_intermediate_size=moe_shared_expert_intermediate_size,
            max_position_embeddings=max_position_embeddings)
        self.tower = ContextTower(config)
        init_weights(self.tower, seed=init_seed)
        self.val_loss = MeanMetric()
        self.val_acc = MeanMetric()

    def _loss(self, batch: Tensor):
        logits = self.tower(batch[:, :-1])
        target = batch[:, 1:]
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1))
        acc = (logits.argmax(-1) == target).float().mean()
        return loss, acc

    def training_step(self, batch: Tensor, batch_idx: int):
        loss, acc = self._loss(batch)
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/acc", acc)
        return loss

    def validation_step(self, batch: Tensor, batch_idx: int):
        loss, acc = self._loss(batch)
        self.val_loss.update(loss, weight=batch.numel())
        self.val_acc.update(acc, weight=batch.numel())
        self.log("val/loss", self.val_loss, prog_bar=True)
        self.log("val/acc", self.val_acc)

    def configure_optimizers(self):
        h = self.hparams
        return _optimizer(self, list(self.tower.parameters()), h.lr, h.weight_decay, h.betas, h.warmup_steps, h.min_lr_ratio)

    def on_fit_end(self):
        if self.hparams.save_dir and self.trainer.is_global_zero:
            self.save_backbone(self.hparams.save_dir)

    def save_backbone(self, path: str | Path) -> None:
        """Write the tower in transformers' NemotronH format (loadable by NemotronHForCausalLM)."""
        from .towers.loading import save_backbone_hf

        state = {k: v.detach().cpu() for k, v in from_tower_names(self.tower.state_dict()).items()}
        save_backbone_hf(state, path, config=self.tower.config)


# ---- denoiser fine-tuning ---------------------------------------------------------------------

class DenoiserFineTuning(L.LightningModule):
    """Trains the denoiser tower, its LM head and the time modules against a frozen context tower.

    Args:
        backbone: a local AR checkpoint directory of any registered tower family (NemotronH, Llama;
            the frozen context tower, and the denoiser's initial weights).
        block_size: S, tokens per block; training sequences must be multiples of it.
        mask_token_id: the [MASK] id (3 in NemotronH vocabularies and the byte tokenizer).
        schedule: how a block's time maps to a mask probability.
        time_sampler: how block times are drawn (uniform, stratified, antithetic).
        exact_mask_count: mask exactly max(1, round(p S)) positions per block instead of i.i.d.
        loss_weighting: "nelbo" (1 / realised mask fraction: the any-order NELBO, weight <= S),
            "schedule" (the schedule's continuous-time weight at the sampled t) or "none" (plain CE).
        time_init: "identity" (the denoiser starts as the AR model) or "pixart" (AdaLNSingle's init).
        time_conditioning: the time conditioning by class_path, {"class_path": ..., "init_args": {...}}
            (a `twotower.time_embedding.TimeConditioning`; None: AdaLNSingle(init=time_init)).
            Recorded in the checkpoint and, on export, in config.json.
        shifted: train the AR-aligned variant: block position 0 is never masked (at inference it is
            the context tower's own next-token prediction) and the denoiser output at position i
            is scored against the token at i + 1, the offset the copied AR layers already use.
            Exported models record it; generation reads it from there.
        init_from: a released-layout two-tower directory whose denoiser (tower, head, time modules)
            starts this run instead of a copy of the backbone; its context tower must equal `backbone`.

    Batches are (B, L) token tensors, or dicts {"input_ids": (B, L), "loss_mask": (B, L) bool}
    where only positions with loss_mask True are training targets (see `twotower.data.distill`).
    """

    def __init__(self, backbone: str, block_size: int = 16, mask_token_id: int = 3,
                 schedule: NoiseSchedule | None = None, time_sampler: TimeSampler | None = None,
                 exact_mask_count: bool = False, loss_weighting: str = "nelbo", time_init: str = "identity",
                 lr: float = 1e-3, weight_decay: float = 0.0, betas: tuple[float, float] = (0.9, 0.95),
                 warmup_steps: int = 50, min_lr_ratio: float = 0.1, val_seed: int = 1234,
                 init_from: str | None = None, shifted: bool = False, time_conditioning: dict | None = None):
        super().__init__()
        if loss_weighting not in ("nelbo", "schedule", "none"):
            raise ValueError(f"loss_weighting must be 'nelbo', 'schedule' or 'none', got {loss_weighting!r}")
        if not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"block_size must be an integer >= 1, got {block_size!r}")
        if shifted and block_size < 2:
            raise ValueError("shifted training needs block_size >= 2 (position 0 of a block is never masked)")
        _check_positive(lr=lr)
        self.save_hyperparameters()
        self.schedule = schedule or LinearSchedule()
        self.time_sampler = time_sampler or UniformTime()
        path = Path(backbone)
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"backbone checkpoint not found: {path / 'config.json'} "
                                    "(give a local AR checkpoint directory; see recipes/backbone.yaml)")
        self.context = ContextTowerBase.from_pretrained(path)
        if not 0 <= mask_token_id < self.context.config.vocab_size:
            raise ValueError(f"mask_token_id {mask_token_id} is outside the vocabulary [0, {self.context.config.vocab_size})")
        self.context.requires_grad_(False).eval()
        self.denoiser = family_for(self.context.config).denoiser.from_context(
            self.context, time_init=time_init, time=time_conditioning)
        if init_from is not None:
            self._init_denoiser(Path(init_from))
        self.metrics = torch.nn.ModuleDict({
            split: torch.nn.ModuleDict({"nelbo": SumMetric(), "ce": SumMetric(), "correct": SumMetric(),
                                        "masked": SumMetric(), "tokens": SumMetric()})
            for split in ("train_", "val_")})

    # The frozen tower stays in eval mode whatever Lightning does with train().
    def train(self, mode: bool = True):
        super().train(mode)
        self.context.eval()
        return self

    def _init_denoiser(self, path: Path) -> None:
        from .model import TwoTowerLM

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
        self.denoiser.load_state_dict(start.denoiser.state_dict())

    @staticmethod
    def _unpack(batch) -> tuple[Tensor, Tensor | None]:
        if isinstance(batch, Tensor):
            return batch, None
        if isinstance(batch, dict) and "input_ids" in batch:
            return batch["input_ids"], batch.get("loss_mask")
        raise TypeError(f"a batch must be a (B, L) tensor or a dict with 'input_ids' (and 'loss_mask'), got {type(batch).__name__}")

    def forward_loss(self, x: Tensor, *, loss_mask: Tensor | None = None,
                     generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """x (B, L) clean tokens -> dict of loss (to optimise) and the summed statistics.

        loss_mask (B, L) bool: only these positions are targets (None: every position).
        """
        S = self.hparams.block_size
        if x.shape[1] % S:
            raise ValueError(f"sequence length {x.shape[1]} is not a multiple of block_size {S}; "
                             f"set the data module's seq_len to a multiple of {S}")
        if loss_mask is not None and loss_mask.shape != x.shape:
            raise ValueError(f"loss_mask has shape {tuple(loss_mask.shape)} but the batch {tuple(x.shape)}")
        with torch.no_grad():
            _, states = self.context.forward_train(x, S)
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
        if loss_mask is not None:
            masked = masked & loss_mask.bool()
        hidden = self.denoiser.forward_train(noisy, states, t_act.to(self.denoiser.lm_head.weight.dtype), return_hidden=True)
        if shifted:  # the token at p is read from the output at p - 1 (p is never a block's first position)
            hidden = hidden.roll(1, dims=1)
        logits = self.denoiser.head(hidden[masked])  # (N, V): only masked positions pay for the head
        target = x[masked]
        ce = F.cross_entropy(logits, target, reduction="none")
        nelbo_w = (1.0 / t_act).repeat_interleave(S, dim=1)[masked]  # reported whatever the objective
        # A tensor, not an int: reading the mask's count back would sync the device on every step.
        n_tokens = torch.tensor(x.numel(), device=x.device) if loss_mask is None else loss_mask.sum()
        weighting = self.hparams.loss_weighting
        if weighting == "none":
            loss = ce.sum() / masked.sum().clamp(min=1)
        else:
            w = nelbo_w if weighting == "nelbo" else self.schedule.loss_weight(t).repeat_interleave(S, dim=1)[masked]
            loss = (w * ce).sum() / n_tokens.clamp(min=1)
        return {"loss": loss, "nelbo_sum": (nelbo_w * ce).sum().detach(), "ce_sum": ce.sum().detach(),
                "correct": (logits.argmax(-1) == target).sum(), "masked": masked.sum(), "tokens": n_tokens}

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
        self.log(f"{name}/nelbo", m["nelbo"].compute() / tokens, prog_bar=name == "val")
        self.log(f"{name}/masked_ce", m["ce"].compute() / masked)
        self.log(f"{name}/masked_acc", m["correct"].compute() / masked, prog_bar=name == "val")
        for metric in m.values():
            metric.reset()

    def training_step(self, batch: Tensor, batch_idx: int):
        x, loss_mask = self._unpack(batch)
        out = self.forward_loss(x, loss_mask=loss_mask)
        self.log("train/loss", out["loss"], prog_bar=True)
        self.log("train/masked_acc", out["correct"].float() / out["masked"].clamp(min=1), prog_bar=True)
        self._update("train_", out)
        return out["loss"]

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
        return _optimizer(self, params, h.lr, h.weight_decay, h.betas, h.warmup_steps, h.min_lr_ratio)

    # ---- checkpoints: only the trainable side -------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        h = self.hparams
        checkpoint["state_dict"], checkpoint[CKPT_META_KEY] = training_checkpoint(
            checkpoint["state_dict"], context_source=h.backbone, block_size=h.block_size,
            mask_token_id=h.mask_token_id, shifted=h.shifted, time_conditioning=self.denoiser.time.spec())

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        # The frozen tower was left out on save; put back the weights this module loaded from its path.
        restore_frozen(checkpoint["state_dict"], self.context.state_dict())
