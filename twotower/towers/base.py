"""What a tower family provides: the context-tower and denoiser-tower contracts and the registry.

A *family* is one backbone architecture (NemotronH, Llama, ...) turned into two towers. The
decoders (`twotower/decoding/`), the training module (`DenoiserFineTuning`) and `TwoTowerLM` talk
to towers only through the methods below, so a new family is three classes (context tower,
denoiser tower, cache) plus one `register_family` call; nothing else changes. A context tower writes
one forward, `_forward_cached`; `forward`, `prefill`, `extend` and `logits` are this module's.
Each family is a subpackage of `twotower/towers/` (`nemotron_h/`, `llama/`, `qwen2/`, `mistral/`).

Shapes: B batch, T cached (context) length, n appended tokens, S block size, L = nB * S training
length, V vocabulary, H hidden size.

The registry (`registry.py`) maps transformers' `config.model_type` to the family's classes; each
family's module fills it on import through `register_family` (`twotower.towers` imports every
built-in family). `TowerFamily`, `family_for` and `registered_families` are this module's public
names too, as every family's `__init__` and plug-in uses them.
"""

from __future__ import annotations

import abc
import os
from typing import Any

import torch
import torch.nn as nn
from torch import Tensor

from ..cache_base import Cache
from ..hardware import warn_if_slow_bf16
from ..hub import resolve_model
from ..time_embedding import build_time_conditioning
from . import registry
from .checkpoints import check_keys, check_shapes, to_tower_names
from .common import check_ids, validity
from .inference_linear import HEAD_COPY
from .lazy import close_refs
from .loading import backbone_refs, materialize
from .registry import TowerFamily, family_for, registered_families
from ..validation import check_skip_layers

__all__ = ["ContextTowerBase", "DenoiserTowerBase", "TowerFamily", "register_family", "family_for",
           "registered_families"]


# The attribute a training engine sets on a block (or a tower) to wrap its training forward.
BLOCK_RUNNER = "twotower_run"


def at_positions(hidden: Tensor, where: bool | Tensor) -> Tensor:
    """hidden (B, L, H) -> itself for where=True, or hidden[where] (N, H) for a (B, L) bool mask."""
    if isinstance(where, Tensor):
        if where.dtype != torch.bool or where.shape != hidden.shape[:2]:
            raise ValueError(f"return_logits must be a bool or a (B, L) = {tuple(hidden.shape[:2])} bool mask, "
                             f"got a {where.dtype} tensor of shape {tuple(where.shape)}")
        return hidden[where]
    return hidden


def run_block(module: nn.Module, step, *args):
    """Run `step(*args)` as one call of `module` (a block, or a whole tower).

    The training forwards call their blocks through sub-methods (pre, qkv, attend, post), never
    through `module(...)`, so hooks that wrap a module call would not fire. This is the seam
    instead: `twotower.distributed` sets `module.twotower_run` to a wrapper (an FSDP2 unit's
    forward, activation checkpointing); without one the step simply runs.
    """
    runner = module.__dict__.get(BLOCK_RUNNER)
    return step(*args) if runner is None else runner(step, *args)


