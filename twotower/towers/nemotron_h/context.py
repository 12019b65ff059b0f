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

from functools import partial

import torch
import torch.nn as nn
from torch import Tensor

from ..base import ContextTowerBase, at_positions, run_block
from ..common import ContextStates, causal_mask, check_ids
from .cache import HybridCache, PendingScan
from .layers import ATTENTION, MAMBA, MOE, HybridBackbone
from .ssd import conv_boundary_states, conv_state_at, ssd_state_at


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
            if blk.block_type == MOE:
                blk.mixer.gate.float()

    def restore_precision(self) -> None:
        self.keep_router_fp32()

    # ---- the cached forward (prefill / extend / logits: ContextTowerBase) -----------------------
    def empty_cache(self, batch: int, *, capacity: int = 64, device=None) -> HybridCache:
        """An empty cache for `batch` rows with room for `capacity` positions (grows when needed)."""
        dtype = self.backbone.embeddings.weight.dtype
        return HybridCache.empty(self.backbone, batch, capacity=capacity,
                                 device=self.backbone.embeddings.weight.device if device is None else device,
                                 dtype=dtype)

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

    def _forward_cached(self, ids: Tensor, valid: Tensor, padded: bool, cache: HybridCache | None, offset: int,
                        provisional: bool = False) -> Tensor:
        """Run the stack over `ids` (b, n) appended after `offset` cached positions; returns the final hidden.

        n = 1 is a recurrent Mamba update; larger n runs one chunked scan. `provisional`: leave the
        Mamba states as they are and record in `cache.pending` (a `PendingScan`) what `accept` needs.
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
            pending = PendingScan(offset, n)
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
                    cache.conv[i], cache.ssm[i] = _stored(out.conv_state), _stored(out.ssm_state)
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


def _stored(state: Tensor) -> Tensor:
    """A Mamba state as the cache keeps it. Eager: as computed (often a view: the window's last
    columns, a transposed scan state). Compiled: contiguous, because the compiled stack guards on
    the strides of the cache's tensors, and a state stored with other strides than the last call's
    (the prefill's, a step's, `accept`'s) would recompile it; inside the graph the copy is fused."""
    return state.contiguous() if torch.compiler.is_compiling() else state
