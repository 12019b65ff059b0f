"""Every registered family (NemotronH, Llama, Qwen2, Mistral, and any family registered later, which
needs only a tiny config builder in conftest.FAMILY_CONFIGS), beyond the tower-family contract itself.

The contract (prefill + extends == the full forward, left padding, the cache's concat / select /
mirror, the training forward == per-block inference and its logits, speculative == AR on the shared
and the mirrored cache, and exactness against transformers: logits, greedy `generate`, speculative
through `TwoTowerLM`) is `twotower.testing.check_family`, run over every family in
tests/test_testing.py, as a plug-in family's author runs it. Here:

* every decoder in twotower.decoding runs on every family, rows independent of their batch;
* save_pretrained / from_pretrained round trip, with either time conditioning (by class_path);
* a bad `return_logits` mask is refused;
* the layout: nothing under twotower/towers imports the model, and families import no sibling
  (the Llama-like ones build on Llama).
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import FAMILY_CONFIGS, MASK, PAD, left_pad, make_family_towers, random_prompts, run_decoder
from test_decoders import all_decoders

from twotower.decoding import Towers
from twotower.model import TwoTowerLM
from twotower.testing import check_rows_independent, never_predict_mask_
from twotower.time_embedding import NoTimeConditioning
from twotower.towers.base import registered_families

FAMILIES = sorted(registered_families())


def test_every_registered_family_has_a_test_config():
    missing = set(FAMILIES) - set(FAMILY_CONFIGS)
    assert not missing, f"add a tiny config builder for {sorted(missing)} to tests/conftest.py FAMILY_CONFIGS"
    assert {"nemotron_h", "llama", "qwen2", "mistral"} <= set(FAMILIES)


@pytest.fixture(params=FAMILIES)
def family(request):
    return request.param


def test_a_return_logits_mask_of_the_wrong_shape_is_refused():
    ctx, _ = make_family_towers("llama", seed=5)
    x = torch.randint(4, 64, (2, 12))
    with pytest.raises(ValueError, match="bool mask"):
        ctx.forward_train(x, 4, return_logits=torch.ones(2, 11, dtype=torch.bool))


@pytest.mark.parametrize("cls", all_decoders(), ids=lambda c: c.__name__)
def test_every_decoder_runs_and_rows_are_independent(family, cls):
    ctx, den = make_family_towers(family, seed=6)
    never_predict_mask_(ctx, den)
    ids, mask = left_pad(random_prompts([4, 1, 6], seed=2))
    towers = Towers(ctx, den, mask_token_id=MASK, pad_token_id=PAD)
    with torch.inference_mode():
        out = run_decoder(cls(), ctx, den, ids, mask, max_new_tokens=9)
        assert out.new_tokens.shape == (3, 9) and not torch.any(out.new_tokens == MASK)
        check_rows_independent(cls(), towers, ids, mask, out, 9, None)


@pytest.mark.parametrize("time", [None, {"class_path": "twotower.time_embedding.NoTimeConditioning"}])
def test_save_and_load_round_trip(family, time, tmp_path):
    ctx, _ = make_family_towers(family, seed=8)
    model = TwoTowerLM.from_backbone(ctx, block_size=4, time=time).eval()
    model.save_pretrained(tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    assert raw["model_type"] == family
    want = (time or {}).get("class_path", "twotower.time_embedding.AdaLNSingle")
    assert raw["time_conditioning"]["class_path"] == want
    back = TwoTowerLM.from_pretrained(tmp_path).eval()
    assert type(back.context) is type(model.context) and type(back.denoiser.time) is type(model.denoiser.time)
    ids = torch.randint(4, 64, (1, 6))
    with torch.inference_mode():
        a = model.generate(ids, max_new_tokens=8).sequences
        b = back.generate(ids, max_new_tokens=8).sequences
    assert torch.equal(a, b)
    if time is not None:  # time-agnostic: t changes nothing
        assert isinstance(back.denoiser.time, NoTimeConditioning)
        _, cache = back.context.prefill(ids)
        x = torch.full((1, 4), MASK)
        with torch.inference_mode():
            torch.testing.assert_close(back.denoiser.forward_block(x, cache, torch.tensor([0.2])),
                                       back.denoiser.forward_block(x, cache, torch.tensor([0.9])))


# ---- layout: families are siblings, and nothing under towers/ reaches the model -------------------

# A Llama-like family builds on Llama's towers; no other family imports a sibling.
MAY_IMPORT = {"qwen2": {"llama"}, "mistral": {"llama"}}


def imported_modules(file, package: str) -> set[str]:
    """Absolute names of every module `file` imports (module level or inside functions, relative
    imports resolved against `package`), plus string arguments of importlib.import_module calls."""
    import ast

    found = set()
    for node in ast.walk(ast.parse(file.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            found |= {module} | {f"{module}.{a.name}" for a in node.names}
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "import_module" and node.args \
                and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str):
            found.add(node.args[0].value)
    return found


def test_nothing_under_towers_imports_the_model_and_families_are_siblings():
    from pathlib import Path

    import twotower.towers as towers_pkg

    root = Path(towers_pkg.__file__).parent
    for file in root.rglob("*.py"):
        rel = file.relative_to(root)
        package = ".".join(["twotower", "towers", *rel.parts[:-1]])
        mods = imported_modules(file, package)
        for bad in ("twotower.model", "twotower.export"):
            hits = {m for m in mods if m == bad or m.startswith(bad + ".")}
            assert not hits, f"towers/{rel} imports {sorted(hits)}: nothing under towers/ may import the model"
        if len(rel.parts) > 1:  # a family's module
            family = rel.parts[0]
            siblings = {m.split(".")[2] for m in mods if m.startswith("twotower.towers.") and len(m.split(".")) > 3
                        and m.split(".")[2] in FAMILIES} - {family}
            assert siblings <= MAY_IMPORT.get(family, set()), f"towers/{rel} imports the families {sorted(siblings)}"
