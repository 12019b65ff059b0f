"""benchmarks/: the smoke benchmark end to end (files, JSON contents, reference invariants), the run
without matplotlib, and the prompt windows, mode parsing and README update on hand-built inputs.
(The quality measures it reports are tested in test_quality.py.)"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # benchmarks/ is a folder of the repository, not an installed package
    sys.path.insert(0, str(REPO))

from benchmarks import bench, harness, modes, report, workload  # noqa: E402
from benchmarks.phases import profile  # noqa: E402
from twotower import decoding, samplers  # noqa: E402

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
    expected = {(m.name, b) for m in modes.SMOKE_MODES for b in (1, 2)}
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
        # The released mock-AR: one token per denoiser forward and no blocks; with the smoke model's
        # identity-initialised denoiser its greedy output is the AR output.
        assert mock["decoder"].startswith("MockAR(") and mock["nfe_per_block"] is None and mock["block_size"] is None
        assert mock["quality"]["match_ar"] == 1.0
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
    md = report.render_markdown(res)
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
        rest = p["phases"]["sampling/commit + other"]
        assert list(p["phases"])[-1] == "sampling/commit + other" and rest["calls"] is None
        prefill = p["phases"]["prefill"]
        assert prefill["calls"] == len(res["prompts"]) and prefill["ms_per_call"] > 0  # one prompt per call
    den = res["profile"][0]["phases"]
    assert list(den) == ["prefill", "denoiser forward", "context extend", "sampling/commit + other"]
    assert den["denoiser forward"]["calls"] > 0
    spec = res["profile"][1]["phases"]
    draft, verify = spec["denoiser forward (draft)"]["calls"], spec["context extend (verify)"]["calls"]
    assert draft == verify == spec["accept (rollback)"]["calls"] > 0  # one of each per iteration
    ar = res["profile"][2]["phases"]
    # AR: one prefill per prompt, then one extend per further token.
    assert ar["decode forward (extend)"]["calls"] == len(res["prompts"]) * (res["settings"]["max_new_tokens"] - 1)


def test_profile_restores_the_tower_methods(smoke):
    """The profile wraps public methods on the instances only; afterwards nothing is left behind."""
    model, _ = workload.smoke_model(smoke[0] / "tiny")
    before = {k for t in (model.context, model.denoiser) for k in vars(t)}
    ids = torch.tensor([[1, 40, 41, 42]])
    p = profile(model, modes.speculative(4), [(ids, torch.ones_like(ids))], 6, torch.device("cpu"))
    assert p["phases"]["accept (rollback)"]["calls"] > 0
    assert {k for t in (model.context, model.denoiser) for k in vars(t)} == before


def test_plot_from_an_existing_json(smoke, tmp_path):
    out, _ = smoke
    (tmp_path / "bench.json").write_text((out / "bench.json").read_text())
    assert bench.main(["--plot-from", str(tmp_path / "bench.json")]) == 0
    assert (tmp_path / "tradeoff.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_without_matplotlib_the_tables_json_and_readme_are_written_then_it_fails_naming_the_extra(tmp_path):
    """The script as a user runs it, in a fresh interpreter where `import matplotlib` fails."""
    out, readme = tmp_path / "out", tmp_path / "README.md"
    readme.write_text("# Title\n")
    script = REPO / "benchmarks" / "bench.py"
    # Lightning's torchmetrics imports an installed matplotlib by itself (it would not, were matplotlib
    # missing), so it is imported first; from then on every `import matplotlib` fails.
    code = "\n".join([
        "import runpy, sys",
        "import lightning.pytorch",
        "for name in [m for m in sys.modules if m.split('.')[0] == 'matplotlib']:",
        "    del sys.modules[name]",
        "sys.modules['matplotlib'] = None",
        "sys.argv = sys.argv[1:]",
        "runpy.run_path(sys.argv[0], run_name='__main__')",
    ])
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # the script finds its checkout itself
    proc = subprocess.run([sys.executable, "-c", code, str(script), "--smoke", "--modes", "ar", "--no-training",
                           "--no-profile", "--out", str(out), "--update-readme", "--readme",
                           str(readme)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0, proc.stdout
    assert 'pip install -e ".[bench]"' in proc.stderr and "matplotlib" in proc.stderr, proc.stderr
    assert "--plot-from" in proc.stderr
    res = json.loads((out / "bench.json").read_text())
    assert {r["mode"] for r in res["runs"]} == {"ar"}
    assert "## Generation" in (out / "bench.md").read_text()
    assert report.README_START in readme.read_text()
    assert not (out / "tradeoff.png").exists()


# ---- hand-built inputs -------------------------------------------------------------------------


def test_ratio_is_undefined_for_a_zero_or_missing_reference():
    assert harness.ratio(3.0, 2.0) == 1.5
    assert harness.ratio(0.0, 0.0) is None and harness.ratio(1.0, None) is None and harness.ratio(None, 1.0) is None


def test_select_windows_are_seeded_skip_short_documents_and_follow_the_text():
    docs = [list(range(100, 105)), list(range(200, 230)), list(range(300, 340))]
    w = workload.select_windows(docs, 5, prompt_len=8, max_new_tokens=4, bos_id=1, seed=7)
    assert w == workload.select_windows(docs, 5, prompt_len=8, max_new_tokens=4, bos_id=1, seed=7)
    assert {x.doc for x in w} == {1, 2}  # document 0 is too short for 8 + 4 tokens
    for x in w:
        doc = docs[x.doc]
        assert x.ids == [1] + doc[x.offset: x.offset + 8]
        assert x.truth == doc[x.offset + 8: x.offset + 12]
    with pytest.raises(ValueError, match="prompt_len"):
        workload.select_windows(docs, 1, prompt_len=60, max_new_tokens=4, bos_id=1)


def test_parse_modes_accepts_any_threshold_and_block_and_always_runs_ar():
    parsed = modes.parse_modes("diff_t0.6_b8,mock_ar", modes.FULL_MODES)
    assert [m.name for m in parsed] == ["ar", "diff_t0.6_b8", "mock_ar"]
    assert (parsed[1].threshold, parsed[1].block) == (0.6, 8)
    spec = modes.parse_modes("spec_b8", modes.FULL_MODES)[1]
    assert (spec.kind, spec.block) == ("speculative", 8)
    assert [m.name for m in modes.parse_modes("mock_ar,ar,mock_ar", modes.FULL_MODES)] == ["ar", "mock_ar"]
    assert modes.parse_modes(None, modes.SMOKE_MODES) == modes.SMOKE_MODES
    with pytest.raises(SystemExit, match="unknown mode"):
        modes.parse_modes("fast", modes.FULL_MODES)
    with pytest.raises(SystemExit, match="unknown mode"):
        modes.parse_modes("spec_bx", modes.FULL_MODES)
    with pytest.raises(SystemExit, match="spec_b1.*block_size"):  # the decoder's own refusal, passed on
        modes.parse_modes("spec_b1", modes.FULL_MODES)


def test_modes_are_decoder_instances():
    by_name = {m.name: m for m in modes.FULL_MODES}
    assert by_name["hf_generate"].decoder is None and not by_name["hf_generate"].uses_denoiser
    assert isinstance(by_name["ar"].decoder, decoding.Autoregressive) and not by_name["ar"].uses_denoiser
    assert isinstance(by_name["mock_ar"].decoder, decoding.MockAR)  # the released mock-AR, not the sampler
    diff = by_name["diff_t0.8_b16"].decoder
    assert isinstance(diff, decoding.MaskDiffusion) and diff.steps_per_block == diff.block_size == 16
    assert isinstance(diff.sampler, samplers.ConfidenceThreshold) and diff.sampler.threshold == 0.8
    spec = by_name["spec_b16"].decoder
    assert isinstance(spec, decoding.Speculative) and spec.block_size == 16 and spec.draft_steps == 1


def test_the_benchmark_left_the_package():
    from twotower import cli

    assert "bench" not in cli.TOOLS
    assert not (REPO / "twotower" / "bench.py").exists()


def test_update_readme_replaces_between_markers_or_appends_a_results_section(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("# Title\n\nIntro.\n")
    report.update_readme(readme, "first")
    start, end = report.README_START, report.README_END
    assert readme.read_text() == f"# Title\n\nIntro.\n\n## Results\n\n{start}\nfirst\n{end}\n"
    readme.write_text(readme.read_text() + "\n## After\n")
    report.update_readme(readme, "second\n")
    text = readme.read_text()
    assert "first" not in text and f"{start}\nsecond\n{end}" in text
    assert text.startswith("# Title\n\nIntro.\n") and text.endswith("## After\n") and text.count("## Results") == 1
