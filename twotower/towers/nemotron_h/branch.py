"""Two-branch verification on NemotronH: the tree forward and its accept (`towers/branching.py`).

Attention layers read the tree mask. A Mamba-2 layer is a causal scan, which a mask cannot restrict,
so it scans the tree itself (`ssd.ScanTree`): every slot's causal conv reads the raw inputs along its
own path (`tree_conv1d`), and the SSD's quadratic form decays along paths instead of along the block
(`ssd_tree_scan`): a slot sees the cache's states and the slots of its own path, exactly what a scan
of that path alone computes. One pass over the n + m slots, like a plain extend of as many: no
branch is scanned on its own and no state is rebuilt at a fork. Padding slots are no-ops (dt = 0, zero
conv input). The scan inputs of every slot are recorded, so `accept_tree` can rebuild the state
after any kept prefix of either branch.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..branching import TreeLayout, take_branch, tree_ancestors, tree_mask, tree_parents
from .cache import HybridCache, PendingScan
from .layers import ATTENTION, MAMBA
from .ssd import ScanTree

__all__ = ["tree_forward", "accept_tree", "scan_tree"]


def scan_tree(layout: TreeLayout, kernel_size: int, ancestors: Tensor | None = None) -> ScanTree:
    """The `ScanTree` of a tree layout for Mamba layers with a `kernel_size` conv: the slots' paths,
    and the k inputs each slot's conv reads, the oldest first. Conv inputs are indexed as `tree_conv1d`
    lays them out: the cache's k - 1 conv inputs, then the block's slots. ancestors: `tree_ancestors(layout)`,
    when the caller has it already."""
    km1 = kernel_size - 1
    parents = tree_parents(layout) + km1  # -1 (before the block) becomes the cache's last conv input
    R = parents.shape[0]
    # The input before each input: a conv-state input's is the state's previous one (clamped at the
    # oldest, which no slot's window reaches past), a slot's is its parent.
    before = torch.cat([(torch.arange(km1, device=parents.device) - 1).clamp(min=0).expand(R, km1), parents], 1)
    tap = torch.arange(km1, km1 + parents.shape[1], device=parents.device).expand_as(parents)
    taps = [tap]
    for _ in range(km1):
        tap = before.gather(1, tap)
        taps.append(tap)
    return ScanTree(tree_ancestors(layout) if ancestors is None else ancestors, torch.stack(taps[::-1], dim=1))


def tree_forward(tower, cache: HybridCache, main: Tensor, branch: Tensor, layout: TreeLayout) -> Tensor:
    """Append main (R, n) and branch (R, m) provisionally as one tree block; returns the final normed
    hidden (R, n + m, H) (slot order: main, then branch). `accept_tree` must settle the cache next."""
    cache.check_settled("run a tree verify on it")
    n, m = layout.n, layout.m
    offset = cache.length
    x = tower.backbone.embeddings(torch.cat([main, branch], dim=1))
    cache.reserve(n + m)
    # Written directly (not write_mask): branch padding is not a hole of the settled cache.
    cache.key_mask[:, offset:offset + n] = True
    cache.key_mask[:, offset + n:offset + n + m] = layout.branch_valid
    types = tower.backbone.block_types
    ancestors = tree_ancestors(layout)  # the paths, shared by the attention mask and the Mamba scans
    mask = tree_mask(layout, cache.key_mask[:, :offset], ancestors) if ATTENTION in types else None
    tree = None
    if MAMBA in types:
        tree = scan_tree(layout, tower.config.conv_kernel, ancestors)
        real = cache.key_mask[:, offset:offset + n + m]
    pending = PendingScan(offset, n + m)
    for i, blk in enumerate(tower.backbone.layers):
        h = blk.pre(x)
        if blk.block_type == ATTENTION:
            q, k, v = blk.mixer.qkv(h)
            cache.write_kv(i, k, v)
            k, v = cache.kv(i, upto=offset + n + m)
            y = blk.mixer.attend(q, k, v, mask)
        elif blk.block_type == MAMBA:
            a = blk.mixer(h, conv_state=cache.conv[i], ssm_state=cache.ssm[i], pad_mask=real, tree=tree,
                          return_xbc=True, return_scan_inputs=True, need_final_state=False)
            pending.xbc[i], pending.scan[i], y = a.xbc, a.scan_inputs, a.y
        else:
            y = blk.mixer(h)
        x = blk.post(x, y)
    cache.advance(n + m)
    cache.pending = pending
    return tower.backbone.norm_f(x)


def accept_tree(tower, cache: HybridCache, layout: TreeLayout, keep: Tensor, take: Tensor) -> None:
    """Settle a tree block: row r keeps its first keep[r] block positions (1 .. n) of the branch it
    takes (take[r], as `source_slots`: a branch's tokens then stand at positions from its fork; else the
    main block's).
    The row is then exactly as if only those tokens had been appended: K,V and recorded Mamba inputs
    of the winning branch move over the main block's positions, and `accept` rolls back as usual."""
    pending = cache.pending
    if not isinstance(pending, PendingScan) or pending.n != layout.n + layout.m:
        raise RuntimeError("accept_tree: the cache holds no tree block of this layout (tree_forward first)")
    src = take_branch(cache, layout, take, pending.start)
    settled = PendingScan(pending.start, layout.n)
    for i, xbc in pending.xbc.items():
        settled.xbc[i] = _gather_positions(xbc, src)
        settled.scan[i] = tuple(_gather_positions(t, src) for t in pending.scan[i])
    cache.pending = settled
    tower.accept(cache, keep)


def _gather_positions(t: Tensor, src: Tensor) -> Tensor:
    """t (R, L, ...) -> (R, n, ...): position p of row r taken from t[r, src[r, p]]."""
    idx = src.view(*src.shape, *([1] * (t.dim() - 2))).expand(*src.shape, *t.shape[2:])
    return t.gather(1, idx)
