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

from benchmarks import bench, harness, modes, report, summary, workload  # noqa: E402
from benchmarks.phases import per_iteration, profile, profile_interleaved  # noqa: E402
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


def test_smoke_json_has_every_mode_batch_size_and_seed_with_sane_numbers(smoke):
    _, res = smoke
    assert res["settings"]["seeds"] == [0, 1] and [p["seed"] for p in res["per_seed"]] == [0, 1]
    assert res["per_seed"][0]["prompts"] != res["per_seed"][1]["prompts"]  # each seed draws its own windows
    runs = {(r["mode"], r["batch_size"], r["seed"]): r for r in res["runs"]}
    expected = {(m.name, b, seed) for m in modes.SMOKE_MODES for b in (1, 2) for seed in (0, 1)}
    assert set(runs) == expected and len(res["runs"]) == len(expected)
    n_prompts = len(res["per_seed"][0]["prompts"])
    for key, r in runs.items():
        assert math.isfinite(r["tokens_per_s"]) and r["tokens_per_s"] > 0, key
        assert len(r["seconds_per_repeat"]) == res["settings"]["repeats"], key
        assert 0.0 <= r["quality"]["agreement"] <= 1.0, key
        assert all(0.0 <= a <= 1.0 for a in r["quality"]["agreement_per_prompt"]), key
        assert math.isfinite(r["quality"]["nll"]) and r["quality"]["nll"] > 0, key
        assert 0.0 < r["quality"]["distinct_4"] <= 1.0, key
        assert r["generated_tokens_per_repeat"] == n_prompts * res["settings"]["max_new_tokens"], key
        assert r["param_bytes"] > 0 and r["cache_bytes"] > 0, key
        assert r["deterministic_across_repeats"], key
    for b, seed in ((1, 0), (1, 1), (2, 0), (2, 1)):
        ar, mock = runs[("ar", b, seed)], runs[("mock_ar", b, seed)]
        assert ar["retention_agreement"] == 1.0 and ar["retention_nll"] == 1.0
        assert ar["speedup_vs_ar"] == 1.0 and ar["quality"]["match_ar"] == 1.0
        assert ar["tokens_per_nfe"] == 1.0 and mock["tokens_per_nfe"] == 1.0
        # The released mock-AR: one token per denoiser forward and no blocks; with the smoke model's
        # identity-initialised denoiser its greedy output is the AR output.
        assert mock["decoder"].startswith("MockAR(") and mock["nfe_per_block"] is None and mock["block_size"] is None
        assert mock["quality"]["match_ar"] == 1.0
        # Every denoiser forward commits at least one token per row.
        for name in ("diff_t0.5_b16", "diff_t0.8_b16", "diff_t0.8_b4", "spec_b16"):
            assert runs[(name, b, seed)]["tokens_per_nfe"] >= 1.0
        # Speculative decoding is lossless: the AR tokens exactly, one draft forward per iteration.
        spec = runs[("spec_b16", b, seed)]
        assert spec["quality"]["match_ar"] == 1.0 and spec["retention_nll"] == pytest.approx(1.0)
        assert spec["nfe_per_block"] is None  # tok/NFE is tokens per iteration


def test_markdown_without_the_transformers_baseline_reads_cleanly(smoke):
    """`--modes` without hf_generate: no "n/ax" fragments in the headline lines."""
    import copy

    _, res = smoke
    res = copy.deepcopy(res)
    for r in res["runs"] + res["summary"]:
        r["speedup_vs_hf"] = None
    md = report.render_markdown(res)
    heads = [line for line in md.splitlines() if line.startswith(("- Headline", "- Lossless"))]
    assert heads and all("transformers'" not in h and "n/a" not in h.split("throughput")[0] for h in heads)
    assert all("our AR's throughput at " in h for h in heads)


