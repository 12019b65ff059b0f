"""Batch 8 two ways: one `generate` call per 8 prompts, and the server's continuous batching over all of them.

    python benchmarks/continuous_batch.py                         # the embedded default, seeds 0 1 2
    python benchmarks/continuous_batch.py --model smollm2-135m --prompt-len 48 --int8-draft --pack-context \\
        --block-size 6 --threads 2                                # the real model as its serve recipe runs it

Why both: in one `generate` call the rows of a speculative batch keep different numbers of tokens per
iteration, so they finish at different iterations and the batch runs until its slowest row is done, with
fewer and fewer rows (AR's rows, all asked for the same count, finish together). A server does not wait:
its scheduler (`twotower.serving.Scheduler`, continuous batching at block boundaries) gives a finished
row's place to the next request. Both decoders run here both ways on the same prompts:

* static: `Decoder.generate` over the prompts in consecutive batches of --max-batch rows (the
  embedded benchmark's batch-8 protocol), with the mean rows a speculative iteration held (untimed: how much
  of each batch's work ran short of rows);
* continuous: every prompt submitted at once to one in-process `Scheduler(max_batch=--max-batch)`
  (no HTTP), which admits them as rows free up; timed until the last job is over. Each new row is
  prefilled alone there, for both decoders.

Prompts are held-out windows of the embedded corpus's held-out documents (`bench.py`'s), tokenised with
the model's own tokenizer; EOS is ignored, so every row writes exactly --max-new-tokens (the embedded
benchmark's rule) and times compare like for like. Greedy; every run's tokens must equal static AR's
(checked per prompt). Modes run interleaved, the order rotating each round, after a warm-up of each;
a mode's time is its median over rounds, and ratios are within a seed (the machine's speed drifts).
JSON to --out.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.workload import heldout_token_docs, select_windows  # noqa: E402
from twotower.decoding import Autoregressive, Speculative  # noqa: E402
from twotower.model import TwoTowerLM  # noqa: E402
from twotower.serving.requests import CompletionRequest  # noqa: E402
from twotower.serving.scheduler import Job, Scheduler  # noqa: E402
from twotower.tokenizers import tokenizer_for  # noqa: E402

MODES = ("ar_static", "spec_static", "ar_continuous", "spec_continuous")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="embedded", help="a two-tower directory or a built-in name")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--prompts", type=int, default=32, help="held-out prompts per seed")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--max-batch", type=int, default=8)
    p.add_argument("--block-size", type=int, default=None, help="speculative draft length (None: the model's)")
    p.add_argument("--batch-block-size", type=int, default=None, help="Speculative(batch_block_size=...)")
    p.add_argument("--int8-draft", action="store_true", help="merge_adapters(int8_draft=True)")
    p.add_argument("--pack-context", action="store_true", help="merge_adapters(pack_context=True)")
    p.add_argument("--rounds", type=int, default=2, help="timed rounds per seed (after one warm-up)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds one continuous run may take")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    for name in ("prompts", "prompt_len", "max_new_tokens", "max_batch", "rounds", "threads"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    return args


def static_run(model, decoder, prompts: list[list[int]], new_tokens: int, max_batch: int,
               rows: list | None = None) -> list[list[int]]:
    """Each prompt's tokens, from `generate` over consecutive batches of `max_batch` prompts (equal lengths).
    rows: if given, gets (iterations, row-iterations) per batch: how full the batch stayed."""
    out = []
    for i in range(0, len(prompts), max_batch):
        ids = torch.tensor(prompts[i: i + max_batch])
        res = decoder.generate(model, ids, torch.ones_like(ids), max_new_tokens=new_tokens, eos_token_id=None)
        out.extend(res.new_tokens.tolist())
        if rows is not None:
            rows.append((max(int(res.blocks), 1), int(res.nfe.sum())))
    return out


def continuous_run(model, decoder, name: str, prompts: list[list[int]], new_tokens: int, max_batch: int, tok,
                   timeout: float) -> list[list[int]]:
    """Each prompt's tokens, from one in-process Scheduler that admits them all as rows free up."""
    sched = Scheduler(model.towers(), max_batch=max_batch).start()
    try:
        # No EOS ids: every row writes new_tokens. Each job decodes its text as it commits (the server's own
        # bookkeeping, paid by both decoders: once per AR step, once per speculative iteration).
        jobs = [sched.submit(Job(CompletionRequest(prompt=ids, prompt_ids=list(ids), max_tokens=new_tokens,
                                                   decoder=decoder, decoder_name=name), tok, eos_ids=[]))
                for ids in prompts]
        deadline = time.perf_counter() + timeout
        while not all(j.over for j in jobs):
            if time.perf_counter() > deadline:
                raise TimeoutError(f"continuous {name}: not done after {timeout:.0f} s (raise --timeout)")
            time.sleep(0.005)
    finally:
        sched.stop()
    failed = [j.error for j in jobs if j.error is not None]
    if failed:
        raise RuntimeError(f"continuous {name}: {len(failed)} jobs failed, the first: {failed[0]}")
    return [list(j.tokens) for j in jobs]


