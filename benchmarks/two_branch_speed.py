"""TwoBranchSpeculative against Speculative (and AR), interleaved prompt by prompt, batch 1, greedy.

Per mode: tokens per iteration (generated tokens / denoiser forwards), tokens per second, and whether
the output is AR's token for token (it must be for both). Modes run on each prompt in a rotating
order so the machine's load hits them alike.

    python benchmarks/two_branch_speed.py twotower/assets/twotower --prompts 32
    python benchmarks/two_branch_speed.py smollm2-135m --seeds 0
    python benchmarks/two_branch_speed.py smollm2-135m --dtype bfloat16 --merged --out OUT.json
    # float32 on a CPU without AMX: the int8 draft, a packed context and 6-position drafts for every mode
    python benchmarks/two_branch_speed.py smollm2-135m --int8-draft --pack-context --block-size 6 --threads 2
    # trees beside prompt-lookup drafts (both speculative modes take the same lookup)
    python benchmarks/two_branch_speed.py smollm2-135m --dtype bfloat16 --pack-context --block-size 6 \
        --lookup 3 --lookup-max-tokens 15 --rules likeliest likeliest:3:3

Prints a table and writes JSON (default benchmarks/results/two_branch_speed_<model>.json).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.two_branch_potential import byte_prompts, real_prompts, write_result  # noqa: E402
from twotower.decoding import Autoregressive, NgramLookup, Speculative, TwoBranchSpeculative  # noqa: E402
from twotower.model import TwoTowerLM  # noqa: E402


def modes(rules: list[str], block_size: int | None = None, lookup: NgramLookup | None = None) -> dict:
    """AR, Speculative and one TwoBranchSpeculative per rule: "<branch_at>[/<branch_len>][:<forks>[:<alternatives>]]"
    (e.g. "likeliest/4", "likeliest:3:3"); the speculative modes draft `block_size` positions (None: the model's block)
    and all take `lookup` (None: no prompt-lookup drafts), so "speed vs spec" compares trees on the same lookups."""
    out = {"ar": Autoregressive(), "spec": Speculative(block_size=block_size, lookup=lookup)}
    for r in rules:
        rule, *tree = r.split(":")
        at, _, length = rule.partition("/")
        forks, alternatives = (list(map(int, tree)) + [1, 1])[:2]
        out[f"two_branch_{r}"] = TwoBranchSpeculative(float(at) if at[0].isdigit() else at,
                                                      int(length) if length else None, block_size=block_size,
                                                      forks=forks, alternatives=alternatives, lookup=lookup)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("model")
    p.add_argument("--source", choices=["auto", "bytes", "real"], default="auto")
    p.add_argument("--seeds", type=int, nargs="+", default=[1])
    p.add_argument("--prompts", type=int, default=32, help="byte windows per seed")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--per-kind", type=int, default=4)
    p.add_argument("--prompt-tokens", type=int, default=48)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--rules", nargs="+", default=["likeliest", "likeliest/4"], help="branch_at[/branch_len][:forks[:alternatives]] values (a float: a threshold)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                   help="bfloat16: the speed question (output may differ from AR by rounding)")
    p.add_argument("--merged", action="store_true",
                   help="TwoTowerLM.merge_adapters() first: both speculative modes draft with the inference copies")
    p.add_argument("--int8-draft", action="store_true",
                   help="merge_adapters(int8_draft=True): the draft's copies and head in dynamic int8 (a CPU)")
    p.add_argument("--pack-context", action="store_true",
                   help="merge_adapters(pack_context=True): the context's products pre-packed, AR's steps included")
    p.add_argument("--block-size", type=int, default=None, help="positions per draft (default: the model's block)")
    p.add_argument("--lookup", type=int, default=None, metavar="G",
                   help="prompt-lookup drafts of G-grams for every speculative mode (default: none)")
    p.add_argument("--lookup-max-tokens", type=int, default=None, metavar="M",
                   help="with --lookup: lookup drafts of up to M tokens (NgramLookup(G, max_tokens=M))")
    p.add_argument("--out")
    args = p.parse_args(argv)
    if args.lookup_max_tokens is not None and args.lookup is None:
        p.error(f"--lookup-max-tokens {args.lookup_max_tokens} needs --lookup G (the n-gram size), e.g. --lookup 3")
    torch.set_num_threads(args.threads)
    model = TwoTowerLM.from_pretrained(args.model, dtype=getattr(torch, args.dtype)).eval()
    if args.merged or args.int8_draft or args.pack_context:  # AR's context is touched only by pack_context
        model.merge_adapters(int8_draft=args.int8_draft, pack_context=args.pack_context)
    source = args.source if args.source != "auto" else ("bytes" if model.config.vocab_size <= 512 else "real")
    lookup = None if args.lookup is None else NgramLookup(args.lookup, max_tokens=args.lookup_max_tokens)
    ms = modes(args.rules, args.block_size, lookup)
    names = list(ms)
    rows = {n: {"tokens": 0, "nfe": 0, "seconds": 0.0, "equal_ar": True} for n in names}
    with torch.inference_mode():
        prompts, eos = (byte_prompts if source == "bytes" else real_prompts)(model, args)
        for k, pr in enumerate(prompts):
            outs = {}
            for name in names[k % len(names):] + names[:k % len(names)]:
                t0 = time.perf_counter()
                o = ms[name].generate(model, pr[None], max_new_tokens=args.max_new_tokens, eos_token_id=eos)
                dt = time.perf_counter() - t0
                g = int(o.num_generated[0])
                outs[name] = o.new_tokens[0, :g]
                r = rows[name]
                r["tokens"] += g
                r["nfe"] += int(o.nfe[0]) if name != "ar" else g
                r["seconds"] += dt
            for name in names:
                rows[name]["equal_ar"] &= bool(torch.equal(outs[name], outs["ar"]))
    res = {"settings": {**vars(args), "source": source, "prompts_total": len(prompts)}, "modes": {}}
    lines = [f"### {args.model}: {len(prompts)} prompts, batch 1, greedy, {args.max_new_tokens} new tokens, "
             f"{args.threads} thread(s), {args.dtype}{', merged' if args.merged else ''}"
             f"{', int8 draft' if args.int8_draft else ''}{', packed context' if args.pack_context else ''}"
             f"{f', {args.block_size}-position drafts' if args.block_size else ''}"
             f"{f', lookups {lookup!r}' if lookup else ''}", "",
             "| mode | tokens/iteration | tokens/s | speed vs spec | output == AR |", "|---|---|---|---|---|"]
    base = rows["spec"]["tokens"] / rows["spec"]["seconds"]
    for name in names:
        r = rows[name]
        m = {"tokens_per_iter": r["tokens"] / r["nfe"], "tokens_per_s": r["tokens"] / r["seconds"],
             "equal_ar": r["equal_ar"], "tokens": r["tokens"], "seconds": r["seconds"]}
        res["modes"][name] = m
        lines.append(f"| {name} | {m['tokens_per_iter']:.3f} | {m['tokens_per_s']:.1f} | "
                     f"{m['tokens_per_s'] / base:.2f}x | {m['equal_ar']} |")
    print("\n".join(lines))
    write_result(res, args, "two_branch_speed")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