class ContextTowerBase(nn.Module, abc.ABC):
    """The frozen AR model, run causally over clean tokens, leaving a per-layer cache behind.

    Subclasses hold `config` (the transformers config), `backbone` (a module whose state-dict names
    are transformers' names below `model.`) and `lm_head` (the AR head, `lm_head.weight`), and
    implement `_forward_cached`, `accept`, `empty_cache` and `forward_train`.
    `logits` arguments take "all" (B, n, V), "last" (B, 1, V) or "none" (None); logits are float32.
    """

    config: Any
    backbone: nn.Module
    lm_head: nn.Linear

    # ---- the cached forward: template methods over the family's `_forward_cached` -------------
    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """(B, T) ids, optional (B, T) 0/1 mask (left padding) -> logits (B, T, V) float32, no cache."""
        return self.prefill(input_ids, attention_mask, logits="all", use_cache=False)[0]

    def prefill(self, input_ids: Tensor, attention_mask: Tensor | None = None, *, logits: str = "all",
                use_cache: bool = True, capacity: int | None = None) -> tuple[Tensor | None, Cache | None]:
        """Causal pass over a left-padded prompt batch (B, T) -> (logits, cache of length T).

        Padded positions (mask 0) are invisible to every real token; `capacity` preallocates room
        for that many positions (the cache grows when it runs out).
        """
        check_ids(input_ids, self.config.vocab_size)
        b, T = input_ids.shape
        valid, padded = validity(input_ids, attention_mask)
        cache = self.empty_cache(b, capacity=capacity or max(64, 2 * T), device=input_ids.device) if use_cache else None
        hidden = self._forward_cached(input_ids, valid, padded, cache, 0)
        return self.logits(hidden, logits), cache

    def extend(self, cache: Cache, tokens: Tensor, *, logits: str = "all", attention_mask: Tensor | None = None,
               provisional: bool = False) -> Tensor | None:
        """Append tokens (B, n) to `cache` in place and return their logits.

        n = 1 is an AR step, n = S a committed block in one forward. With `provisional=True`
        (speculative decoding) the block is appended on trial and `accept` must settle it before
        the cache is used again.
        """
        # No value-range check here: it would read the ids back from the device on every AR step.
        check_ids(tokens, self.config.vocab_size, check_range=False)
        cache.check_settled("extend it")
        if tokens.shape[0] != cache.batch_size:
            raise ValueError(f"tokens have batch {tokens.shape[0]} but the cache has {cache.batch_size}")
        valid, padded = validity(tokens, attention_mask)
        hidden = self._forward_cached(tokens, valid, padded, cache, cache.length, provisional)
        return self.logits(hidden, logits)

    def logits(self, hidden: Tensor, which: str) -> Tensor | None:
        """The AR head over final (normed) hidden states (B, n, H): "all" (B, n, V), "last" (B, 1, V)
        or "none" (None); float32."""
        if which == "none":
            return None
        if which == "last":
            hidden = hidden[:, -1:]
        elif which != "all":
            raise ValueError(f"logits must be 'all', 'last' or 'none', got {which!r}")
        return self.lm_head(hidden).float()

    @abc.abstractmethod
    def _forward_cached(self, ids: Tensor, valid: Tensor, padded: bool, cache: Cache | None, offset: int,
                        provisional: bool = False) -> Tensor:
        """The family's forward: run the stack over `ids` (B, n) appended after `offset` cached
        positions and return the final normed hidden (B, n, H).

        valid (B, n) marks real tokens; `padded` says whether any is False (known on the host, so
        no device read). With a cache, write the n positions into it and advance its length;
        `provisional` (never without a cache): append on trial, recording in `cache.pending` what
        `accept` needs. cache None: a plain causal forward.
        """

    @property
    def max_length(self) -> int | None:
        """The most cache positions this tower runs (None: no limit): the config's
        max_position_embeddings, or less where the family refuses longer runs (a sliding window)."""
        return getattr(self.config, "max_position_embeddings", None)

    # ---- compile ------------------------------------------------------------------------------
    def compile_forward(self, **compile_kwargs) -> None:
        """`torch.compile` the family's cached forward (the hot path of prefill and every extend),
        as an instance attribute: the state dict and the class stay as they are."""
        self._forward_cached = torch.compile(self._forward_cached, **compile_kwargs)

    @property
    def forward_compiled(self) -> bool:
        """Whether `compile_forward` has been called on this tower."""
        return "_forward_cached" in vars(self)

    @abc.abstractmethod
    def accept(self, cache: Cache, keep: Tensor) -> None:
        """Settle a provisional block: row b keeps its first keep[b] (B,) tokens, without a forward.

        Rejected positions become holes (masked-out keys); each row is then exactly as if only
        its kept tokens had been appended.
        """

    @abc.abstractmethod
    def empty_cache(self, batch: int, *, capacity: int = 64, device=None) -> Cache:
        """A cache for `batch` rows holding no position yet (an empty prompt)."""

    @abc.abstractmethod
    def forward_train(self, input_ids: Tensor, block_size: int, *, return_logits: bool | Tensor = False):
        """One causal pass over clean sequences (B, L), L a multiple of `block_size`.

        Returns (logits or None, states). Logits are (B, L, V) for return_logits=True, or (N, V) at the
        N True positions (row-major, as `x[mask]`) of a (B, L) bool return_logits: only those positions
        pay for the head (`at_positions`). `states` is whatever this family's denoiser `forward_train` needs to denoise every block k at once as if it had the cache of
        input_ids[:, :kS] (attention K,V of all positions, recurrent states at block entries, ...),
        with a `block_size` attribute.
        """

    def restore_precision(self) -> None:
        """Called after a cast to a low-precision dtype: put back the parts that must stay float32
        (e.g. MoE routers). Nothing by default."""

    # ---- loading: shared by every family ------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *, dtype: torch.dtype | None = None,
                        device=None) -> "ContextTowerBase":
        """Load a local AR checkpoint directory (config.json + safetensors), or a built-in model name
        (`twotower.hub.resolve_model`, e.g. "embedded-backbone"), as a context tower.

        On the base class the family comes from config.json's `model_type`; on a family's class the
        checkpoint must be of that family. The tower is built on the meta device and each weight is
        read once from the (memory-mapped) files straight into `dtype` on `device`
        (`loading.materialize`): peak memory is the tower plus one tensor. dtype=None gives the
        modules' default dtype (float32); routers stay float32 in any dtype.
        """
        path = resolve_model(path, kind="backbone checkpoint")
        config, refs = backbone_refs(path)
        try:
            family = family_for(config)
            if cls is not ContextTowerBase and not issubclass(family.context, cls):
                raise ValueError(f"{path} holds a {config.model_type!r} model, which {cls.__name__} cannot load; "
                                 f"use {family.context.__name__}.from_pretrained or ContextTowerBase.from_pretrained")
            with torch.device("meta"):
                tower = family.context(config)
            tower.load_backbone_state(refs, where=str(path), dtype=dtype, device=device)
        finally:
            close_refs(refs.values())
        warn_if_slow_bf16(dtype, device, f"loading {path.name} in bfloat16")
        return tower

    def load_backbone_state(self, state: dict[str, Tensor], *, where: str = "state dict",
                            dtype: torch.dtype | None = None, device=None) -> None:
        """Load a flat backbone state dict (backbone names + `lm_head.weight`; tensors or lazy
        references), checking keys and shapes. A tower on the meta device adopts the weights,
        read into `dtype` (None: the modules' own) on `device`."""
        mapped = to_tower_names(state)
        own = self.state_dict()
        check_keys(mapped, own.keys(), where=where)
        check_shapes(mapped, own, where=where)
        materialize(self, mapped, dtype=dtype, device=device, keep="module")


