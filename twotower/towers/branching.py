"""Two-branch verification: one context forward over a drafted block and a second branch of it.

A speculative iteration verifies a drafted block d_0 .. d_{n-1}. A second candidate branches at
position j (per row, 1 <= j <= n-1): e_j .. e_{n-1}, sharing d_0 .. d_{j-1}. One forward covers both:
the cache takes n + m provisional slots (m = n - min(j), the longest branch),

    slots offset .. offset+n-1        the main block, causal as in a plain extend;
    slots offset+n .. offset+n+m-1    branch position j+k in slot offset+n+k (k < n - j, or fewer
                                      when branches are cut short; the rest of a row's m slots is
                                      padding, masked out),

and a tree mask: a branch query sees the cache, the main block before j and the branch up to itself;
a main query never sees a branch slot. More candidates (K branches, each forking at its own per-row
position) follow one another in the branch slots, each with its own width, and a branch query sees
only its own branch. Recurrent layers cannot read a mask; a family scans them along each slot's
path instead (`tree_ancestors`, `tree_parents`; `towers/nemotron_h/branch.py`). Afterwards
`take_branch` moves the winning branch's slots of a row over the main block's positions j.., and
the family's ordinary `accept` settles the n-slot block: rows are then exactly as if only their
kept tokens had been appended.

This module holds what does not depend on the family: the layout, the mask and the K,V move.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..cache_base import KVBuffers

__all__ = ["TreeLayout", "tree_layout", "tree_ancestors", "tree_parents", "tree_mask", "take_branch"]


@dataclass
class TreeLayout:
    """Where the branches of a tree verify sit. n: the main block's length; widths: each branch's
    slots (branch b holds slots n + sum(widths[:b]) .. of the block, every row the same);
    forks (R, K) long: each row's fork position of every branch; branch_valid (R, m) bool: branch
    b's k-th slot holds position forks[:, b] + k; block_pos (R, n + m) long: the block position
    (0 .. n-1) of every slot (padding: clamped)."""

    n: int
    widths: tuple[int, ...]
    forks: Tensor
    branch_valid: Tensor
    block_pos: Tensor

    @property
    def m(self) -> int:
        """Branch slots of all branches together."""
        return sum(self.widths)

    @property
    def j(self) -> Tensor:
        """(R,) long: the fork positions of a one-branch tree."""
        if len(self.widths) != 1:
            raise ValueError(f"a tree of {len(self.widths)} branches has no single fork position; read forks")
        return self.forks[:, 0]

    def starts(self) -> list[int]:
        """Each branch's first slot, relative to the block (n for the first)."""
        out = [self.n]
        for w in self.widths[:-1]:
            out.append(out[-1] + w)
        return out

    def slot_forks(self) -> Tensor:
        """(R, m) long: the fork position of the branch each branch slot belongs to."""
        return torch.cat([self.forks[:, b:b + 1].expand(-1, w) for b, w in enumerate(self.widths)], dim=1)


def _limits(j: Tensor, n: int, length: int | Tensor | None) -> Tensor:
    """(R,) long: how many positions from fork j each row's branch covers (checked, see `tree_layout`)."""
    if isinstance(length, Tensor):
        bad = (length.dtype != torch.long or length.shape != j.shape
               or bool(((length < 0) | (length > n - j)).any()))
        if bad:
            raise ValueError(f"per-row branch lengths must be a (R,) long tensor with 0 <= length <= n - j "
                             f"(0: the row has no such branch), got {length.dtype} {tuple(length.shape)}")
        return length
    if length is not None and not (isinstance(length, int) and length >= 1):
        raise ValueError(f"a branch length must be an int >= 1 (None: to the block's end), got {length!r}")
    return n - j if length is None else (n - j).clamp(max=length)


