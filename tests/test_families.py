"""The tower-family contract, run over every registered family (NemotronH, Llama, Qwen2, Mistral, and any family
registered later, which needs only a tiny config builder in conftest.FAMILY_CONFIGS):

* prefill + extends (1 token and blocks) == the full forward; left-padded rows == rows alone;
* the all-blocks training forward == per-block inference; its logits (all, or at a mask) == the full forward;
* every decoder in twotower.decoding runs, rows do not depend on their batch, and Speculative ==
  Autoregressive; the two-device mirror gives the same tokens;
* save_pretrained / from_pretrained round trip, with either time conditioning (by class_path);
* exact against transformers: a random `<Family>ForCausalLM` written by its own save_pretrained and
  read by `ContextTowerBase.from_pretrained` gives its logits (full, prefill + extends), greedy AR
  equals its `generate`, and speculative decoding through `TwoTowerLM` equals AR;
* the layout: nothing under twotower/towers imports the model, and families import no sibling
  (the Llama-like ones build on Llama).
"""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from conftest import (FAMILY_CONFIGS, MASK, PAD, left_pad, make_family_towers, random_prompts, randomize_,
                      randomize_time_, run_decoder)
from test_decoders import all_decoders

from twotower.caches import Cache
from twotower.decoding import Autoregressive, Speculative
from twotower.model import TwoTowerLM
from twotower.time_embedding import NoTimeConditioning, TimeConditioning
from twotower.towers.base import ContextTowerBase, DenoiserTowerBase, family_for, registered_families

TOL = dict(rtol=1e-5, atol=1e-5)


def assert_close(a, b, tol=1e-5):
    """Max abs error within tol relative to the logits' scale (float32 sums in another order)."""
    scale = max(1.0, float(b.abs().max()))
    err = float((a - b).abs().max())
    assert err <= tol * scale, f"max abs error {err:.3g} at scale {scale:.3g}"
FAMILIES = sorted(registered_families())


def test_every_registered_family_has_a_test_config():
    missing = set(FAMILIES) - set(FAMILY_CONFIGS)
    assert not missing, f"add a tiny config builder for {sorted(missing)} to tests/conftest.py FAMILY_CONFIGS"
    assert {"nemotron_h", "llama", "qwen2", "mistral"} <= set(FAMILIES)


@pytest.fixture(params=FAMILIES)
def family(request):
    return request.param


@pytest.fixture
def pair(family):
    return make_family_towers(family, seed=5)


def test_towers_implement_the_interfaces(pair):
    ctx, den = pair
    assert isinstance(ctx, ContextTowerBase) and isinstance(den, DenoiserTowerBase)
    assert isinstance(den.time, TimeConditioning)
    assert isinstance(ctx.empty_cache(2), Cache)


def test_prefill_and_extends_equal_the_full_forward(pair):
    ctx, _ = pair
    ids = torch.randint(4, 64, (2, 19))
    with torch.inference_mode():
        full = ctx(ids)
        got, cache = ctx.prefill(ids[:, :6], capacity=8)
        parts = [got] + [ctx.extend(cache, ids[:, lo:hi]) for lo, hi in ((6, 7), (7, 13), (13, 14), (14, 19))]
        torch.testing.assert_close(torch.cat(parts, 1), full, **TOL)
        # left padding: each row as if alone
        prompts = random_prompts([3, 8, 5], seed=1)
        pids, mask = left_pad(prompts)
        logits, _ = ctx.prefill(pids, mask)
        for r, p in enumerate(prompts):
            torch.testing.assert_close(logits[r, -len(p):], ctx(p[None])[0], **TOL)


def test_cache_contract_concat_select_mirror(pair):
    """Every family's cache: caches of other batches join (`concat`, shorter ones left-padded) and
    split (`select`) without changing any row; a mirror and a clone read the same; `nbytes` counts."""
    ctx, den = pair
    a, b = torch.randint(4, 64, (1, 5)), torch.randint(4, 64, (2, 8))
    nxt, block, t = torch.randint(4, 64, (3, 3)), torch.full((3, 4), MASK), torch.tensor([0.2, 0.5, 0.9])
    with torch.inference_mode():
        _, ca = ctx.prefill(a)
        _, cb = ctx.prefill(b)
        joined = type(ca).concat([ca, cb])
        assert isinstance(joined, type(ca)) and joined.batch_size == 3 and joined.nbytes() > 0
        den_joined = den.forward_block(block, joined, t)
        assert_close(den.forward_block(block, joined.mirror_to("cpu"), t), den_joined)
        assert_close(den_joined[1:], den.forward_block(block[1:], cb, t[1:]))
        assert_close(den_joined[:1], den.forward_block(block[:1], ca, t[:1]))
        got = ctx.extend(joined.clone(), nxt)
        assert_close(got[:1], ctx.extend(ca.clone(), nxt[:1]))
        assert_close(got[1:], ctx.extend(cb.clone(), nxt[1:]))
        picked = joined.select(torch.tensor([2, 0]))
        assert_close(ctx.extend(picked, nxt[[2, 0]]), got[[2, 0]])


