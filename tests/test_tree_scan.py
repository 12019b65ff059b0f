"""Mamba-2 over a tree of positions (a tree verify's one-pass scan): `ssd_tree_scan`, `tree_conv1d` and
`scan_tree`, each against its chain counterpart run on every slot's path alone."""

from __future__ import annotations

import pytest
import torch

from test_ssd import naive_scan, random_inputs  # the naive recurrence and its inputs (tests/ is on sys.path)
from twotower.towers.branching import tree_ancestors, tree_layout, tree_parents
from twotower.towers.nemotron_h.branch import scan_tree
from twotower.towers.nemotron_h.ssd import causal_conv1d, ssd_scan_reference, ssd_tree_scan, tree_conv1d

N = 7  # the main block's length in these trees


def layouts():
    """Trees of every shape the decoders build: one branch, three branches with per-row forks and
    widths, a row without its second branch (length 0), branches cut short (padding slots)."""
    one = tree_layout(torch.tensor([2, 5]), N)
    three = tree_layout(torch.tensor([[1, 3, 3], [4, 2, 6]]), N,
                        [None, torch.tensor([2, 0]), 1])
    cut = tree_layout(torch.tensor([[3, 1], [1, 5]]), N, 3)
    return {"one": one, "three": three, "cut": cut}


def paths(layout) -> list[list[list[int]]]:
    """Per row, per slot: its path (slot indices, root first), walked from `tree_parents`."""
    out = []
    for row in tree_parents(layout).tolist():
        rows = []
        for t in range(len(row)):
            path, s = [], t
            while s >= 0:
                path.append(s)
                s = row[s]
            rows.append(path[::-1])
        out.append(rows)
    return out


def real_slots(layout) -> torch.Tensor:
    R = layout.forks.shape[0]
    return torch.cat([torch.ones(R, layout.n, dtype=torch.bool), layout.branch_valid], dim=1)


def test_tree_parents_and_ancestors_of_a_hand_built_tree():
    # Main 0..3, one branch forking at 2 (slots 4, 5 hold positions 2, 3).
    layout = tree_layout(torch.tensor([2]), 4)
    assert tree_parents(layout).tolist() == [[-1, 0, 1, 2, 1, 4]]
    anc = tree_ancestors(layout)[0].int().tolist()
    assert anc == [[1, 0, 0, 0, 0, 0],
                   [1, 1, 0, 0, 0, 0],
                   [1, 1, 1, 0, 0, 0],
                   [1, 1, 1, 1, 0, 0],
                   [1, 1, 0, 0, 1, 0],
                   [1, 1, 0, 0, 1, 1]]


@pytest.mark.parametrize("name", ["one", "three", "cut"])
def test_ancestors_are_the_paths_parents_walk(name):
    layout = layouts()[name]
    anc = tree_ancestors(layout)
    for r, rows in enumerate(paths(layout)):
        for t, path in enumerate(rows):
            assert anc[r, t].nonzero().flatten().tolist() == path


@pytest.mark.parametrize("name", ["one", "three", "cut"])
@pytest.mark.parametrize("k", [2, 4])
def test_tree_conv_is_each_paths_causal_conv(name, k):
    layout = layouts()[name]
    R, L, c = layout.forks.shape[0], layout.n + layout.m, 5
    g = torch.Generator().manual_seed(k)
    x, w, bias = torch.randn(R, L, c, generator=g), torch.randn(c, k, generator=g), torch.randn(c, generator=g)
    state = torch.randn(R, c, k - 1, generator=g)
    y = tree_conv1d(x, w, bias, initial_state=state, taps=scan_tree(layout, k).conv_taps)
    for r, rows in enumerate(paths(layout)):
        for t, path in enumerate(rows):
            ref, _ = causal_conv1d(x[r:r + 1, path], w, bias, initial_state=state[r:r + 1])
            # The same products summed in the same order: the chain's numbers bit for bit.
            assert torch.equal(y[r, t], ref[0, -1])


@pytest.mark.parametrize("name", ["one", "three", "cut"])
@pytest.mark.parametrize("seeded", [False, True])
@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("strong_decay", [False, True])
def test_tree_scan_is_each_paths_recurrence(name, seeded, groups, strong_decay):
    layout = layouts()[name]
    R, L = layout.forks.shape[0], layout.n + layout.m
    x, dt, A, B, C, D, s0 = random_inputs(b=R, L=L, h=4, p=3, g=groups, n=5, seed=groups,
                                          strong_decay=strong_decay)
    y = ssd_tree_scan(x, dt, A, B, C, D=D, initial_state=s0 if seeded else None, ancestors=tree_ancestors(layout))
    init = s0 if seeded else torch.zeros_like(s0)
    for r, rows in enumerate(paths(layout)):
        for t, path in enumerate(rows):
            pick = (lambda u: u[r:r + 1, path])
            ref, _, _ = naive_scan(pick(x), pick(dt), A, pick(B), pick(C), D, init[r:r + 1])
            assert torch.allclose(y[r, t].double(), ref[0, -1], atol=2e-5, rtol=1e-5)


def test_a_chain_is_the_single_chunk_scan_and_the_causal_conv():
    # A tree without branches is the block itself: the plain extend's scan and conv.
    x, dt, A, B, C, D, s0 = random_inputs(b=2, L=9, h=4, p=3, g=2, n=5, seed=3)
    chain = torch.tril(torch.ones(9, 9, dtype=torch.bool)).expand(2, 9, 9)
    y = ssd_tree_scan(x, dt, A, B, C, D=D, initial_state=s0, ancestors=chain)
    ref, _ = ssd_scan_reference(x, dt, A, B, C, chunk_size=64, D=D, initial_state=s0)
    assert torch.allclose(y, ref, atol=1e-5, rtol=1e-5)
    layout = tree_layout(torch.tensor([[8], [8]]), 9, torch.zeros(2, dtype=torch.long))  # no row has the branch
    taps = scan_tree(layout, 4).conv_taps[:, :, :9]
    raw, w, state = torch.randn(2, 9, 6), torch.randn(6, 4), torch.randn(2, 6, 3)
    assert torch.equal(tree_conv1d(raw, w, None, initial_state=state, taps=taps),
                       causal_conv1d(raw, w, None, initial_state=state)[0])


def test_padding_slots_stay_finite_and_out_of_every_real_path():
    layout = layouts()["cut"]
    anc, real = tree_ancestors(layout), real_slots(layout)
    # No real slot has a padding slot on its path, so what padding computes is never read.
    assert not (anc & real[:, :, None] & ~real[:, None, :]).any()
    R, L = real.shape
    x, dt, A, B, C, D, s0 = random_inputs(b=R, L=L, h=4, p=3, g=2, n=5)
    dt = dt * real[..., None]  # the mixer's padding: dt = 0 there
    assert torch.isfinite(ssd_tree_scan(x, dt, A, B, C, D=D, initial_state=s0, ancestors=anc)).all()
