"""The cache contract every tower family's context cache honours, and the K,V buffers they share.

`Cache` is what the decoders and the two-device mirror rely on. `KVBuffers` is the family-neutral
half of a concrete cache: per-layer attention K,V in preallocated buffers (b, kv_heads, capacity, d)
that grow geometrically, so appending a token or a block writes in place instead of re-concatenating
the whole history, and a `key_mask` (b, capacity) marking which cached positions are real tokens
(left padding and speculative holes are False). A family adds its per-row recurrent states by
naming them in `STATES` (NemotronH: Mamba conv / SSM states).

This module is the bottom layer: it imports nothing of the package, so the families' caches
(`HybridCache` in `twotower.towers.nemotron_h.cache`: Mamba states + K,V; `KVCache` in
`twotower.towers.llama.cache`: K,V only) build on it, and `twotower.caches`, the public module,
re-exports both the contract and the concrete caches from above them.

A *provisional* extend (speculative decoding) appends a block's K,V on trial and records a
`PendingBlock`; the context tower's `accept` settles it. Until then the cache refuses to be read,
copied or extended. Positions a row rejected stay behind as holes (False in `key_mask`), which
`compact` can squeeze out (exact for every family that honours the `compact` contract).
"""

from __future__ import annotations

import abc
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["Cache", "KVBuffers", "PendingBlock"]


class Cache(abc.ABC):
    """What decoders and the two-device mirror need from any family's context cache.

    A cache holds, per layer, what the context tower left behind for B rows after `length`
    positions (left padding and speculative holes included: `valid_mask` says which are real).
    It is written only by its context tower; the denoiser reads it.
    """

    length: int  # cached positions, holes included

    @property
    @abc.abstractmethod
    def batch_size(self) -> int:
        """B, the number of rows."""

    @property
    @abc.abstractmethod
    def device(self) -> torch.device:
        """Where the cache lives."""

    @abc.abstractmethod
    def valid_mask(self) -> Tensor:
        """(B, length) bool: which cached positions are real tokens."""

    @abc.abstractmethod
    def check_settled(self, action: str) -> None:
        """Raise RuntimeError naming `action` while a provisional block awaits `accept`."""

    @abc.abstractmethod
    def select(self, rows: Tensor) -> "Cache":
        """A cache of rows `rows` only (LongTensor of indices or (B,) bool mask)."""

    @abc.abstractmethod
    def clone(self) -> "Cache":
        """An independent copy."""

    @abc.abstractmethod
    def mirror_to(self, device, mirror: "Cache | None" = None) -> "Cache":
        """Bring a copy on `device` up to date, sending only what changed since `mirror` was made."""

    @abc.abstractmethod
    def compact(self, *, min_gain: int = 1) -> int:
        """Squeeze holes out; return how many positions the length shrank by (0: nothing moved).
        Outputs of every later tower call must not change."""

    @abc.abstractmethod
    def nbytes(self) -> int:
        """Bytes held by the cache's tensors."""


@dataclass
class PendingBlock:
    """A provisionally appended block: it starts at cache position `start` and holds `n` positions.
    A family with recurrent states subclasses it to record what its `accept` needs."""

    start: int
    n: int