def decoders(args) -> dict:
    spec = Speculative(block_size=args.block_size, batch_block_size=args.batch_block_size)
    return {"ar": Autoregressive(), "spec": spec}


def run_mode(model, mode: str, prompts, args, tok) -> tuple[float, list[list[int]]]:
    kind, how = mode.split("_")
    decoder = decoders(args)[kind]
    t0 = time.perf_counter()
    with torch.inference_mode():
        if how == "static":
            out = static_run(model, decoder, prompts, args.max_new_tokens, args.max_batch)
        else:
            out = continuous_run(model, decoder, kind, prompts, args.max_new_tokens, args.max_batch, tok, args.timeout)
    return time.perf_counter() - t0, out


def measure_seed(model, prompts, args, tok) -> dict:
    """{mode: median seconds}, each mode's tokens checked against static AR's, and the ratios."""
    for mode in MODES:  # warm-up on the first batch's worth of prompts
        run_mode(model, mode, prompts[: args.max_batch], args, tok)
    times: dict[str, list[float]] = {m: [] for m in MODES}
    reference, outs = None, {}
    for r in range(args.rounds):
        for mode in MODES[r % len(MODES):] + MODES[: r % len(MODES)]:
            seconds, out = run_mode(model, mode, prompts, args, tok)
            times[mode].append(seconds)
            if mode == "ar_static" and reference is None:
                reference = out
            outs.setdefault(mode, []).append(out)
        print(f"  round {r + 1}/{args.rounds}: " + ", ".join(f"{m} {times[m][-1]:.2f} s" for m in MODES),
              file=sys.stderr, flush=True)
    med = {m: statistics.median(v) for m, v in times.items()}
    same = {m: all(out == reference for out in outs[m]) for m in MODES}  # every round, every row
    rows_equal = {m: sum(a == b for a, b in zip(outs[m][-1], reference)) for m in MODES}
    filled: list = []  # untimed: how many rows a static speculative iteration holds on average
    with torch.inference_mode():
        static_run(model, decoders(args)["spec"], prompts, args.max_new_tokens, args.max_batch, filled)
    return {"seconds": med, "equal_to_ar": same, "rows_equal_to_ar": rows_equal,
            "spec_static_rows_per_iteration": sum(r for _, r in filled) / sum(i for i, _ in filled),
            "spec_over_ar_static": med["ar_static"] / med["spec_static"],
            "spec_over_ar_continuous": med["ar_continuous"] / med["spec_continuous"],
            "continuous_spec_over_static_ar": med["ar_static"] / med["spec_continuous"],
            "tokens": len(prompts) * args.max_new_tokens}


def load(args) -> tuple[TwoTowerLM, object]:
    from twotower.hub import resolve_model

    path = resolve_model(args.model)
    model = TwoTowerLM.from_pretrained(path).eval()
    if args.int8_draft or args.pack_context:
        model.merge_adapters(int8_draft=args.int8_draft, pack_context=args.pack_context)
    return model, tokenizer_for(model, path)


def render(per_seed: dict) -> str:
    lines = ["| seed | AR static s | spec static s | AR continuous s | spec continuous s | spec / AR, static "
             "| spec / AR, continuous | spec continuous / AR static | rows per static spec iteration | output = static AR |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for seed, r in per_seed.items():
        s = r["seconds"]
        lines.append(f"| {seed} | {s['ar_static']:.2f} | {s['spec_static']:.2f} | {s['ar_continuous']:.2f} | "
                     f"{s['spec_continuous']:.2f} | {r['spec_over_ar_static']:.3f} | {r['spec_over_ar_continuous']:.3f} | "
                     f"{r['continuous_spec_over_static_ar']:.3f} | {r['spec_static_rows_per_iteration']:.2f} | "
                     f"{'yes' if all(r['equal_to_ar'].values()) else 'NO'} |")
    means = {k: statistics.mean(r[k] for r in per_seed.values()) for k in
             ("spec_over_ar_static", "spec_over_ar_continuous", "continuous_spec_over_static_ar")}
    lines.append(f"| mean | | | | | {means['spec_over_ar_static']:.3f} | {means['spec_over_ar_continuous']:.3f} | "
                 f"{means['continuous_spec_over_static_ar']:.3f} | | |")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    model, tok = load(args)
    docs, _ = heldout_token_docs(False, tok)
    per_seed = {}
    for seed in args.seeds:
        wins = select_windows(docs, args.prompts, args.prompt_len, args.max_new_tokens, bos_id=tok.bos_token_id,
                              seed=seed)
        print(f"seed {seed}: {len(wins)} prompts", file=sys.stderr, flush=True)
        per_seed[seed] = measure_seed(model, [w.ids for w in wins], args, tok)
    print(f"{args.model}: {args.prompts} prompts x {args.max_new_tokens} tokens per seed, max batch {args.max_batch}, "
          f"{args.threads} thread(s), median of {args.rounds} rounds\n")
    print(render(per_seed))
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "per_seed": per_seed}, indent=1))
    bad = [s for s, r in per_seed.items() if not all(r["equal_to_ar"].values())]
    if bad:
        print(f"\nERROR: output differs from static AR on seeds {bad}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
