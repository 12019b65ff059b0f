"""Checkpoint IO (twotower.towers.loading): every accepted on-disk layout, the writer, and the
error messages a user sees for broken checkpoints. transformers' NemotronHForCausalLM is the
independent reference for the AR layout."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import hf_backbone_state, make_hf_model, tiny_config
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import NemotronHForCausalLM

from twotower.towers.checkpoints import check_keys, check_shapes, fuse_experts, unfuse_experts
from twotower.towers.loading import (
    load_backbone_state_dict,
    load_two_tower_state_dict,
    read_config,
    read_safetensors,
)
from twotower.towers.saving import save_backbone_hf, save_state_dict

SMALL_SHARD = 20_000  # bytes; the tiny model is ~100 kB in float32, so this gives several shards


@pytest.fixture
def model() -> NemotronHForCausalLM:
    return make_hf_model()


@pytest.fixture
def backbone(model) -> dict[str, torch.Tensor]:
    """The model's weights under backbone names (what the loaders must return)."""
    return hf_backbone_state(model)


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert torch.equal(a[k], b[k]), k


def two_tower_state(backbone: dict[str, torch.Tensor], n_layers: int, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    h = backbone["embeddings.weight"].shape[1]
    state = {}
    for k, v in backbone.items():
        if k == "lm_head.weight":
            state["context_lm_head.weight"] = v.clone()
            state["lm_head.weight"] = v + 1  # distinct from the context head, to catch a mix-up
        else:
            state[f"context_tower.{k}"] = v.clone()
            state[f"denoiser_tower.{k}"] = v * 2
    state["t_embedder.mlp.0.weight"] = torch.randn(h, 256, generator=g)
    state["t_embedder.mlp.0.bias"] = torch.randn(h, generator=g)
    state["t_embedder.mlp.2.weight"] = torch.randn(h, h, generator=g)
    state["t_embedder.mlp.2.bias"] = torch.randn(h, generator=g)
    state["t_block.1.weight"] = torch.randn(3 * h, h, generator=g)
    state["t_block.1.bias"] = torch.randn(3 * h, generator=g)
    for i in range(n_layers):
        state[f"scale_shift_tables.{i}"] = torch.randn(3, h, generator=g)
    return state


# ------------------------------------------------------------------------------------ AR loading


def test_load_transformers_save_pretrained(model, backbone, tmp_path):
    model.save_pretrained(tmp_path)
    # transformers 5 writes the remote-code layout: backbone. prefix and one tensor per expert
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        assert "backbone.layers.3.mixer.experts.0.up_proj.weight" in f.keys()
    config, state = load_backbone_state_dict(tmp_path)
    assert config.layers_block_type == model.config.layers_block_type
    assert state["layers.3.mixer.experts.up_proj"].shape == (4, 24, 32)
    assert state["layers.3.mixer.experts.down_proj"].shape == (4, 32, 24)
    assert_same(state, backbone)


def test_load_sharded_per_expert_backbone_prefix(model, backbone, tmp_path):
    on_disk = {k if k == "lm_head.weight" else f"backbone.{k}": v for k, v in backbone.items()}
    save_state_dict(on_disk, tmp_path, config=model.config, max_shard_size=SMALL_SHARD, expert_layout="per_expert")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 1 and not (tmp_path / "model.safetensors").exists()
    assert all((tmp_path / s).is_file() for s in shards)
    assert "backbone.layers.6.mixer.experts.3.down_proj.weight" in index["weight_map"]
    assert not any(k.endswith("experts.up_proj") for k in index["weight_map"])
    _, state = load_backbone_state_dict(tmp_path)
    assert_same(state, backbone)


def test_load_model_prefix_fused_ignores_mtp(model, backbone, tmp_path):
    on_disk = {k if k == "lm_head.weight" else f"model.{k}": v for k, v in backbone.items()}
    on_disk["mtp.layers.0.norm.weight"] = torch.ones(32)
    on_disk["mtp.layers.0.mixer.experts.0.up_proj.weight"] = torch.ones(24, 32)
    save_state_dict(on_disk, tmp_path, config=model.config)
    _, state = load_backbone_state_dict(tmp_path)
    assert_same(state, backbone)


def test_tied_head_uses_embedding(backbone, tmp_path):
    config = tiny_config(tie_word_embeddings=True)
    on_disk = {f"backbone.{k}": v for k, v in backbone.items() if k != "lm_head.weight"}
    save_state_dict(on_disk, tmp_path, config=config)
    _, state = load_backbone_state_dict(tmp_path)
    assert torch.equal(state["lm_head.weight"], backbone["embeddings.weight"])

    untied = tmp_path / "untied"
    save_state_dict(on_disk, untied, config=tiny_config())
    with pytest.raises(KeyError, match="lm_head.weight"):
        load_backbone_state_dict(untied)


def test_bf16_save_and_dtype_on_load(model, backbone, tmp_path):
    save_state_dict(backbone, tmp_path, config=model.config, dtype=torch.bfloat16)
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "bfloat16"
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        assert f.get_tensor("layers.3.mixer.gate.weight").dtype == torch.float32
        assert f.get_tensor("layers.3.mixer.gate.e_score_correction_bias").dtype == torch.float32
        assert f.get_tensor("layers.0.mixer.in_proj.weight").dtype == torch.bfloat16

    _, as_stored = load_backbone_state_dict(tmp_path)
    _, as_fp32 = load_backbone_state_dict(tmp_path, dtype=torch.float32)
    for k, v in backbone.items():
        keep32 = k.endswith(("e_score_correction_bias", "mixer.gate.weight"))
        expected = v if keep32 else v.to(torch.bfloat16)
        assert torch.equal(as_stored[k], expected), k
        assert as_fp32[k].dtype == torch.float32 and torch.equal(as_fp32[k], expected.float()), k

    fp32_dir = tmp_path / "fp32"
    save_state_dict(backbone, fp32_dir, config=model.config)
    _, cast = load_backbone_state_dict(fp32_dir, dtype="bfloat16")
    assert cast["layers.6.mixer.gate.weight"].dtype == torch.float32
    assert torch.equal(cast["layers.6.mixer.gate.weight"], backbone["layers.6.mixer.gate.weight"])
    assert torch.equal(cast["layers.6.mixer.experts.up_proj"], backbone["layers.6.mixer.experts.up_proj"].bfloat16())
    with pytest.raises(ValueError, match="int8"):
        load_backbone_state_dict(fp32_dir, dtype="int8")


@pytest.mark.parametrize("sharded", [False, True])
def test_save_backbone_hf_loads_in_transformers(model, backbone, tmp_path, sharded):
    save_backbone_hf(backbone, tmp_path, config=model.config, max_shard_size=SMALL_SHARD if sharded else None)
    loaded, info = NemotronHForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    ids = torch.randint(3, 64, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(ids).logits
        got = loaded.eval()(ids).logits
    assert torch.equal(got, expected)
    # and our own reader gives back exactly what was written
    assert_same(load_backbone_state_dict(tmp_path)[1], backbone)


def test_shared_storage_is_saved(model, backbone, tmp_path):
    backbone["lm_head.weight"] = backbone["embeddings.weight"]  # tied: same tensor twice
    save_state_dict(backbone, tmp_path, config=model.config)
    _, state = load_backbone_state_dict(tmp_path)
    assert torch.equal(state["lm_head.weight"], state["embeddings.weight"])


def test_resave_replaces_stale_layout(model, backbone, tmp_path):
    save_state_dict(backbone, tmp_path, config=model.config, max_shard_size=SMALL_SHARD)
    backbone["norm_f.weight"] = backbone["norm_f.weight"] + 1
    save_state_dict(backbone, tmp_path, config=model.config)  # single file now
    assert not (tmp_path / "model.safetensors.index.json").exists()
    assert sorted(p.name for p in tmp_path.glob("*.safetensors")) == ["model.safetensors"]
    assert_same(load_backbone_state_dict(tmp_path)[1], backbone)


def test_layer_count_mismatch(backbone, tmp_path):
    save_state_dict(backbone, tmp_path, config=tiny_config("M*-E"))
    with pytest.raises(ValueError, match="4 layers.*have 7"):
        load_backbone_state_dict(tmp_path)


def test_backbone_loader_refuses_two_tower(model, backbone, tmp_path):
    save_state_dict(two_tower_state(backbone, 7), tmp_path, config=model.config)
    with pytest.raises(ValueError, match="two-tower checkpoint.*load_two_tower_state_dict"):
        load_backbone_state_dict(tmp_path)


# ------------------------------------------------------------------------------------ config / files


def test_read_config_pattern_and_extras(tmp_path):
    raw = json.loads(tiny_config().to_json_string(use_diff=False))
    raw.pop("layers_block_type")
    raw.update(hybrid_override_pattern="M*-E", block_size=16, mask_token_id=3)
    (tmp_path / "config.json").write_text(json.dumps(raw))
    config, got = read_config(tmp_path)
    assert config.layers_block_type == ["linear_attention", "full_attention", "mlp", "moe"]
    assert got["block_size"] == 16 and config.mask_token_id == 3
    assert config.time_step_limit[1] == float("inf")  # {"__float__": "Infinity"} decoded


def test_missing_config(backbone, tmp_path):
    save_file(backbone, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(FileNotFoundError, match="config.json") as e:
        load_backbone_state_dict(tmp_path)
    assert str(tmp_path) in str(e.value)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_config(tmp_path / "nowhere")


def test_bad_config_json(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json is not valid JSON"):
        read_config(tmp_path)
    # The family is never guessed: a file without model_type names the fix.
    for raw in ('{"hidden_size": 8}', '{"hybrid_override_pattern": "M*"}'):
        (tmp_path / "config.json").write_text(raw)
        with pytest.raises(ValueError, match="names no 'model_type'.*add the backbone's transformers model_type"):
            read_config(tmp_path)
    (tmp_path / "config.json").write_text('{"model_type": "nemotron_h", "hidden_size": 8}')
    with pytest.raises(ValueError, match="hybrid_override_pattern"):
        read_config(tmp_path)


@pytest.mark.parametrize("cut", ["half", "tail"])
def test_truncated_safetensors(model, backbone, tmp_path, cut):
    save_state_dict(backbone, tmp_path, config=model.config)
    file = tmp_path / "model.safetensors"
    data = file.read_bytes()
    # "half" cuts into the tensors; "tail" loses only the last bytes of the last tensor
    file.write_bytes(data[: len(data) // 2] if cut == "half" else data[:-4])
    with pytest.raises(ValueError, match="is truncated or not a safetensors file") as e:
        read_safetensors(tmp_path)
    assert str(file) in str(e.value)


def test_garbage_safetensors(tmp_path):
    file = tmp_path / "model.safetensors"
    file.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00this is not json")
    with pytest.raises(ValueError, match=f"truncated or not a safetensors file: {file}"):
        read_safetensors(tmp_path)


def test_missing_shard(model, backbone, tmp_path):
    save_state_dict(backbone, tmp_path, config=model.config, max_shard_size=SMALL_SHARD)
    shard = sorted(tmp_path.glob("model-*-of-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(FileNotFoundError, match=shard.name) as e:
        load_backbone_state_dict(tmp_path)
    assert "model.safetensors.index.json" in str(e.value)


def test_lone_safetensors_file_and_ambiguous_dir(backbone, tmp_path):
    save_file(backbone, str(tmp_path / "weights.safetensors"))
    assert_same(read_safetensors(tmp_path), backbone)
    save_file({"x": torch.ones(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(FileNotFoundError, match="2 \\*.safetensors files.*index"):
        read_safetensors(tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="no weights"):
        read_safetensors(empty)


# ------------------------------------------------------------------------------------ two towers


def test_two_tower_round_trip_sharded_per_expert(model, backbone, tmp_path):
    state = two_tower_state(backbone, n_layers=7)
    save_state_dict(
        state,
        tmp_path,
        config=model.config,
        max_shard_size=SMALL_SHARD,
        expert_layout="per_expert",
        extra_config={"block_size": 16, "mask_token_id": 3},
    )
    weight_map = json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"]
    assert "denoiser_tower.layers.3.mixer.experts.1.up_proj.weight" in weight_map
    assert "context_tower.layers.6.mixer.experts.3.down_proj.weight" in weight_map
    config, raw, loaded = load_two_tower_state_dict(tmp_path)
    assert raw["block_size"] == 16 and raw["mask_token_id"] == 3 and config.block_size == 16
    assert_same(loaded, state)


def test_two_tower_missing_denoiser(model, backbone, tmp_path):
    state = {k: v for k, v in two_tower_state(backbone, 7).items() if not k.startswith("denoiser_tower.")}
    save_state_dict(state, tmp_path, config=model.config)
    with pytest.raises(ValueError, match="no 'denoiser_tower.' keys"):
        load_two_tower_state_dict(tmp_path)


def test_two_tower_missing_time_table(model, backbone, tmp_path):
    state = two_tower_state(backbone, 7)
    del state["scale_shift_tables.6"]
    save_state_dict(state, tmp_path, config=model.config)
    with pytest.raises(KeyError, match="scale_shift_tables.6"):
        load_two_tower_state_dict(tmp_path)


def test_ar_dir_to_two_tower_loader(model, tmp_path):
    model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="AR checkpoint.*from_backbone.*convert"):
        load_two_tower_state_dict(tmp_path)


# ------------------------------------------------------------------------------------ experts


def test_fuse_unfuse_round_trip(backbone):
    per_expert = unfuse_experts(backbone)
    assert "layers.3.mixer.experts.up_proj" not in per_expert
    assert torch.equal(per_expert["layers.3.mixer.experts.2.up_proj.weight"], backbone["layers.3.mixer.experts.up_proj"][2])
    assert per_expert["layers.6.mixer.experts.0.down_proj.weight"].shape == (32, 24)
    assert len(per_expert) == len(backbone) + 2 * 2 * (4 - 1)  # 2 MoE layers x 2 projections x 4 experts
    assert_same(fuse_experts(per_expert), backbone)
    prefixed = fuse_experts({f"denoiser_tower.{k}": v for k, v in per_expert.items()})
    assert torch.equal(prefixed["denoiser_tower.layers.6.mixer.experts.down_proj"], backbone["layers.6.mixer.experts.down_proj"])


def test_fuse_missing_expert_names_layer(model, backbone, tmp_path):
    per_expert = unfuse_experts(backbone)
    del per_expert["layers.6.mixer.experts.1.up_proj.weight"]
    with pytest.raises(ValueError, match=r"layers\.6\.mixer\.experts: up_proj of expert\(s\) \[1\] missing"):
        fuse_experts(per_expert)
    # and through the loader, on a backbone.-prefixed checkpoint
    save_file(
        {f"backbone.{k}" if k != "lm_head.weight" else k: v.contiguous() for k, v in per_expert.items()},
        str(tmp_path / "model.safetensors"),
    )
    model.config.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"layers\.6\.mixer\.experts"):
        load_backbone_state_dict(tmp_path)


def test_fuse_refuses_both_layouts(backbone):
    mixed = dict(backbone)
    mixed["layers.3.mixer.experts.0.up_proj.weight"] = backbone["layers.3.mixer.experts.up_proj"][0]
    with pytest.raises(ValueError, match="both per-expert"):
        fuse_experts(mixed)


# ------------------------------------------------------------------------------------ validation


def test_check_keys_message(backbone):
    check_keys(backbone, backbone.keys(), where="ckpt/ok")  # exact match: no error
    state = dict(backbone)
    del state["norm_f.weight"]
    state.update({f"extra.{i:02d}": torch.zeros(1) for i in range(12)})
    with pytest.raises(KeyError) as e:
        check_keys(state, backbone.keys(), where="/ckpt/dir")
    msg = str(e.value)
    assert "/ckpt/dir" in msg
    assert "1 missing key(s): norm_f.weight" in msg
    assert "12 unexpected key(s): extra.00" in msg and "extra.09" in msg and "(+2 more)" in msg
    assert "extra.11" not in msg
    assert isinstance(e.value, ValueError)  # callers may catch either type


def test_check_shapes_message(backbone):
    check_shapes(backbone, backbone, where="x")
    state = dict(backbone)
    state["layers.0.mixer.in_proj.weight"] = torch.zeros(99, 32)
    state["embeddings.weight"] = torch.zeros(65, 32)
    with pytest.raises(ValueError) as e:
        check_shapes(state, backbone, where="/ckpt/dir")
    msg = str(e.value)
    assert "/ckpt/dir" in msg and "2 shape mismatch" in msg
    assert "layers.0.mixer.in_proj.weight: checkpoint (99, 32) vs model (100, 32)" in msg
    assert "embeddings.weight: checkpoint (65, 32) vs model (64, 32)" in msg
