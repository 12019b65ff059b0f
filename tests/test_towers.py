"""Context tower parity with transformers' NemotronH, cache consistency, boundary states, padding."""

from __future__ import annotations

import pytest
import torch
from conftest import dt_regimes, hf_backbone_state, left_pad, make_hf_pair, randomize_, tiny_config

from twotower.caches import HybridCache
from twotower.towers.nemotron_h.context import ContextTower

PATTERNS = ["M*-EM*E", "ME*-M", "*EMM-"]


def assert_close(a, b, rtol=1e-5, atol=1e-5):
    # Relative to the logits' scale: about 1e-5 of the largest magnitude.
    scale = max(float(b.abs().max()), 1.0)
    err = float((a - b).abs().max())
    assert err <= atol * scale + rtol * scale, f"max abs error {err:.3g} at scale {scale:.3g}"


@pytest.mark.parametrize("pattern", PATTERNS)
def test_full_forward_matches_transformers(pattern):
    ref, tower = make_hf_pair(pattern)
    x = torch.randint(4, 64, (3, 41))
    with torch.no_grad():
        assert_close(tower(x), ref(x).logits)


def test_group_limited_routing_and_latent_moe_match_transformers():
    ref, tower = make_hf_pair("E*ME", n_routed_experts=8, n_group=2, topk_group=1, moe_latent_size=16)
    x = torch.randint(4, 64, (2, 19))
    with torch.no_grad():
        # use_cache=False: a full forward needs no cache, and transformers (5.25) cannot build one
        # for a stack whose first layer is MoE or MLP: its cache's placeholder for a stateless
        # layer 0 (`DummyLayer`) has no `get_seq_length`, which the forward asks layer 0 for.
        assert_close(tower(x), ref(x, use_cache=False).logits)


def assert_state_close(a, b, tol=1e-6):
    # Conv states are raw in_proj outputs; in the low-dt regimes (B and C rows scaled up) they reach
    # magnitudes around 20, so float32 rounding is judged relative to the state's own scale.
    assert torch.allclose(a, b, rtol=0, atol=tol * max(float(b.abs().max()), 1.0))


@dt_regimes
@pytest.mark.parametrize("pattern", PATTERNS)
def test_prefill_then_extends_match_full_forward(pattern, regime):
    ref, tower = make_hf_pair(pattern, seed=1, **regime)
    x = torch.randint(4, 64, (2, 13 + 16 + 1 + 7 + 1))
    with torch.no_grad():
        full = ref(x, use_cache=False).logits
        logits, cache = tower.prefill(x[:, :13])
        parts, pos = [logits], 13
        for n in (16, 1, 7, 1):
            parts.append(tower.extend(cache, x[:, pos:pos + n]))
            pos += n
    assert cache.length == x.shape[1]
    assert_close(torch.cat(parts, 1), full)


def _assert_caches_equal(a: HybridCache, b: HybridCache, tol=1e-5):
    assert a.length == b.length
    assert torch.equal(a.valid_mask(), b.valid_mask())
    for i in range(len(a.keys)):
        if a.keys[i] is not None:
            ka, va = a.kv(i)
            kb, vb = b.kv(i)
            assert torch.allclose(ka, kb, atol=tol) and torch.allclose(va, vb, atol=tol), f"layer {i} K,V"
        if a.conv[i] is not None:
            assert torch.allclose(a.conv[i], b.conv[i], atol=tol), f"layer {i} conv state"
            assert a.ssm[i].dtype == torch.float32
            assert torch.allclose(a.ssm[i], b.ssm[i], atol=tol, rtol=1e-5), f"layer {i} ssm state"


@pytest.mark.parametrize("split", [1, 5, 16, 30])
def test_prefill_extend_equals_prefill_of_concatenation(split):
    _, tower = make_hf_pair("M*-EM*E", seed=2)
    x = torch.randint(4, 64, (2, 37))
    with torch.no_grad():
        la, cache_a = tower.prefill(x[:, :split], capacity=8)  # small capacity: forces growth
        lb = tower.extend(cache_a, x[:, split:])
        lfull, cache_full = tower.prefill(x)
    assert_close(torch.cat([la, lb], 1), lfull)
    _assert_caches_equal(cache_a, cache_full)
    assert cache_a.capacity >= 37


