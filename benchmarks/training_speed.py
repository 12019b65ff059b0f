"""Training speed: a denoiser fine-tuning step against an AR backbone training step, same batch.

The denoiser step is what fine-tuning costs (`DenoiserFineTuning.forward_loss`: a frozen context
pass plus the denoiser over every block, backward, AdamW); the AR step is what training the
backbone itself costs (a trainable context tower of its family, next-token cross-entropy, backward, AdamW).
The ratio of their tokens / second says how much dearer fine-tuning is than AR training.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from .harness import sync

__all__ = ["training_batch", "training_speed", "TARGET_RATIO"]

TARGET_RATIO = 0.66  # denoiser / AR training throughput the fine-tuning path aims for


def training_batch(docs: list[list[int]], batch: int, seq_len: int, *, bos_id: int, eos_id: int) -> Tensor:
    """(batch, seq_len + 1) rows packed from `[bos] + doc + [eos]` (tiled when the documents are short)."""
    stream = [t for d in docs for t in [bos_id, *d, eos_id]]
    need = batch * (seq_len + 1)
    stream = (stream * (need // max(1, len(stream)) + 1))[:need]
    return torch.tensor(stream, dtype=torch.long).view(batch, seq_len + 1)


def _step_seconds(step, steps: int, warmup: int, device: torch.device) -> list[float]:
    """Wall seconds of each of `steps` calls of `step`, after `warmup` untimed ones."""
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        sync(device)
        start = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - start)
    return times


def training_speed(model, backbone: Path, rows: Tensor, *, steps: int, warmup: int, device: torch.device) -> dict:
    """Median step time of both paths on inputs (B, L) = rows[:, :-1] (AR targets rows[:, 1:]).

    The denoiser starts from the benchmarked model's own weights, the AR model from `backbone`
    (the context tower's checkpoint). Returns the per-step seconds, tokens / second of each path
    and ratio = AR step seconds / denoiser step seconds (= denoiser / AR tokens per second).
    """
    from twotower.towers.base import ContextTowerBase
    from twotower.training import DenoiserFineTuning

    x = rows[:, :-1].to(device)
    B, L = x.shape
    ft = DenoiserFineTuning(backbone=str(backbone), block_size=model.block_size, mask_token_id=model.mask_token_id,
                            shifted=model.shifted)
    ft.denoiser.load_state_dict(model.denoiser.state_dict())
    ft.to(device).train()
    params = [p for p in ft.denoiser.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)
    gen = torch.Generator(device=device).manual_seed(0)

    def denoiser_step():
        opt.zero_grad(set_to_none=True)
        ft.forward_loss(x, generator=gen)["loss"].backward()
        opt.step()

    den_times = _step_seconds(denoiser_step, steps, warmup, device)
    del ft, opt, params  # free the fine-tuning copy before the AR model loads

    ar = ContextTowerBase.from_pretrained(backbone)  # any registered family.to(device).train().requires_grad_(True)
    ar_opt = torch.optim.AdamW(ar.parameters(), lr=1e-5)
    target = rows[:, 1:].to(device)

    def ar_step():
        ar_opt.zero_grad(set_to_none=True)
        logits = ar(x)
        F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1)).backward()
        ar_opt.step()

    ar_times = _step_seconds(ar_step, steps, warmup, device)
    del ar, ar_opt
    den_s, ar_s = statistics.median(den_times), statistics.median(ar_times)
    return {"batch": B, "seq_len": L, "tokens_per_step": B * L, "steps": steps, "warmup": warmup,
            "denoiser_step_seconds": den_times, "ar_step_seconds": ar_times,
            "denoiser_tokens_per_s": B * L / den_s, "ar_tokens_per_s": B * L / ar_s,
            "ratio": ar_s / den_s, "target_ratio": TARGET_RATIO}
