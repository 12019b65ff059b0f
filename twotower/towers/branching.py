"""Two-branch verification: one context forward over a drafted block and a second branch of it.

A speculative iteration verifies a drafted block d_0 .. d_{n-1}. A second candidate branches at
position j (per row, 1 <= j <= n-1): e_j .. e_{n-1}, sharing d_0 .. d_{j-1}. One forward covers both:
the cache takes n + m provisional slots (m = n - min(j), the longest branch),

    slots offset .. offset+n-1        the main block, causal as in a plain extend;
    slots offset+n .. offset+n+m-1    branch position j+k in slot offset+n+k (k < n - j, or fewer
                                      when branches are cut short; the rest of a row's m slots is
                                      padding, masked out),

and a tree mask: a branch query sees the cache, the main block before j and the branch up to itself;
a main query never sees a branch slot. Recurrent layers cannot read a mask; each family runs them
per segment (`towers/nemotron_h/branch.py`). Afterwards `take_branch` moves the winning branch's
slots of a row over the main block's positions j.., and the family's ordinary `accept` settles the
n-slot block: rows are then exactly as if only their kept tokens had been appended.

This module holds what does not depend on the family: the layout, the mask and the K,V move.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..cache_base import KVBuffers

__all__ = ["TreeLayout", "tree_layout", "tree_mask", "take_branch"]


@dataclass
class TreeLayout:
    """Where the two branches of a tree verify sit. n: the main block's length; m: branch slots;
    j (R,) long: each row's branch position; branch_valid (R, m) bool: slot k holds position j + k;
    block_pos (R, n + m) long: the block position (0 .. n-1) of every slot (padding: clamped)."""

    n: int
    m: int
    j: Tensor
    branch_valid: Tensor
    block_pos: Tensor


def tree_layout(j: Tensor, n: int, length: int | Tensor | None = None) -> TreeLayout:
    """The layout for branch positions j (R,) (long, each in [1, n - 1]) of an n-position block, each
    branch covering positions j .. n-1, or only its first `length` of them (an int >= 1 for every row,
    a (R,) long tensor of per-row lengths, each in [1, n - j], or None: all). One host read (two with
    per-row lengths): the branch width m, the longest row's branch."""
    if j.dtype != torch.long or j.dim() != 1:
        raise ValueError(f"j must be a (R,) long tensor of branch positions, got {j.dtype} {tuple(j.shape)}")
    # One host read serves both the range check and the width: the earliest fork has the longest branch.
    lo, hi = (int(v) for v in torch.aminmax(j))
    if lo < 1 or hi > n - 1:
        raise ValueError(f"branch positions must lie in [1, {n - 1}] (position 0 is the context tower's own "
                         f"token, and a branch needs a position), got [{lo}, {hi}]")
    if isinstance(length, Tensor):
        bad = (length.dtype != torch.long or length.shape != j.shape
               or bool(((length < 1) | (length > n - j)).any()))
        if bad:
            raise ValueError(f"per-row branch lengths must be a (R,) long tensor with 1 <= length <= n - j, "
                             f"got {length.dtype} {tuple(length.shape)}")
        limit = length
    elif length is not None and not (isinstance(length, int) and length >= 1):
        raise ValueError(f"a branch length must be an int >= 1 (None: to the block's end), got {length!r}")
    else:
        limit = n - j if length is None else (n - j).clamp(max=length)
    m = n - lo if length is None else min(n - lo, length) if isinstance(length, int) else int(limit.max())
    k = torch.arange(m, device=j.device)
    # Rows share one width m; a row whose branch is shorter (later fork, or cut by `length`) pads its tail.
    branch_valid = k[None, :] < limit[:, None]
    # Padding slots clamp to n - 1 so that indexing by block_pos (e.g. gathering the branch's tokens from
    # the draft) stays in range; the mask hides those slots and their outputs are never read.
    block_pos = torch.cat([torch.arange(n, device=j.device).expand(j.shape[0], n),
                           (j[:, None] + k[None, :]).clamp(max=n - 1)], dim=1)
    return TreeLayout(n, m, j, branch_valid, block_pos)


def tree_mask(layout: TreeLayout, prefix_valid: Tensor) -> Tensor:
    """(R, 1, n + m, offset + n + m) bool attention mask of a tree verify (True = may attend).

    prefix_valid (R, offset): the cache's real positions before the block (holes and padding False).
    Every query sees the real prefix; main slot a sees main slots <= a; branch slot n+k sees main
    slots before j and branch slots n .. n+k that hold a position. A slot always sees itself, so a
    padding slot's attention stays finite (its output is never read).
    """
    n, m, j = layout.n, layout.m, layout.j
    R, dev = j.shape[0], j.device
    L = n + m
    a = torch.arange(L, device=dev)
    is_branch = a >= n
    causal = a[None, :] <= a[:, None]  # (L, L), slot order: main then branch
    same_side = is_branch[:, None] == is_branch[None, :]
    # (R, L, L): within one side, causal; a branch query also sees the main block before j.
    allowed = (causal & same_side)[None].expand(R, L, L).clone()  # clone: expand is a stride-0 view, written per row
    # Main slots j.. hold d_j.., which the branch replaces; the main -> branch block stays False, so a main
    # query attends exactly as in a plain extend of d.
    allowed[:, n:, :n] = a[None, None, :n] < j[:, None, None]
    key_valid = torch.cat([torch.ones(R, n, dtype=torch.bool, device=dev), layout.branch_valid], dim=1)
    allowed &= key_valid[:, None, :]
    allowed |= torch.eye(L, dtype=torch.bool, device=dev)[None]
    prefix = prefix_valid[:, None, :].expand(R, L, prefix_valid.shape[1])
    return torch.cat([prefix, allowed], dim=2)[:, None]


def source_slots(layout: TreeLayout, take: Tensor) -> Tensor:
    """(R, n) long: for each block position p, the slot (0 .. n+m-1, relative to the block) that holds
    the row's winner there: the branch's slot n + p - j where take[r] and p >= j, else p. Past a
    short branch's end (never kept) the last slot stands in."""
    p = torch.arange(layout.n, device=take.device)[None, :]
    j = layout.j[:, None]
    # Positions before j are shared by both branches, so they stay in their main slots even when the branch wins.
    from_branch = take[:, None] & (p >= j)
    # The clamp only keeps the index in range: keep <= j + the branch's valid length, so no clamped position is kept.
    return torch.where(from_branch, (layout.n + p - j).clamp(max=layout.n + layout.m - 1), p)


def take_branch(cache: KVBuffers, layout: TreeLayout, take: Tensor, start: int) -> Tensor:
    """Copy each row's winning branch (take (R,) bool) over the main block's K,V at positions j..n-1,
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