def test_smoke_summary_is_the_mean_and_spread_of_the_seeds_runs(smoke):
    _, res = smoke
    rows = {(r["mode"], r["batch_size"]): r for r in res["summary"]}
    assert set(rows) == {(m.name, b) for m in modes.SMOKE_MODES for b in (1, 2)}
    for (name, b), row in rows.items():
        per_seed = [r for r in res["runs"] if r["mode"] == name and r["batch_size"] == b]
        assert row["seeds"] == [0, 1]
        for figure, ours in (("speedup_vs_ar", [r["speedup_vs_ar"] for r in per_seed]),
                             ("tokens_per_nfe", [r["tokens_per_nfe"] for r in per_seed]),
                             ("nll", [r["quality"]["nll"] for r in per_seed])):
            assert row[figure]["mean"] == pytest.approx(sum(ours) / 2) and row[figure]["values"] == ours
            assert row[figure]["min"] == min(ours) and row[figure]["max"] == max(ours)
    targets = {t["label"]: t for t in res["targets"]}
    assert targets["speculative output = AR output, batch 1"]["status"] == "met"  # lossless on every seed
    assert targets["speculative x AR, batch 8"]["status"] == "not run"  # the smoke run has batch 1 and 2
    md = (smoke[0] / "bench.md").read_text()
    assert "## Targets (issue 13)" in md and "### Per seed" in md and "mean (min-max over seeds)" in md


def test_smoke_training_and_profile_numbers(smoke):
    _, res = smoke
    t = res["training"]
    assert t["denoiser_tokens_per_s"] > 0 and t["ar_tokens_per_s"] > 0
    assert t["ratio"] == pytest.approx(t["denoiser_tokens_per_s"] / t["ar_tokens_per_s"])
    assert [(p["mode"], p["seed"]) for p in res["profile"]] == [
        (m, seed) for seed in (0, 1) for m in ("diff_t0.8_b16", "spec_b16", "ar")]
    n_prompts, N = len(res["per_seed"][0]["prompts"]), res["settings"]["max_new_tokens"]
    for p in res["profile"]:
        assert sum(r["seconds"] for r in p["phases"].values()) == pytest.approx(p["total_seconds"], rel=1e-6)
        rest = p["phases"]["sampling/commit + other"]
        assert list(p["phases"])[-1] == "sampling/commit + other" and rest["calls"] is None
        prefill = p["phases"]["prefill"]
        assert prefill["calls"] == n_prompts and prefill["ms_per_call"] > 0  # one prompt per call
    den = res["profile"][0]["phases"]
    assert list(den) == ["prefill", "denoiser forward", "context extend", "sampling/commit + other"]
    assert den["denoiser forward"]["calls"] > 0
    spec = res["profile"][1]["phases"]
    draft, verify = spec["denoiser forward (draft)"]["calls"], spec["context extend (verify)"]["calls"]
    assert draft == verify == spec["accept (rollback)"]["calls"] == res["profile"][1]["steps"] > 0  # one per iteration
    ar = res["profile"][2]["phases"]
    # AR: one prefill per prompt, then one extend per further token.
    assert ar["decode forward (extend)"]["calls"] == res["profile"][2]["steps"] == n_prompts * (N - 1)
    # Per iteration: one entry per seed, whose phases add up to the iteration and whose accepted
    # tokens add up to every generated token; the summary's histogram is the seeds' sum.
    its = res["iterations"]["per_seed"]
    assert [it["seed"] for it in its] == [0, 1]
    for it, p in zip(its, [p for p in res["profile"] if p["mode"] == "spec_b16"]):
        assert it["iterations"] == p["steps"] and sum(it["accepted_histogram"]) == p["steps"]
        assert sum((k + 1) * c for k, c in enumerate(it["accepted_histogram"])) == n_prompts * N
        assert sum(it["phases_ms"].values()) == pytest.approx(it["iteration_ms"])
        assert it["iteration_ms"] * it["iterations"] + it["prefill_ms_per_call"] * n_prompts == \
            pytest.approx(1e3 * p["total_seconds"])
    (agg,) = res["iterations"]["summary"]
    assert agg["accepted_histogram"] == [a + b for a, b in zip(*(it["accepted_histogram"] for it in its))]
    assert agg["iterations"] == sum(it["iterations"] for it in its)
    md = (smoke[0] / "bench.md").read_text()
    assert "### `spec_b16` per iteration (batch 1)" in md and "| **iteration** |" in md


