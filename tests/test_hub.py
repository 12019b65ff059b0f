"""Built-in model names and shipped recipes (`twotower.hub`): "embedded" / "embedded-backbone" load from
any working directory everywhere a model folder is taken, other code can register names, unknown names
list the known ones, and `--config` takes a shipped recipe by name."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from twotower import hub
from twotower.model import TwoTowerLM

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT / "twotower" / "assets"


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_builtin_names_load_from_any_directory(tmp_path, monkeypatch):
    from twotower.towers.base import ContextTowerBase

    monkeypatch.chdir(tmp_path)  # nowhere near the repository
    assert hub.resolve_model("embedded") == ASSETS / "twotower"
    assert hub.resolve_model("embedded-backbone") == ASSETS / "backbone"
    model = TwoTowerLM.from_pretrained("embedded")
    assert same_weights(model, TwoTowerLM.from_pretrained(ASSETS / "twotower"))
    ctx = ContextTowerBase.from_pretrained("embedded-backbone")
    assert same_weights(ctx, model.context)  # the shipped model's frozen tower is the shipped backbone
    fresh = TwoTowerLM.from_backbone("embedded-backbone")
    assert same_weights(fresh.context, ctx) and fresh.tokenizer is not None


def test_recipes_and_training_take_names(tmp_path, monkeypatch):
    from twotower.data import DistilledDataModule
    from twotower.inference import GenerationModule
    from twotower.training import DenoiserFineTuning

    monkeypatch.chdir(tmp_path)
    gm = GenerationModule("embedded", max_new_tokens=4)
    assert gm.model_dir == str((ASSETS / "twotower").resolve())
    DenoiserFineTuning("embedded-backbone", init_from="embedded", shifted=True)
    assert DistilledDataModule("embedded-backbone").backbone == ASSETS / "backbone"
    # every shipped recipe names the shipped models by name (backbone.yaml writes to assets/, which stays)
    for recipe in sorted((ROOT / "recipes").glob("*.yaml")):
        lines = [ln for ln in recipe.read_text().splitlines() if "twotower/assets" in ln.split("#")[0]]
        assert all(ln.strip().startswith("save_dir:") for ln in lines), (recipe.name, lines)


def test_export_takes_a_backbone_name(tmp_path):
    """A fine-tuning checkpoint whose backbone moved: `export --backbone embedded-backbone` rebuilds the
    pair; without a recorded training tokenizer the backbone's own (byte) is written."""
    from twotower.cli import export
    from twotower.tokenizers import ByteTokenizer, find_tokenizer
    from twotower.towers.checkpoints import CKPT_META_KEY, training_checkpoint

    model = TwoTowerLM.from_pretrained("embedded")
    state = {f"denoiser.{k}": v for k, v in model.denoiser.state_dict().items()}
    state, meta = training_checkpoint(state, context_source=tmp_path / "moved", block_size=model.block_size,
                                      mask_token_id=model.mask_token_id, shifted=model.shifted,
                                      time_conditioning=model.denoiser.time.spec())
    torch.save({"state_dict": state, CKPT_META_KEY: meta}, tmp_path / "run.ckpt")
    with pytest.raises(FileNotFoundError, match="pass --backbone"):
        export(str(tmp_path / "run.ckpt"), str(tmp_path / "out"))
    export(str(tmp_path / "run.ckpt"), str(tmp_path / "out"), backbone="embedded-backbone")
    assert same_weights(TwoTowerLM.from_pretrained(tmp_path / "out"), model)
    assert isinstance(find_tokenizer(tmp_path / "out"), ByteTokenizer)


def test_registered_names_and_errors(tmp_path, monkeypatch):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    calls = []

    def resolver():
        calls.append(1)
        return folder

    monkeypatch.setattr(hub, "_MODELS", dict(hub._MODELS))  # registrations end with the test
    hub.register_model("my-model", resolver)
    assert hub.resolve_model("my-model") == folder and calls == [1]
    assert "my-model" in hub.known_models()
    with pytest.raises(ValueError, match="already registered; pass replace=True"):
        hub.register_model("my-model", resolver)
    hub.register_model("broken", lambda: tmp_path / "nothing-here")
    with pytest.raises(FileNotFoundError, match="built-in model 'broken' resolved to .* no config.json"):
        hub.resolve_model("broken")
    with pytest.raises(FileNotFoundError, match="two-tower checkpoint not found: 'no-such-model' does not exist and "
                                                "is not a built-in model name; known names: .*embedded, "
                                                "embedded-backbone.*my-model"):
        TwoTowerLM.from_pretrained("no-such-model")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "embedded").mkdir()  # a local folder wins over a name, as in transformers
    assert hub.resolve_model("embedded") == Path("embedded")


def test_config_takes_a_shipped_recipe_by_name(tmp_path, monkeypatch):
    from twotower.cli import resolve_configs

    monkeypatch.chdir(tmp_path)
    shipped = hub.RECIPES_DIR / "generate.yaml"
    assert shipped.read_text() == (ROOT / "recipes" / "generate.yaml").read_text()
    for name in ("generate", "generate.yaml", "recipes/generate.yaml"):
        assert hub.resolve_recipe(name) == shipped
    assert resolve_configs(["predict", "--config", "generate", "--config=serve", "--x", "1"]) == [
        "predict", "--config", str(shipped), f"--config={hub.RECIPES_DIR / 'serve.yaml'}", "--x", "1"]
    assert resolve_configs(["fit", "--config", "{trainer: {}}"]) == ["fit", "--config", "{trainer: {}}"]  # inline YAML
    (tmp_path / "generate.yaml").write_text("x: 1")
    assert resolve_configs(["predict", "--config", "generate.yaml"])[2] == "generate.yaml"  # a local file wins
    with pytest.raises(FileNotFoundError, match="recipe 'nope' does not exist.*shipped: .*generate.yaml"):
        hub.resolve_recipe("nope")


def test_an_adapter_records_a_builtin_backbone_name_and_its_tokenizer(tmp_path, monkeypatch):
    """A LoRA model over a backbone given by name references the name (portable across installs) and
    writes the tokenizer it is given, as save_pretrained does for full models."""
    import json

    from conftest import save_tiny_llama

    from twotower.tokenizers import ByteTokenizer
    from twotower.towers.adapters import LoRA

    save_tiny_llama(tmp_path / "llama", seed=3, vocab_size=260)  # a bare transformers folder, no tokenizer
    monkeypatch.setattr(hub, "_MODELS", dict(hub._MODELS))
    hub.register_model("tiny-llama", lambda: tmp_path / "llama")
    model = TwoTowerLM.from_backbone("tiny-llama", denoiser=LoRA(rank=2))
    model.save_pretrained(tmp_path / "adapter", tokenizer=ByteTokenizer(260))
    raw = json.loads((tmp_path / "adapter" / "config.json").read_text())
    assert raw["backbone"] == "tiny-llama" and raw["tokenizer"] == "byte"
    back = TwoTowerLM.from_pretrained(tmp_path / "adapter")
    assert isinstance(back.tokenizer, ByteTokenizer) and same_weights(back, model)
