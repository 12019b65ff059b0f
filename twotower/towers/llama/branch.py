"""Two-branch verification on the Llama family (and Qwen2 / Mistral, its subclasses): the tree
forward and its accept (`towers/branching.py`).

Every layer attends, so the tree mask alone separates the branches. RoPE needs each slot's logical
position: a branch slot holding block position j + k is rotated at T_row + j + k (T_row the row's
real context length), the position it would have in a plain extend of that branch; keys are cached
rotated, so moving them over the main block's slots on accept leaves them exact.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ...cache_base import PendingBlock
from ..branching import TreeLayout, take_branch, tree_mask
from .cache import KVCache

__all__ = ["tree_forward", "accept_tree"]


def tree_forward(tower, cache: KVCache, main: Tensor, branch: Tensor, layout: TreeLayout) -> Tensor:
    """Append main (R, n) and branch (R, m) provisionally as one tree block; returns the final normed
    hidden (R, n + m, H) (slot order: main, then branch). `accept_tree` must settle the cache next."""
    cache.check_settled("run a tree verify on it")
    n, m = layout.n, layout.m
    offset = cache.length
    bb = tower.backbone
    bb.check_window(offset + n + m)  # slots bound positions from above, as in a plain extend
    x = bb.embed_tokens(torch.cat([main, branch], dim=1))
    before = cache.real_counts(offset) if offset else torch.zeros_like(layout.forks[:, 0])
    cos, sin = bb.rotary(before[:, None] + layout.block_pos)
    cache.reserve(n + m)
    cache.key_mask[:, offset:offset + n] = True
    cache.key_mask[:, offset + n:offset + n + m] = layout.branch_valid
    mask = tree_mask(layout, cache.key_mask[:, :offset])
    for i, blk in enumerate(bb.layers):
        q, k, v = blk.self_attn.qkv(blk.attn_input(x), cos, sin)
        cache.write_kv(i, k, v)
        k, v = cache.kv(i, upto=offset + n + m)
        x = blk.residual(x, blk.self_attn.attend(q, k, v, mask))
        x = blk.mlp_out(x)
    cache.advance(n + m)
    cache.pending = PendingBlock(offset, n + m)
    return bb.norm(x)


def accept_tree(tower, cache: KVCache, layout: TreeLayout, keep: Tensor, take: Tensor) -> None:
    """Settle a tree block: row r keeps its first keep[r] block positions of the branch it takes
    (take[r]: the second one). Its K,V move over the main block's slots; `accept` does the rest."""
    pending = cache.pending
    if pending is None or pending.n != layout.n + layout.m:
        raise RuntimeError("accept_tree: the cache holds no tree block of this layout (tree_forward first)")
    take_branch(cache, layout, take, pending.start)
    cache.pending = PendingBlock(pending.start, layout.n)
    tower.accept(cache, keep)
