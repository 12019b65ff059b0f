"""KVCache: the context cache of the Llama-like families (Llama, Qwen2, Mistral): attention K,V only."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ...cache_base import KVBuffers, PendingBlock

__all__ = ["KVCache"]


@dataclass
class KVCache(KVBuffers):
    """A cache of attention K,V only (every layer attends; no recurrent state).

    Keys are stored after RoPE rotation at their logical positions; the next logical position of a
    row is `real_counts()`, so holes (left padding, rejected drafts) are plain masked-out keys and
    `compact` stays exact.
    """

    keys: list[Tensor]
    values: list[Tensor]
    key_mask: Tensor  # (b, capacity) bool
    length: int = 0
    padded: bool = False
    pending: PendingBlock | None = None
    hole_bound: int = 0

    @classmethod
    def allocate(cls, num_layers: int, kv_heads: int, head_dim: int, batch: int, *, capacity: int = 64,
                 device=None, dtype=None) -> "KVCache":
        """An empty cache: per layer K and V buffers (batch, kv_heads, capacity, head_dim)."""
        shape = (batch, kv_heads, capacity, head_dim)
        keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(num_layers)]
        values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(num_layers)]
        mask = torch.zeros(batch, capacity, dtype=torch.bool, device=device)
        return cls(keys, values, mask, 0)
