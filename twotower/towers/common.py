"""Helpers every tower family shares: id and mask checks, the attention masks of the cached and the
training forwards, the training-time context exports, and RMSNorm."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
from torch import Tensor

__all__ = ["ContextStates", "RMSNorm", "causal_mask", "block_attention_mask", "validity", "check_ids"]


@dataclass
class ContextStates:
    """Training-time context exports for sequences of L = nB * S clean tokens.

    keys / values[i]: (b, kv, L, d) for attention layers; conv[i]: (b, nB, conv_dim, k-1) and
    ssm[i]: (b, nB, h, p, n) float32 for recurrent (Mamba) layers: the states entering block k.
    None where a layer has no such state (every conv / ssm entry for an attention-only family).
    """

    keys: list[Tensor | None]
    values: list[Tensor | None]
    conv: list[Tensor | None]
    ssm: list[Tensor | None]
    block_size: int


class RMSNorm(nn.Module):
    """RMSNorm computed in float32, result cast back to the input dtype."""

    def __init__(self, hidden_size: int, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight.float() * xf).to(x.dtype)


def causal_mask(valid: Tensor, q_len: int, offset: int) -> Tensor:
    """(b, 1, q_len, offset + q_len) bool: query i (absolute position offset + i) may see key j if
    j <= offset + i and key j is real. A query always sees itself, so padded rows stay finite."""
    k_len = valid.shape[1]
    q_pos = torch.arange(q_len, device=valid.device)[:, None] + offset
    k_pos = torch.arange(k_len, device=valid.device)[None, :]
    allowed = (k_pos <= q_pos)[None] & valid[:, None, :]
    allowed |= (k_pos == q_pos)[None]
    return allowed[:, None]


def block_attention_mask(length: int, block_size: int, device=None) -> Tensor:
    """(L, 2L) bool for the training forward: query i sees context key j if block(j) < block(i)
    and denoiser key j if block(j) == block(i)."""
    blk = torch.arange(length, device=device) // block_size
    return torch.cat([blk[None, :] < blk[:, None], blk[None, :] == blk[:, None]], dim=1)


def validity(ids: Tensor, attention_mask: Tensor | None) -> tuple[Tensor, bool]:
    """(valid (b, n) bool, whether any position is padding) from an optional 0/1 attention mask."""
    if attention_mask is None:
        return torch.ones(ids.shape, dtype=torch.bool, device=ids.device), False
    valid = attention_mask.to(ids.device).bool()
    return valid, not bool(valid.all())


def check_ids(ids: Tensor, vocab_size: int, *, check_range: bool = True) -> None:
    """Raise ValueError unless `ids` is a 2-D integer tensor (of ids in [0, vocab_size) with `check_range`)."""
    if ids.dim() != 2:
        raise ValueError(f"input_ids must be (batch, length), got shape {tuple(ids.shape)}")
    if ids.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"input_ids must be an integer tensor, got {ids.dtype}")
    if check_range and ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab_size):
        raise ValueError(f"token ids must lie in [0, {vocab_size}); got min {int(ids.min())}, max {int(ids.max())}")