class KVBuffers(Cache):
    """The family-neutral part of a cache: growable per-layer K,V buffers, the key mask and the
    provisional-block bookkeeping (see the module docstring).

    Subclasses are dataclasses with the fields `keys`, `values` (lists indexed by layer, None where
    a layer does not attend), `key_mask` (b, capacity) bool, `length`, `padded`, `pending`,
    `hole_bound`, plus one list per name in `STATES` (per-row recurrent states, fixed-size: copied
    whole by `mirror_to`, stacked by `concat`).
    """

    STATES: tuple[str, ...] = ()
    keys: list
    values: list
    key_mask: Tensor
    # Whether any cached position is padding (False in key_mask). A summary kept so that hot paths
    # can skip building masks without reading key_mask back from the device on every step.
    padded: bool
    pending: PendingBlock | None
    # A host-side upper bound on how far `compact` could shrink the length (holes in the row with the
    # most real positions), so that `compact` can decline without reading the mask from the device.
    hole_bound: int

    def _states(self) -> dict[str, list]:
        """name -> per-layer list, for each recurrent state the family keeps."""
        return {name: getattr(self, name) for name in self.STATES}

    @classmethod
    def _build(cls, keys, values, states: dict, key_mask, length: int, padded: bool = False, hole_bound: int = 0):
        return cls(keys=keys, values=values, key_mask=key_mask, length=length, padded=padded,
                   hole_bound=hole_bound, **states)

    def _cast_state(self, name: str, t: Tensor, device, dtype) -> Tensor:
        """How `to` moves a recurrent state (default: like K,V)."""
        return t.to(device=device, dtype=dtype or t.dtype)

    def check_settled(self, action: str) -> None:
        """Raise if a provisional block waits for the context tower's `accept` (recurrent states,
        if any, are stale until then)."""
        if self.pending is not None:
            raise RuntimeError(f"cannot {action}: the cache holds a provisional block of {self.pending.n} positions; "
                               "call ContextTower.accept(cache, keep) first")

    # ---- shape facts --------------------------------------------------------------------------
    @property
    def batch_size(self) -> int:
        return self.key_mask.shape[0]

    @property
    def capacity(self) -> int:
        return self.key_mask.shape[1]

    @property
    def device(self) -> torch.device:
        return self.key_mask.device

    def valid_mask(self) -> Tensor:
        """(b, length) bool: which cached positions are real tokens."""
        return self.key_mask[:, : self.length]

    def kv(self, layer: int, upto: int | None = None) -> tuple[Tensor, Tensor]:
        """Views (b, kv, upto, d) of layer's keys and values (default: the committed length)."""
        upto = self.length if upto is None else upto
        return self.keys[layer][:, :, :upto], self.values[layer][:, :, :upto]

    # ---- writing (context tower only) ---------------------------------------------------------
    def reserve(self, extra: int) -> None:
        """Make room for `extra` more positions, doubling capacity when it runs out."""
        need = self.length + extra
        if need <= self.capacity:
            return
        new_cap = max(need, 2 * self.capacity)
        for store in (self.keys, self.values):
            for i, t in enumerate(store):
                if t is not None:
                    grown = t.new_zeros(t.shape[0], t.shape[1], new_cap, t.shape[3])
                    grown[:, :, : self.length] = t[:, :, : self.length]
                    store[i] = grown
        mask = self.key_mask.new_zeros(self.batch_size, new_cap)
        mask[:, : self.length] = self.key_mask[:, : self.length]
        self.key_mask = mask

    def write_mask(self, new_valid: Tensor, *, padded: bool) -> None:
        """Record the validity (b, n) of the n positions about to be appended (call after reserve);
        `padded` says whether any of them is False (the caller knows without a device read)."""
        n = new_valid.shape[1]
        self.key_mask[:, self.length : self.length + n] = new_valid.to(self.key_mask.device)
        self.padded = self.padded or padded
        if padded:
            self.hole_bound += n

    def write_kv(self, layer: int, k: Tensor, v: Tensor) -> None:
        """Write (b, kv, n, d) at positions [length, length + n) of layer (call after reserve)."""
        n = k.shape[2]
        self.keys[layer][:, :, self.length : self.length + n] = k
        self.values[layer][:, :, self.length : self.length + n] = v

    def advance(self, n: int) -> None:
        self.length += n

    def check_keep(self, keep: Tensor) -> tuple[Tensor, int, int]:
        """Check `keep` (b,) against the pending block: (keep as long on the cache's device,
        min(keep), max(keep)), or a ValueError naming the bad value. One host read (the bounds)."""
        pending = self.pending
        if pending is None:
            raise RuntimeError("accept: the cache holds no provisional block (extend(..., provisional=True) first)")
        b, n = self.batch_size, pending.n
        if not isinstance(keep, Tensor) or keep.shape != (b,) or keep.dtype not in (torch.int64, torch.int32):
            shape = tuple(keep.shape) if isinstance(keep, Tensor) else type(keep).__name__
            raise ValueError(f"keep must be a ({b},) integer tensor, got {shape}")
        keep = keep.to(device=self.device, dtype=torch.long)
        lo, hi = (int(v) for v in torch.aminmax(keep))
        if lo < 0 or hi > n:
            raise ValueError(f"keep must lie in [0, {n}] (the provisional block's length), got [{lo}, {hi}]")
        return keep, lo, hi

    def settle(self, keep: Tensor, bounds: tuple[int, int] | None = None) -> tuple[int, int]:
        """The family-independent half of `accept`: check `keep` (b,) against the pending block,
        turn each row's rejected positions into holes and set the length to start + max(keep).

        Returns (min(keep), max(keep)) (one host read: the new length depends on it; none when the
        caller passes the `bounds` `check_keep` returned for this `keep`). The caller moves any
        recurrent state first, using `pending`, which this clears.
        """
        if bounds is None:
            keep, lo, hi = self.check_keep(keep)
        else:
            lo, hi = bounds
        pending = self.pending
        if lo < hi:  # rows that kept fewer than `hi` leave holes
            kept = torch.arange(hi, device=self.device)[None, :] < keep[:, None]
            self.key_mask[:, pending.start: pending.start + hi] &= kept
            self.padded = True
            self.hole_bound += hi - lo  # the fullest row lost at most hi - lo positions
        self.length = pending.start + hi
        self.pending = None
        return lo, hi

    def real_counts(self, upto: int | None = None) -> Tensor:
        """(b,) long: real (non-hole) positions among the first `upto` (default: length), on the device.

        A positional family's next logical position per row: holes from padding or rejected
        drafts do not count, so positions stay those of an unpadded single-row run.
        """
        upto = self.length if upto is None else upto
        return self.key_mask[:, :upto].sum(1)

    def compact(self, *, min_gain: int = 1) -> int:
        """Squeeze the holes out of the K,V buffers: each row's real positions move, in order, to the
        front, and the length becomes the longest row's count of real positions. Returns how many
        positions the length shrank by (0, and nothing moves, if that would be fewer than `min_gain`).

        Exact for a family whose attention has no positional encoding (NemotronH): a row's attention
        output depends on which keys it sees, not on where they sit, and recurrent states are
        untouched. Exact too for a RoPE family that caches keys already rotated and takes the next
        positions from `real_counts` (Llama-like): moving a key does not change its rotation, and the
        count of real keys does not change. (A family that derives positions from slots must not
        call this.) Holes come from left padding and from speculative decoding, where rows keep different prefixes of a shared block. Anything
        that mirrors this cache elsewhere must copy it afresh afterwards. One host read, skipped
        while `hole_bound` already rules out `min_gain`.
        """
        self.check_settled("compact it")
        L, need = self.length, max(1, min_gain)
        if self.hole_bound < need:
            return 0
        valid = self.key_mask[:, :L]
        counts = valid.sum(1)
        lengths = counts.cpu()
        new_len = int(lengths.max()) if lengths.numel() else 0
        self.hole_bound = L - new_len  # exact now
        if L - new_len < need:
            return 0
        # Real positions first, in their order (a stable sort of the hole flags), then cut at new_len.
        order = torch.sort((~valid).to(torch.uint8), dim=1, stable=True).indices[:, :new_len]
        for store in (self.keys, self.values):
            for t in store:
                if t is not None:
                    idx = order[:, None, :, None].expand(t.shape[0], t.shape[1], new_len, t.shape[3])
                    t[:, :, :new_len] = t[:, :, :L].gather(2, idx)
        self.key_mask[:, :new_len] = torch.arange(new_len, device=self.device)[None, :] < counts[:, None]
        self.key_mask[:, new_len:L] = False
        self.length = new_len
        self.padded = bool((lengths < new_len).any())
        self.hole_bound = 0
        return L - new_len

    # ---- copies -------------------------------------------------------------------------------
    def _map(self, fn) -> "KVBuffers":
        self.check_settled("copy it")
        each = lambda store: [None if t is None else fn(t) for t in store]  # noqa: E731
        return self._build(each(self.keys), each(self.values), {k: each(v) for k, v in self._states().items()},
                           fn(self.key_mask), self.length, self.padded, hole_bound=self.hole_bound)

    def clone(self) -> "KVBuffers":
        return self._map(lambda t: t.clone())

    def to(self, device=None, dtype=None) -> "KVBuffers":
        """Move (and optionally cast K,V and the states the family allows; the mask stays bool)."""
        self.check_settled("move it")
        cast = lambda t: None if t is None else t.to(device=device, dtype=dtype or t.dtype)  # noqa: E731
        states = {name: [None if t is None else self._cast_state(name, t, device, dtype) for t in store]
                  for name, store in self._states().items()}
        return self._build([cast(t) for t in self.keys], [cast(t) for t in self.values], states,
                           self.key_mask.to(device=device), self.length, self.padded, hole_bound=self.hole_bound)

    def select(self, rows: Tensor) -> "KVBuffers":
        """Keep batch rows `rows` (LongTensor or bool mask), e.g. to drop finished sequences."""
        rows = rows.to(self.device)
        out = self._map(lambda t: t.index_select(0, rows) if rows.dtype != torch.bool else t[rows])
        if out.padded:  # the row with the most real positions may be gone: every hole may now count
            out.hole_bound = out.length
        return out

    @classmethod
    def concat(cls, caches: "list[KVBuffers]") -> "KVBuffers":
        """Stack caches of other batches into one batch (b = sum of their batch sizes), in order.

        Lengths may differ: each cache's positions are right-aligned to the longest length L and the
        positions in front are left padding (False in `key_mask`). For every family honouring the
        `compact` contract a masked-out position is exactly an absent key: each row computes
        what it computed in its own cache (continuous batching joins freshly prefilled requests
        to a running batch this way). Recurrent states are per row and simply stacked. The capacity
        keeps every cache's spare room. Every cache must be settled and share devices and dtypes.
        """
        caches = list(caches)
        if not caches:
            raise ValueError("concat needs at least one cache")
        for c in caches:
            c.check_settled("concatenate it")
        first = caches[0]
        for c in caches[1:]:
            if type(c) is not type(first):
                raise ValueError(f"concat: caches of different kinds ({type(first).__name__}, {type(c).__name__}); "
                                 "join caches of one tower family only")
            if c.device != first.device or len(c.keys) != len(first.keys):
                raise ValueError(f"concat: caches differ in device or layers ({c.device}, {len(c.keys)} layers vs "
                                 f"{first.device}, {len(first.keys)}); build them with the same tower and device")
        L = max(c.length for c in caches)
        capacity = max(L - c.length + c.capacity for c in caches)
        b = sum(c.batch_size for c in caches)

        def stack_kv(store: str, i: int) -> Tensor | None:
            parts = [getattr(c, store)[i] for c in caches]
            if parts[0] is None:
                return None
            t0 = parts[0]
            big = t0.new_zeros(b, t0.shape[1], capacity, t0.shape[3])
            r = 0
            for c, t in zip(caches, parts):
                big[r: r + t.shape[0], :, L - c.length: L] = t[:, :, : c.length]
                r += t.shape[0]
            return big

        keys = [stack_kv("keys", i) for i in range(len(first.keys))]
        values = [stack_kv("values", i) for i in range(len(first.values))]
        states = {name: [None if t is None else torch.cat([getattr(c, name)[i] for c in caches]) for i, t in enumerate(store)]
                  for name, store in first._states().items()}
        mask = torch.zeros(b, capacity, dtype=torch.bool, device=first.device)
        r = 0
        for c in caches:
            mask[r: r + c.batch_size, L - c.length: L] = c.key_mask[:, : c.length]
            r += c.batch_size
        padded = any(c.padded or c.length < L for c in caches)
        # compact can shrink by at most L minus the fullest row's real count, and each cache's fullest
        # row holds at least c.length - c.hole_bound real positions.
        bound = min(L - c.length + c.hole_bound for c in caches) if padded else 0
        # The first cache's class, whichever class this was called on: a family's cache joins as itself.
        return type(first)._build(keys, values, states, mask, L, padded, hole_bound=bound)

    cat = concat

    def mirror_to(self, device, mirror: "KVBuffers | None" = None) -> "KVBuffers":
        """Bring a copy of this cache on `device` up to date, sending only what changed.

        The first call copies everything. Later calls (same `mirror`) append the K,V positions
        written since the previous call (one block's worth) and replace the recurrent states, which are
        small and fixed-size. Nothing already sent is sent again.
        """
        self.check_settled("mirror it")
        device = torch.device(device)
        if mirror is None:
            mirror = type(self).empty_like(self, device)
        sent = mirror.length
        if sent > self.length:
            raise ValueError(f"mirror holds {sent} positions but the source only {self.length}; was the source reset?")
        new = self.length - sent
        mirror.reserve(new)
        for i, k in enumerate(self.keys):
            if k is not None:
                mirror.keys[i][:, :, sent : self.length].copy_(k[:, :, sent : self.length], non_blocking=True)
                mirror.values[i][:, :, sent : self.length].copy_(self.values[i][:, :, sent : self.length], non_blocking=True)
        mirror.key_mask[:, sent : self.length].copy_(self.key_mask[:, sent : self.length])
        for name, store in self._states().items():
            for i, s in enumerate(store):
                if s is not None:
                    getattr(mirror, name)[i].copy_(s, non_blocking=True)
        mirror.length = self.length
        mirror.padded = self.padded
        mirror.hole_bound = self.hole_bound
        return mirror

    @classmethod
    def empty_like(cls, cache: "KVBuffers", device) -> "KVBuffers":
        """Zero cache of the same shapes (capacity = cache.capacity) on `device`."""
        z = lambda t: None if t is None else torch.zeros_like(t, device=device)  # noqa: E731
        return cls._build([z(t) for t in cache.keys], [z(t) for t in cache.values],
                          {name: [z(t) for t in store] for name, store in cache._states().items()},
                          torch.zeros_like(cache.key_mask, device=device), 0)

    def nbytes(self) -> int:
        stores = (self.keys, self.values, *self._states().values())
        tensors = [t for store in stores for t in store if t is not None]
        return sum(t.numel() * t.element_size() for t in tensors) + self.key_mask.numel()

