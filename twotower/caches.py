"""HybridCache: the context tower's per-layer cache (attention K,V + Mamba-2 conv / SSM states).

Attention K,V live in preallocated buffers (b, kv_heads, capacity, d) that grow geometrically, so
appending a token or a block writes in place instead of re-concatenating the whole history. A
`key_mask` (b, capacity) marks which cached positions are real tokens (left padding is False).
Mamba layers keep the conv state (b, conv_dim, k-1) in the model dtype and the SSM state
(b, heads, head_dim, state) always in float32.

The cache is written only by the context tower (`prefill` / `extend`); the denoiser reads it.
For two devices, `mirror_to` keeps a copy on another device up to date by sending only what was
appended since the last call plus the (small) Mamba states.

A *provisional* extend (`ContextTower.extend(..., provisional=True)`, speculative decoding) appends
a block's K,V but leaves the Mamba states where they were and records in `pending` what is needed to
move them to any accepted prefix; `ContextTower.accept` settles it. Until then the cache refuses to
be read, copied or extended. Positions a row rejected stay behind as holes (False in `key_mask`):
NemotronH attention has no positional encoding, so a hole is exactly a masked-out key, and
`compact` can squeeze holes out by moving each row's real positions to the front.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass

import torch
from torch import Tensor


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

    Per Mamba layer index: `xbc` the raw conv inputs (b, n, conv_dim), `scan` the scan inputs
    (x, dt, B) (see `MambaOut.scan_inputs`).
    """

    start: int
    n: int
    xbc: dict[int, Tensor]
    scan: dict[int, tuple[Tensor, Tensor, Tensor]]


