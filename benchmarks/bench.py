"""Quality / speed benchmark: our AR mode, transformers' `generate`, mock-AR, diffusion and speculative decoding.

    pip install -e ".[bench]" && python benchmarks/bench.py --update-readme   # full run, README Results
    python benchmarks/bench.py --smoke --out /tmp/b                            # tiny random model, seconds

NVIDIA's headline for the released model is a trade-off: 98.7% of the AR model's quality at 2.42x its
wall-clock throughput (confidence threshold 0.8, block 16). This measures ours, in one run, on the
same held-out prompts for every mode (each mode is a `twotower.decoding` decoder, see modes.py), once
per seed of `--seeds` (each seed draws its own prompt windows; every ratio is computed within that
seed's interleaved run, then the seeds are aggregated to mean and min-max spread, summary.py):

* speed: generated tokens / s (wall clock, one warm-up call per mode, median of `--repeats` runs over
  all prompts, interleaved: one pass of every mode per round, so drift hits all alike), tokens per
  NFE, NFE per block, memory (CUDA: peak allocated; CPU: parameter bytes + the run's cache bytes,
  both computed from tensor shapes);
* quality (`twotower.evaluation`): agreement with the held-out continuation over its first 64
  tokens, NLL per token of the generated continuation under the context tower (teacher-forced;
  lower is better), distinct-2 / distinct-4 (degenerate, repetitive output scores low);
* retention = mode / AR for agreement, AR / mode for NLL; throughput ratios vs our AR and vs transformers;
* training speed: denoiser fine-tuning step vs AR backbone training step on the same batch;
* a per-phase wall-time profile of mask diffusion, speculative and AR decoding at batch 1, per seed,
  and speculative decoding per iteration (phase ms, tokens accepted, cost in AR decode steps);
* issue 13's targets (summary.TARGETS), each met or missed with its gap;
* the local lm-evaluation-harness suite (benchmarks/eval/, eval_suite.py) for AR, speculative and
  diffusion at 0.8, each score with its retention against AR (`--no-eval` skips it).

Every mode is greedy (temperature 0) and ignores EOS, so each generates exactly max_new_tokens.
Results go to `--out`: bench.json (every raw number), bench.md (tables), then tradeoff.png.
Runs as a file from anywhere (`python benchmarks/bench.py`) or as `python -m benchmarks.bench`
from the repository root.
"""

from __future__ import annotations

import sys
from pathlib import Path

if not __package__:
    # Run as a file: import this folder as the `benchmarks` package from the repository root (which
    # also puts this checkout's `twotower` first), and drop the folder itself from the path, where
    # its module names (report, phases, ...) could shadow other top-level modules.
    _here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _here]
    sys.path.insert(0, str(_here.parent))

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402

import torch  # noqa: E402

from benchmarks import harness, modes as mode_lib, report, workload  # noqa: E402
from benchmarks.phases import per_iteration, profile_interleaved  # noqa: E402
from benchmarks.summary import check_targets, summarize_iterations, summarize_profiles, summarize_runs  # noqa: E402
from benchmarks.training_speed import training_batch, training_speed  # noqa: E402
from twotower.evaluation import AGREEMENT_TOKENS, continuation_nll, distinct_n  # noqa: E402

__all__ = ["main", "build_parser"]