def tree_layout(j: Tensor, n: int, length: int | Tensor | list | None = None) -> TreeLayout:
    """The layout for fork positions j of an n-position block: (R,) long for one branch per row, or
    (R, K) for K branches (each in [1, n - 1]). Each branch covers positions j .. n-1, or only its first
    `length` of them: an int >= 1 for every row, a (R,) long tensor of per-row lengths, each in
    [0, n - j] (0: the row has no such branch), None (all), or, for K branches, a list of K of those.
    Host reads: one for a one-branch tree (two with per-row lengths), else one more per branch (its
    width, the longest row's branch)."""
    if j.dtype != torch.long or j.dim() not in (1, 2):
        raise ValueError(f"j must be a (R,) or (R, K) long tensor of branch positions, got {j.dtype} "
                         f"{tuple(j.shape)}")
    forks = j[:, None] if j.dim() == 1 else j
    # One host read for the range check, which also gives a one-branch tree its width (see below).
    lo, hi = (int(v) for v in torch.aminmax(forks))
    if lo < 1 or hi > n - 1:
        raise ValueError(f"branch positions must lie in [1, {n - 1}] (position 0 is the context tower's own "
                         f"token, and a branch needs a position), got [{lo}, {hi}]")
    K = forks.shape[1]
    lengths = length if isinstance(length, list) else [length] * K
    if len(lengths) != K:
        raise ValueError(f"{K} branches need {K} lengths, got {len(lengths)}")
    widths, valid, pos = [], [], [torch.arange(n, device=j.device).expand(forks.shape[0], n)]
    for b in range(K):
        fb, lb = forks[:, b], lengths[b]
        limit = _limits(fb, n, lb)
        if K == 1 and not isinstance(lb, Tensor):  # the earliest fork's branch is the longest: no second host read
            w = n - lo if lb is None else min(n - lo, lb)
        else:  # a branch no row has still takes one (padding) slot: every tensor keeps its shape
            w = max(int(limit.max()), 1)
        k = torch.arange(w, device=j.device)
        widths.append(w)
        # Rows share one width per branch; a row whose branch is shorter (later fork, or cut) pads its tail.
        valid.append(k[None, :] < limit[:, None])
        # Padding slots clamp to n - 1 so that indexing by block_pos (e.g. gathering the branch's tokens from
        # the draft) stays in range; the mask hides those slots and their outputs are never read.
        pos.append((fb[:, None] + k[None, :]).clamp(max=n - 1))
    return TreeLayout(n, tuple(widths), forks, torch.cat(valid, dim=1), torch.cat(pos, dim=1))


def tree_ancestors(layout: TreeLayout) -> Tensor:
    """(R, n + m, n + m) bool: [r, t, s] = slot s lies on slot t's path through the tree (t included).
    Main slot a's path is main slots 0 .. a; the path of branch b's k-th slot (forking at j) is main
    slots 0 .. j - 1 and the branch's slots 0 .. k. A padding slot's path runs on through its branch's
    earlier slots (no real slot has it on its path; what it computes is never read)."""
    n, L = layout.n, layout.n + layout.m
    R, dev = layout.forks.shape[0], layout.forks.device
    a = torch.arange(L, device=dev)
    # Slot a's side: 0 for the main block, b + 1 for branch b.
    side = torch.cat([a.new_zeros(n)] + [a.new_full((w,), b + 1) for b, w in enumerate(layout.widths)])
    causal = a[None, :] <= a[:, None]  # (L, L), slot order: main then the branches
    # Within one side, causal; a branch slot's path also holds the main block before its fork.
    anc = (causal & (side[:, None] == side[None, :]))[None].expand(R, L, L).clone()  # clone: written per row
    # Main slots j.. hold d_j.., which the branch replaces; the main -> branch block stays False: a main slot's
    # path is exactly a plain extend's.
    anc[:, n:, :n] = a[None, None, :n] < layout.slot_forks()[:, :, None]
    return anc


def tree_parents(layout: TreeLayout) -> Tensor:
    """(R, n + m) long: the slot just before each slot on its path (-1: the cache's last position, for
    main slot 0). A branch's first slot follows the main slot before its fork."""
    L = layout.n + layout.m
    parents = (torch.arange(L, device=layout.forks.device) - 1).expand(layout.forks.shape[0], L).clone()
    for b, start in enumerate(layout.starts()):
        parents[:, start] = layout.forks[:, b] - 1
    return parents


