"""The real model at batch 8: speculative decoding against AR on the same 8 prompts at once.

    python benchmarks/real_model_batch.py                      # smollm2-135m, bf16, seeds 0 1 2
    python benchmarks/real_model_batch.py --seeds 0 --rounds 1  # a quick look

Each seed draws 8 held-out windows (4 prose, 4 Python; `real_model.py`'s split and window
sampler, `--prompt-tokens` long, so no row is padded) and generates `--new-tokens` for all 8 rows in
one `generate` call per mode. EOS is ignored, so every mode writes the same number of tokens and
speeds compare like for like (the embedded benchmark's rule). Modes run interleaved, the order
rotating each round, after one short warm-up call per mode; a mode's time is the median over rounds. Ratios are within a seed: the
machine's absolute speed drifts.

Modes (bf16 unless --dtype float32, one thread unless --threads): `ar`; `spec` (the shipped settings); `spec_merged`
(`merge_adapters()`: the draft's inference copies); `spec_merged_bb8` (the same with
`batch_block_size=8`: 8-token drafts while rows share the batch; `--batch-blocks 8 4` adds
`spec_merged_bb4` too); with --int8-draft, `spec_int8` and `spec_int8_bb<k>` as well
(`merge_adapters(int8_draft=True)`: the draft's copies and head in dynamic int8); with --pack-rows r, `ar_packed<r>`
and `spec_int8_packed<r>_bb<k>` (the int8 draft on a context packed for inputs of up to r rows, each row also
checked against AR on that packed context). tokens / iteration is per row:
the rows' generated tokens over their denoiser forwards (with --lookup, `_lk<g>` modes, that is tokens per denoiser
forward: a row's lookup iterations run none, so it exceeds tokens per iteration). `= AR` counts rows whose tokens equal AR's
(in bf16 a 16-row verify may round differently from a 1-row step, so this need not be 8/8; the
float32 exactness check is `real_model.py`'s).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.real_model import held_out_documents, windows  # noqa: E402
from twotower.decoding import Autoregressive, NgramLookup, Speculative  # noqa: E402
from twotower.model import TwoTowerLM  # noqa: E402

def build_modes(batch_blocks: list[int], int8_draft: bool = False, pack_rows: list[int] = (), only=None,
                lookup: list[int] = (), lookup_max: int | None = None) -> dict:
    """name -> (model key: plain / merged / int8 / packed<r>, decoder): AR, the shipped speculative, merged, and
    merged with each `batch_block_size` in batch_blocks (shorter drafts while rows share the batch);
    with int8_draft the same on the int8 draft's copies; for each r in pack_rows, AR and the int8 draft on a
    context packed for inputs of up to r rows (`merge_adapters(int8_draft=True, pack_context=True,
    pack_rows=r)`). `only` keeps those modes and `ar`."""
    modes = {"ar": ("plain", Autoregressive()), "spec": ("plain", Speculative()),
             "spec_merged": ("merged", Speculative())}
    modes |= {f"spec_merged_bb{k}": ("merged", Speculative(batch_block_size=k)) for k in batch_blocks}
    if int8_draft:
        modes["spec_int8"] = ("int8", Speculative())
        modes |= {f"spec_int8_bb{k}": ("int8", Speculative(batch_block_size=k)) for k in batch_blocks}
    for r in pack_rows:
        modes[f"ar_packed{r}"] = (f"packed{r}", Autoregressive())
        modes |= {f"spec_int8_packed{r}_bb{k}": (f"packed{r}", Speculative(batch_block_size=k)) for k in batch_blocks}
        for g in lookup:  # prompt-lookup drafts (NgramLookup(g, max_tokens=lookup_max)) on the same copies
            modes |= {f"spec_int8_packed{r}_bb{k}_lk{g}": (f"packed{r}", Speculative(
                batch_block_size=k, lookup=NgramLookup(g, max_tokens=lookup_max))) for k in batch_blocks}
    if only is not None:
        unknown = sorted(set(only) - set(modes))
        if unknown:
            raise SystemExit(f"--only: unknown modes {unknown}; the modes of these flags are {sorted(modes)}")
        modes = {n: m for n, m in modes.items() if n in set(only) | {"ar"}}
    return modes


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=48)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--batch-blocks", type=int, nargs="*", default=[8],
                   help="a merged mode with Speculative(batch_block_size=k) for each k")
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16",
                   help="every mode's dtype: float32 on a CPU without a oneDNN bf16 path (twotower.hardware)")
    p.add_argument("--int8-draft", action="store_true",
                   help="also the int8 draft (merge_adapters(int8_draft=True)): spec_int8, spec_int8_bb<k>")
    p.add_argument("--pack-rows", type=int, nargs="*", default=[],
                   help="for each r, AR and the int8 draft on a packed context serving up to r rows: ar_packed<r>, "
                        "spec_int8_packed<r>_bb<k> (merge_adapters(int8_draft=True, pack_context=True, pack_rows=r))")
    p.add_argument("--lookup", type=int, nargs="*", default=[],
                   help="with --pack-rows: also spec_int8_packed<r>_bb<k>_lk<g>, prompt-lookup drafts of n-gram size g")
    p.add_argument("--lookup-max-tokens", type=int, default=None,
                   help="with --lookup: lookup drafts up to this long while a row runs alone (NgramLookup.max_tokens)")
    p.add_argument("--only", nargs="+", default=None, metavar="MODE", help="run only these modes (and ar)")
    p.add_argument("--out", default="benchmarks/results/real_model_batch8.json")
    return p.parse_args(argv)


def prompts_for(tok, docs: dict, seed: int, length: int) -> torch.Tensor:
    rng = random.Random(seed)
    rows = windows(tok, docs["prose"], 4, length, rng) + windows(tok, docs["python"], 4, length, rng)
    return torch.tensor(rows)


def timed(model, decoder, ids: torch.Tensor, new_tokens: int) -> tuple[float, torch.Tensor, torch.Tensor]:
    """(seconds, the new tokens (8, N), denoiser forwards per row)."""
    t0 = time.perf_counter()
    out = decoder.generate(model, ids, max_new_tokens=new_tokens, eos_token_id=None)
    return time.perf_counter() - t0, out.new_tokens, out.nfe


def measure_seed(models: dict, ids: torch.Tensor, args) -> dict:
    modes = build_modes(args.batch_blocks, args.int8_draft, args.pack_rows, args.only, args.lookup,
                        args.lookup_max_tokens)
    secs = {name: [] for name in modes}
    outs = {}
    names = list(modes)
    for name in names:  # warm-up: first calls pay for allocations and oneDNN's kernel choices
        key, dec = modes[name]
        timed(models[key], dec, ids, 4)
    for r in range(args.rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            key, dec = modes[name]
            dt, toks, nfe = timed(models[key], dec, ids, args.new_tokens)
            secs[name].append(dt)
            outs[name] = (toks, nfe)
    ar_tokens = outs["ar"][0]
    res = {}
    for name in modes:
        toks, nfe = outs[name]
        t = statistics.median(secs[name])
        ar = isinstance(modes[name][1], Autoregressive)
        res[name] = {"seconds": t, "tok_s": toks.numel() / t,
                     "tokens_per_iteration": 1.0 if ar else toks.numel() / float(nfe.sum()),
                     "rows_equal_ar": int((toks == ar_tokens).all(dim=1).sum())}
        same = f"ar_{modes[name][0]}"  # a packed mode is also checked against AR on its own packed context
        if not ar and same in outs:
            res[name]["rows_equal_same_context_ar"] = int((toks == outs[same][0]).all(dim=1).sum())
    for name in modes:
        res[name]["x_ar"] = res[name]["tok_s"] / res["ar"]["tok_s"]
    return res


def render(per_seed: dict) -> str:
    names = list(next(iter(per_seed.values())))
    lines = ["| mode | x AR, seeds " + " / ".join(str(s) for s in per_seed) + " | mean | tokens / iteration | = AR rows "
             "| = AR rows on its context |", "|---|---|---:|---:|---:|---:|"]
    for name in names:
        xs = [per_seed[s][name]["x_ar"] for s in per_seed]
        tpi = statistics.mean(per_seed[s][name]["tokens_per_iteration"] for s in per_seed)
        eq = sum(per_seed[s][name]["rows_equal_ar"] for s in per_seed)
        same = [per_seed[s][name].get("rows_equal_same_context_ar") for s in per_seed]
        same = "-" if None in same else f"{sum(same)}/{8 * len(per_seed)}"
        lines.append(f"| {name} | {' / '.join(f'{x:.2f}' for x in xs)} | {statistics.mean(xs):.2f} | "
                     f"{tpi:.2f} | {eq}/{8 * len(per_seed)} | {same} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    plain = TwoTowerLM.from_pretrained(args.model, dtype=dtype).eval()
    models = {"plain": plain}
    copies = {"merged": {}, "int8": {"int8_draft": True}}
    copies |= {f"packed{r}": {"int8_draft": True, "pack_context": True, "pack_rows": r} for r in args.pack_rows}
    for key in sorted({key for key, _ in build_modes(args.batch_blocks, args.int8_draft, args.pack_rows, args.only,
                                                     args.lookup, args.lookup_max_tokens).values()} - {"plain"}):
        models[key] = TwoTowerLM.from_pretrained(args.model, dtype=dtype).eval()
        models[key].merge_adapters(**copies[key])
    tok = plain.tokenizer
    docs = {"prose": held_out_documents("stdlib-docs"), "python": held_out_documents("stdlib")}
    per_seed = {}
    with torch.inference_mode():
        for seed in args.seeds:
            per_seed[seed] = measure_seed(models, prompts_for(tok, docs, seed, args.prompt_tokens), args)
            print(f"seed {seed}: " + ", ".join(f"{n} {v['x_ar']:.2f}x" for n, v in per_seed[seed].items()),
                  file=sys.stderr, flush=True)
    table = render(per_seed)
    print(table)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"args": vars(args), "per_seed": per_seed, "table": table}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