DEFAULT_MODEL = "twotower/assets/twotower"
DEFAULT_BACKBONE = "twotower/assets/backbone"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python benchmarks/bench.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default=DEFAULT_MODEL, help="two-tower checkpoint directory")
    p.add_argument("--backbone", default=DEFAULT_BACKBONE,
                   help="AR checkpoint of the model's family (transformers baseline, training)")
    p.add_argument("--prompts", type=int, default=32, help="held-out prompts per seed")
    p.add_argument("--prompt-len", type=int, default=128, help="prompt tokens (after [bos])")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3, help="timed runs per mode (median reported)")
    p.add_argument("--batch-sizes", default="1,8")
    p.add_argument("--modes", default=None,
                   help="comma list, e.g. ar,hf_generate,diff_t0.8_b16 (default: the group 'default', "
                        f"{','.join(m.name for m in mode_lib.DEFAULT_MODES)}); each item is {mode_lib.SPEC_HELP}")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--seeds", default=None,
                   help="comma list of prompt-window seeds; every mode runs on each seed's prompts (default 0,1,2; "
                        "--smoke: 0,1)")
    p.add_argument("--seed", type=int, default=None, help=argparse.SUPPRESS)  # the former single seed = --seeds N
    p.add_argument("--train-batch", type=int, default=8)
    p.add_argument("--train-seq-len", type=int, default=256)
    p.add_argument("--train-steps", type=int, default=5, help="timed training steps per path")
    p.add_argument("--no-training", action="store_true", help="skip the training-speed comparison")
    p.add_argument("--no-profile", action="store_true", help="skip the per-phase profile")
    p.add_argument("--no-eval", action="store_true",
                   help="skip the lm-evaluation-harness suite (benchmarks/eval/; needs the [eval] extra)")
    p.add_argument("--eval-limit", type=int, default=None, help="documents per evaluation task (default: all)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile our towers (TwoTowerLM.compile_towers) for every mode of ours, AR included; "
                        "compilation happens in the warm-up calls, outside the timings")
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--scale-checkpoint", default=None, metavar="AR_DIR",
                   help="also run the scale section (benchmarks/scale.py) on this AR checkpoint "
                        "(benchmarks/make_scale_checkpoint.py); written as scale.json / scale.md in --out")
    p.add_argument("--update-readme", action="store_true", help="write bench.md into README.md's Results section")
    p.add_argument("--readme", default=str(workload.REPO_ROOT / "README.md"), help=argparse.SUPPRESS)
    p.add_argument("--plot-from", default=None, metavar="BENCH_JSON",
                   help="run nothing: draw tradeoff.png next to an existing bench.json")
    p.add_argument("--smoke", action="store_true",
                   help="tiny random model, 2 prompts of 32 tokens per seed, seeds 0,1, 16 new tokens, 1 repeat, "
                        "batch 1,2, fewer modes, 1 thread unless --threads")
    return p


def _apply_smoke(args) -> None:
    args.prompts, args.prompt_len, args.max_new_tokens, args.repeats = 2, 32, 16, 1
    args.batch_sizes, args.train_batch, args.train_seq_len, args.train_steps = "1,2", 2, 32, 2
    args.no_eval = True  # the suite needs a byte-level trained model; the smoke model is random
    if args.threads is None:
        args.threads = 1  # a tiny model: more threads only add synchronisation
    if args.seeds is None and args.seed is None:
        args.seeds = "0,1"


