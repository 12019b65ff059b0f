"""`ARPretraining`: next-token training of a small NemotronH from scratch, used to make the embedded
default backbone; it saves the result in transformers' NemotronH format at the end of `fit`.
`tiny_nemotron_config` and `init_weights` build and initialise such a model.

(Re-exported by `twotower.training`, where recipes name it: `twotower.training.ARPretraining`.)
"""

from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics import MeanMetric
from transformers import NemotronHConfig

from .optim import adamw_with_schedule
from .validation import check_positive
from .towers.checkpoints import from_tower_names
from .towers.nemotron_h.context import ContextTower
from .towers.saving import save_backbone_hf


def tiny_nemotron_config(*, pattern: str, vocab_size: int, hidden_size: int, num_attention_heads: int,
                         num_key_value_heads: int, head_dim: int, intermediate_size: int,
                         mamba_num_heads: int, mamba_head_dim: int, ssm_state_size: int, n_groups: int,
                         n_routed_experts: int, num_experts_per_tok: int, moe_intermediate_size: int,
                         moe_shared_expert_intermediate_size: int, max_position_embeddings: int,
                         chunk_size: int = 64, pad_token_id: int = 0, bos_token_id: int = 1, eos_token_id: int = 2,
                         time_step_limit: tuple[float, float] = (0.0, math.inf)):
    """A NemotronHConfig from the handful of sizes a small recipe sets.

    `time_step_limit` clamps every Mamba-2 time step (`towers.nemotron_h.layers.dt_limit`); the default, (0, inf),
    is transformers' and mamba-ssm's: no clamp."""
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
        time_step_limit=[float(v) for v in time_step_limit],  # NemotronHConfig takes floats only
    )


@torch.no_grad()
def init_weights(tower: ContextTower, *, std: float = 0.02, seed: int | None = None) -> None:
    """Fresh-model init: N(0, std) linears and embeddings, residual outputs scaled by 1/sqrt(2 layers),
    Mamba A = 1..heads, dt log-uniform in [time_step_min, time_step_max] (through inverse softplus), D = 1."""
    # A CPU generator: the same seed gives the same weights on any device.
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    cfg = tower.config
    n_layers = len(cfg.layers_block_type)
    for name, p in tower.named_parameters():
        if name.endswith("norm.weight") or name.endswith("norm_f.weight"):
            p.fill_(1.0)
        elif name.endswith(".bias"):
            p.zero_()
        elif name.endswith("A_log"):
            # A = -exp(A_log) = -1 .. -heads: each head decays at its own rate (the S4D-real init).
            p.copy_(torch.log(torch.arange(1, p.numel() + 1, dtype=p.dtype)))
        elif name.endswith(".D"):
            p.fill_(1.0)
        elif name.endswith("dt_bias"):
            lo, hi = math.log(cfg.time_step_min), math.log(cfg.time_step_max)
            dt = torch.exp(torch.rand(p.shape, generator=gen) * (hi - lo) + lo).clamp(min=cfg.time_step_floor)
            # Inverse softplus (dt + log(1 - e^-dt)), so softplus(dt_bias) = dt; expm1 keeps small dt exact.
            p.copy_(dt + torch.log(-torch.expm1(-dt)))
        elif name.endswith("conv1d.weight"):
            bound = 1 / math.sqrt(p.shape[-1])
            p.copy_((torch.rand(p.shape, generator=gen) * 2 - 1) * bound)
        else:
            # Projections that write into the residual stream are scaled down (GPT-2): its variance then
            # stays bounded with depth, one such write per mixer and per MLP.
            scale = std / math.sqrt(2 * n_layers) if name.endswith(("out_proj.weight", "o_proj.weight", "down_proj.weight", "down_proj")) else std
            p.copy_(torch.randn(p.shape, generator=gen) * scale)


class ARPretraining(L.LightningModule):
    """Next-token training of a NemotronH hybrid from scratch (the embedded default's backbone).

    Batches are LongTensors (B, T) of packed token ids. At the end of `fit`, the model is written
    to `save_dir` in transformers' NemotronH format (config.json + model.safetensors).
    `time_step_limit` is the Mamba-2 time-step clamp, trained with and recorded in config.json;
    the default (0, inf) clamps nothing, as transformers and mamba-ssm default to.
    """

    def __init__(self, pattern: str = "M*-EM*E", vocab_size: int = 260, hidden_size: int = 128,
                 num_attention_heads: int = 4, num_key_value_heads: int = 2, head_dim: int = 32,
                 intermediate_size: int = 384, mamba_num_heads: int = 8, mamba_head_dim: int = 32,
                 ssm_state_size: int = 32, n_groups: int = 2, n_routed_experts: int = 4,
                 num_experts_per_tok: int = 2, moe_intermediate_size: int = 192,
                 moe_shared_expert_intermediate_size: int = 128, max_position_embeddings: int = 4096,
                 lr: float = 3e-3, weight_decay: float = 0.1, betas: tuple[float, float] = (0.9, 0.95),
                 warmup_steps: int = 100, min_lr_ratio: float = 0.1, init_seed: int = 0,
                 time_step_limit: tuple[float, float] = (0.0, math.inf), save_dir: str | None = None):
        super().__init__()
        for name, value in [("lr", lr), ("hidden_size", hidden_size), ("vocab_size", vocab_size)]:
            check_positive(name, value)
        self.save_hyperparameters()
        config = tiny_nemotron_config(
            pattern=pattern, vocab_size=vocab_size, hidden_size=hidden_size,
            num_attention_heads=num_attention_heads, num_key_value_heads=num_key_value_heads, head_dim=head_dim,
            intermediate_size=intermediate_size, mamba_num_heads=mamba_num_heads, mamba_head_dim=mamba_head_dim,
            ssm_state_size=ssm_state_size, n_groups=n_groups, n_routed_experts=n_routed_experts,
            num_experts_per_tok=num_experts_per_tok, moe_intermediate_size=moe_intermediate_size,
            moe_shared_expert_intermediate_size=moe_shared_expert_intermediate_size,
            max_position_embeddings=max_position_embeddings, time_step_limit=time_step_limit)
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
        # Weighted by tokens: the epoch mean is per token even when the last batch is smaller.
        self.val_loss.update(loss, weight=batch.numel())
        self.val_acc.update(acc, weight=batch.numel())
        self.log("val/loss", self.val_loss, prog_bar=True)
        self.log("val/acc", self.val_acc)

    def configure_optimizers(self):
        h = self.hparams
        return adamw_with_schedule(self, list(self.tower.parameters()), h.lr, h.weight_decay, h.betas, h.warmup_steps, h.min_lr_ratio)

    def on_fit_end(self):
        if self.hparams.save_dir and self.trainer.is_global_zero:
            self.save_backbone(self.hparams.save_dir)

    def save_backbone(self, path: str | Path) -> None:
        """Write the tower in transformers' NemotronH format (loadable by NemotronHForCausalLM)."""
        state = {k: v.detach().cpu() for k, v in from_tower_names(self.tower.state_dict()).items()}
        save_backbone_hf(state, path, config=self.tower.config)