def test_training_forward_equals_per_block_inference(pair):
    ctx, den = pair
    S, nB = 4, 3
    x = torch.randint(4, 64, (2, S * nB))
    noisy = torch.where(torch.rand(x.shape) < 0.5, torch.full_like(x, MASK), x)
    t = torch.rand(2, nB)
    with torch.inference_mode():
        _, states = ctx.forward_train(x, S)
        logits = den.forward_train(noisy, states, t)
        for k in range(nB):
            cache = ctx.empty_cache(2) if k == 0 else ctx.prefill(x[:, : k * S])[1]
            assert_close(logits[:, k * S: (k + 1) * S], den.forward_block(noisy[:, k * S: (k + 1) * S], cache, t[:, k]))


def test_training_forward_logits_at_a_mask_are_the_full_forwards_there(pair):
    ctx, _ = pair
    S = 4
    x = torch.randint(4, 64, (2, 3 * S))
    where = torch.rand(x.shape, generator=torch.Generator().manual_seed(0)) < 0.4
    with torch.inference_mode():
        full = ctx(x)
        every, _ = ctx.forward_train(x, S, return_logits=True)
        picked, _ = ctx.forward_train(x, S, return_logits=where)
        assert ctx.forward_train(x, S)[0] is None
    assert picked.shape == (int(where.sum()), full.shape[-1])
    assert_close(every, full)
    assert_close(picked, full[where])
    with pytest.raises(ValueError, match="bool mask"):
        ctx.forward_train(x, S, return_logits=where[:, :-1])


def never_predict_mask_(*towers) -> None:
    """Zero the [MASK] row of every head: its logit is then 0, below the best of 63 random logits.
    A random AR model may rank [MASK] first (and the AR-exact decoders then rightly emit it); a
    trained one never does, and the no-[MASK] check below is about the decoders, not the model."""
    with torch.no_grad():
        for tower in towers:
            tower.lm_head.weight[MASK] = 0


@pytest.mark.parametrize("cls", all_decoders(), ids=lambda c: c.__name__)
def test_every_decoder_runs_and_rows_are_independent(family, cls):
    ctx, den = make_family_towers(family, seed=6)
    never_predict_mask_(ctx, den)
    prompts = random_prompts([4, 1, 6], seed=2)
    ids, mask = left_pad(prompts)
    with torch.inference_mode():
        out = run_decoder(cls(), ctx, den, ids, mask, max_new_tokens=9)
        assert out.new_tokens.shape == (3, 9) and not torch.any(out.new_tokens == MASK)
        for r, p in enumerate(prompts):
            alone = run_decoder(cls(), ctx, den, p[None], max_new_tokens=9)
            assert torch.equal(alone.new_tokens[0], out.new_tokens[r]), f"{cls.__name__} row {r}"


@pytest.mark.parametrize("mirror", [False, True])
def test_speculative_equals_autoregressive(family, mirror):
    ctx, den = make_family_towers(family, seed=7)
    ids, mask = left_pad(random_prompts([2, 9, 5, 4], seed=3))
    with torch.inference_mode():
        ar = run_decoder(Autoregressive(), ctx, None, ids, mask, max_new_tokens=17)
        spec = run_decoder(Speculative(block_size=5), ctx, den, ids, mask, max_new_tokens=17,
                           denoiser_device="cpu" if mirror else None)
    assert torch.equal(spec.sequences, ar.sequences)


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


# ---- exact against transformers: every family, read from its own transformers checkpoint ---------


@pytest.fixture
def hf_pair(family, tmp_path):
    """(transformers model, its checkpoint folder, our context tower read from it): a random
    `<Family>ForCausalLM` of the family's tiny config, written by its own save_pretrained."""
    hf_class = getattr(transformers, family_for(family).hf_architecture)
    hf = randomize_(hf_class(FAMILY_CONFIGS[family]()), seed=11).eval()
    hf.save_pretrained(tmp_path / "ar")
    return hf, tmp_path / "ar", ContextTowerBase.from_pretrained(tmp_path / "ar").eval()


def test_context_logits_equal_transformers(hf_pair):
    hf, _, ctx = hf_pair
    ids = torch.randint(4, 64, (2, 30))
    with torch.inference_mode():
        want = hf(ids).logits.float()
        assert_close(ctx(ids), want)
        got, cache = ctx.prefill(ids[:, :9], capacity=10)  # the cache has to grow on the way
        parts = [got] + [ctx.extend(cache, ids[:, lo:hi]) for lo, hi in ((9, 16), (16, 17), (17, 30))]
        assert_close(torch.cat(parts, 1), want)


def test_greedy_autoregressive_equals_transformers_generate(hf_pair):
    hf, _, ctx = hf_pair
    hf.generation_config.eos_token_id = None
    prompt = torch.randint(4, 64, (1, 7))
    with torch.inference_mode():
        want = hf.generate(prompt, max_new_tokens=12, do_sample=False, pad_token_id=PAD)
        got = run_decoder(Autoregressive(), ctx, None, prompt, max_new_tokens=12)
    assert torch.equal(got.sequences, want)


def test_speculative_equals_autoregressive_through_the_model(hf_pair):
    _, path, _ = hf_pair
    model = TwoTowerLM.from_backbone(path, block_size=4, mask_token_id=MASK).eval()
    randomize_time_(model.denoiser, 12)
    ids, mask = left_pad(random_prompts([3, 8, 5], seed=4))
    with torch.inference_mode():
        ar = model.generate(ids, mask, decoder=Autoregressive(), max_new_tokens=14)
        spec = model.generate(ids, mask, decoder=Speculative(block_size=4), max_new_tokens=14)
    assert torch.equal(spec.sequences, ar.sequences)


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
