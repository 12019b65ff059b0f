"""ContextTower: the frozen AR NemotronH model, run causally, exporting per-layer caches.

Three ways to run it:
* `tower(input_ids)` / `prefill(input_ids, attention_mask)` — causal forward over a (left-padded)
  batch; `prefill` also returns a `HybridCache` for later extension.
* `extend(cache, tokens)` — append any number of tokens (one for AR decoding, a committed block of
  S in one chunked scan) and return their logits; the cache grows in place. With
  `provisional=True` (speculative decoding) the block is appended on trial: `accept(cache, keep)`
  then keeps each row's first keep[b] tokens and rolls the rest back, without another forward.
* `forward_train(input_ids, block_size)` — one causal pass over clean training sequences that
  also returns, per layer, what the denoiser needs for every block at once: attention K,V of every
  position, and Mamba conv / SSM states at every block boundary (state after position kS - 1).

State dict names: `backbone.` + transformers' NemotronH backbone names, and `lm_head.weight`.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
import torch.nn as nn
from torch import Tensor

from ..caches import HybridCache, PendingBlock
from .base import ContextTowerBase, at_positions, run_block
from .layers import ATTENTION, MAMBA, HybridBackbone
from .ssd import conv_boundary_states, conv_state_at, ssd_state_at


@dataclass
class ContextStates:
    """Training-time context exports for sequences of L = nB * S clean tokens.

    keys / values[i]: (b, kv, L, d) for attention layers; conv[i]: (b, nB, conv_dim, k-1) and
    ssm[i]: (b, nB, h, p, n) float32 for Mamba layers: the states entering block k.
    """

    keys: list[Tensor | None]
    values: list[Tensor | None]
    conv: list[Tensor | None]
    ssm: list[Tensor | None]
    block_size: int


def causal_mask(valid: Tensor, q_len: int, offset: int) -> Tensor:
    """(b, 1, q_len, offset + q_len) bool: query i (absolute position offset + i) may see key j if
    j <= offset + i and key j is real. A query always sees itself, so padded rows stay finite."""
    k_len = valid.shape[1]
    q_pos = torch.arange(q_len, device=valid.device)[:, None] + offset
    k_pos = torch.arange(k_len, device=valid.device)[None, :]
    allowed = (k_pos <= q_pos)[None] & valid[:, None, :]
    allowed |= (k_pos == q_pos)[None]
    return allowed[:, None]


class ContextTower(ContextTowerBase):
    """The AR model as the context tower. `config` is a transformers `NemotronHConfig`."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.backbone = HybridBackbone(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    # ---- precision ----------------------------------------------------------------------------
    def keep_router_fp32(self) -> None:
        """MoE router weights and correction biases stay float32 whatever the model dtype."""
        for blk in self.backbone.layers:
            if blk.block_type == "moe":
                blk.mixer.gate.float()

    def restore_precision(self) -> None:
        self.keep_router_fp32()

    # ---- plain causal forward -----------------------------------------------------------------
    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """(b, T) token ids -> logits (b, T, V) float32."""
        return self.prefill(input_ids, attention_mask, logits="all", use_cache=False)[0]

    def prefill(self, input_ids: Tensor, attention_mask: Tensor | None = None, *, logits: str = "all",
                use_cache: bool = True, capacity: int | None = None):
        """Causal forward over a prompt batch, returning (logits, cache).

        attention_mask: (b, T), 1 for real tokens, 0 for (left) padding. Padded positions are kept
        out of attention and out of the Mamba states. logits: "all" (b, T, V), "last" (b, 1, V) or
        "none" (None).
        """
        check_ids(input_ids, self.config.vocab_size)
        b, T = input_ids.shape
        valid, padded = validity(input_ids, attention_mask)
        cache = self.empty_cache(b, capacity=capacity or max(64, 2 * T), device=input_ids.device) if use_cache else None
        hidden = self._run(input_ids, valid, padded, cache, offset=0)
        return self._logits(hidden, logits), cache

    def empty_cache(self, batch: int, *, capacity: int = 64, device=None) -> HybridCache:
        """An empty cache for `batch` rows with room for `capacity` positions (grows when needed)."""
        dtype = self.backbone.embeddings.weight.dtype
        return HybridCache.empty(self.backbone, batch, capacity=capacity,
                                 device=self.backbone.embeddings.weight.device if device is None else device,
                                 dtype=dtype)

    def extend(self, cache: HybridCache, tokens: Tensor, *, logits: str = "all",
               attention_mask: Tensor | None = None, provisional: bool = False) -> Tensor | None:
        """Append tokens (b, n) to `cache` (in place) and return their logits (b, n, V).

        n = 1 is an AR step (recurrent Mamba update); larger n runs one chunked scan.
        provisional: append on trial (speculative decoding). The logits are those of a normal
        extend; the cache then waits for `accept(cache, keep)`, which settles how many of the n
        tokens each row keeps.
        """
        # No value-range check here: it would read the ids back from the device on every AR step.
        check_ids(tokens, self.config.vocab_size, check_range=False)
        cache.check_settled("extend it")
        if tokens.shape[0] != cache.batch_size:
            raise ValueError(f"tokens have batch {tokens.shape[0]} but the cache has {cache.batch_size}")
        valid, padded = validity(tokens, attention_mask)
        hidden = self._run(tokens, valid, padded, cache, offset=cache.length, provisional=provisional)
        return self._logits(hidden, logits)

    def accept(self, cache: HybridCache, keep: Tensor) -> None:
        """Settle a provisional block: row b keeps its first keep[b] tokens (0 <= keep[b] <= n).

        The Mamba conv / SSM states move to the state after each row's last kept token (rebuilt in
        closed form from the recorded scan inputs: no forward). The cache length grows by
        max(keep); a row that kept fewer leaves holes (False in `key_mask`) that attention skips.
        Rows are then exactly as if only their kept tokens had been appended.
        """
        pending = cache.pending
        if pending is None:
            raise RuntimeError("accept: the cache holds no provisional block (extend(..., provisional=True) first)")
        keep, lo, hi = cache.check_keep(keep)  # raises before anything moved; the one host read
        for i, blk in enumerate(self.backbone.layers):
            if i in pending.scan:
                x, dt, B = pending.scan[i]
                cache.ssm[i] = ssd_state_at(x, dt, blk.mixer.decay_rates(), B, initial_state=cache.ssm[i],
                                            last=keep - 1)
                cache.conv[i] = conv_state_at(cache.conv[i], pending.xbc[i], keep)
        cache.settle(keep, bounds=(lo, hi))  # holes, length

    def _logits(self, hidden: Tensor, which: str) -> Tensor | None:
        if which == "none":
            return None
        if which == "last":
            hidden = hidden[:, -1:]
        elif which != "all":
            raise ValueError(f"logits must be 'all', 'last' or 'none', got {which!r}")
        return self.lm_head(hidden).float()

    def _run(self, ids: Tensor, valid: Tensor, padded: bool, cache: HybridCache | None, offset: int,
             provisional: bool = False) -> Tensor:
        """Run the stack over `ids` (b, n) appended after `offset` cached positions; returns the final hidden.

        valid (b, n) marks real tokens; `padded` says whether any is False. `provisional`: leave the
        Mamba states as they are and record in `cache.pending` what `accept` needs.
        """
        n = ids.shape[1]
        x = self.backbone.embeddings(ids)
        pad_mask = valid if padded else None
        if cache is not None:
            cache.reserve(n)
            cache.write_mask(valid, padded=padded)
            key_valid, any_padding = cache.key_mask[:, : offset + n], cache.padded
        else:
            key_valid, any_padding = valid, padded
        # One mask for every attention layer; None when nothing is masked beyond causality for n = 1.
        mask = None
        if any(t == ATTENTION for t in self.backbone.block_types):
            mask = None if (n == 1 and not any_padding) else causal_mask(key_valid, n, offset)
        if provisional:
            if cache is None:
                raise ValueError("a provisional run needs a cache")
            pending = PendingBlock(offset, n, {}, {})
        for i, blk in enumerate(self.backbone.layers):
            h = blk.pre(x)
            if blk.block_type == ATTENTION:
                q, k, v = blk.mixer.qkv(h)
                if cache is not None:
                    cache.write_kv(i, k, v)
                    k, v = cache.kv(i, upto=offset + n)
                y = blk.mixer.attend(q, k, v, mask)
            elif blk.block_type == MAMBA:
                out = blk.mixer(h, conv_state=None if cache is None else cache.conv[i],
                                ssm_state=None if cache is None else cache.ssm[i], pad_mask=pad_mask,
                                return_xbc=provisional, return_scan_inputs=provisional,
                                need_final_state=not provisional)
                if provisional:
                    pending.xbc[i], pending.scan[i] = out.xbc, out.scan_inputs
                elif cache is not None:
                    cache.conv[i], cache.ssm[i] = out.conv_state, out.ssm_state
                y = out.y
            else:
                y = blk.mixer(h)
            x = blk.post(x, y)
        if cache is not None:
            cache.advance(n)
            if provisional:
                cache.pending = pending
        return self.backbone.norm_f(x)

    # ---- training-time export -----------------------------------------------------------------
    def forward_train(self, input_ids: Tensor, block_size: int, *, return_logits: bool | Tensor = False):
        """One causal pass over clean sequences (b, L), L a multiple of block_size.

        Returns (logits or None, ContextStates). The Mamba scan runs with chunk size = block_size,
        so the chunk-entry states are the block-boundary states.
        """
        check_ids(input_ids, self.config.vocab_size)
        b, L = input_ids.shape
        if L % block_size:
            raise ValueError(f"sequence length {L} is not a multiple of block_size {block_size}")
        n_layers = len(self.backbone.layers)
        keys, values, conv, ssm = [None] * n_layers, [None] * n_layers, [None] * n_layers, [None] * n_layers
        x = self.backbone.embeddings(input_ids)
        mask = torch.ones(L, L, dtype=torch.bool, device=x.device).tril() if ATTENTION in self.backbone.block_types else None

        def step(i, blk, x):
            h = blk.pre(x)
            if blk.block_type == ATTENTION:
                q, k, v = blk.mixer.qkv(h)
                keys[i], values[i] = k, v
                y = blk.mixer.attend(q, k, v, mask)
            elif blk.block_type == MAMBA:
                out = blk.mixer(h, chunk_size=block_size, return_xbc=True, return_chunk_states=True)
                conv[i] = conv_boundary_states(out.xbc, blk.mixer.kernel_size, block_size)
                ssm[i] = out.ssm_chunk_states
                y = out.y
            else:
                y = blk.mixer(h)
            return blk.post(x, y)

        for i, blk in enumerate(self.backbone.layers):
            x = run_block(blk, partial(step, i, blk), x)
        logits = None if return_logits is False else self.lm_head(self.backbone.norm_f(at_positions(x, return_logits))).float()
        return logits, ContextStates(keys, values, conv, ssm, block_size)


def validity(ids: Tensor, attention_mask: Tensor | None) -> tuple[Tensor, bool]:
    """(valid (b, n) bool, whether any position is padding) from an optional 0/1 attention mask."""
    if attention_mask is None:
        return torch.ones(ids.shape, dtype=torch.bool, device=ids.device), False
    valid = attention_mask.to(ids.device).bool()
    return valid, not bool(valid.all())


def check_ids(ids: Tensor, vocab_size: int, *, check_range: bool = True) -> None:
    if ids.dim() != 2:
        raise ValueError(f"input_ids must be (batch, length), got shape {tuple(ids.shape)}")
    if ids.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"input_ids must be an integer tensor, got {ids.dtype}")
    if check_range and ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab_size):
        raise ValueError(f"token ids must lie in [0, {vocab_size}); got min {int(ids.min())}, max {int(ids.max())}")
