"""Routed experts: the grouped path (`torch._grouped_mm`) against a plain per-expert loop."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_config

from twotower.towers.nemotron_h import layers
from twotower.towers.nemotron_h.layers import Experts, MoELayer

grouped = pytest.mark.skipif(not hasattr(torch, "_grouped_mm"), reason="torch has no _grouped_mm")


def reference(experts: Experts, x, weights, idx):
    """sum over the k chosen slots of weight * down(act(up(x))), token by token, slot by slot."""
    out = torch.zeros(x.shape, dtype=torch.float64)
    for n in range(x.shape[0]):
        for j in range(idx.shape[1]):
            e = int(idx[n, j])
            h = experts.act(F.linear(x[n].double(), experts.up_proj[e].double()))
            out[n] += float(weights[n, j]) * F.linear(h, experts.down_proj[e].double())
    return out


def random_experts(E=16, k=2, seed=0):
    cfg = tiny_config("E", n_routed_experts=E, num_experts_per_tok=k, n_group=1, topk_group=1)
    torch.manual_seed(seed)
    moe = MoELayer(cfg)
    with torch.no_grad():
        moe.gate.weight.normal_(0, 1.0)
        moe.experts.up_proj.normal_(0, 0.3)
        moe.experts.down_proj.normal_(0, 0.3)
    return moe


@grouped
@pytest.mark.parametrize("tokens", [1, 5, 40])
def test_grouped_experts_match_per_expert_loop(tokens):
    moe = random_experts(E=16, k=2, seed=tokens)
    x = torch.randn(tokens, moe.experts.up_proj.shape[2])
    with torch.no_grad():
        w, idx = moe.gate(x)
        if tokens == 40:
            idx[:, 0] = idx[:, 0] % 4  # crowd a few experts so that others surely get nothing
            idx[:, 1] = 8 + idx[:, 1] % 4
        ref = reference(moe.experts, x, w, idx)
        used = set(idx.flatten().tolist())
        assert len(used) < 16, "the test needs experts without tokens"
        for path in (moe.experts._grouped, moe.experts._loop, moe.experts.forward):
            torch.testing.assert_close(path(x, w, idx).double(), ref, rtol=1e-5, atol=1e-5)


@grouped
def test_grouped_path_is_chosen_and_reads_nothing_back(monkeypatch):
    """No gradient: forward takes the grouped kernel, with no .tolist() / .item() on the way."""
    moe = random_experts(E=32, k=4)
    x = torch.randn(16, moe.experts.up_proj.shape[2])
    with torch.no_grad():
        expected = moe(x)

        def refuse(*a, **k):
            raise AssertionError("host read-back in the grouped MoE path")

        monkeypatch.setattr(torch.Tensor, "tolist", refuse)
        monkeypatch.setattr(torch.Tensor, "item", refuse)
        torch.testing.assert_close(moe(x), expected, rtol=0, atol=0)


def test_training_uses_the_loop_and_gradients_flow():
    """The grouped kernel's CPU backward fails, so a step that needs gradients takes the loop."""
    moe = random_experts(E=16, k=2)
    x = torch.randn(6, moe.experts.up_proj.shape[2], requires_grad=True)
    assert not layers._grouped_mm_ok(x, moe.experts.up_proj)
    moe(x).sum().backward()
    assert moe.experts.up_proj.grad is not None and x.grad is not None


def test_grouped_override_off(monkeypatch):
    monkeypatch.setattr(layers, "USE_GROUPED_MM", False)
    moe = random_experts(E=16, k=2)
    x = torch.randn(3, moe.experts.up_proj.shape[2])
    with torch.no_grad():
        assert not layers._grouped_mm_ok(x, moe.experts.up_proj)
        w, idx = moe.gate(x)
        torch.testing.assert_close(moe.experts(x, w, idx).double(), reference(moe.experts, x, w, idx),
                                   rtol=1e-5, atol=1e-5)


@grouped
def test_a_few_experts_run_dense_up_to_dense_max_tokens_then_grouped(monkeypatch):
    """E <= 2k: every expert on every token while that is cheap, the grouped GEMM past
    DENSE_MAX_TOKENS tokens; both sum what the per-token reference sums."""
    moe = random_experts(E=4, k=2, seed=3)
    calls = []
    for name in ("_dense", "_grouped"):
        real = getattr(moe.experts, name)
        monkeypatch.setattr(moe.experts, name, lambda *a, _real=real, _name=name: calls.append(_name) or _real(*a))
    for tokens in (layers.DENSE_MAX_TOKENS, layers.DENSE_MAX_TOKENS + 1):
        x = torch.randn(tokens, moe.experts.up_proj.shape[2])
        with torch.no_grad():
            w, idx = moe.gate(x)
            torch.testing.assert_close(moe.experts(x, w, idx).double(), reference(moe.experts, x, w, idx),
                                       rtol=1e-5, atol=1e-5)
    assert calls == ["_dense", "_grouped"]
