"""DenoiserTower: writes a block of S tokens in parallel from the context tower's cache.

Layer i of the denoiser, for a block:
* attention: queries from the block; keys / values = the context tower's layer-i K,V of every clean
  position before the block, concatenated with the block's own K,V (denoiser weights). No causal
  mask: the block sees all its context and itself bidirectionally.
* Mamba-2: a causal chunked scan over the block only, seeded with the context tower's layer-i conv
  and SSM states at the block boundary, with the denoiser's weights.
* MLP / MoE: token-wise.
* adaLN-single time conditioning from t (time_embedding.py); without t the layers are plain.

Two forwards with one meaning:
* `forward_block(x, cache, t)` — inference: one block (b, S) against a HybridCache.
* `forward_train(x, states, t)` — training: every block of (b, L = nB S) at once, vectorised.
  Block k attends to context K,V of positions < kS and to itself; its Mamba layers start from the
  boundary states of block k. Logits equal `forward_block` of block k given the cache of x[:kS].

State dict names: `backbone.` + NemotronH names, `lm_head.weight`, `time.` + the adaLN modules.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn as nn
from torch import Tensor

from ...time_embedding import build_time_conditioning
from ..base import DenoiserTowerBase, run_block
from ..common import ContextStates, block_attention_mask
from .cache import HybridCache
from .context import ContextTower
from .layers import ATTENTION, MAMBA, MOE, HybridBackbone


class DenoiserTower(DenoiserTowerBase):
    """The trainable tower. `config` is the same NemotronHConfig as the context tower's.

    time: the time conditioning spec {"class_path", "init_args"} (None: AdaLNSingle(init=time_init)),
    one modulation per layer.
    """

    def __init__(self, config, *, time_init: str = "identity", time: dict | None = None):
        super().__init__()
        self.config = config
        self.backbone = HybridBackbone(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.num_modulated = self.modulated_layers(config)
        self.time = build_time_conditioning(time, config.hidden_size, self.num_modulated, time_init=time_init)

    @staticmethod
    def modulated_layers(config) -> int:
        """One modulation per block (Mamba, attention, MLP or MoE)."""
        return len(config.layers_block_type)

    @classmethod
    def from_context(cls, context: ContextTower, *, time_init: str = "identity",
                     time: dict | None = None, device=None) -> "DenoiserTower":
        """A denoiser initialised as a copy of the context tower and its LM head (docs/design.md,
        section 3), on `device` (None: the context's); each weight is copied once (`copy_of_context`)."""
        return cls.copy_of_context(context, time_init=time_init, time=time, device=device)

    def match_precision(self, context: ContextTower) -> None:
        """MoE routers stay in the context's (float32) precision: re-copy them at full precision
        after `from_context` cast the whole copy to the context's first dtype."""
        with torch.no_grad():
            for d_blk, c_blk in zip(self.backbone.layers, context.backbone.layers):
                if d_blk.block_type == MOE:
                    ref = next(c_blk.mixer.gate.parameters())
                    d_blk.mixer.gate.to(ref.dtype)
                    d_blk.mixer.gate.load_state_dict(c_blk.mixer.gate.state_dict())

    def head(self, hidden: Tensor) -> Tensor:
        """Final norm + LM head in float32: (..., H) -> (..., V)."""
        return self.head_projection(self.backbone.norm_f(hidden)).float()

    # ---- inference: one block -----------------------------------------------------------------
    def forward_block(self, x: Tensor, cache: HybridCache, t: Tensor | None = None, *,
                      return_hidden: bool = False) -> Tensor:
        """x (b, S) noisy block, cache = context of length T, t (b,) -> logits (b, S, V) float32.

        The cache is read, never written.
        """
        mask = self.block_key_mask(x, cache)
        h_all = self.backbone.embeddings(x)
        mods = None if t is None else self.time(t.to(h_all.device))  # each (b, 1, H)
        for i, blk in self.run_layers():
            mod = None if mods is None else mods[i]
            h = blk.pre(h_all, mod)
            if blk.block_type == ATTENTION:
                q, k, v = blk.mixer.qkv(h)
                ck, cv = cache.kv(i)
                y = blk.mixer.attend(q, torch.cat([ck.to(k.dtype), k], 2), torch.cat([cv.to(v.dtype), v], 2), mask)
            elif blk.block_type == MAMBA:
                y = blk.mixer(h, conv_state=cache.conv[i], ssm_state=cache.ssm[i], need_final_state=False).y
            else:
                y = blk.mixer(h)
            h_all = blk.post(h_all, y, mod)
        return h_all if return_hidden else self.head(h_all)

    # ---- training: every block at once --------------------------------------------------------
    def forward_train(self, x: Tensor, states: ContextStates, t: Tensor | None = None, *,
                      return_hidden: bool = False) -> Tensor:
        """x (b, L) noisy sequence, states from `ContextTower.forward_train`, t (b, nB) -> logits (b, L, V).

        With `return_hidden` returns the pre-norm hidden (b, L, H) (call `head` on selected rows).
        """
        S = states.block_size
        b, L, nB = self.training_blocks(x, S, t)
        hid = self.backbone.embeddings(x).view(b, nB, S, -1)
        H = hid.shape[-1]
        mask = block_attention_mask(L, S, device=x.device) if ATTENTION in self.backbone.block_types else None
        mods = None if t is None else self.time(t)  # each (b, nB, 1, H)

        def step(i, blk, hid, mod):
            h = blk.pre(hid, mod)
            if blk.block_type == ATTENTION:
                q, k, v = blk.mixer.qkv(h.reshape(b, L, H))
                keys = torch.cat([states.keys[i].to(k.dtype), k], 2)
                vals = torch.cat([states.values[i].to(v.dtype), v], 2)
                y = blk.mixer.attend(q, keys, vals, mask).view(b, nB, S, H)
            elif blk.block_type == MAMBA:
                conv, ssm = states.conv[i], states.ssm[i]
                out = blk.mixer(h.reshape(b * nB, S, H), chunk_size=S,
                                conv_state=conv.reshape(b * nB, *conv.shape[2:]),
                                ssm_state=ssm.reshape(b * nB, *ssm.shape[2:]), need_final_state=False)
                y = out.y.view(b, nB, S, H)
            else:
                y = blk.mixer(h)
            return blk.post(hid, y, mod)

        for i, blk in self.run_layers():
            hid = run_block(blk, partial(step, i, blk), hid, None if mods is None else mods[i])
        hid = hid.reshape(b, L, H)
        return hid if return_hidden else self.head(hid)