@dt_regimes
def test_training_boundary_states_equal_prefix_prefill_states(regime):
    _, tower = make_hf_pair("M*-EM*E", seed=3, **regime)
    S, x = 8, torch.randint(4, 64, (2, 40))
    with torch.no_grad():
        logits, states = tower.forward_train(x, S, return_logits=True)
        assert_close(logits, tower(x))
        for k in range(x.shape[1] // S):
            if k == 0:
                cache = HybridCache.empty(tower.backbone, 2)
            else:
                _, cache = tower.prefill(x[:, : k * S])
            for i, blk in enumerate(tower.backbone.layers):
                if blk.block_type == "linear_attention":
                    assert_state_close(states.conv[i][:, k], cache.conv[i])
                    assert torch.allclose(states.ssm[i][:, k], cache.ssm[i], atol=1e-5, rtol=1e-5)
                elif blk.block_type == "full_attention" and k > 0:
                    ck, cv = cache.kv(i)
                    assert torch.allclose(states.keys[i][:, :, : k * S], ck, atol=1e-5)
                    assert torch.allclose(states.values[i][:, :, : k * S], cv, atol=1e-5)


@dt_regimes
def test_left_padded_batch_equals_each_prompt_alone(regime):
    # With a floor (low_dt_floor) this also checks that padded positions keep dt = 0.
    _, tower = make_hf_pair("M*-EM*E", seed=4, **regime)
    lengths = [11, 4, 17]
    prompts = [torch.randint(4, 64, (n,)) for n in lengths]
    T = max(lengths)
    ids, mask = left_pad(prompts)
    cont = torch.randint(4, 64, (len(prompts), 9))
    with torch.no_grad():
        logits, cache = tower.prefill(ids, mask)
        ext = tower.extend(cache, cont)
        for r, p in enumerate(prompts):
            alone, cache_r = tower.prefill(p[None])
            ext_r = tower.extend(cache_r, cont[r:r + 1])
            assert_close(logits[r, T - len(p):], alone[0])
            assert_close(ext[r], ext_r[0])
            for i, st in enumerate(cache.ssm):
                if st is not None:
                    assert torch.allclose(st[r], cache_r.ssm[i][0], atol=1e-5, rtol=1e-5)
                    assert_state_close(cache.conv[i][r], cache_r.conv[i][0])


@dt_regimes
def test_left_padded_batch_matches_transformers_real_positions(regime):
    ref, tower = make_hf_pair("M*-EM*E", seed=5, **regime)
    ids = torch.randint(4, 64, (2, 12))
    mask = torch.ones_like(ids)
    mask[0, :5] = 0
    ids[0, :5] = 0
    with torch.no_grad():
        ours = tower(ids, mask)
        alone = ref(ids[0:1, 5:]).logits
    assert_close(ours[0, 5:], alone[0])


def test_cache_clone_select_and_to_are_independent_copies():
    _, tower = make_hf_pair("M*E", seed=6)
    x = torch.randint(4, 64, (3, 10))
    with torch.no_grad():
        _, cache = tower.prefill(x)
        clone = cache.clone()
        tower.extend(cache, torch.randint(4, 64, (3, 2)))
        assert clone.length == 10 and cache.length == 12
        sub = clone.select(torch.tensor([2, 0]))
        _, alone = tower.prefill(x[[2, 0]])
        _assert_caches_equal(sub, alone)
        moved = clone.to("cpu", dtype=torch.float64)
        assert moved.ssm[0].dtype == torch.float32 and moved.keys[1].dtype == torch.float64


def test_cache_mirror_sends_only_new_positions():
    _, tower = make_hf_pair("M*E", seed=7)
    x = torch.randint(4, 64, (2, 24))
    with torch.no_grad():
        _, cache = tower.prefill(x[:, :8])
        mirror = cache.mirror_to("cpu")
        _assert_caches_equal(mirror, cache)
        # Poison what the mirror already holds: an incremental update must not overwrite it.
        mirror.keys[1][:, :, :8] += 100.0
        tower.extend(cache, x[:, 8:24])
        cache.mirror_to("cpu", mirror)
        assert mirror.length == 24
        assert torch.allclose(mirror.keys[1][:, :, 8:24], cache.keys[1][:, :, 8:24])
        assert torch.all(mirror.keys[1][:, :, :8] - cache.keys[1][:, :, :8] > 99)
        assert torch.allclose(mirror.ssm[0], cache.ssm[0])


def test_bad_inputs_raise_clear_errors():
    _, tower = make_hf_pair("M*E")
    with pytest.raises(ValueError, match="token ids must lie"):
        tower(torch.tensor([[1, 64]]))
    with pytest.raises(ValueError, match="batch, length"):
        tower(torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="multiple of block_size"):
        tower.forward_train(torch.randint(4, 64, (1, 10)), 8)
    with pytest.raises(ValueError, match="input_ids must be an integer"):
        tower(torch.ones(1, 3))


def test_from_pretrained_transformers_save_and_sharded_backbone_prefix(tmp_path):
    from twotower.towers.loading import read_safetensors
    from twotower.towers.saving import save_state_dict

    ref, _ = make_hf_pair("M*-EM*E", seed=8)
    ref.save_pretrained(tmp_path / "hf")
    tower = ContextTower.from_pretrained(tmp_path / "hf").eval()
    x = torch.randint(4, 64, (2, 21))
    with torch.no_grad():
        expected = ref(x).logits
        assert_close(tower(x), expected)
    # The NVIDIA remote-code spelling: `backbone.` prefix, one module per expert, sharded.
    state = hf_backbone_state(ref)
    remote = {("backbone." + k if k != "lm_head.weight" else k): v for k, v in state.items()}
    save_state_dict(remote, tmp_path / "remote", config=ref.config, max_shard_size=8_000, expert_layout="per_expert")
    assert (tmp_path / "remote" / "model.safetensors.index.json").exists()
    assert any(".experts.1.up_proj.weight" in k for k in read_safetensors(tmp_path / "remote"))
    tower2 = ContextTower.from_pretrained(tmp_path / "remote").eval()
    with torch.no_grad():
        assert_close(tower2(x), expected)
    # bf16 weights: loads, computes, and keeps the router in float32.
    tower3 = ContextTower.from_pretrained(tmp_path / "hf", dtype=torch.bfloat16).eval()
    assert tower3.backbone.embeddings.weight.dtype == torch.bfloat16
    assert tower3.backbone.layers[3].mixer.gate.weight.dtype == torch.float32
    with torch.no_grad():
        logits = tower3(x)
    assert torch.isfinite(logits).all() and (logits.argmax(-1) == expected.argmax(-1)).float().mean() > 0.5


def test_from_pretrained_truncated_or_missing_files_name_the_problem(tmp_path):
    ref, _ = make_hf_pair("M*E", seed=9)
    ref.save_pretrained(tmp_path / "hf")
    weights = tmp_path / "hf" / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(Exception, match="truncated"):
        ContextTower.from_pretrained(tmp_path / "hf")
    with pytest.raises(FileNotFoundError, match="nothing"):
        ContextTower.from_pretrained(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        ContextTower.from_pretrained(tmp_path / "empty")


def test_moe_expert_paths_agree_and_dispatch_by_expert_count(monkeypatch):
    """The dense, per-expert-loop and grouped paths compute the same mixture; dense serves only
    tiny expert counts (E <= 2 top-k, where every token uses half of the experts anyway), larger
    ones go grouped (no gradient) or through the loop."""
    from twotower.towers.nemotron_h.layers import Experts

    cfg = tiny_config(n_routed_experts=16, num_experts_per_tok=2)
    experts = randomize_(Experts(cfg), seed=4)
    g = torch.Generator().manual_seed(4)
    for n in (1, 3, 40):
        x = torch.randn(n, cfg.hidden_size, generator=g)
        idx = torch.stack([torch.randperm(16, generator=g)[:2] for _ in range(n)])
        w = torch.rand(n, 2, generator=g)
        torch.testing.assert_close(experts._loop(x, w, idx), experts._dense(x, w, idx), rtol=1e-5, atol=1e-6)
    used = []
    for name in ("_loop", "_dense", "_grouped"):
        monkeypatch.setattr(experts, name, lambda *a, _n=name: used.append(_n) or a[0])
    small = randomize_(Experts(tiny_config(n_routed_experts=4, num_experts_per_tok=2)), seed=4)
    monkeypatch.setattr(small, "_dense", lambda *a: used.append("small_dense") or a[0])
    with torch.no_grad():
        experts(torch.zeros(3, cfg.hidden_size), torch.ones(3, 2), torch.zeros(3, 2, dtype=torch.long))
        small(torch.zeros(3, cfg.hidden_size), torch.ones(3, 2), torch.zeros(3, 2, dtype=torch.long))
    assert used[0] in ("_grouped", "_loop") and used[1] == "small_dense"