def parse_seeds(args) -> list[int]:
    """--seeds "0,1,2" (or the former --seed N) -> distinct ints, in order; exits naming the bad value."""
    if args.seed is not None:
        if args.seeds is not None:
            raise SystemExit("give --seeds (a comma list) or the former --seed, not both")
        return [args.seed]
    text = "0,1,2" if args.seeds is None else args.seeds
    try:
        seeds = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise SystemExit(f"--seeds {text!r}: not a comma list of integers (e.g. 0,1,2)") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise SystemExit(f"--seeds {text!r}: give one or more distinct integers (e.g. 0,1,2)")
    return seeds


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark with command-line options `argv`; 0 on success. Exits with a message
    naming the `bench` extra when matplotlib is missing, after bench.json / bench.md are written."""
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    if args.plot_from:
        return _plot_only(Path(args.plot_from))
    if args.smoke:
        _apply_smoke(args)
    batch_sizes = [int(b) for b in args.batch_sizes.split(",") if b.strip()]
    if not batch_sizes or min(batch_sizes) < 1 or args.prompts < 1 or args.repeats < 1 or args.max_new_tokens < 1:
        raise SystemExit(f"--prompts ({args.prompts}), --repeats ({args.repeats}), --max-new-tokens "
                         f"({args.max_new_tokens}) and every --batch-sizes entry ({args.batch_sizes!r}) must be >= 1")
    seeds = parse_seeds(args)
    modes = mode_lib.parse_modes(args.modes, mode_lib.SMOKE_MODES if args.smoke else mode_lib.DEFAULT_MODES)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    threads_before = torch.get_num_threads()
    threads = args.threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    try:
        with tempfile.TemporaryDirectory(prefix="twotower-bench-") as tmp:
            res = _run(args, modes, seeds, batch_sizes, device, threads, Path(tmp))
    finally:
        torch.set_num_threads(threads_before)
    readme = Path(args.readme) if args.update_readme else None
    try:
        written = report.write_results(res, Path(args.out), readme=readme)
    except report.PlotUnavailable as err:
        raise SystemExit(f"bench: {err}") from None
    print("wrote " + ", ".join(str(p) for p in written))
    if args.scale_checkpoint:
        from benchmarks import scale

        scale.main(["--checkpoint", args.scale_checkpoint, "--out", str(Path(args.out) / "scale.json")])
    return 0


def _plot_only(path: Path) -> int:
    if not path.is_file():
        raise SystemExit(f"--plot-from {path}: no such file; pass the bench.json of a finished run")
    try:
        report.plot_tradeoff(json.loads(path.read_text()), path.parent / "tradeoff.png")
    except report.PlotUnavailable as err:
        raise SystemExit(f"bench: {err}") from None
    print(f"wrote {path.parent / 'tradeoff.png'}")
    return 0


def _profile_modes(modes: list[mode_lib.Mode]) -> list[mode_lib.Mode]:
    """The profiled modes: diffusion at 0.8 / block 16 and speculative / block 16 (always), every other
    speculative mode of the run (e.g. a decoder given by class_path), then AR."""
    extra = [m for m in modes if m.kind == "speculative" and m.name != "spec_b16"]
    return [mode_lib.diffusion(0.8, 16), mode_lib.speculative(16)] + extra + [mode_lib.ar()]


def _run(args, modes: list[mode_lib.Mode], seeds: list[int], batch_sizes: list[int], device: torch.device,
         threads: int, tmp: Path) -> dict:
    """Every measurement of one benchmark run, as the (JSON-ready apart from tensors) result dict."""
    from twotower.tokenizers import ByteTokenizer

    torch.manual_seed(0)
    model, hf, backbone = workload.load_models(args, tmp, device, need_hf=any(m.kind == "hf" for m in modes))
    if args.compile:
        model.compile_towers()
    vocab = model.config.vocab_size
    if vocab < ByteTokenizer.MIN_VOCAB:
        raise SystemExit(f"the benchmark prompts are byte-tokenised (vocab >= {ByteTokenizer.MIN_VOCAB}); this "
                         f"model's vocab is {vocab}: pass a byte-level --model")
    tok = ByteTokenizer(vocab)
    docs, source = workload.heldout_token_docs(args.smoke, tok)
    runner = harness.Runner(model, hf, args.max_new_tokens)
    print(f"bench: seeds {seeds}, {args.prompts} prompts per seed x {args.max_new_tokens} new tokens, modes "
          f"{[m.name for m in modes]}, batch sizes {batch_sizes}, device {device}, {threads} threads; greedy, "
          "EOS ignored", flush=True)
    runs, per_seed, profiles, iterations = [], [], [], []
    for seed in seeds:
        windows = workload.select_windows(docs, args.prompts, args.prompt_len, args.max_new_tokens,
                                          bos_id=tok.bos_token_id, seed=seed)
        prompts = torch.tensor([w.ids for w in windows], device=device)  # (P, 1 + prompt_len)
        truth = torch.tensor([w.truth for w in windows])  # (P, max_new_tokens)
        print(f"bench: seed {seed}", flush=True)
        with torch.inference_mode(), workload.quiet_transformers():
            seed_runs = [run for b in batch_sizes
                         for run in harness.generation_runs(runner, modes, prompts, truth, b, args.repeats, device,
                                                            tok)]
            harness.add_ratios(seed_runs)  # within this seed's interleaved run, before any aggregation
            ref_nll = continuation_nll(model.context, prompts, truth.to(device))
        for r in seed_runs:
            r["seed"] = seed
        runs += seed_runs
        per_seed.append({"seed": seed, "prompts": [{"doc": w.doc, "offset": w.offset, "text": tok.decode(w.ids)}
                                                   for w in windows],
                         "reference": {"nll": ref_nll.mean().item(),
                                       "distinct_2": statistics.fmean(distinct_n(t, 2) for t in truth),
                                       "distinct_4": statistics.fmean(distinct_n(t, 4) for t in truth)}})
        if not args.no_profile:
            one = [(prompts[i: i + 1], torch.ones_like(prompts[i: i + 1])) for i in range(len(windows))]
            with torch.inference_mode():
                seed_profiles = [p | {"seed": seed} for p in
                                 profile_interleaved(model, _profile_modes(modes), one, args.max_new_tokens, device)]
            ar_profile = next(p for p in seed_profiles if p["kind"] == "ar")
            for p in seed_profiles:
                split = ", ".join(f"{k} {v['share']:.0%}" for k, v in p["phases"].items() if v["share"] is not None)
                print(f"  profile {p['mode']}: {split}", flush=True)
                if p["kind"] == "speculative":
                    it = per_iteration(p, ar_profile) | {"seed": seed}
                    iterations.append(it)
                    print(f"  {p['mode']} per iteration: {it['iteration_ms']:.2f} ms = "
                          f"{it['iteration_ar_steps']:.2f} AR steps, {it['tokens_per_iteration']:.2f} tokens",
                          flush=True)
            profiles += seed_profiles

    summary = summarize_runs(runs)
    result = {"settings": {k: v for k, v in vars(args).items() if k not in ("readme", "plot_from", "seed")} | {
                  "seeds": seeds, "prompt_source": source, "modes": [m.name for m in modes],
                  "batch_sizes": batch_sizes, "temperature": 0.0,
                  "eos": "ignored (eos_token_id=None): every mode generates max_new_tokens",
                  "agreement_tokens": AGREEMENT_TOKENS, "dtype": str(next(model.context.parameters()).dtype),
                  "block_size_model": model.block_size},
              "machine": workload.machine_info(device, threads),
              "per_seed": per_seed, "runs": runs, "summary": summary, "targets": check_targets(summary)}
    if not args.no_profile:
        result["profile"] = profiles
        result["profile_summary"] = summarize_profiles(profiles)
        result["iterations"] = {"per_seed": iterations, "summary": [
            summarize_iterations([it for it in iterations if it["mode"] == name])
            for name in dict.fromkeys(it["mode"] for it in iterations)]}
    del hf, runner
    if not args.no_training:
        rows = training_batch(docs, args.train_batch, args.train_seq_len, bos_id=tok.bos_token_id,
                              eos_id=tok.eos_token_id)
        result["training"] = t = training_speed(model, backbone, rows, steps=args.train_steps,
                                                warmup=1 if args.smoke else 2, device=device)
        print(f"  training: denoiser {t['denoiser_tokens_per_s']:.0f} tok/s, AR {t['ar_tokens_per_s']:.0f} tok/s, "
              f"ratio {t['ratio']:.2f}", flush=True)
    if not args.no_eval:
        from benchmarks.eval_suite import run_suite

        print("bench: evaluation suite (lm-evaluation-harness)", flush=True)
        result["eval_suite"] = run_suite(args.model, limit=args.eval_limit)
    return result


if __name__ == "__main__":
    sys.exit(main())
