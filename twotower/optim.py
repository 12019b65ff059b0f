"""Optimisation pieces shared by the training modules: AdamW with decay on matrices only, and a
warm-up + cosine learning-rate schedule stepped per optimizer step."""

from __future__ import annotations

import math

import lightning as L
import torch


def warmup_cosine(step: int, *, warmup: int, total: int, min_ratio: float) -> float:
    """LR multiplier: linear warm-up to 1, then cosine decay to `min_ratio` at `total` steps."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup  # step + 1: the first step already trains (an LR of 0 would waste it)
    if total <= warmup:
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def attached_trainer(module: L.LightningModule):
    """`module.trainer`, or None for a module no Trainer runs (tests, scripts): Lightning's public
    property raises RuntimeError there instead of returning None."""
    try:
        return module.trainer
    except RuntimeError:
        return None


def adamw_with_schedule(module: L.LightningModule, params, lr, weight_decay, betas, warmup_steps, min_lr_ratio):
    # Decay on matrices only: biases, norm gains and per-channel vectors (Mamba's A_log, D, dt_bias)
    # set scales and offsets, and pulling them towards 0 distorts rather than regularises.
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=tuple(betas))
    trainer = attached_trainer(module)
    total = trainer.estimated_stepping_batches if trainer is not None else 10**9
    # An unbounded run (no max_steps / max_epochs) reports inf: 10**9 steps keeps the LR at its peak for any real run.
    total = int(total) if math.isfinite(total) else 10**9
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: warmup_cosine(s, warmup=warmup_steps, total=total, min_ratio=min_lr_ratio))
    return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