def test_profile_restores_the_tower_methods_and_interleaving_counts_what_single_passes_do(smoke):
    """The profile wraps public methods on the instances only; afterwards nothing is left behind.
    Interleaved (prompt by prompt, mode by mode), each mode's calls and accepted counts are those of
    its own pass."""
    model, _ = workload.smoke_model(smoke[0] / "tiny")
    before = {k for t in (model.context, model.denoiser) for k in vars(t)}
    batches = [(torch.tensor([[1, 40 + i, 41, 42]]), torch.ones(1, 4, dtype=torch.long)) for i in range(2)]
    trio = [modes.diffusion(0.8, 4), modes.speculative(4), modes.ar()]
    together = profile_interleaved(model, trio, batches, 6, torch.device("cpu"))
    assert {k for t in (model.context, model.denoiser) for k in vars(t)} == before
    for mode, p in zip(trio, together):
        alone = profile(model, mode, batches, 6, torch.device("cpu"))
        assert {n: r["calls"] for n, r in p["phases"].items()} == {n: r["calls"] for n, r in alone["phases"].items()}
        assert p.get("accepted") == alone.get("accepted") and p["steps"] == alone["steps"] > 0
        assert sum(r["seconds"] for r in p["phases"].values()) == pytest.approx(p["total_seconds"], rel=1e-6)
    assert together[1]["phases"]["accept (rollback)"]["calls"] > 0
    assert {k for t in (model.context, model.denoiser) for k in vars(t)} == before


