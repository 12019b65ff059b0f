"""bench: the smoke benchmark end to end (files, JSON contents, reference invariants), and the quality
metrics, prompt windows, mode parsing and README update on hand-built inputs."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import randomize_, tiny_config

from twotower import bench
from twotower.towers.context import ContextTower

# ---- the smoke run ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    assert bench.main(["--smoke", "--out", str(out), "--threads", "1"]) == 0
    return out, json.loads((out / "bench.json").read_text())


def test_smoke_writes_the_three_files(smoke):
    out, _ = smoke
    assert (out / "tradeoff.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (out / "bench.md").read_text()
    assert "EOS is ignored" in md and "Lower is better" in md
    for section in ("## Generation", "## Training speed", "## Where the time goes"):
        assert section in md


def test_smoke_json_has_every_mode_and_batch_size_with_sane_numbers(smoke):
    _, res = smoke
    runs = {(r["mode"], r["batch_size"]): r for r in res["runs"]}
    expected = {(m.name, b) for m in bench.SMOKE_MODES for b in (1, 2)}
    assert set(runs) == expected
    for key, r in runs.items():
        assert math.isfinite(r["tokens_per_s"]) and r["tokens_per_s"] > 0, key
        assert len(r["seconds_per_repeat"]) == res["settings"]["repeats"], key
        assert 0.0 <= r["quality"]["agreement"] <= 1.0, key
        assert all(0.0 <= a <= 1.0 for a in r["quality"]["agreement_per_prompt"]), key
        assert math.isfinite(r["quality"]["nll"]) and r["quality"]["nll"] > 0, key
        assert 0.0 < r["quality"]["distinct_4"] <= 1.0, key
        assert r["generated_tokens_per_repeat"] == len(res["prompts"]) * res["settings"]["max_new_tokens"], key
        assert r["param_bytes"] > 0 and r["cache_bytes"] > 0, key
        assert r["deterministic_across_repeats"], key
    for b in (1, 2):
        ar, mock = runs[("ar", b)], runs[("mock_ar", b)]
        assert ar["retention_agreement"] == 1.0 and ar["retention_nll"] == 1.0
        assert ar["speedup_vs_ar"] == 1.0 and ar["quality"]["match_ar"] == 1.0
        assert ar["tokens_per_nfe"] == 1.0 and mock["tokens_per_nfe"] == 1.0
        assert mock["nfe_per_block"] == res["settings"]["block_size_model"]  # one token per step
        # Every denoiser forward commits at least one token per row.
        for name in ("diff_t0.5_b16", "diff_t0.8_b16", "diff_t0.8_b4", "spec_b16"):
            assert runs[(name, b)]["tokens_per_nfe"] >= 1.0
        # Speculative decoding is lossless: the AR tokens exactly, one draft forward per iteration.
        spec = runs[("spec_b16", b)]
        assert spec["quality"]["match_ar"] == 1.0 and spec["retention_nll"] == pytest.approx(1.0)
        assert spec["nfe_per_block"] is None  # tok/NFE is tokens per iteration


def test_markdown_without_the_transformers_baseline_reads_cleanly(smoke):
    """`--modes` without hf_generate: no "n/ax" fragments in the headline lines."""
    import copy

    _, res = smoke
    res = copy.deepcopy(res)
    for r in res["runs"]:
        r["speedup_vs_hf"] = None
    md = bench.render_markdown(res)
    heads = [line for line in md.splitlines() if line.startswith(("- Headline", "- Lossless"))]
    assert heads and all("transformers'" not in h and "n/a" not in h.split("throughput")[0] for h in heads)
    assert all("our AR's throughput at " in h for h in heads)


def test_smoke_training_and_profile_numbers(smoke):
    _, res = smoke
    t = res["training"]
    assert t["denoiser_tokens_per_s"] > 0 and t["ar_tokens_per_s"] > 0
    assert t["ratio"] == pytest.approx(t["denoiser_tokens_per_s"] / t["ar_tokens_per_s"])
    modes = [p["mode"] for p in res["profile"]]
    assert modes == ["diff_t0.8_b16", "spec_b16", "ar"]
    for p in res["profile"]:
        assert sum(r["seconds"] for r in p["phases"].values()) == pytest.approx(p["total_seconds"], rel=1e-6)
    den = res["profile"][0]["phases"]
    assert den["denoiser forward"]["calls"] == den["sampling/commit"]["calls"] > 0
    spec = res["profile"][1]["phases"]
    draft, verify = spec["denoiser forward (draft)"]["calls"], spec["context extend (verify)"]["calls"]
    assert draft == verify == spec["accept (rollback)"]["calls"] > 0  # one of each per iteration


# ---- metrics on hand-built inputs ---------------------------------------------------------------


def test_agreement_counts_equal_positions_over_the_first_n():
    gen = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]])
    truth = torch.tensor([[1, 0, 3, 0], [5, 6, 7, 9]])
    assert bench.agreement(gen, truth).tolist() == [0.5, 0.75]
    assert bench.agreement(gen, truth, first=2).tolist() == [0.5, 1.0]
    assert bench.agreement(gen, truth[:, :1]).tolist() == [1.0, 1.0]  # only the positions both have


def test_distinct_n_by_hand():
    seq = [1, 2, 1, 2, 1]
    assert bench.distinct_n(seq, 1) == 2 / 5
    assert bench.distinct_n(seq, 2) == 2 / 4  # (1,2) (2,1) (1,2) (2,1)
    assert bench.distinct_n(torch.tensor(seq), 4) == 1.0  # (1,2,1,2) (2,1,2,1)
    assert bench.distinct_n([7] * 6, 4) == 1 / 3
    assert math.isnan(bench.distinct_n(seq, 6))


def test_continuation_nll_equals_a_prefix_by_prefix_hand_computation():
    ctx = randomize_(ContextTower(tiny_config()), seed=3).eval()
    g = torch.Generator().manual_seed(0)
    prompts, cont = torch.randint(4, 64, (3, 5), generator=g), torch.randint(4, 64, (3, 4), generator=g)
    got = bench.continuation_nll(ctx, prompts, cont, batch_size=2)  # two chunks
    full = torch.cat([prompts, cont], 1)
    with torch.no_grad():
        for r in range(3):
            nll = [-ctx(full[r: r + 1, : 5 + j])[0, -1].double().log_softmax(-1)[cont[r, j]] for j in range(4)]
            assert got[r].item() == pytest.approx(torch.stack(nll).mean().item(), abs=1e-5)


def test_ratio_is_undefined_for_a_zero_or_missing_reference():
    assert bench.ratio(3.0, 2.0) == 1.5
    assert bench.ratio(0.0, 0.0) is None and bench.ratio(1.0, None) is None and bench.ratio(None, 1.0) is None


# ---- prompts, modes, README ---------------------------------------------------------------------


def test_select_windows_are_seeded_skip_short_documents_and_follow_the_text():
    docs = [list(range(100, 105)), list(range(200, 230)), list(range(300, 340))]
    w = bench.select_windows(docs, 5, prompt_len=8, max_new_tokens=4, bos_id=1, seed=7)
    assert w == bench.select_windows(docs, 5, prompt_len=8, max_new_tokens=4, bos_id=1, seed=7)
    assert {x.doc for x in w} == {1, 2}  # document 0 is too short for 8 + 4 tokens
    for x in w:
        doc = docs[x.doc]
        assert x.ids == [1] + doc[x.offset: x.offset + 8]
        assert x.truth == doc[x.offset + 8: x.offset + 12]
    with pytest.raises(ValueError, match="prompt_len"):
        bench.select_windows(docs, 1, prompt_len=60, max_new_tokens=4, bos_id=1)


def test_parse_modes_accepts_any_threshold_and_block_and_always_runs_ar():
    modes = bench.parse_modes("diff_t0.6_b8,mock_ar", bench.FULL_MODES)
    assert [m.name for m in modes] == ["ar", "diff_t0.6_b8", "mock_ar"]
    assert (modes[1].threshold, modes[1].block) == (0.6, 8)
    spec = bench.parse_modes("spec_b8", bench.FULL_MODES)[1]
    assert (spec.kind, spec.block) == ("speculative", 8)
    assert [m.name for m in bench.parse_modes("mock_ar,ar,mock_ar", bench.FULL_MODES)] == ["ar", "mock_ar"]
    assert bench.parse_modes(None, bench.SMOKE_MODES) == bench.SMOKE_MODES
    with pytest.raises(SystemExit, match="unknown mode"):
        bench.parse_modes("fast", bench.FULL_MODES)
    with pytest.raises(SystemExit, match="unknown mode"):
        bench.parse_modes("spec_bx", bench.FULL_MODES)


def test_update_readme_replaces_between_markers_or_appends_a_results_section(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("# Title\n\nIntro.\n")
    bench.update_readme(readme, "first")
    assert readme.read_text() == f"# Title\n\nIntro.\n\n## Results\n\n{bench.README_START}\nfirst\n{bench.README_END}\n"
    readme.write_text(readme.read_text() + "\n## After\n")
    bench.update_readme(readme, "second\n")
    text = readme.read_text()
    assert "first" not in text and f"{bench.README_START}\nsecond\n{bench.README_END}" in text
    assert text.startswith("# Title\n\nIntro.\n") and text.endswith("## After\n") and text.count("## Results") == 1
