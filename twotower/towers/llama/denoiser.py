"""LlamaDenoiserTower: writes a block of S tokens in parallel from a Llama context tower's KVCache.

Layer i, for a block of S positions after a row's T real context tokens:
* attention: queries from the block; keys / values = the context tower's layer-i K,V of every clean
  position (already rotated, holes masked out) followed by the block's own K,V, computed with the
  denoiser's weights and rotated at the block's logical positions T, ..., T + S - 1. No causal mask
  inside the block (bidirectional), as for NemotronH (docs/design.md, section 1.2).
* MLP: token-wise.
* time conditioning on both sub-blocks (2 per layer: attention 2i, MLP 2i + 1; see layers.py).

`forward_train` runs every block of (b, L = nB S) at once: block k's positions are kS .. kS + S - 1,
it sees the context keys before kS and itself (`block_attention_mask`), and its logits equal
`forward_block` of block k over the cache of x[:kS].

State dict names: `backbone.` + transformers' Llama names, `lm_head.weight`, `time.` + the time module.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn as nn
from torch import Tensor

from ...time_embedding import build_time_conditioning
from ..base import DenoiserTowerBase, run_block
from ..common import ContextStates, block_attention_mask
from .cache import KVCache
from .context import LlamaContextTower
from .layers import LlamaBackbone


class LlamaDenoiserTower(DenoiserTowerBase):
    """The trainable Llama tower. `config` is the context tower's LlamaConfig.

    time: the time conditioning spec {"class_path", "init_args"} (None: AdaLNSingle(init=time_init)),
    over 2 * num_hidden_layers modulated sub-blocks.
    """

    backbone_class = LlamaBackbone  # as the family's context tower

    def __init__(self, config, *, time_init: str = "identity", time: dict | None = None):
        super().__init__()
        self.config = config
        self.backbone = self.backbone_class(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.num_modulated = self.modulated_layers(config)
        self.time = build_time_conditioning(time, config.hidden_size, self.num_modulated, time_init=time_init)

    @staticmethod
    def modulated_layers(config) -> int:
        """Sub-blocks the time conditioning modulates: attention and MLP of every layer."""
        return 2 * config.num_hidden_layers

    @classmethod
    def from_context(cls, context: LlamaContextTower, *, time_init: str = "identity",
                     time: dict | None = None, device=None) -> "LlamaDenoiserTower":
        """A denoiser initialised as a copy of the context tower and its LM head (docs/design.md,
        section 3), on `device` (None: the context's); each weight is copied once (`copy_of_context`)."""
        return cls.copy_of_context(context, time_init=time_init, time=time, device=device)

    def head(self, hidden: Tensor) -> Tensor:
        """Final norm + LM head in float32: (..., H) -> (..., V)."""
        return self.head_projection(self.backbone.norm(hidden)).float()

    def _layers(self, h: Tensor, mods, attend) -> Tensor:
        """Run every layer on h (..., S, H); `attend(i, q, k, v)` gives layer i's attention output."""
        for i, blk in self.run_layers():
            m_attn = None if mods is None else mods[2 * i]
            m_mlp = None if mods is None else mods[2 * i + 1]
            h = run_block(blk, partial(self._layer, i, blk, attend), h, m_attn, m_mlp)
        return h

    @staticmethod
    def _layer(i, blk, attend, h: Tensor, m_attn, m_mlp) -> Tensor:
        h = blk.residual(h, attend(i, blk, blk.attn_input(h, m_attn)), m_attn)
        return blk.mlp_out(h, m_mlp)

    # ---- inference: one block -----------------------------------------------------------------
    def forward_block(self, x: Tensor, cache: KVCache, t: Tensor | None = None, *,
                      return_hidden: bool = False) -> Tensor:
        """x (b, S) noisy block, cache = context of length T, t (b,) -> logits (b, S, V) float32.

        The cache is read, never written.
        """
        S = x.shape[1]
        mask = self.block_key_mask(x, cache)
        self.backbone.check_window(cache.length + S)
        h = self.backbone.embed_tokens(x)
        # Each row's block continues its own real positions: a left-padded row's holes take none.
        positions = cache.real_counts()[:, None] + torch.arange(S, device=x.device)[None]
        cos, sin = self.backbone.rotary(positions.to(x.device))
        mods = None if t is None else self.time(t.to(h.device))  # each (b, 1, H)

        def attend(i, blk, hin):
            q, k, v = blk.self_attn.qkv(hin, cos, sin)
            ck, cv = cache.kv(i)
            return blk.self_attn.attend(q, torch.cat([ck.to(k.dtype), k], 2), torch.cat([cv.to(v.dtype), v], 2), mask)

        h = self._layers(h, mods, attend)
        return h if return_hidden else self.head(h)

    # ---- training: every block at once --------------------------------------------------------
    def forward_train(self, x: Tensor, states: ContextStates, t: Tensor | None = None, *,
                      return_hidden: bool = False) -> Tensor:
        """x (b, L) noisy sequence, states from `LlamaContextTower.forward_train`, t (b, nB) -> logits (b, L, V).

        With `return_hidden` returns the pre-norm hidden (b, L, H) (call `head` on selected rows).
        """
        S = states.block_size
        b, L, nB = self.training_blocks(x, S, t)
        self.backbone.check_window(L)
        h = self.backbone.embed_tokens(x)
        H = h.shape[-1]
        cos, sin = self.backbone.rotary(torch.arange(L, device=x.device).expand(b, L))
        mask = block_attention_mask(L, S, device=x.device)
        mods = None if t is None else [tuple(p.repeat_interleave(S, dim=1).reshape(b, L, H) for p in m)
                                       for m in self.time(t)]  # each (b, L, H): block k's modulation

        def attend(i, blk, hin):
            q, k, v = blk.self_attn.qkv(hin, cos, sin)
            keys = torch.cat([states.keys[i].to(k.dtype), k], 2)
            vals = torch.cat([states.values[i].to(v.dtype), v], 2)
            return blk.self_attn.attend(q, keys, vals, mask)

        h = self._layers(h, mods, attend)
        return h if return_hidden else self.head(h)