def test_plot_from_an_existing_json(smoke, tmp_path):
    out, _ = smoke
    (tmp_path / "bench.json").write_text((out / "bench.json").read_text())
    assert bench.main(["--plot-from", str(tmp_path / "bench.json")]) == 0
    assert (tmp_path / "tradeoff.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_from_a_json_written_before_the_seeds(smoke, tmp_path):
    """A bench.json of one seed, as written before --seeds (no seed, no summary), still plots."""
    _, res = smoke
    old = {"settings": res["settings"], "machine": res["machine"],
           "runs": [{k: v for k, v in r.items() if k != "seed"} for r in res["runs"] if r["seed"] == 0]}
    (tmp_path / "bench.json").write_text(json.dumps(old))
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


def test_profile_accept_counts_match_the_decoders_own_iteration_count(smoke):
    """The histogram's source, `keep` read off `ContextTower.accept`, against the decoder's output:
    as many counts as iterations (`GenerationOutput.blocks`), adding up to the tokens generated; and
    on a model whose towers both always choose token 0 (zero heads), every draft is accepted whole,
    so each prompt's iterations keep 4, 4 and then the 2 still missing of N = 10."""
    model, _ = workload.smoke_model(smoke[0] / "tiny2")
    mode, N = modes.speculative(4), 10
    batches = [(torch.tensor([[1, 40 + i, 41, 42, 43 + i]]), torch.ones(1, 5, dtype=torch.long)) for i in range(3)]
    p = profile(model, mode, batches, N, torch.device("cpu"))
    blocks = [mode.decoder.generate(model, ids, mask, max_new_tokens=N, eos_token_id=None).blocks
              for ids, mask in batches]
    assert len(p["accepted"]) == len(p["accepted_raw"]) == p["steps"] == sum(blocks)
    assert sum(p["accepted"]) == 3 * N and all(1 <= k <= 4 for k in p["accepted_raw"])
    with torch.no_grad():
        model.context.lm_head.weight.zero_()
        model.denoiser.lm_head.weight.zero_()
    p = profile(model, mode, batches, N, torch.device("cpu"))
    assert p["accepted"] == [4, 4, 2] * 3 and p["accepted_raw"] == [4, 4, 4] * 3 and p["steps"] == 9
    assert per_iteration(p)["accepted_histogram"] == [0, 3, 0, 6]
    with pytest.raises(ValueError, match="batch 1"):
        profile(model, mode, [(torch.ones(2, 5, dtype=torch.long),) * 2], N, torch.device("cpu"))


def _profile_dict(kind, phases, steps, tokens, calls=2, **extra):
    """A hand-built phases.profile result: phases = {name: (seconds, calls)} + the remainder's seconds."""
    rows = {name: {"seconds": sec, "calls": n} for name, (sec, n) in phases.items()}
    total = sum(r["seconds"] for r in rows.values())
    return {"mode": "m_" + kind, "kind": kind, "block_size": 4, "total_seconds": total, "tokens": tokens,
            "calls": calls, "steps": steps, "phases": rows, **extra}


def test_per_iteration_on_known_numbers():
    spec = _profile_dict("speculative", {"prefill": (0.2, 2), "draft": (0.4, 4), "verify": (0.3, 4),
                                         "accept (rollback)": (0.1, 4), "sampling/commit + other": (0.2, None)},
                         steps=4, tokens=10, accepted=[4, 1, 3, 2], accepted_raw=[4, 1, 4, 2])
    ar = _profile_dict("ar", {"prefill": (0.2, 2), "decode forward (extend)": (0.7, 8),
                              "sampling/commit + other": (0.1, None)}, steps=8, tokens=10)
    it = per_iteration(spec, ar)
    assert it["phases_ms"] == pytest.approx({"draft": 100.0, "verify": 75.0, "accept (rollback)": 25.0,
                                             "sampling/commit + other": 50.0})
    assert it["iteration_ms"] == pytest.approx(250.0) and it["prefill_ms_per_call"] == pytest.approx(100.0)
    assert it["tokens_per_iteration"] == 2.5 and it["verifier_accepted_per_iteration"] == 2.75
    assert it["accepted_histogram"] == [1, 1, 1, 1]
    assert it["ar_step_ms"] == pytest.approx(100.0)  # (1.0 s - 0.2 s prefill) / 8 steps
    assert it["iteration_ar_steps"] == pytest.approx(2.5) and it["implied_speedup"] == pytest.approx(1.0)
    assert per_iteration(spec)["iteration_ar_steps"] is None  # without an AR profile: no AR steps
    with pytest.raises(ValueError, match="speculative profile"):
        per_iteration(ar)
    with pytest.raises(ValueError, match="accept counts"):
        per_iteration(spec | {"accepted": [4, 1, 3]})
    with pytest.raises(ValueError, match="AR profile"):
        per_iteration(spec, spec)
    other = per_iteration(spec | {"accepted": [2, 2, 2, 4], "accepted_raw": [2, 2, 2, 4]}, ar) | {"seed": 1}
    agg = summary.summarize_iterations([it, other])
    assert agg["accepted_histogram"] == [1, 4, 1, 2] and agg["iterations"] == 8
    assert agg["accepted_fraction"] == [0.125, 0.5, 0.125, 0.25]
    assert agg["tokens_per_iteration"]["mean"] == 2.5 and agg["phases_ms"]["draft"]["mean"] == pytest.approx(100.0)


def test_spread_is_mean_min_max_and_sample_std_of_the_finite_values():
    s = summary.spread([1.0, 2.0, None, 6.0, float("nan")])
    assert (s["mean"], s["min"], s["max"], s["n"], s["missing"]) == (3.0, 1.0, 6.0, 3, 2)
    assert s["std"] == pytest.approx(math.sqrt(((1 - 3) ** 2 + (2 - 3) ** 2 + (6 - 3) ** 2) / 2))
    assert summary.spread([5])["std"] == 0.0 and summary.spread([None, None]) is None and summary.spread([]) is None


def _run_dict(mode, b, seed, tps, agreement, nll, match=None):
    return {"mode": mode, "batch_size": b, "seed": seed, "kind": mode, "tokens_per_s": tps, "tokens_per_nfe": 1.0,
            "nfe_per_block": None, "deterministic_across_repeats": True,
            "quality": {"agreement": agreement, "nll": nll, "distinct_2": 1.0, "distinct_4": 1.0, "match_ar": match}}


def test_seed_aggregation_averages_ratios_taken_within_each_seed():
    """Seed 0 ran on a fast machine state, seed 1 on a slow one: the summary's x AR is the mean of
    the per-seed ratios (2.0 and 1.0 -> 1.5), not the ratio of the mean tok/s (550 / 300)."""
    seed0 = [_run_dict("ar", 1, 0, 500.0, 0.4, 0.5, 1.0), _run_dict("fast", 1, 0, 1000.0, 0.2, 1.0, 0.5)]
    seed1 = [_run_dict("ar", 1, 1, 100.0, 0.5, 0.4, 1.0), _run_dict("fast", 1, 1, 100.0, 0.5, 0.5, 0.25)]
    for runs in (seed0, seed1):
        harness.add_ratios(runs)
    rows = {r["mode"]: r for r in summary.summarize_runs(seed0 + seed1)}
    fast = rows["fast"]
    assert fast["seeds"] == [0, 1]
    assert fast["speedup_vs_ar"]["values"] == [2.0, 1.0] and fast["speedup_vs_ar"]["mean"] == 1.5
    assert (fast["speedup_vs_ar"]["min"], fast["speedup_vs_ar"]["max"]) == (1.0, 2.0)
    assert fast["retention_agreement"]["values"] == pytest.approx([0.5, 1.0])
    assert fast["retention_nll"]["values"] == pytest.approx([0.5, 0.8]) and fast["retention_nll"]["mean"] == \
        pytest.approx(0.65)
    assert fast["match_ar"]["mean"] == pytest.approx(0.375) and fast["speedup_vs_hf"] is None  # no hf_generate
    assert fast["tokens_per_s"]["mean"] == 550.0 and rows["ar"]["speedup_vs_ar"]["mean"] == 1.0
    with pytest.raises(ValueError, match="more than one run for a seed"):
        summary.summarize_runs(seed0 + seed0)
    with pytest.raises(ValueError, match="no 'seed'"):
        summary.summarize_runs([{k: v for k, v in seed0[0].items() if k != "seed"}])


def test_targets_met_missed_and_not_run():
    def row(mode, b, **figures):
        return {"mode": mode, "batch_size": b, **{k: summary.spread(v) for k, v in figures.items()}}

    rows = [row("spec_b16", 1, tokens_per_nfe=[6.0, 8.5], speedup_vs_ar=[2.5, 2.3], match_ar=[1.0, 0.99]),
            row("spec_b16", 8, speedup_vs_ar=[1.1, 0.95], match_ar=[1.0, 1.0]),
            row("ar", 1, speedup_vs_hf=[1.9, 1.8])]
    out = {t["label"]: t for t in summary.check_targets(rows)}
    tpi = out["speculative: tokens per iteration"]
    assert (tpi["status"], tpi["mean"], tpi["seeds_met"], tpi["n"]) == ("met", 7.25, 1, 2)
    assert tpi["gap"] == pytest.approx(0.25)
    b1 = out["speculative x AR, batch 1"]
    assert b1["status"] == "missed" and b1["gap"] == pytest.approx(2.4 - 2.42) and b1["seeds_met"] == 1
    assert out["speculative x AR, batch 8"]["status"] == "met"  # mean 1.025, although one seed is below 1.0
    eq1 = out["speculative output = AR output, batch 1"]  # must hold on every seed: the mean is not enough
    assert eq1["status"] == "missed" and eq1["gap"] == pytest.approx(-0.01) and eq1["seeds_met"] == 1
    assert out["speculative output = AR output, batch 8"]["status"] == "met"
    assert out["diffusion 0.8 x AR, batch 1"]["status"] == "not run" and out["diffusion 0.8 x AR, batch 1"]["gap"] \
        is None
    assert out["AR x transformers, batch 1 (before: 1.82)"]["status"] == "met"
    one = summary.check_targets(rows, [summary.Target("x", "ar", 1, "speedup_vs_hf", 1.9)])
    assert one[0]["status"] == "missed" and one[0]["gap"] == pytest.approx(-0.05)
    with pytest.raises(ValueError, match="figure 'tok_s'"):
        summary.Target("x", "ar", 1, "tok_s", 1.0)
    with pytest.raises(ValueError, match="rule"):
        summary.Target("x", "ar", 1, "speedup_vs_hf", 1.0, rule="median")


def test_diffusion_modes_against_the_diffusion_target():
    def row(mode, kind, b, sp, ret):
        return {"mode": mode, "kind": kind, "batch_size": b, "speedup_vs_ar": summary.spread(sp),
                "retention_agreement": summary.spread(ret)}

    rows = [row("diff_t0.8_b16", "diffusion", 1, [1.4, 1.5], [0.97, 0.99]),
            row("pos", "diffusion", 1, [1.6, 1.7], [0.95, 0.96]),
            row("diff_t0.5_b16", "diffusion", 1, [2.0, 2.2], [0.8, 0.9]),
            row("pos", "diffusion", 8, [3.0, 3.0], [1.0, 1.0]), row("spec_b16", "speculative", 1, [3.0], [1.0]),
            row("undefined", "diffusion", 1, [1.9], [None])]
    out = summary.diffusion_against_target(rows)
    assert [(d["mode"], d["met"]) for d in out] == [("diff_t0.5_b16", False), ("undefined", False), ("pos", True),
                                                    ("diff_t0.8_b16", False)]


def test_modes_by_class_path_split_and_groups():
    parsed = modes.parse_modes('default,diff:twotower.samplers.MarginThreshold:{"margin": 0.3},'
                               'pos=diff_b8:twotower.samplers.ConfidenceThreshold:{"threshold": 0.7},'
                               'decoder:twotower.decoding.Speculative:{"block_size": 8, "draft_steps": 2}',
                               modes.SMOKE_MODES)
    names = [m.name for m in parsed]
    assert names[:len(modes.DEFAULT_MODES)] == [m.name for m in modes.DEFAULT_MODES]
    margin, pos, spec = parsed[len(modes.DEFAULT_MODES):]
    assert margin.name == "diff_MarginThreshold(margin=0.3)_b16" and margin.kind == "diffusion"
    assert isinstance(margin.decoder.sampler, samplers.MarginThreshold) and margin.decoder.sampler.margin == 0.3
    assert margin.decoder.block_size == margin.decoder.steps_per_block == 16 == margin.block
    assert pos.name == "pos" and pos.decoder.block_size == 8 and pos.threshold == 0.7
    assert spec.kind == "speculative" and spec.decoder.draft_steps == 2 and spec.block == 8
    assert [m.name for m in modes.parse_modes("all", modes.SMOKE_MODES)] == [m.name for m in modes.FULL_MODES]
    assert modes.parse_modes(None, modes.DEFAULT_MODES) == modes.DEFAULT_MODES
    assert modes.split_modes('a, b:{"x": [1, 2], "y": "p,}"} ,c') == ["a", 'b:{"x": [1, 2], "y": "p,}"}', "c"]
    for bad, match in (("diff:twotower.samplers.Nope", "Sampler subclass"),
                       ("decoder:twotower.samplers.ConfidenceThreshold", "Decoder subclass"),
                       ("diff:twotower.samplers.MarginThreshold:[0.3]", "JSON object"),
                       ('diff:twotower.samplers.MarginThreshold:{"margin": 0.3', "unbalanced"),
                       ('diff:twotower.samplers.MarginThreshold:{"width": 1}', "MarginThreshold"),
                       ('diff_bx:twotower.samplers.MarginThreshold', "diff_b<BLOCK>"),
                       ("nosuch:twotower.decoding.Speculative", "unknown mode"),
                       ("ar=decoder:twotower.decoding.Speculative", "built-in mode")):
        with pytest.raises(SystemExit, match=match):
            modes.parse_modes(bad, modes.FULL_MODES)


def test_seeds_option():
    parse = bench.build_parser().parse_args
    assert bench.parse_seeds(parse([])) == [0, 1, 2]
    assert bench.parse_seeds(parse(["--seeds", "3, 5"])) == [3, 5]
    assert bench.parse_seeds(parse(["--seed", "4"])) == [4]  # the former single-seed option
    for argv, match in ((["--seeds", "0,x"], "comma list"), (["--seeds", "1,1"], "distinct"),
                        (["--seeds", "1", "--seed", "2"], "not both")):
        with pytest.raises(SystemExit, match=match):
            bench.parse_seeds(parse(argv))


# ---- the interleaving of timed runs -------------------------------------------------------------


def test_rotated_puts_every_mode_in_every_position():
    turns = [harness.rotated(3, t) for t in range(3)]
    assert turns == [[0, 1, 2], [1, 2, 0], [2, 0, 1]]
    for position in range(3):
        assert sorted(turn[position] for turn in turns) == [0, 1, 2]


def test_run_modes_interleaves_the_modes_batch_by_batch():
    """Every batch runs under every mode back to back, in a rotating order; each mode's seconds per
    round add up its own calls only, and its tokens come from its own calls."""
    from types import SimpleNamespace

    log = []

    def runner(mode, ids, mask, measure_cache=False):
        if not measure_cache:
            log.append((mode.name, int(ids[0, 0])))
        new = ids[:, :2] + (1 if mode.name == "b" else 0)
        return harness.Call(new, torch.ones(ids.shape[0], dtype=torch.long), 0)

    modes_ = [SimpleNamespace(name=n, kind="ar") for n in ("a", "b", "c")]
    batches = [(torch.full((2, 3), j), torch.ones(2, 3)) for j in range(4)]
    out = harness.run_modes(runner, modes_, batches, repeats=2, device=torch.device("cpu"))
    assert len(log) == 2 * 4 * 3
    for turn in range(8):  # round r, batch j: turn r * 4 + j
        chunk = log[3 * turn: 3 * turn + 3]
        assert {j for _, j in chunk} == {turn % 4}
        assert [name for name, _ in chunk] == [modes_[i].name for i in harness.rotated(3, turn)]
    assert [len(r["seconds_per_repeat"]) for r in out] == [2, 2, 2]
    assert torch.equal(out[1]["tokens"], torch.cat([b[0][:, :2] + 1 for b in batches]))
    assert all(r["deterministic_across_repeats"] for r in out)
