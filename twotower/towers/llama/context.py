"""LlamaContextTower: a frozen transformers-Llama AR model as the context tower, with a `KVCache`.

The same three ways to run as NemotronH's tower (`twotower/towers/context.py`): a causal
`prefill` / `forward` over a left-padded batch, `extend` by any number of tokens (provisional for
speculative decoding, settled by `accept`), and `forward_train`, which returns every layer's K,V
for the denoiser's all-blocks training pass.

Positions are logical per row: a token's RoPE position is the number of real tokens before it in
its row (`KVCache.real_counts` for what is cached, a cumulative sum over the new ones). Keys are
cached after rotation, so a row's outputs never depend on padding, holes or compaction: they equal
an unpadded single-row run.

State dict names: `backbone.` + transformers' names below `model.`, and `lm_head.weight`.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn as nn
from torch import Tensor

from ...caches import KVCache, PendingBlock
from ..base import ContextTowerBase, at_positions, run_block
from ..context import ContextStates, check_ids, validity, causal_mask
from .layers import LlamaBackbone


def new_positions(valid: Tensor, before: Tensor | None) -> Tensor:
    """(b, n) long logical positions of n appended tokens: real tokens already in the row (`before`,
    (b,), None = 0) plus the real tokens among the new ones before each. Padding gets a harmless
    in-range position (it is masked out of every real query)."""
    pos = valid.long().cumsum(1) - 1
    if before is not None:
        pos = pos + before[:, None]
    return pos.clamp(min=0)


class LlamaContextTower(ContextTowerBase):
    """The AR model as the context tower. `config` is a transformers `LlamaConfig` (or Qwen2-like)."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.backbone = LlamaBackbone(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    # ---- plain causal forward -----------------------------------------------------------------
    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """(b, T) token ids -> logits (b, T, V) float32."""
        return self.prefill(input_ids, attention_mask, logits="all", use_cache=False)[0]

    def prefill(self, input_ids: Tensor, attention_mask: Tensor | None = None, *, logits: str = "all",
                use_cache: bool = True, capacity: int | None = None):
        """Causal forward over a left-padded prompt batch -> (logits, KVCache or None)."""
        check_ids(input_ids, self.config.vocab_size)
        b, T = input_ids.shape
        valid, padded = validity(input_ids, attention_mask)
        cache = self.empty_cache(b, capacity=capacity or max(64, 2 * T), device=input_ids.device) if use_cache else None
        hidden = self._run(input_ids, valid, padded, cache, offset=0)
        return self._logits(hidden, logits), cache

    def empty_cache(self, batch: int, *, capacity: int = 64, device=None) -> KVCache:
        """An empty KVCache for `batch` rows with room for `capacity` positions (grows when needed)."""
        w = self.backbone.embed_tokens.weight
        kv_heads, head_dim = self.backbone.kv_shape
        return KVCache.allocate(len(self.backbone.layers), kv_heads, head_dim, batch, capacity=capacity,
                                device=w.device if device is None else device, dtype=w.dtype)

    def extend(self, cache: KVCache, tokens: Tensor, *, logits: str = "all", attention_mask: Tensor | None = None,
               provisional: bool = False) -> Tensor | None:
        """Append tokens (b, n) to `cache` (in place) and return their logits (b, n, V).

        provisional: append on trial; `accept(cache, keep)` then settles how many each row keeps.
        """
        check_ids(tokens, self.config.vocab_size, check_range=False)
        cache.check_settled("extend it")
        if tokens.shape[0] != cache.batch_size:
            raise ValueError(f"tokens have batch {tokens.shape[0]} but the cache has {cache.batch_size}")
        valid, padded = validity(tokens, attention_mask)
        hidden = self._run(tokens, valid, padded, cache, offset=cache.length)
        if provisional:
            cache.pending = PendingBlock(cache.length - tokens.shape[1], tokens.shape[1], {}, {})
        return self._logits(hidden, logits)

    def accept(self, cache: KVCache, keep: Tensor) -> None:
        """Settle a provisional block: row b keeps its first keep[b] tokens, the rest become holes.

        Nothing else moves: the kept keys already sit at their logical positions, and the next
        positions are counted from the real keys, so the holes leave no trace.
        """
        cache.settle(keep)

    def _logits(self, hidden: Tensor, which: str) -> Tensor | None:
        if which == "none":
            return None
        if which == "last":
            hidden = hidden[:, -1:]
        elif which != "all":
            raise ValueError(f"logits must be 'all', 'last' or 'none', got {which!r}")
        return self.lm_head(hidden).float()

    def _run(self, ids: Tensor, valid: Tensor, padded: bool, cache: KVCache | None, offset: int) -> Tensor:
        """Run the stack over `ids` (b, n) appended after `offset` cached positions -> final hidden (normed)."""
        n = ids.shape[1]
        x = self.backbone.embed_tokens(ids)
        before = cache.real_counts(offset) if cache is not None and offset else None
        cos, sin = self.backbone.rotary(new_positions(valid, before))
        if cache is not None:
            cache.reserve(n)
            cache.write_mask(valid, padded=padded)
            key_valid, any_padding = cache.key_mask[:, : offset + n], cache.padded
        else:
            key_valid, any_padding = valid, padded
        mask = None if (n == 1 and not any_padding) else causal_mask(key_valid, n, offset)
        for i, blk in enumerate(self.backbone.layers):
            q, k, v = blk.self_attn.qkv(blk.attn_input(x), cos, sin)
            if cache is not None:
                cache.write_kv(i, k, v)
                k, v = cache.kv(i, upto=offset + n)
            x = blk.residual(x, blk.self_attn.attend(q, k, v, mask))
            x = blk.mlp_out(x)
        if cache is not None:
            cache.advance(n)
        return self.backbone.norm(x)

    # ---- training-time export -----------------------------------------------------------------
    def forward_train(self, input_ids: Tensor, block_size: int, *, return_logits: bool | Tensor = False):
        """One causal pass over clean sequences (b, L), L a multiple of block_size.

        Returns (logits or None, ContextStates) with every layer's rotated keys and values
        (b, kv, L, d); there is no recurrent state (conv / ssm are None).
        """
        check_ids(input_ids, self.config.vocab_size)
        b, L = input_ids.shape
        if L % block_size:
            raise ValueError(f"sequence length {L} is not a multiple of block_size {block_size}")
        x = self.backbone.embed_tokens(input_ids)
        positions = torch.arange(L, device=input_ids.device).expand(b, L)
        cos, sin = self.backbone.rotary(positions)
        mask = torch.ones(L, L, dtype=torch.bool, device=x.device).tril()
        n_layers = len(self.backbone.layers)
        keys, values = [None] * n_layers, [None] * n_layers

        def step(i, blk, x):
            q, k, v = blk.self_attn.qkv(blk.attn_input(x), cos, sin)
            keys[i], values[i] = k, v
            return blk.mlp_out(blk.residual(x, blk.self_attn.attend(q, k, v, mask)))

        for i, blk in enumerate(self.backbone.layers):
            x = run_block(blk, partial(step, i, blk), x)
        logits = None if return_logits is False else self.lm_head(self.backbone.norm(at_positions(x, return_logits))).float()
        return logits, ContextStates(keys, values, [None] * n_layers, [None] * n_layers, block_size)
