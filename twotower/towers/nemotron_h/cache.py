"""HybridCache: NemotronH's context cache, attention K,V (`caches.KVBuffers`) + Mamba-2 states.

Mamba layers keep the conv state (b, conv_dim, k-1) in the model dtype and the SSM state
(b, heads, head_dim, state) always in float32, whatever the cache is moved or cast to.

A provisional extend (speculative decoding) appends the block's K,V but leaves the Mamba states
where they were, recording in a `PendingScan` what is needed to move them to any accepted prefix;
`ContextTower.accept` settles it. NemotronH attention has no positional encoding, so a hole
is exactly a masked-out key.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from ...cache_base import KVBuffers, PendingBlock
from .layers import ATTENTION, MAMBA

__all__ = ["HybridCache", "PendingScan"]


@dataclass
class PendingScan(PendingBlock):
    """A provisional block of a NemotronH cache. Per Mamba layer index: `xbc` the raw conv inputs
    (b, n, conv_dim), `scan` the scan inputs (x, dt, B) (see `MambaOut.scan_inputs`)."""

    xbc: dict[int, Tensor] = field(default_factory=dict)
    scan: dict[int, tuple[Tensor, Tensor, Tensor]] = field(default_factory=dict)


@dataclass
class HybridCache(KVBuffers):
    """Per-layer NemotronH cache; lists are indexed by layer, None where a layer has no such state."""

    STATES = ("conv", "ssm")
    keys: list[Tensor | None]
    values: list[Tensor | None]
    conv: list[Tensor | None]
    ssm: list[Tensor | None]
    key_mask: Tensor  # (b, capacity) bool
    length: int = 0
    padded: bool = False
    pending: PendingScan | None = None
    hole_bound: int = 0

    @classmethod
    def empty(cls, backbone, batch: int, *, capacity: int = 64, device=None, dtype=None) -> "HybridCache":
        """An empty cache shaped for `backbone` (a HybridBackbone)."""
        n = len(backbone.layers)
        keys, values, conv, ssm = [None] * n, [None] * n, [None] * n, [None] * n
        for i, blk in enumerate(backbone.layers):
            m = blk.mixer
            if blk.block_type == ATTENTION:
                shape = (batch, m.num_kv_heads, capacity, m.head_dim)
                keys[i] = torch.zeros(shape, device=device, dtype=dtype)
                values[i] = torch.zeros(shape, device=device, dtype=dtype)
            elif blk.block_type == MAMBA:
                conv[i], ssm[i] = m.empty_states(batch, device=device, dtype=dtype)
        mask = torch.zeros(batch, capacity, dtype=torch.bool, device=device)
        return cls(keys, values, conv, ssm, mask, 0)

    def _cast_state(self, name: str, t: Tensor, device, dtype) -> Tensor:
        # SSM states accumulate over the whole history: float32 in every model dtype (docs/design.md).
        if name == "ssm":
            return t.to(device=device, dtype=torch.float32)
        return super()._cast_state(name, t, device, dtype)
