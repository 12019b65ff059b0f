"""Two-branch verification on NemotronH: the tree forward and its accept (`towers/branching.py`).

Attention layers read the tree mask. A Mamba-2 layer is a causal scan: a mask cannot stop the branch
from reading the main block's positions j .. n-1, so the layer runs two segments (the main block, then
every branch at once: K branches are K rows each). The main block
scans from the cache's states, exactly as a provisional extend; the branch scans from the main
block's states after position j - 1, rebuilt per row in closed form from the main segment's recorded
inputs (`ssd_state_at`, `conv_state_at`: what `accept`'s rollback already uses), with its padding
slots as no-ops (dt = 0, zero conv input). Both segments' scan inputs are recorded, so `accept_tree`
can rebuild the state after any kept prefix of either branch. The cost over a plain verify is the
branch's m positions through every layer plus one closed-form state per Mamba layer.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..branching import TreeLayout, take_branch, tree_mask
from .cache import HybridCache, PendingScan
from .layers import ATTENTION, MAMBA
from .ssd import conv_state_at, ssd_state_at

__all__ = ["tree_forward", "accept_tree", "branch_seed"]


def branch_seed(mixer, conv_state: Tensor, ssm_state: Tensor, xbc: Tensor, scan_inputs, j: Tensor
                ) -> tuple[Tensor, Tensor]:
    """(conv, ssm) states of a Mamba layer after the main block's first j[r] positions, per row: the
    state a branch at position j starts from. xbc / scan_inputs: the main segment's recorded inputs."""
    x, dt, B = scan_inputs
    conv = conv_state_at(conv_state, xbc, j)
    ssm = ssd_state_at(x, dt, mixer.decay_rates(), B, initial_state=ssm_state, last=j - 1)
    return conv, ssm


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
    mask = tree_mask(layout, cache.key_mask[:, :offset]) if ATTENTION in tower.backbone.block_types else None
    pending = PendingScan(offset, n + m)
    for i, blk in enumerate(tower.backbone.layers):
        h = blk.pre(x)
        if blk.block_type == ATTENTION:
            q, k, v = blk.mixer.qkv(h)
            cache.write_kv(i, k, v)
            k, v = cache.kv(i, upto=offset + n + m)
            y = blk.mixer.attend(q, k, v, mask)
        elif blk.block_type == MAMBA:
            conv0, ssm0 = cache.conv[i], cache.ssm[i]
            a = blk.mixer(h[:, :n], conv_state=conv0, ssm_state=ssm0, return_xbc=True, return_scan_inputs=True,
                          need_final_state=False)
            by, bxbc, bscan = _branch_scans(blk.mixer, h, conv0, ssm0, a, layout)
            pending.xbc[i] = torch.cat([a.xbc, bxbc], dim=1)
            pending.scan[i] = tuple(torch.cat([u, w], dim=1) for u, w in zip(a.scan_inputs, bscan))
            y = torch.cat([a.y, by], dim=1)
        else:
            y = blk.mixer(h)
        x = blk.post(x, y)
    cache.advance(n + m)
    cache.pending = pending
    return tower.backbone.norm_f(x)


def _branch_scans(mixer, h: Tensor, conv0: Tensor, ssm0: Tensor, main, layout: TreeLayout):
    """A Mamba layer's scans of every branch's slots of h (R, n + m, H), each seeded at its own forks
    from the main segment's output `main` (its recorded inputs); padding slots are no-ops. The K
    branches run as R * K rows of one scan, each padded to the widest branch: one call, not K, which
    is most of a small model's cost of a tree (docs/design.md, section 2.4). Returns y (R, m, H), xbc
    (R, m, C) and the scan inputs, in slot order."""
    R, n, K, W = h.shape[0], layout.n, len(layout.widths), max(layout.widths)
    k = torch.arange(W, device=h.device)
    # Slot of branch b's k-th position, clamped inside its own slots (the extra ones are masked below).
    idx = torch.stack([s + k.clamp(max=w - 1) for s, w in zip(layout.starts(), layout.widths)])  # (K, W)
    inside = torch.stack([k < w for w in layout.widths])  # (K, W)
    valid = layout.branch_valid[:, (idx - n).flatten()].view(R, K, W) & inside
    # Row r's branch b becomes row r * K + b: repeat_interleave puts each row's K copies together.
    rep = (lambda t: t.repeat_interleave(K, dim=0)) if K > 1 else (lambda t: t)
    conv, ssm = branch_seed(mixer, rep(conv0), rep(ssm0), rep(main.xbc), tuple(map(rep, main.scan_inputs)),
                            layout.forks.reshape(-1))
    out = mixer(h[:, idx.flatten()].reshape(R * K, W, -1), conv_state=conv, ssm_state=ssm,
                pad_mask=valid.view(R * K, W), return_xbc=True, return_scan_inputs=True, need_final_state=False)

    def slots(t: Tensor) -> Tensor:  # (R * K, W, ...) -> (R, m, ...): branch b's first widths[b] positions in turn
        t = t.view(R, K, W, *t.shape[2:])
        return torch.cat([t[:, b, :w] for b, w in enumerate(layout.widths)], dim=1)

    return slots(out.y), slots(out.xbc), tuple(slots(t) for t in out.scan_inputs)


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