class DenoiserTowerBase(nn.Module, abc.ABC):
    """The trainable tower: writes a block of S tokens from the context cache, conditioned on t.

    Subclasses hold `config`, `backbone`, `lm_head` and `time` (a `TimeConditioning`), with
    `num_modulated` sub-blocks that `time` modulates.
    """

    config: Any
    backbone: nn.Module
    lm_head: nn.Linear
    time: nn.Module
    # Layers the denoiser passes over (a shallow draft, `set_skip_layers`); a class default, so that
    # towers built on the meta device or loaded from old checkpoints run every layer.
    skip_layers: frozenset[int] = frozenset()

    def run_layers(self) -> list[tuple[int, nn.Module]]:
        """(index, block) of every layer the denoiser runs, in order. Every family's forwards loop
        over this, so a skipped layer costs nothing and layer i still reads the context's layer i."""
        return [(i, blk) for i, blk in enumerate(self.backbone.layers) if i not in self.skip_layers]

    def set_skip_layers(self, layers) -> None:
        """Run the denoiser without the given layer indices (a shallower, cheaper draft; weights kept).

        The skipped layers' weights stay (a checkpoint's names do not change) but are frozen: they get no
        gradient, and data-parallel training would otherwise stop on parameters no forward used. A
        layer skipped before and run now trains again. The time modulation of a kept layer is still
        its own. At least one layer must remain.
        """
        skip = check_skip_layers(layers, len(self.backbone.layers))
        for i in skip | self.skip_layers:
            self.backbone.layers[i].requires_grad_(i not in skip)
        self.skip_layers = skip

    @abc.abstractmethod
    def forward_block(self, x: Tensor, cache: Cache, t: Tensor | None = None, *,
                      return_hidden: bool = False) -> Tensor:
        """x (B, S) noisy block after the cache's T positions, t (B,) masked fraction or None ->
        logits (B, S, V) float32. The cache is read, never written. t=None: plain AR layers."""

    @abc.abstractmethod
    def forward_train(self, x: Tensor, states, t: Tensor | None = None, *, return_hidden: bool = False) -> Tensor:
        """x (B, L) noisy sequence, `states` from the context's `forward_train`, t (B, nB) ->
        logits (B, L, V) (or the pre-norm hidden (B, L, H)); block k equals `forward_block` of
        block k over the cache of the clean x[:, :kS]."""

    @staticmethod
    @abc.abstractmethod
    def modulated_layers(config) -> int:
        """How many sub-blocks the time conditioning modulates for `config` (the number of
        scale-shift tables a checkpoint holds; the tower's `num_modulated`)."""

    @staticmethod
    def training_blocks(x: Tensor, block_size: int, t: Tensor | None) -> tuple[int, int, int]:
        """(b, L, nB) of a training batch x (b, L), checked: L a multiple of the block size and t,
        if given, one value per block (b, nB). Every family's `forward_train` starts here."""
        b, L = x.shape
        if L % block_size:
            raise ValueError(f"sequence length {L} is not a multiple of block_size {block_size}")
        nB = L // block_size
        if t is not None and t.shape != (b, nB):
            raise ValueError(f"t must have shape (batch, blocks) = {(b, nB)}, got {tuple(t.shape)}")
        return b, L, nB

    @staticmethod
    def block_key_mask(x: Tensor, cache: Cache) -> Tensor | None:
        """The attention mask of a block x (b, S) over a settled cache of the same batch, checked:
        (b, 1, 1, T + S) bool, True where a key may be read (the cache's real positions and the whole
        block), or None when no row of the cache is padded (every key may be read, and SDPA runs
        its faster unmasked path). Every family's `forward_block` starts here."""
        b, S = x.shape
        cache.check_settled("denoise from it")
        if cache.batch_size != b:
            raise ValueError(f"block has batch {b} but the cache has {cache.batch_size}")
        if not cache.padded:
            return None
        valid = cache.valid_mask()
        return torch.cat([valid, valid.new_ones(b, S)], dim=1)[:, None, None, :]

    def match_precision(self, context: ContextTowerBase) -> None:
        """After `from_context` cast this copy to the context's first dtype: put back, with the
        context's values and precision, the parts the family keeps in float32 (NemotronH: MoE
        routers). Nothing by default."""

    @abc.abstractmethod
    def head(self, hidden: Tensor) -> Tensor:
        """Final norm + LM head in float32: (..., H) -> (..., V)."""

    def head_projection(self, h: Tensor) -> Tensor:
        """`lm_head(h)` (h normed), through the head's inference copy where `merge_adapters` made one
        (pre-packed or int8, `towers.inference_linear`) and no gradient is recorded. Every family's
        `head` applies its LM head here, so that a copy is never made for a head that ignores it."""
        copy = self.__dict__.get(HEAD_COPY)
        if copy is None or torch.is_grad_enabled():
            return self.lm_head(h)
        copy.check(h, "head copy")
        return copy(h)

    def train(self, mode: bool = True):
        if mode:  # the head copy is an inference copy, as the fused projections are
            self.__dict__.pop(HEAD_COPY, None)
        return super().train(mode)

    def _apply(self, fn, recurse=True):
        self.__dict__.pop(HEAD_COPY, None)  # moved or cast: the copy would be stale
        return super()._apply(fn, recurse)

    @classmethod
    @abc.abstractmethod
    def from_context(cls, context: ContextTowerBase, *, time_init: str = "identity",
                     time: dict | None = None, device=None) -> "DenoiserTowerBase":
        """A denoiser initialised as a copy of `context` and its head (docs/design.md, section 3),
        on `device` (None: the context's).

        time: the time conditioning as {"class_path": ..., "init_args": {...}} (default AdaLNSingle
        with init=time_init).
        """

    @classmethod
    def copy_of_context(cls, context: ContextTowerBase, *, time_init: str = "identity",
                        time: dict | None = None, device=None) -> "DenoiserTowerBase":
        """`from_context` for families whose denoiser holds the context's weights (backbone +
        lm_head, same names) plus a `time` module built by `build_time_conditioning`.

        Memory-lean: the denoiser is built on the meta device and each context tensor is copied
        once, straight onto `device` (its own storage, dtype kept, so float32 routers stay
        float32); no random initialisation, no intermediate copy. Only the time modules, new
        weights, are built for real (on CPU, with the seeded init, then moved), in the dtype of the
        context's first parameter.
        """
        p = next(context.parameters())
        device = p.device if device is None else torch.device(device)
        with torch.device("meta"):
            den = cls(context.config, time_init=time_init, time=time)
        real_time = build_time_conditioning(time, context.config.hidden_size, den.num_modulated, time_init=time_init)
        state = {"time." + k: v.to(device=device, dtype=p.dtype if v.is_floating_point() else v.dtype)
                 for k, v in real_time.state_dict().items()}
        with torch.no_grad():
            state.update({k: v.detach().to(device, copy=True) for k, v in context.state_dict().items()})
        check_keys(state, den.state_dict().keys(), where=f"{cls.__name__}.copy_of_context")
        den.load_state_dict(state, strict=True, assign=True)
        return den


def register_family(family: TowerFamily) -> TowerFamily:
    """Add a family to the registry (its module calls this on import)."""
    for cls, base in ((family.context, ContextTowerBase), (family.denoiser, DenoiserTowerBase)):
        if not (isinstance(cls, type) and issubclass(cls, base)):
            raise TypeError(f"family {family.model_type!r}: {cls!r} must subclass {base.__name__}")
    registry.add(family)
    return family
