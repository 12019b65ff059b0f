"""benchmarks/'s stand-alone scripts (spec_cost.py, draft_quality.py, draft_diagnostics.py) run end to end
on the embedded default with a few short prompts, and what they report agrees with the decoders run
directly. (bench.py has its own smoke run in test_bench.py.)"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # benchmarks/ is a folder of the repository, not an installed package
    sys.path.insert(0, str(REPO))

from benchmarks import draft_diagnostics, draft_quality, spec_cost, workload  # noqa: E402
from twotower import ByteTokenizer, TwoTowerLM  # noqa: E402
from twotower.decoding import NgramLookup, Speculative  # noqa: E402

MODEL = str(REPO / "twotower" / "assets" / "twotower")
SHORT = ["--prompts", "3", "--prompt-len", "32", "--max-new-tokens", "16"]


def _windows(seed: int) -> torch.Tensor:
    tok = ByteTokenizer()
    docs, _ = workload.heldout_token_docs(False, tok)
    return torch.tensor([w.ids for w in workload.select_windows(docs, 3, 32, 16, bos_id=tok.bos_token_id,
                                                                seed=seed)])


def test_draft_quality_matches_the_decoders(tmp_path):
    out = tmp_path / "dq.json"
    assert draft_quality.main([MODEL, *SHORT, "--seeds", "0", "1", "--batch", "2", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    summary = res["summary"][MODEL]
    assert summary["spec_equals_ar_every_seed"] is True
    model = TwoTowerLM.from_pretrained(MODEL).eval()
    for seed in (0, 1):
        got = res["seeds"][str(seed)]["models"][MODEL]
        direct = Speculative(block_size=16).generate(model, _windows(seed), None, max_new_tokens=16,
                                                     eos_token_id=None)
        assert got["spec_tokens_per_iter"] == direct.new_tokens.numel() / int(direct.nfe.sum())
        assert 0.0 <= got["diff_agreement"] <= 1.0 and got["diff_tokens_per_nfe"] >= 1.0
    mean = summary["spec_tokens_per_iter"]["mean"]
    assert mean == sum(summary["spec_tokens_per_iter"]["values"]) / 2


def test_spec_cost_prints_the_split_and_lossless_levers(capsys):
    spec_cost.main(["--model", MODEL, *SHORT, "--seeds", "0", "--batch-sizes", "1,2", "--rounds", "1",
                    "--levers", "batch_block_size=8,grouped MoE past 24 tokens"])
    text = capsys.readouterr().out
    assert text.count("## seed 0, batch") == 2
    for table in text.split("## seed 0, batch")[1:]:
        rows = dict(re.findall(r"^\| ([a-z ()]+) \| ([\d.]+) \(", table, flags=re.M))
        assert set(rows) == {"draft forward", "verify extend", "accept (rollback)", "tracker commit",
                             "rest of the loop", "iteration"}, table
        parts = sum(float(v) for k, v in rows.items() if k != "iteration")
        assert abs(parts - float(rows["iteration"])) <= 0.03  # the parts add up to the iteration (2-decimal rounding)
    rows = re.findall(r"^\| (batch_block_size=8|grouped MoE past 24 tokens) .*\| (True|False) \|$", text, flags=re.M)
    assert len(rows) == 4 and all(identical == "True" for _, identical in rows), text


def test_draft_diagnostics_counts_the_loop(capsys):
    assert draft_diagnostics.main([MODEL, *SHORT, "--seed", "0"]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    loop = re.search(r"loop: (\d+) iterations keep ([\d.]+)", line)
    assert loop, line
    assert int(loop.group(1)) >= 3 and 1.0 <= float(loop.group(2)) <= 16.0
    prefix = float(re.search(r"teacher-forced accepted prefix ([\d.]+)", line).group(1))
    assert 0.0 <= prefix <= 15.0


def test_real_model_float32_baseline_keeps_no_bf16_mode_and_short_drafts_draft_fewer_positions():
    """benchmarks/real_model.py on a CPU without a bf16 path: --baseline ar_fp32 --only <float32 modes>
    must load no bf16 model (every mode float32, ratios against float32 AR), and --short-drafts n runs
    Speculative(block_size=n) on the merged copies."""
    from benchmarks import real_model as rm

    only = ["spec_fp32_merged", "spec_fp32_merged_b6", "spec_fp32_merged_cut0.3"]
    modes = rm.build_modes([], [0.3], merged=True, only=only, baseline="ar_fp32", short=[6])
    assert set(modes) == {"ar_fp32", *only}
    assert all(key.startswith("fp32") for key, _ in modes.values())
    assert all(rm.reference_ar(modes, n) == "ar_fp32" for n in only)
    assert modes["spec_fp32_merged_b6"][1].block_size == 6 and modes["spec_fp32_merged_cut0.3"][1].draft_cut == 0.3
    assert "ar" in rm.build_modes([], merged=True, only=["spec_fp32_merged"])  # the default baseline: bf16 AR
    assert "spec_fp32_merged_b6" not in rm.build_modes([], short=[6])  # short drafts need --merged
    assert rm.parse_args(["--baseline", "ar_fp32", "--short-drafts", "4", "8"]).short_drafts == [4, 8]
    steps = rm.build_modes([], merged=True, only=["spec_fp32_int8_packed_b6_s2"], baseline="ar_fp32", short=[6],
                           draft_steps=[2])
    key, decoder = steps["spec_fp32_int8_packed_b6_s2"]
    assert key == "fp32_int8_packed" and (decoder.block_size, decoder.draft_steps) == (6, 2)
    assert rm.parse_args(["--draft-steps", "2", "3"]).draft_steps == [2, 3]
    bf16 = rm.build_modes([], merged=True, only=["spec_packed_b6_lk3_m15"], short=[6], lookup=[3], lookup_max=15)
    assert set(bf16) == {"ar", "spec_packed_b6_lk3_m15"}  # checked against bf16 AR, its own dtype
    key, decoder = bf16["spec_packed_b6_lk3_m15"]
    assert key == "bf16_packed" and decoder.block_size == 6 and decoder.lookup.max_tokens == 15


def test_int8_draft_modes_run_on_the_int8_copies_and_the_kernel_table_prints_every_shape(tmp_path, capsys):
    """real_model.py / real_model_batch.py: the int8 modes use a model merged with int8_draft=True;
    real_model_phases.py --kernels times every projection shape of the tower at 1 and 16 rows."""
    from conftest import save_chat_llama

    from benchmarks import real_model as rm
    from benchmarks import real_model_batch as rb
    from benchmarks import real_model_phases as rp
    from twotower.towers.adapters import LoRA

    modes = rm.build_modes([], merged=True, only=["spec_fp32_int8", "spec_fp32_int8_b8"], baseline="ar_fp32",
                           short=[8])
    assert set(modes) == {"ar_fp32", "spec_fp32_int8", "spec_fp32_int8_b8"}
    assert modes["spec_fp32_int8_b8"][0] == "fp32_int8" and modes["spec_fp32_int8_b8"][1].block_size == 8
    assert rm.MODELS["fp32_int8"] == (torch.float32, {"int8_draft": True})
    batch = rb.build_modes([4], int8_draft=True)
    assert batch["spec_int8_bb4"][0] == "int8" and batch["spec_int8_bb4"][1].batch_block_size == 4
    assert "spec_int8" not in rb.build_modes([4])
    packed = rb.build_modes([4], int8_draft=True, pack_rows=[16, 128], only=["ar_packed128", "spec_int8_packed128_bb4"])
    assert set(packed) == {"ar", "ar_packed128", "spec_int8_packed128_bb4"}
    assert packed["spec_int8_packed128_bb4"][0] == packed["ar_packed128"][0] == "packed128"
    with pytest.raises(SystemExit, match="unknown modes"):
        rb.build_modes([4], only=["spec_int8_packed7_bb4"])
    assert rp.VARIANTS["merged+fused, int8 draft"] == {"fuse": True, "int8_draft": True}
    model = TwoTowerLM.from_backbone(save_chat_llama(tmp_path / "backbone", seed=3), block_size=6,
                                     denoiser=LoRA(rank=4, alpha=8.0)).eval()
    rp.kernel_table(model)
    rows = re.findall(r"^\| (q/k/v|o|gate/up|down|head) \((\d+) x (\d+)\) \| (1|16) \| ([\d.]+) \| ([\d.]+) \|",
                      capsys.readouterr().out, flags=re.M)
    assert sorted({(r[0], r[3]) for r in rows}) == sorted((n, k) for n in ("q/k/v", "o", "gate/up", "down", "head")
                                                          for k in ("1", "16"))
    head = [r for r in rows if r[0] == "head"][0]
    assert (int(head[1]), int(head[2])) == tuple(model.context.lm_head.weight.shape)


def test_two_branch_speed_runs_on_the_int8_draft_with_short_drafts(tmp_path):
    """benchmarks/two_branch_speed.py --int8-draft --block-size: every mode still AR's output, and the
    speculative modes draft the asked number of positions (at most that many tokens an iteration)."""
    from benchmarks import two_branch_speed

    out = tmp_path / "tb.json"
    assert two_branch_speed.main([MODEL, "--prompts", "2", "--prompt-len", "32", "--max-new-tokens", "12",
                                  "--int8-draft", "--block-size", "4", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["settings"]["int8_draft"] is True and res["settings"]["block_size"] == 4
    assert set(res["modes"]) == {"ar", "spec", "two_branch_likeliest", "two_branch_likeliest/4"}
    assert all(m["equal_ar"] for m in res["modes"].values())
    assert 1.0 <= res["modes"]["spec"]["tokens_per_iter"] <= 4.0
    modes = two_branch_speed.modes(["likeliest/3"], block_size=6)
    assert modes["spec"].block_size == 6 and modes["two_branch_likeliest/3"].block_size == 6
    lookup = NgramLookup(3, max_tokens=15)
    modes = two_branch_speed.modes(["likeliest:3:3"], block_size=6, lookup=lookup)
    assert modes["spec"].lookup is lookup and modes["two_branch_likeliest:3:3"].lookup is lookup
    assert modes["two_branch_likeliest:3:3"].forks == 3
    with pytest.raises(SystemExit):  # --lookup-max-tokens alone names no n-gram size
        two_branch_speed.main([MODEL, "--lookup-max-tokens", "15"])


def test_draft_gate_records_each_iteration_without_changing_the_decode(tmp_path, capsys):
    """benchmarks/draft_gate.py on the embedded default: the recording decoder gives Speculative's tokens,
    one record per iteration after the first (tokens kept within 1..block), and the policy table's tau = 0
    row is 'always draft' (the recorded tokens over their iterations' cost)."""
    from benchmarks import draft_gate

    model = TwoTowerLM.from_pretrained(str(REPO / "twotower" / "assets" / "twotower")).eval()
    ids = torch.tensor([draft_gate.prompts_of(model, [0], 1)[0]])
    rec = draft_gate.RecordingSpeculative()
    with torch.inference_mode():
        got = rec.generate(model, ids, torch.ones_like(ids), max_new_tokens=40)
        want = Speculative().generate(model, ids, torch.ones_like(ids), max_new_tokens=40)
    assert torch.equal(got.new_tokens, want.new_tokens)
    assert len(rec.records) == got.blocks - 1 and all(0.0 < p <= 1.0 and 1 <= k <= 16 for p, k in rec.records)
    always = draft_gate.policy_table(rec.records, 3.0)[0]
    assert always["tau"] == 0.0 and always["gated"] == 0.0
    assert always["x_ar"] == pytest.approx(sum(k for _, k in rec.records) / (3.0 * len(rec.records)))
    out = tmp_path / "gate.json"
    assert draft_gate.main([str(REPO / "twotower" / "assets" / "twotower"), "--cost", "3", "--seeds", "0",
                            "--per-kind", "1", "--new-tokens", "24", "--out", str(out)]) == 0
    assert "| AR step below tau |" in capsys.readouterr().out and json.loads(out.read_text())["records"]


def test_lookup_potential_counts_trees_whose_output_is_ars(tmp_path):
    """benchmarks/lookup_potential.py on the embedded default: every mode it runs (oracles and forked trees
    included) must give AR's tokens, else it exits; its counts lie in [1, the longest draft]."""
    from benchmarks import lookup_potential

    out = tmp_path / "lp.json"
    modes = ["denoiser", "best_of_both", "three_way", "pairs3", "oracle_fork"]
    assert lookup_potential.main([str(REPO / "twotower" / "assets" / "twotower"), "--ngram", "4", "--max-tokens", "32",
                                  "--seeds", "1", "--per-kind", "1", "--new-tokens", "24", "--modes", *modes,
                                  "--out", str(out)]) == 0
    seed = json.loads(out.read_text())["per_seed"]["1"]
    assert all(1.0 <= seed[m] <= 33.0 for m in modes) and seed["iterations"] is not None


def _naive_store(seqs, n):
    """{key: (count of its most frequent next token, that token's latest continuation start, sequence)}
    by a plain scan: the reference for benchmarks/datastore_potential.py's `Datastore`."""
    nexts = {}
    for s, seq in enumerate(seqs):
        for i in range(len(seq) - n):
            nexts.setdefault(tuple(seq[i:i + n]), []).append((seq[i + n], s, i + n))
    out = {}
    for key, occ in nexts.items():
        counts = {}
        for t, _, _ in occ:
            counts[t] = counts.get(t, 0) + 1
        best = min(counts, key=lambda t: (-counts[t], t))  # most frequent, ties: the smallest id
        _, s, start = [o for o in occ if o[0] == best][-1]  # its latest occurrence
        out[key] = (counts[best], s, start)
    return out


@pytest.mark.parametrize("n", [1, 2, 3])
def test_datastore_proposes_what_a_plain_scan_finds(n):
    """`Datastore.propose` equals a plain scan's choice for every n-gram of the sequences and for absent
    ones, within each sequence only, and honours min_count; an n whose key would not fit 64 bits is refused."""
    from benchmarks.datastore_potential import Datastore

    g = torch.Generator().manual_seed(n)
    seqs = [torch.randint(0, 5, (int(length),), generator=g).tolist() for length in (30, 2, 17, 40)]
    store, want = Datastore(seqs, n, vocab_size=5), _naive_store(seqs, n)
    assert len(store) == len(want)
    for key, (count, s, start) in want.items():
        assert store.propose(key, 6) == seqs[s][start:start + 6], key
        assert store.propose(key, 6, min_count=count + 1) == []
    absent = [k for k in ([a] * n for a in range(5)) if tuple(k) not in want]
    assert all(store.propose(k, 6) == [] for k in absent)
    with pytest.raises(ValueError, match="n <= 4"):
        Datastore(seqs, 5, vocab_size=49152)


def test_datastore_lookup_drafts_where_the_row_has_nothing_and_keeps_ars_output():
    """benchmarks/datastore_potential.py's `StoreLookup` on the embedded default: with AR's own output in
    the store, its drafts replace the denoiser's and take fewer iterations than the row's own lookup,
    and every output is AR's (`tokens_per_iteration` exits otherwise)."""
    from benchmarks.datastore_potential import Datastore, StoreLookup
    from benchmarks.draft_gate import prompts_of
    from benchmarks.lookup_potential import tokens_per_iteration
    from twotower.decoding import Autoregressive

    model = TwoTowerLM.from_pretrained(str(REPO / "twotower" / "assets" / "twotower"), dtype=torch.float32).eval()
    ids = prompts_of(model, [1], 1)[0]
    with torch.inference_mode():
        ar = Autoregressive().generate(model, torch.tensor([ids]), max_new_tokens=32).sequences[0].tolist()
        store = Datastore([ar], 4, model.tokenizer.vocab_size)
        own = tokens_per_iteration(model, ids, 32, 16, NgramLookup(4), ("lookup",))
        stored = tokens_per_iteration(model, ids, 32, 16, StoreLookup(store, 4), ("lookup", "best_of_both"))
    assert stored["lookup"] < own["lookup"]
    assert stored["best_of_both"] <= stored["lookup"]


def _real_model_run_on(device: str, tmp_path) -> dict:
    """real_model.py's timed call and NLL judge on `device`, beside `generate` on that device."""
    from conftest import save_tiny_twotower

    from benchmarks import real_model as rm
    from twotower.decoding import Autoregressive

    model = rm.load_model(str(save_tiny_twotower(tmp_path / "tt")), "fp32", device)
    ids = [1, 40, 41, 42, 43]
    with torch.inference_mode():
        toks, seconds, info = rm.run(model, Speculative(block_size=4), ids, 6, None)
        want = Autoregressive().generate(model, torch.tensor([ids], device=device), max_new_tokens=6)
        nll = rm._nll(model.context, [{"prompt": ids, "tokens": toks}])
    return {"device": model.context.lm_head.weight.device.type, "tokens": toks,
            "ar": want.new_tokens[0].tolist(), "seconds": seconds, "nfe": info["nfe"], "nll": nll}


def assert_real_model_ran_on(device: str, got: dict) -> None:
    """The tokens are AR's on that device, the call was timed and the mean NLL is finite and positive."""
    assert got["device"] == device and got["tokens"] == got["ar"], got
    assert got["seconds"] > 0 and got["nfe"] >= 1 and 0 < got["nll"] < float("inf"), got


def test_real_model_runs_on_the_device_it_is_given(tmp_path):
    from benchmarks import real_model as rm

    assert rm.parse_args([]).device == "cpu" and rm.parse_args(["--device", "cuda"]).device == "cuda"
    assert_real_model_ran_on("cpu", _real_model_run_on("cpu", tmp_path))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_real_model_runs_on_a_gpu(tmp_path):
    got = _real_model_run_on("cuda", tmp_path)
    assert got["device"] == "cuda"
    assert_real_model_ran_on("cuda", got)


def test_continuous_batch_compares_static_and_scheduled_batches_on_the_same_prompts(tmp_path, capsys):
    """benchmarks/continuous_batch.py: AR and speculative, static and through the scheduler, every output equal
    to static AR's, the ratios and how full the static speculative batches stayed."""
    from benchmarks import continuous_batch as cb

    out = tmp_path / "cb.json"
    assert cb.main(["--seeds", "0", "--prompts", "5", "--max-batch", "2", "--max-new-tokens", "6", "--rounds", "1",
                    "--prompt-len", "24", "--block-size", "4", "--out", str(out)]) == 0
    res = json.loads(out.read_text())["per_seed"]["0"]
    assert all(res["equal_to_ar"].values()) and res["rows_equal_to_ar"] == {m: 5 for m in cb.MODES}
    assert set(res["seconds"]) == set(cb.MODES) and all(v > 0 for v in res["seconds"].values())
    assert 1.0 <= res["spec_static_rows_per_iteration"] <= 2.0  # batches of 2, then the odd prompt alone
    assert "| mean |" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        cb.parse_args(["--max-batch", "0"])


def test_draft_vocab_modes_run_the_packed_and_float32_drafts_on_a_vocab_subset():
    """real_model.py --draft-vocab K:F: each bf16 packed speculative mode and spec_fp32_merged_b<n> gets a _v<K>f<F>
    twin whose model merges with draft_vocab=(K, F) (resolved to ids when loaded), checked against its dtype's AR."""
    from benchmarks import real_model as rm

    modes = rm.build_modes([], merged=True, short=[6], lookup=[3], lookup_max=15, vocabs=["8192:4096", "100"],
                           only=["spec_packed_b6_lk3_m15_v8192f4096", "spec_fp32_merged_b6_v100"])
    assert set(modes) == {"ar", "ar_fp32", "spec_packed_b6_lk3_m15_v8192f4096", "spec_fp32_merged_b6_v100"}
    key, decoder = modes["spec_packed_b6_lk3_m15_v8192f4096"]
    assert rm.MODELS[key] == (torch.bfloat16, {"pack_context": True, "draft_vocab": (8192, 4096)})
    assert decoder.block_size == 6 and decoder.lookup.max_tokens == 15
    assert rm.MODELS[modes["spec_fp32_merged_b6_v100"][0]] == (torch.float32, {"draft_vocab": (100, 0)})
    assert rm.context_of(key) == rm.context_of("bf16_packed")  # measured against AR on the same packed context
    with pytest.raises(SystemExit, match="not K or K:F"):
        rm.build_modes([], merged=True, short=[6], vocabs=["8k"])


@pytest.mark.parametrize("name, baseline, merge, context", [
    ("spec_packed_int8_b6_lk3_m15", "ar", {"pack_context": True, "int8_draft": True}, "bf16_packed"),
    ("spec_fp32_int8_packed_b6_lk3_m15", "ar_fp32", {"int8_draft": True, "pack_context": True}, "fp32_int8_packed"),
    ("spec_fp32_int8_b6_lk3_m15", "ar_fp32", {"int8_draft": True}, "fp32"),  # the plain float32 context
])
def test_int8_draft_modes_have_draft_vocab_twins_on_their_own_context(name, baseline, merge, context):
    """real_model.py's int8 drafts (on the packed bf16 context, the packed and the plain float32 ones) each get a
    --draft-vocab twin whose model adds draft_vocab to the same copies, measured against AR on the same context."""
    from benchmarks import real_model as rm

    twin = f"{name}_v100"
    modes = rm.build_modes([], merged=True, short=[6], lookup=[3], lookup_max=15, vocabs=["100"], baseline=baseline,
                           only=[twin])
    assert set(modes) == {baseline, twin}
    key = modes[twin][0]
    assert rm.MODELS[key] == (rm.MODELS[key][0], {**merge, "draft_vocab": (100, 0)})
    assert rm.MODELS[key][0] == (torch.bfloat16 if baseline == "ar" else torch.float32)
    assert rm.context_of(key) == rm.context_of(context)


def test_alt_model_modes_twin_the_packed_and_float32_drafts_and_load_the_other_model(monkeypatch):
    """real_model.py --alt-model DIR: each bf16 packed speculative mode and spec_fp32_merged_b<n> (vocabulary
    twins included) gets an _alt twin with the same dtype and copies, loaded from DIR, against its dtype's AR."""
    from benchmarks import real_model as rm

    modes = rm.build_modes([], merged=True, short=[6], lookup=[3], lookup_max=15, vocabs=["100"], alt=True,
                           only=["spec_packed_b6_lk3_m15_alt", "spec_packed_b6_lk3_m15_v100_alt",
                                 "spec_fp32_merged_b6_alt"])
    assert set(modes) == {"ar", "ar_fp32", "spec_packed_b6_lk3_m15_alt", "spec_packed_b6_lk3_m15_v100_alt",
                          "spec_fp32_merged_b6_alt"}
    key = modes["spec_packed_b6_lk3_m15_v100_alt"][0]
    assert key == "bf16_packed_v100_alt" and rm.MODELS[key] == rm.MODELS["bf16_packed_v100"]
    assert rm.context_of(key) == rm.context_of("bf16_packed")
    assert "spec_packed_b6_alt" not in rm.build_modes([], merged=True, short=[6])  # only with alt=True
    loaded = []
    monkeypatch.setattr(rm, "load_model", lambda name, key, device="cpu": loaded.append((name, key)) or rm)
    monkeypatch.setattr(rm, "tokenizer", None, raising=False)  # what main reads from the fp32 "model"
    monkeypatch.setattr(rm, "held_out_documents", lambda *a: (_ for _ in ()).throw(SystemExit(0)))  # stop there
    with pytest.raises(SystemExit):
        rm.main(["--model", "A", "--alt-model", "B", "--merged", "--short-drafts", "6",
                 "--only", "spec_fp32_merged_b6_alt"])
    assert sorted(loaded) == [("A", "bf16"), ("A", "fp32"), ("B", "fp32_merged_alt")]


def test_two_draft_vocabs_twin_only_the_plain_drafts():
    """--draft-vocab A B: each plain draft mode gets one twin per vocabulary, never a twin of a twin."""
    from benchmarks import real_model as rm

    modes = rm.build_modes([], merged=True, short=[6], vocabs=["100", "200"])
    assert {"spec_fp32_merged_b6_v100", "spec_fp32_merged_b6_v200", "spec_packed_b6_v100", "spec_packed_b6_v200"} <= set(modes)
    assert not [name for name in modes if "_v100_v200" in name]
    assert all(key in rm.MODELS for key, _ in modes.values())
