"""LlamaContextTower: a frozen transformers-Llama AR model as the context tower, with a `KVCache`.

The same three ways to run as every family's tower (`twotower/towers/base.py`): a causal
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

from ...cache_base import PendingBlock
from ..base import ContextTowerBase, at_positions, run_block
from ..common import ContextStates, causal_mask, check_ids
from ..inference_linear import HEAD_COPY
from .cache import KVCache
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
    """The AR model as the context tower. `config` is a transformers `LlamaConfig`; the Llama-like
    families (Qwen2, Mistral) subclass it with their own `backbone_class`."""

    backbone_class = LlamaBackbone  # what a Llama-like family changes (biases, window rules)

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.backbone = self.backbone_class(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    @property
    def max_length(self) -> int | None:
        """max_position_embeddings, or the sliding window when it is shorter (`check_window`)."""
        limits = [v for v in (super().max_length, self.backbone.window) if v is not None]
        return min(limits) if limits else None

    def logits(self, hidden: Tensor, which: str) -> Tensor | None:
        """`ContextTowerBase.logits`, through the packed head copy where `merge_adapters(pack_context=True)`
        made one and it serves these rows (`towers.inference_linear`)."""
        copy = self.__dict__.get(HEAD_COPY)
        if copy is None or which not in ("all", "last") or torch.is_grad_enabled():
            return super().logits(hidden, which)
        h = hidden[:, -1:] if which == "last" else hidden
        if not copy.applies(h):
            return super().logits(hidden, which)
        copy.check(h, "packed head copy")
        return copy(h).float()

    def train(self, mode: bool = True):
        if mode:  # the packed head is an inference copy (`merge_adapters`)
            self.__dict__.pop(HEAD_COPY, None)
        return super().train(mode)

    def _apply(self, fn, recurse=True):
        self.__dict__.pop(HEAD_COPY, None)  # moved or cast: the copy would be stale
        return super()._apply(fn, recurse)

    # ---- the cached forward (prefill / extend / logits: ContextTowerBase) -----------------------
    def empty_cache(self, batch: int, *, capacity: int = 64, device=None) -> KVCache:
        """An empty KVCache for `batch` rows with room for `capacity` positions (grows when needed)."""
        w = self.backbone.embed_tokens.weight
        kv_heads, head_dim = self.backbone.kv_shape
        return KVCache.allocate(len(self.backbone.layers), kv_heads, head_dim, batch, capacity=capacity,
                                device=w.device if device is None else device, dtype=w.dtype)

    def accept(self, cache: KVCache, keep: Tensor) -> None:
        """Settle a provisional block: row b keeps its first keep[b] tokens, the rest become holes.

        Nothing else moves: the kept keys already sit at their logical positions, and the next
        positions are counted from the real keys, so the holes leave no trace.
        """
        cache.settle(keep)

    def _forward_cached(self, ids: Tensor, valid: Tensor, padded: bool, cache: KVCache | None, offset: int,
                        provisional: bool = False) -> Tensor:
        """Run the stack over `ids` (b, n) appended after `offset` cached positions -> final hidden (normed).

        provisional: the block is appended like any other (K,V only, no recurrent state); `accept`
        then only turns each row's rejected positions into holes.
        """
        n = ids.shape[1]
        # Slots bound logical positions from above: a host-side check, no device read.
        self.backbone.check_window(offset + n)
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
            if provisional:
                cache.pending = PendingBlock(offset, n)
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
        self.backbone.check_window(L)
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