@dataclass
class HybridCache(Cache):
    """Per-layer cache; lists are indexed by layer, None where a layer has no such state."""

    keys: list[Tensor | None]
    values: list[Tensor | None]
    conv: list[Tensor | None]
    ssm: list[Tensor | None]
    key_mask: Tensor  # (b, capacity) bool
    length: int = 0
    # Whether any cached position is padding (False in key_mask). A summary kept so that hot paths
    # can skip building masks without reading key_mask back from the device on every step.
    padded: bool = False
    pending: PendingBlock | None = None
    # A host-side upper bound on how far `compact` could shrink the length (holes in the row with the
    # most real positions), so that `compact` can decline without reading the mask from the device.
    hole_bound: int = 0

    def check_settled(self, action: str) -> None:
        """Raise if a provisional block waits for `ContextTower.accept` (its Mamba states are stale)."""
        if self.pending is not None:
            raise RuntimeError(f"cannot {action}: the cache holds a provisional block of {self.pending.n} positions; "
                               "call ContextTower.accept(cache, keep) first")

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    def empty(cls, backbone, batch: int, *, capacity: int = 64, device=None, dtype=None) -> "HybridCache":
        """An empty cache shaped for `backbone` (a HybridBackbone)."""
        n = len(backbone.layers)
        keys, values, conv, ssm = [None] * n, [None] * n, [None] * n, [None] * n
        for i, blk in enumerate(backbone.layers):
            m = blk.mixer
            if blk.block_type == "full_attention":
                shape = (batch, m.num_kv_heads, capacity, m.head_dim)
                keys[i] = torch.zeros(shape, device=device, dtype=dtype)
                values[i] = torch.zeros(shape, device=device, dtype=dtype)
            elif blk.block_type == "linear_attention":
                conv[i], ssm[i] = m.empty_states(batch, device=device, dtype=dtype)
        mask = torch.zeros(batch, capacity, dtype=torch.bool, device=device)
        return cls(keys, values, conv, ssm, mask, 0)

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

        Exact for NemotronH, whose attention has no positional encoding: a row's attention output
        depends on which keys it sees, not on where they sit, and the Mamba states are untouched.
        Exact too for a RoPE family that caches keys already rotated and takes the next positions
        from `real_counts` (Llama): moving a key does not change its rotation, and the count of
        real keys does not change. (A family that derives positions from slots must not call this.) Holes come from left padding and
        from speculative decoding, where rows keep different prefixes of a shared block. Anything
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
    def _map(self, fn) -> "HybridCache":
        self.check_settled("copy it")
        keys = [None if t is None else fn(t) for t in self.keys]
        values = [None if t is None else fn(t) for t in self.values]
        conv = [None if t is None else fn(t) for t in self.conv]
        ssm = [None if t is None else fn(t) for t in self.ssm]
        return type(self)(keys, values, conv, ssm, fn(self.key_mask), self.length, self.padded,
                          hole_bound=self.hole_bound)

    def clone(self) -> "HybridCache":
        return self._map(lambda t: t.clone())

    def to(self, device=None, dtype=None) -> "HybridCache":
        """Move (and optionally cast K,V and conv states; SSM states stay float32, the mask bool)."""
        self.check_settled("move it")
        cast = lambda t: None if t is None else t.to(device=device, dtype=dtype or t.dtype)  # noqa: E731
        return type(self)([cast(t) for t in self.keys], [cast(t) for t in self.values],
                           [cast(t) for t in self.conv],
                           [None if t is None else t.to(device=device, dtype=torch.float32) for t in self.ssm],
                           self.key_mask.to(device=device), self.length, self.padded, hole_bound=self.hole_bound)

    def select(self, rows: Tensor) -> "HybridCache":
        """Keep batch rows `rows` (LongTensor or bool mask), e.g. to drop finished sequences."""
        rows = rows.to(self.device)
        out = self._map(lambda t: t.index_select(0, rows) if rows.dtype != torch.bool else t[rows])
        if out.padded:  # the row with the most real positions may be gone: every hole may now count
            out.hole_bound = out.length
        return out

    @classmethod
    def concat(cls, caches: "list[HybridCache]") -> "HybridCache":
        """Stack caches of other batches into one batch (b = sum of their batch sizes), in order.

        Lengths may differ: each cache's positions are right-aligned to the longest length L and the
        positions in front are left padding (False in `key_mask`). NemotronH attention has no
        positional encoding, so a masked-out position is exactly an absent key: each row computes
        what it computed in its own cache (continuous batching joins freshly prefilled requests
        to a running batch this way). Mamba states are per row and simply stacked. The capacity
        keeps every cache's spare room. Every cache must be settled and share devices and dtypes.
        """
        caches = list(caches)
        if not caches:
            raise ValueError("concat needs at least one cache")
        for c in caches:
            c.check_settled("concatenate it")
        first = caches[0]
        for c in caches[1:]:
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
        conv = [None if t is None else torch.cat([c.conv[i] for c in caches]) for i, t in enumerate(first.conv)]
        ssm = [None if t is None else torch.cat([c.ssm[i] for c in caches]) for i, t in enumerate(first.ssm)]
        mask = torch.zeros(b, capacity, dtype=torch.bool, device=first.device)
        r = 0
        for c in caches:
            mask[r: r + c.batch_size, L - c.length: L] = c.key_mask[:, : c.length]
            r += c.batch_size
        padded = any(c.padded or c.length < L for c in caches)
        # compact can shrink by at most L minus the fullest row's real count, and each cache's fullest
        # row holds at least c.length - c.hole_bound real positions.
        bound = min(L - c.length + c.hole_bound for c in caches) if padded else 0
        return cls(keys, values, conv, ssm, mask, L, padded, hole_bound=bound)

    cat = concat

    def mirror_to(self, device, mirror: "HybridCache | None" = None) -> "HybridCache":
        """Bring a copy of this cache on `device` up to date, sending only what changed.

        The first call copies everything. Later calls (same `mirror`) append the K,V positions
        written since the previous call (one block's worth) and replace the Mamba states, which are
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
        for i, c in enumerate(self.conv):
            if c is not None:
                mirror.conv[i].copy_(c, non_blocking=True)
                mirror.ssm[i].copy_(self.ssm[i], non_blocking=True)
        mirror.length = self.length
        mirror.padded = self.padded
        mirror.hole_bound = self.hole_bound
        return mirror

    @classmethod
    def empty_like(cls, cache: "HybridCache", device) -> "HybridCache":
        """Zero cache of the same shapes (capacity = cache.capacity) on `device`."""
        z = lambda t: None if t is None else torch.zeros_like(t, device=device)  # noqa: E731
        return cls([z(t) for t in cache.keys], [z(t) for t in cache.values],
                           [z(t) for t in cache.conv], [z(t) for t in cache.ssm],
                           torch.zeros_like(cache.key_mask, device=device), 0)

    def nbytes(self) -> int:
        tensors = [t for store in (self.keys, self.values, self.conv, self.ssm) for t in store if t is not None]
        return sum(t.numel() * t.element_size() for t in tensors) + self.key_mask.numel()


class KVCache(HybridCache):
    """A cache of attention K,V only (every layer attends; no recurrent state), e.g. Llama's.

    Keys are stored after RoPE rotation at their logical positions; the next logical position of a
    row is `real_counts()`, so holes (left padding, rejected drafts) are plain masked-out keys and
    `compact` stays exact.
    """

    @classmethod
    def allocate(cls, num_layers: int, kv_heads: int, head_dim: int, batch: int, *, capacity: int = 64,
                 device=None, dtype=None) -> "KVCache":
        """An empty cache: per layer K and V buffers (batch, kv_heads, capacity, head_dim)."""
        shape = (batch, kv_heads, capacity, head_dim)
        keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(num_layers)]
        values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(num_layers)]
        mask = torch.zeros(batch, capacity, dtype=torch.bool, device=device)
        return cls(keys, values, [None] * num_layers, [None] * num_layers, mask, 0)
