"""TwoTowerLM: construction from an AR backbone, the released checkpoint layout (save / load,
sharded and per-expert), and device placement (generation itself: test_decoders.py)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import left_pad, make_context, make_model, random_prompts, save_backbone, tiny_config

from twotower.model import TwoTowerLM
from twotower.towers.loading import read_safetensors
from twotower.towers.saving import save_state_dict


@pytest.fixture(scope="module")
def model() -> TwoTowerLM:
    return make_model()


def assert_same_weights(a: TwoTowerLM, b: TwoTowerLM) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype, k
        assert torch.equal(sa[k], sb[k]), k


# ---- construction -------------------------------------------------------------------------------


def test_from_backbone_copies_the_ar_model_with_identity_time_conditioning():
    ctx = make_context("ME-MEM", seed=1)
    model = TwoTowerLM.from_backbone(ctx)
    assert model.context is ctx and model.block_size == 16 and model.mask_token_id == 3
    assert not any(p.requires_grad for p in model.context.parameters())
    assert all(p.requires_grad for p in model.denoiser.parameters())
    ids = torch.randint(4, 64, (2, 13))
    with torch.no_grad():
        _, cache = ctx.prefill(ids[:, :5])
        # Identity init: the denoiser's layers are the AR layers whatever t is; without attention
        # (the only in-block bidirectional mixer) the block's logits are then the AR logits.
        den = model.denoiser.forward_block(ids[:, 5:], cache, torch.tensor([0.3, 0.9]))
        full = ctx(ids)
    assert torch.allclose(den, full[:, 5:], atol=1e-5)


def test_from_backbone_loads_an_ar_checkpoint_directory(tmp_path):
    ctx = make_context(seed=2)
    save_backbone(ctx, tmp_path)
    model = TwoTowerLM.from_backbone(tmp_path, block_size=4, mask_token_id=5)
    assert (model.block_size, model.mask_token_id) == (4, 5)
    for k, v in ctx.state_dict().items():
        assert torch.equal(model.context.state_dict()[k], v), k
        assert torch.equal(model.denoiser.state_dict()[k], v), k


def test_from_backbone_in_bfloat16_keeps_routers_float32():
    model = TwoTowerLM.from_backbone(make_context(seed=3), dtype=torch.bfloat16)
    for tower in (model.context, model.denoiser):
        assert tower.backbone.embeddings.weight.dtype == torch.bfloat16
        for blk in tower.backbone.layers:
            if blk.block_type == "moe":
                assert blk.mixer.gate.weight.dtype == torch.float32
    for c, d in zip(model.context.backbone.layers, model.denoiser.backbone.layers):
        if c.block_type == "moe":
            assert torch.equal(c.mixer.gate.weight, d.mixer.gate.weight)


def test_constructor_validates_its_arguments():
    cfg = tiny_config()
    with pytest.raises(ValueError, match="block_size must be an int >= 1, got 0"):
        TwoTowerLM(cfg, block_size=0)
    with pytest.raises(ValueError, match=r"mask_token_id must be a token id in \[0, 64\), got 64"):
        TwoTowerLM(cfg, mask_token_id=64)
    with pytest.raises(ValueError, match="time-conditioning init"):
        TwoTowerLM(cfg, time_init="zeros")


# ---- released layout ----------------------------------------------------------------------------


def test_released_names_follow_the_released_layout(model):
    names = model.released_state_dict().keys()
    n_layers = model.config.num_hidden_layers
    assert {"context_lm_head.weight", "lm_head.weight", "context_tower.embeddings.weight",
            "denoiser_tower.norm_f.weight", "t_embedder.mlp.0.weight", "t_embedder.mlp.2.bias",
            "t_block.1.weight", "t_block.1.bias"} <= set(names)
    assert {f"scale_shift_tables.{i}" for i in range(n_layers)} <= set(names)
    assert "denoiser_tower.layers.3.mixer.experts.up_proj" in names  # fused experts in memory
    assert all(k.startswith(("context_tower.", "denoiser_tower.", "t_embedder.", "t_block.", "scale_shift_tables."))
               or k in ("context_lm_head.weight", "lm_head.weight") for k in names)


def test_load_released_state_dict_checks_keys_and_shapes(model):
    fresh = TwoTowerLM(model.config, block_size=8)
    state = model.released_state_dict()
    fresh.load_released_state_dict(state)
    assert_same_weights(fresh, model)
    missing = {k: v for k, v in state.items() if k != "t_block.1.weight"}
    with pytest.raises(ValueError, match="my.ckpt.*missing key.*t_block.1.weight"):
        fresh.load_released_state_dict(missing, where="my.ckpt")
    extra = dict(state, **{"denoiser_tower.bogus": torch.zeros(1)})
    with pytest.raises(ValueError, match="unexpected key.*denoiser_tower.bogus"):
        fresh.load_released_state_dict(extra)
    bad = dict(state, **{"scale_shift_tables.0": torch.zeros(2, 32)})
    with pytest.raises(ValueError, match=r"scale_shift_tables.0: checkpoint \(2, 32\) vs model \(3, 32\)"):
        fresh.load_released_state_dict(bad)


def test_save_then_from_pretrained_generates_the_same(model, tmp_path):
    model.save_pretrained(tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    assert raw["block_size"] == 8 and raw["mask_token_id"] == 3 and raw["architectures"] == ["TwoTowerLM"]
    assert raw["layers_block_type"] == model.config.layers_block_type
    assert set(read_safetensors(tmp_path)) == set(model.released_state_dict())
    loaded = TwoTowerLM.from_pretrained(tmp_path)
    assert (loaded.block_size, loaded.mask_token_id) == (8, 3)
    assert_same_weights(loaded, model)
    assert not any(p.is_meta for p in loaded.parameters()) and not any(b.is_meta for b in loaded.buffers())
    assert not any(p.requires_grad for p in loaded.context.parameters())
    assert all(p.requires_grad for p in loaded.denoiser.parameters())
    ids, mask = left_pad(random_prompts([4, 7]))
    for method in ("generate", "generate_ar"):
        a = getattr(model, method)(ids, attention_mask=mask, max_new_tokens=12)
        b = getattr(loaded, method)(ids, attention_mask=mask, max_new_tokens=12)
        a, b = (a.sequences, b.sequences) if method == "generate" else (a, b)
        assert torch.equal(a, b), method


def test_from_pretrained_reads_a_sharded_per_expert_directory(model, tmp_path):
    save_state_dict(model.released_state_dict(), tmp_path, config=model.config, expert_layout="per_expert",
                    max_shard_size=20_000, extra_config={"block_size": 4, "mask_token_id": 7})
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    assert "context_tower.layers.3.mixer.experts.0.up_proj.weight" in index["weight_map"]
    loaded = TwoTowerLM.from_pretrained(tmp_path, device="cpu")
    assert (loaded.block_size, loaded.mask_token_id) == (4, 7)
    assert_same_weights(loaded, model)


def test_from_pretrained_defaults_and_dtype(model, tmp_path):
    save_state_dict(model.released_state_dict(), tmp_path, config=model.config)  # no block_size / mask id
    loaded = TwoTowerLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert (loaded.block_size, loaded.mask_token_id) == (16, 3)
    assert loaded.denoiser.lm_head.weight.dtype == torch.bfloat16
    assert loaded.context.backbone.layers[3].mixer.gate.weight.dtype == torch.float32


def test_from_pretrained_without_the_denoiser_tower_names_the_directory(model, tmp_path):
    state = {k: v for k, v in model.released_state_dict().items() if not k.startswith("denoiser_tower.")}
    save_state_dict(state, tmp_path, config=model.config)
    with pytest.raises(ValueError, match=f"{tmp_path}.*no 'denoiser_tower.' keys"):
        TwoTowerLM.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        TwoTowerLM.from_pretrained(tmp_path / "nowhere")


def test_from_pretrained_refuses_an_ar_checkpoint(tmp_path):
    save_backbone(make_context(), tmp_path)
    with pytest.raises(ValueError, match="from_backbone"):
        TwoTowerLM.from_pretrained(tmp_path)


# ---- devices ------------------------------------------------------------------------------------


def test_place_towers_on_devices_on_cpu(model):
    ids, mask = left_pad(random_prompts([3, 8], seed=4))
    before = model.generate(ids, mask, max_new_tokens=10).sequences
    assert model.place_towers_on_devices("cpu", "cpu") is model
    assert model.devices == (torch.device("cpu"), torch.device("cpu"))
    assert model.context_device == model.denoiser_device == torch.device("cpu")
    assert torch.equal(model.generate(ids, mask, max_new_tokens=10).sequences, before)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.gpu
def test_two_devices_equal_one_device():
    model = make_model(seed=5)
    ids, mask = left_pad(random_prompts([3, 8], seed=5))
    ref = model.generate(ids, mask, max_new_tokens=12, eos_token_id=2)
    model.place_towers_on_devices("cpu", "cuda")
    assert model.devices[1].type == "cuda"
    out = model.generate(ids, mask, max_new_tokens=12, eos_token_id=2)
    assert torch.equal(out.sequences, ref.sequences)


def test_the_model_hands_decoders_its_towers_and_nothing_else_passes_as_a_pair():
    """`TwoTowerLM.towers()` is the one place the pair and its decoding facts are assembled;
    `Towers.of` takes a TowerPair, a Towers or a context tower, and names them when refused."""
    from types import SimpleNamespace

    from twotower.decoding import Towers

    model = make_model(block_size=4)
    model.shifted = True
    towers = Towers.of(model)
    assert (towers.context, towers.denoiser) == (model.context, model.denoiser)
    assert (towers.mask_token_id, towers.shifted, towers.block_size) == (model.mask_token_id, True, 4)
    assert Towers.of(towers) is towers
    assert Towers.of(model.context).denoiser is None
    look_alike = SimpleNamespace(context=model.context, denoiser=model.denoiser, mask_token_id=3, block_size=4)
    with pytest.raises(ValueError, match=r"TowerPair.*Towers.*ContextTowerBase, got SimpleNamespace"):
        Towers.of(look_alike)