def tree_mask(layout: TreeLayout, prefix_valid: Tensor, ancestors: Tensor | None = None) -> Tensor:
    """(R, 1, n + m, offset + n + m) bool attention mask of a tree verify (True = may attend).

    prefix_valid (R, offset): the cache's real positions before the block (holes and padding False).
    Every query sees the real prefix and the slots of its own path that hold a position
    (`tree_ancestors`): main slot a sees main slots <= a; a slot of branch b (forking at j) sees main
    slots before j and branch b's slots up to itself. A slot always sees itself, so a padding slot's
    attention stays finite (its output is never read). ancestors: `tree_ancestors(layout)`, when the
    caller has it already.
    """
    n, L = layout.n, layout.n + layout.m
    R, dev = layout.forks.shape[0], layout.forks.device
    key_valid = torch.cat([torch.ones(R, n, dtype=torch.bool, device=dev), layout.branch_valid], dim=1)
    allowed = (tree_ancestors(layout) if ancestors is None else ancestors) & key_valid[:, None, :]
    allowed |= torch.eye(L, dtype=torch.bool, device=dev)[None]
    prefix = prefix_valid[:, None, :].expand(R, L, prefix_valid.shape[1])
    return torch.cat([prefix, allowed], dim=2)[:, None]


def source_slots(layout: TreeLayout, take: Tensor) -> Tensor:
    """(R, n) long: for each block position p, the slot (0 .. n+m-1, relative to the block) that holds
    the row's winner there. take (R,): bool (a one-branch tree: the branch wins) or long (0: the main
    block, b + 1: branch b). Where branch b wins, positions p >= its fork j come from its slot
    start_b + p - j, the rest from main slot p. Past a short branch's end (never kept) its last slot
    stands in."""
    take = take.long()
    p = torch.arange(layout.n, device=take.device)[None, :]
    b = (take - 1).clamp(min=0)[:, None]  # the winning branch (0 where main wins: masked by from_branch)
    j = layout.forks.gather(1, b)
    starts = torch.tensor(layout.starts(), device=take.device)
    ends = starts + torch.tensor(layout.widths, device=take.device) - 1
    # Positions before j are shared with the main block, so they stay in their main slots when a branch wins.
    from_branch = (take[:, None] > 0) & (p >= j)
    # The clamp only keeps the index inside the branch: keep <= j + its valid length, so no clamped position is kept.
    slot = torch.minimum(starts[b] + p - j, ends[b])
    return torch.where(from_branch, slot, p)


def take_branch(cache: KVBuffers, layout: TreeLayout, take: Tensor, start: int) -> Tensor:
    """Copy each row's winning branch (take (R,), as `source_slots`) over the main block's K,V from its fork,
    in every attending layer, for the n + m slots written from cache position `start`. Returns the
    `source_slots` used, for a family that also moves recurrent inputs.

    Keys are stored as the forward computed them (NemotronH: no positional encoding; Llama: rotated at
    the branch's own logical positions j + k), so a slot's K,V move unchanged.
    """
    src = source_slots(layout, take)
    L = layout.n + layout.m
    for store in (cache.keys, cache.values):
        for i, t in enumerate(store):
            if t is None:  # a layer that does not attend (Mamba, MLP, MoE) keeps no K,V
                continue
            block = t[:, :, start:start + L]  # (R, kv, L, d)
            idx = src[:, None, :, None].expand(t.shape[0], t.shape[1], layout.n, t.shape[3])
            # gather copies first, so overwriting main slots cannot clobber a source slot still to be read.
            # Only the n main slots: `accept` cuts the length to start + max(keep) <= start + n, dropping the
            # branch slots.
            t[:, :, start:start + layout.n] = block.gather(2, idx)
    return src
