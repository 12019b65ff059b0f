"""The real model: SmolLM2-135M-Instruct as two towers, measured against its own AR decoding.

    python benchmarks/real_model.py                         # the shipped "smollm2-135m", 3 seeds
    python benchmarks/real_model.py --model DIR --seeds 0   # any two-tower folder, one seed

Held-out prompts of three kinds, none in the training text (`recipes/smollm2_denoiser.yaml`):
  * prose:        a window of a held-out "stdlib-docs" document (English docstrings / help topics);
  * python:       a window of a held-out stdlib source file;
  * instruction:  one of `INSTRUCTIONS` (written for this benchmark), through the chat template.
Each seed draws its own windows and instructions. Batch 1, greedy, block 16, EOS ends a row.

Modes run prompt by prompt, interleaved, so the machine's load hits them alike:
  ar / spec in bfloat16 (the speed comparison in one dtype), ar / spec in float32 (the exactness
  check: speculative output must equal AR token for token) and mask-diffusion samplers in bfloat16.
  --merged adds the inference copies of `TwoTowerLM.merge_adapters` side by side with the plain
  modes: spec_merged (the LoRA merged into the denoiser's weights, its q/k/v and gate/up fused, the
  copies and its head pre-packed for oneDNN),
  ar_fused / spec_fused (the context tower's projections fused too), ar_packed / spec_packed (the
  context's products pre-packed too; AR's output must stay the plain AR's) and spec_fp32_fused (must
  equal the plain float32 AR). --only picks modes, e.g. the speed question alone:

    python benchmarks/real_model.py --merged --diffusion --next-lines 0 --per-kind 3 --threads 1 \
        --only ar spec spec_merged ar_fused spec_fused spec_fp32_fused
On a CPU without a oneDNN bf16 path, float32 only: the int8 draft (`spec_fp32_int8`, `..._b<n>` with
--short-drafts) and the packed float32 context (`ar_fp32_packed`, `spec_fp32_int8_packed[_b<n>]`),
each packed mode also checked against AR on its own packed context:

    python benchmarks/real_model.py --merged --diffusion --next-lines 0 --per-kind 3 --threads 2 \
        --baseline ar_fp32 --short-drafts 6 8 --only ar_fp32 ar_fp32_packed spec_fp32_int8_b6 \
        spec_fp32_int8_packed spec_fp32_int8_packed_b6 spec_fp32_int8_packed_b8
On a CPU with a oneDNN bf16 path, the bf16 counterpart: the merged draft on the packed bf16 context with
n-position drafts (`spec_packed_b<n>`) and lookups beside them (`spec_packed_b<n>_lk<g>_m<M>`):

    python benchmarks/real_model.py --merged --diffusion --next-lines 0 --per-kind 3 --threads 2 \
        --short-drafts 6 --lookup 3 --lookup-max-tokens 15 --only ar ar_packed spec_packed_b6 spec_packed_b6_lk3_m15
The same with the draft in int8 (`spec_packed_int8_b<n>`, `spec_packed_int8_b<n>_lk<g>_m<M>`: the draft's copies
and head as dynamic int8, as `spec_fp32_int8` holds them, on the same packed bf16 context).
Quality of a diffusion mode (judged against AR's own output on the same prompts):
  * NLL retention: AR's NLL / the mode's NLL of its generated text under the float32 AR model;
  * distinct-4 retention: the mode's distinct-4 / AR's;
  * prefix agreement: tokens until the first difference from AR's output;
  * next-line task: held-out Python cut at a line end; exact match of the generated next line
    (AR's own score is printed: the task is only a gate where AR scores well above chance).
Prints markdown tables and writes JSON (default benchmarks/results/real_model.json).
"""

from __future__ import annotations

import argparse
import functools
import json
import random
import statistics
import sys
import time
from pathlib import Path

import torch

from twotower.data.sources import held_out, iter_documents
from twotower.decoding import Autoregressive, MaskDiffusion, NgramLookup, Speculative
from twotower.evaluation import continuation_nll, distinct_n
from twotower.model import TwoTowerLM
from twotower.samplers import ConfidenceThreshold, FrontierRun
from twotower.tokenizers import frequent_tokens

# The training recipe's split: documents whose name hashes below this are held out.
VAL_FRACTION = 0.02

INSTRUCTIONS = [
    "Give three tips for keeping a small garden healthy.",
    "Explain why the sky looks blue during the day.",
    "Write a short poem about a lighthouse at night.",
    "What are the main differences between a list and a tuple in Python?",
    "Describe how a bicycle converts pedalling into motion.",
    "Suggest a simple dinner recipe with rice and vegetables.",
    "Explain what a prime number is to a ten-year-old.",
    "Write a polite email asking a colleague to review a document.",
    "Why do leaves change colour in autumn?",
    "List four ways to save water at home.",
    "Write a Python function that returns the largest of three numbers.",
    "Summarize the plot of a story about a lost dog finding its way home.",
    "What should someone pack for a weekend hiking trip?",
    "Explain the difference between weather and climate.",
    "Write a haiku about morning coffee.",
    "How does a refrigerator keep food cold?",
    "Give advice to a student preparing for an exam.",
    "Describe the water cycle in simple terms.",
    "Write a Python function that counts the vowels in a string.",
    "What are the benefits of reading books regularly?",
    "Explain what an algorithm is with an everyday example.",
    "Write a short story opening set in a busy train station.",
    "How can I improve my sleep habits?",
    "Explain why exercise is good for the heart.",
]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m", help="a two-tower folder or a built-in name")
    p.add_argument("--alt-model", default=None,
                   help="a second two-tower model over the same backbone (a shallow draft, another stage): with "
                        "--merged and --short-drafts every bf16 packed speculative mode and spec_fp32_merged_b<n> "
                        "(vocabulary twins included) gets an <mode>_alt twin that drafts with it, in the same run")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--per-kind", type=int, default=4, help="prompts of each kind per seed")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--prompt-tokens", type=int, default=48, help="prose / python prompt window")
    p.add_argument("--next-lines", type=int, default=16, help="next-line task prompts per seed (0: skip)")
    p.add_argument("--diffusion", nargs="*", default=["confidence:0.9", "frontier:0.7"],
                   help="samplers: confidence:THRESHOLD or frontier:MIN_JOINT")
    p.add_argument("--spec-cuts", type=float, nargs="*", default=[],
                   help="also run Speculative(draft_cut=c) in bf16 for each c (adaptive draft length)")
    p.add_argument("--short-drafts", type=int, nargs="*", default=[],
                   help="with --merged: also run Speculative(block_size=n) on the merged copies for each n, as "
                        "spec_merged_b<n> (bf16) and spec_fp32_merged_b<n> (float32): drafts (and verifies) of n "
                        "positions, for CPUs where a forward's cost grows with its positions")
    p.add_argument("--draft-steps", type=int, nargs="*", default=[],
                   help="with --merged and --short-drafts: also run Speculative(block_size=n, draft_steps=k) for "
                        "each k, as spec_merged_b<n>_s<k> (bf16) and spec_fp32_int8_packed_b<n>_s<k> (float32): "
                        "drafts of k denoiser forwards (the first commits its confident positions, "
                        "ConfidenceThreshold(0.8); the last fills the rest)")
    p.add_argument("--lookup", type=int, nargs="*", default=[],
                   help="also run prompt-lookup drafts (Speculative(lookup=g)) for each n-gram size g: spec_fp32_lk<g> "
                        "(float32, block 16) and, with --merged and --short-drafts, spec_fp32_int8_packed_b<n>_lk<g> "
                        "and spec_fp32_int8_packed_b16_lk<g>")
    p.add_argument("--lookup-max-tokens", type=int, default=None,
                   help="with --lookup, --merged and --short-drafts: also run spec_fp32_int8_packed_b<n>_lk<g>_m<M>, "
                        "lookup drafts of up to M tokens (NgramLookup(g, max_tokens=M)) beside the n-position "
                        "denoiser drafts")
    p.add_argument("--draft-vocab", nargs="*", default=[], metavar="K[:F]",
                   help="with --merged and --short-drafts: also run every bf16 packed mode and spec_fp32_merged_b<n> "
                        "with the draft's head over a vocabulary subset (merge_adapters(draft_vocab=...)): the K "
                        "tokens most frequent in the recipe's training split plus every id below F "
                        "(tokenizers.frequent_tokens), as <mode>_v<K> or <mode>_v<K>f<F>")
    p.add_argument("--merged", action="store_true",
                   help="also run the inference copies (TwoTowerLM.merge_adapters): spec_merged (LoRA merged, "
                        "q/k/v and gate/up fused, pre-packed for oneDNN in the denoiser), ar_fused / spec_fused "
                        "(the context tower fused too), ar_packed / spec_packed (the context packed too) in bf16, "
                        "and spec_fp32_fused (checked against the plain float32 AR); spec_int8 / spec_fp32_int8: "
                        "merge_adapters(int8_draft=True), the draft's copies and head in dynamic int8")
    p.add_argument("--only", nargs="+", default=None, metavar="MODE",
                   help="run only these modes (the --baseline AR is always kept: every ratio is against it; a "
                        "speculative mode keeps the AR it is checked against), e.g. --only ar spec spec_merged")
    p.add_argument("--baseline", choices=["ar", "ar_fp32"], default="ar",
                   help="the AR mode every x AR ratio and quality retention is against: ar (bfloat16, the "
                        "default) or ar_fp32, for a CPU without a oneDNN bf16 path, where bf16 runs a slow "
                        "fallback (twotower.hardware); with --only ar_fp32 ... no bf16 model is loaded")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--device", default="cpu",
                   help="where both towers run, e.g. cuda (benchmarks/gpu_checks.sh): the CPU-only copies (int8, "
                        "oneDNN packing) fall back to plain products there; each timed call ends in a device sync")
    p.add_argument("--out", default="benchmarks/results/real_model.json")
    p.add_argument("--samples", type=int, default=2, help="completions per mode to print")
    p.add_argument("--next-line-only", action="store_true", help="run only the next-line task (quality, no timing)")
    return p.parse_args(argv)


# ---- prompts ----------------------------------------------------------------------------------
def held_out_documents(source: str) -> list[str]:
    """Texts of the documents of `source` that the training recipe's split holds out."""
    return [d.text for d in iter_documents(source) if held_out(d.name, VAL_FRACTION) and len(d.text) > 2000]


def windows(tok, texts: list[str], n: int, length: int, rng: random.Random) -> list[list[int]]:
    """n token windows of `length`, each from a random held-out document at a random offset."""
    out = []
    while len(out) < n:
        ids = tok.encode(rng.choice(texts))
        if len(ids) > length + 8:
            start = rng.randrange(0, len(ids) - length)
            out.append(ids[start:start + length])
    return out


def chat_ids(tok, text: str) -> list[int]:
    ids = tok.hf.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def next_line_cases(tok, texts: list[str], n: int, rng: random.Random) -> list[tuple[list[int], str]]:
    """(prompt ids ending at a line end, the true next line) from held-out Python, non-trivial lines only."""
    cases = []
    while len(cases) < n:
        lines = rng.choice(texts).split("\n")
        i = rng.randrange(8, max(9, len(lines) - 1))
        if i >= len(lines) or len(lines[i].strip()) < 12:
            continue
        prompt = "\n".join(lines[max(0, i - 12):i]) + "\n"
        cases.append((tok.encode(prompt), lines[i]))
    return cases


# ---- running ----------------------------------------------------------------------------------
def sync(device: torch.device) -> None:
    """Wait for the device's queued work (a GPU runs asynchronously; a CPU needs nothing)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run(model, decoder, ids: list[int], new_tokens: int, eos) -> tuple[list[int], float, dict]:
    device = model.context.lm_head.weight.device
    x = torch.tensor([ids], device=device)
    sync(device)
    t0 = time.perf_counter()
    out = decoder.generate(model, x, max_new_tokens=new_tokens, eos_token_id=eos)
    sync(device)
    dt = time.perf_counter() - t0
    n = int(out.num_generated[0])
    return out.new_tokens[0, :n].tolist(), dt, {"nfe": int(out.nfe[0]), "blocks": out.blocks}


def prefix_agreement(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


# The models a mode may run on: dtype, and which inference copies (`TwoTowerLM.merge_adapters`).
# A MODELS key ending so loads --alt-model instead of --model (`build_modes(alt=True)`).
ALT = "_alt"
MODELS = {"bf16": (torch.bfloat16, None), "fp32": (torch.float32, None),
          "bf16_merged": (torch.bfloat16, {}),  # merge_adapters()'s defaults: merged, fused, packed
          "bf16_fused": (torch.bfloat16, {"fuse_context": True}),
          "fp32_fused": (torch.float32, {"fuse_context": True}),
          "fp32_merged": (torch.float32, {}),  # merged, fused and (where oneDNN packs float32) packed
          "fp32_int8": (torch.float32, {"int8_draft": True}),  # merged and fused, the draft's copies int8
          # the context's products pre-packed for oneDNN too (float32 packs wherever oneDNN does)
          "fp32_packed": (torch.float32, {"pack_context": True}),
          "fp32_int8_packed": (torch.float32, {"int8_draft": True, "pack_context": True}),
          # packed for at most 16 rows, as bf16 is (float32's default is 128: prefills of <= 128 tokens pack too)
          "fp32_packed16": (torch.float32, {"pack_context": True, "pack_rows": 16}),
          "fp32_int8_packed16": (torch.float32, {"int8_draft": True, "pack_context": True, "pack_rows": 16}),
          "bf16_int8": (torch.bfloat16, {"int8_draft": True}),
          "bf16_packed": (torch.bfloat16, {"pack_context": True}),
          # the draft in int8 on the packed bf16 context: both drafting and verifying read the fewest bytes
          "bf16_packed_int8": (torch.bfloat16, {"pack_context": True, "int8_draft": True})}


def build_modes(samplers: list[str], cuts: list[float] = (), merged: bool = False, only=None,
                baseline: str = "ar", short: list[int] = (), draft_steps: list[int] = (), lookup: list[int] = (),
                lookup_max: int | None = None, vocabs: list[str] = (), alt: bool = False) -> dict:
    """name -> (model key in MODELS, decoder). `only` keeps those modes plus the AR each is measured against."""
    modes = {"ar": ("bf16", Autoregressive()), "spec": ("bf16", Speculative()),
             "ar_fp32": ("fp32", Autoregressive()), "spec_fp32": ("fp32", Speculative())}
    if merged:
        modes |= {"spec_merged": ("bf16_merged", Speculative()), "ar_fused": ("bf16_fused", Autoregressive()),
                  "spec_fused": ("bf16_fused", Speculative()), "spec_fp32_fused": ("fp32_fused", Speculative()),
                  "spec_fp32_merged": ("fp32_merged", Speculative()), "ar_fp32_fused": ("fp32_fused", Autoregressive()),
                  "ar_packed": ("bf16_packed", Autoregressive()), "spec_packed": ("bf16_packed", Speculative())}
    for c in cuts:  # a draft ends where the running product of its confidences falls below c
        modes[f"spec_cut{c}"] = ("bf16", Speculative(draft_cut=c))
        if merged:
            modes[f"spec_fp32_merged_cut{c}"] = ("fp32_merged", Speculative(draft_cut=c))
            modes[f"spec_fp32_int8_cut{c}"] = ("fp32_int8", Speculative(draft_cut=c))
    if merged:  # the draft's copies in int8 (`merge_adapters(int8_draft=True)`), verified in the model's dtype
        modes |= {"spec_int8": ("bf16_int8", Speculative()), "spec_fp32_int8": ("fp32_int8", Speculative()),
                  "ar_fp32_packed": ("fp32_packed", Autoregressive()), "spec_fp32_packed": ("fp32_packed", Speculative()),
                  "spec_fp32_int8_packed": ("fp32_int8_packed", Speculative()),
                  "ar_fp32_packed16": ("fp32_packed16", Autoregressive())}
    for n in short if merged else ():
        modes[f"spec_merged_b{n}"] = ("bf16_merged", Speculative(block_size=n))
        modes[f"spec_fp32_merged_b{n}"] = ("fp32_merged", Speculative(block_size=n))
        modes[f"spec_int8_b{n}"] = ("bf16_int8", Speculative(block_size=n))
        modes[f"spec_fp32_int8_b{n}"] = ("fp32_int8", Speculative(block_size=n))
        modes[f"spec_fp32_int8_packed_b{n}"] = ("fp32_int8_packed", Speculative(block_size=n))
        modes[f"spec_fp32_int8_packed16_b{n}"] = ("fp32_int8_packed16", Speculative(block_size=n))
        # bf16 on a CPU with a oneDNN bf16 path: the merged draft on the packed bf16 context (ar_packed's model).
        modes[f"spec_packed_b{n}"] = ("bf16_packed", Speculative(block_size=n))
        modes[f"spec_packed_int8_b{n}"] = ("bf16_packed_int8", Speculative(block_size=n))
        for k in draft_steps:  # multi-step drafts: more accepted tokens for one more draft forward each
            modes[f"spec_merged_b{n}_s{k}"] = ("bf16_merged", Speculative(block_size=n, draft_steps=k))
            modes[f"spec_fp32_int8_packed_b{n}_s{k}"] = ("fp32_int8_packed", Speculative(block_size=n, draft_steps=k))
    for g in lookup:  # prompt-lookup drafts: the row's own earlier n-grams, no denoiser forward where one is found
        modes[f"spec_fp32_lk{g}"] = ("fp32", Speculative(lookup=g))
        for n in (*short, 16) if merged and short else ():
            modes[f"spec_fp32_int8_packed_b{n}_lk{g}"] = ("fp32_int8_packed", Speculative(block_size=n, lookup=g))
            if lookup_max is not None and n in short:
                long_lookup = NgramLookup(g, max_tokens=lookup_max)
                modes[f"spec_fp32_int8_packed_b{n}_lk{g}_m{lookup_max}"] = (
                    "fp32_int8_packed", Speculative(block_size=n, lookup=long_lookup))
                # the plain float32 context: on a CPU where packing float32 does not pay
                modes[f"spec_fp32_int8_b{n}_lk{g}_m{lookup_max}"] = (
                    "fp32_int8", Speculative(block_size=n, lookup=long_lookup))
                modes[f"spec_packed_b{n}_lk{g}_m{lookup_max}"] = (
                    "bf16_packed", Speculative(block_size=n, lookup=long_lookup))
                modes[f"spec_packed_int8_b{n}_lk{g}_m{lookup_max}"] = (
                    "bf16_packed_int8", Speculative(block_size=n, lookup=long_lookup))
    drafts = twinned_drafts(modes)  # taken once: a second --draft-vocab must not twin the first one's twins
    for spec in vocabs if merged and short else ():
        tag = vocab_model_keys(spec)
        modes |= {f"{name}_{tag}": (f"{key}_{tag}", dec) for name, key, dec in drafts}
    for name, key, dec in twinned_drafts(modes) if alt and merged and short else ():  # vocabulary twins included
        MODELS[f"{key}{ALT}"] = MODELS[key]  # the same dtype and copies, over --alt-model's weights
        modes[f"{name}{ALT}"] = (f"{key}{ALT}", dec)
    for s in samplers:
        kind, _, value = s.partition(":")
        sampler = {"confidence": ConfidenceThreshold, "frontier": FrontierRun}[kind](float(value))
        modes[f"diff_{kind}{value}"] = ("bf16", MaskDiffusion(sampler))
    if only is not None:
        unknown = sorted(set(only) - set(modes))
        if unknown:
            raise SystemExit(f"--only: unknown modes {unknown}; the modes of these flags are {sorted(modes)}")
        keep = set(only) | {baseline} | {reference_ar(modes, n) for n in only if n.startswith("spec")}
        modes = {n: m for n, m in modes.items() if n in keep}
    return modes


def twinned_drafts(modes: dict) -> list[tuple]:
    """(name, key, decoder) of the modes --draft-vocab and --alt-model twin: the speculative modes on a bf16
    packed model or with the int8 draft on a float32 one, and spec_fp32_merged_b<n>, with any twins they
    already have."""
    return [(name, key, dec) for name, (key, dec) in modes.items()
            if key.startswith(("bf16_packed", "fp32_int8")) and name.startswith("spec")
            or name.startswith("spec_fp32_merged_b")]


def vocab_model_keys(spec: str) -> str:
    """Register the MODELS keys of a --draft-vocab spec "K" or "K:F" (a twin of each of `twinned_drafts`' models,
    with draft_vocab added to its copies); its tag."""
    k, _, f = spec.partition(":")
    if not k.isdigit() or f and not f.isdigit():
        raise SystemExit(f"--draft-vocab: {spec!r} is not K or K:F (two counts of tokens, e.g. 8192:8192)")
    tag = f"v{k}" + (f"f{f}" if f else "")
    vocab = (int(k), int(f or 0))
    for key in ("bf16_packed", "bf16_packed_int8", "fp32_int8", "fp32_int8_packed", "fp32_int8_packed16", "fp32_merged"):
        dtype, merge = MODELS[key]
        MODELS[f"{key}_{tag}"] = (dtype, {**merge, "draft_vocab": vocab})
    return tag


@functools.cache
def training_texts() -> tuple[str, ...]:
    """The recipe's training split (stdlib + stdlib-docs, the documents `held_out_documents` leaves)."""
    return tuple(d.text for src in ("stdlib", "stdlib-docs") for d in iter_documents(src)
                 if not held_out(d.name, VAL_FRACTION))


def reference_ar(modes: dict, name: str) -> str:
    """The AR mode a speculative mode must equal: AR in its dtype, on unfused towers."""
    return "ar_fp32" if modes[name][0].startswith("fp32") else "ar"


def context_of(key: str) -> tuple:
    """What the context tower of MODELS[key] computes with: its dtype and its inference copies."""
    dtype, merge = MODELS[key]
    merge = merge or {}
    if merge.get("pack_context"):
        return dtype, "packed", merge.get("pack_rows")
    return dtype, "fused" if merge.get("fuse_context") else "plain"


def same_towers_ar(modes: dict, name: str) -> str | None:
    """The AR mode whose context tower is `name`'s (the same dtype and copies), if one runs."""
    ctx = context_of(modes[name][0])
    return next((n for n, (k, dec) in modes.items() if isinstance(dec, Autoregressive) and context_of(k) == ctx), None)


def measure_seed(models, modes, tok, seed: int, args, docs) -> dict:
    rng = random.Random(seed)
    prompts = [("prose", ids) for ids in windows(tok, docs["prose"], args.per_kind, args.prompt_tokens, rng)]
    prompts += [("python", ids) for ids in windows(tok, docs["python"], args.per_kind, args.prompt_tokens, rng)]
    prompts += [("instruction", chat_ids(tok, t)) for t in rng.sample(INSTRUCTIONS, args.per_kind)]
    eos = tok.eos_token_id
    rows = {name: [] for name in modes}
    for k, (kind, ids) in enumerate(prompts):
        for name in _rotated(list(modes), k):  # a different mode first on each prompt
            dtype, dec = modes[name]
            toks, dt, info = run(models[dtype], dec, ids, args.new_tokens, eos)
            rows[name].append({"kind": kind, "prompt": ids, "tokens": toks, "seconds": dt, **info})
        print(f"  seed {seed} prompt {k + 1}/{len(prompts)} ({kind})", file=sys.stderr, flush=True)
    return {"rows": rows, "next_line": next_line_task(models, modes, tok, docs["python"], rng, args)}


def _rotated(names: list[str], k: int) -> list[str]:
    k %= len(names)
    return names[k:] + names[:k]


def next_line_task(models, modes, tok, texts, rng, args) -> dict:
    """Exact-match rate of the first generated line against the held-out next line, per mode."""
    if not args.next_lines:
        return {}
    cases = next_line_cases(tok, texts, args.next_lines, rng)
    scores = {}
    for name, (dtype, dec) in modes.items():
        if dtype.startswith("fp32"):
            continue
        hits = 0
        for ids, truth in cases:
            toks, _, _ = run(models[dtype], dec, ids, 24, None)
            hits += first_line(tok.decode(toks)) == truth.strip()
        scores[name] = hits / len(cases)
    return scores


def first_line(text: str) -> str:
    """The first non-blank line of a generated text, stripped (a model may open with a blank line)."""
    return next((line.strip() for line in text.split("\n") if line.strip()), "")


# ---- summaries --------------------------------------------------------------------------------
def summarize_seed(res: dict, judge, modes: dict, baseline: str = "ar") -> dict:
    rows = res["rows"]
    ar = rows[baseline]
    ar_time = sum(r["seconds"] for r in ar)
    ar_tokens = sum(len(r["tokens"]) for r in ar)
    ar_nll = _nll(judge, ar)
    ar_d4 = statistics.fmean(distinct_n(r["tokens"], 4) for r in ar if len(r["tokens"]) >= 4)
    out = {}
    for name, rs in rows.items():
        tokens = sum(len(r["tokens"]) for r in rs)
        secs = sum(r["seconds"] for r in rs)
        s = {"tok_per_s": tokens / secs, "tokens": tokens}
        if name != reference_ar(modes, name) and isinstance(modes[name][1], Autoregressive):  # copies must not change AR's output
            s["equal_to_ar"] = all(r["tokens"] == a["tokens"] for r, a in zip(rs, rows[reference_ar(modes, name)]))
        if name.startswith("spec"):
            ref = rows[reference_ar(modes, name)]  # each speculative mode against AR in its dtype
            s["tokens_per_iteration"] = tokens / sum(r["blocks"] for r in rs)
            s["equal_to_ar"] = all(r["tokens"] == a["tokens"] for r, a in zip(rs, ref))
            same = same_towers_ar(modes, name)
            if same not in (None, reference_ar(modes, name)):  # and against AR on its own towers
                s["equal_to_ar_same_towers"] = all(r["tokens"] == a["tokens"] for r, a in zip(rs, rows[same]))
        if name.startswith("diff"):
            s["tokens_per_forward"] = tokens / sum(r["nfe"] for r in rs)
            s["nll_retention"] = ar_nll / _nll(judge, rs)
            s["distinct4_retention"] = statistics.fmean(
                distinct_n(r["tokens"], 4) for r in rs if len(r["tokens"]) >= 4) / ar_d4
            s["prefix_agreement"] = statistics.fmean(prefix_agreement(r["tokens"], a["tokens"]) for r, a in zip(rs, ar))
        s["speedup_vs_ar"] = s["tok_per_s"] / (ar_tokens / ar_time)
        out[name] = s
    out["fastest_ar_tok_per_s"] = max(out[n]["tok_per_s"] for n in rows if n.startswith("ar"))
    out["next_line"] = res["next_line"]
    return out


def _nll(judge, rs) -> float:
    device = judge.lm_head.weight.device
    vals = [float(continuation_nll(judge, torch.tensor([r["prompt"]], device=device),
                                   torch.tensor([r["tokens"]], device=device))[0])
            for r in rs if r["tokens"]]
    return statistics.fmean(vals)


def aggregate(per_seed: list[dict]) -> dict:
    """mean, min and max over seeds of every numeric figure."""
    agg = {}
    for name in per_seed[0]:
        if isinstance(per_seed[0][name], dict):
            agg[name] = {k: seed_stats([s[name].get(k) for s in per_seed]) for k in per_seed[0][name]}
        else:
            agg[name] = seed_stats([s[name] for s in per_seed])
    return agg


def seed_stats(values):
    """Over seeds: all() of booleans, else {mean, min, max} of the numbers given (None where none)."""
    if all(isinstance(v, bool) for v in values):
        return all(values)
    vals = [float(v) for v in values if v is not None]
    return {"mean": statistics.fmean(vals), "min": min(vals), "max": max(vals)} if vals else None


def render(agg: dict, samples: dict, baseline: str = "ar") -> str:
    f = lambda d, p=".2f": f"{d['mean']:{p}} ({d['min']:{p}}-{d['max']:{p}})" if isinstance(d, dict) else str(d)
    L = [f"| mode | tok/s | x {baseline} | tokens / iteration or / forward | equal to AR | NLL retention | "
         "distinct-4 retention | prefix agreement | next-line exact |", "|---|---|---|---|---|---|---|---|---|"]
    for name, s in agg.items():
        if not isinstance(s, dict) or "tok_per_s" not in s:
            continue
        per = s.get("tokens_per_iteration") or s.get("tokens_per_forward")
        nl = agg["next_line"].get(name) if isinstance(agg.get("next_line"), dict) else None
        L.append(f"| {name} | {f(s['tok_per_s'], '.1f')} | {f(s['speedup_vs_ar'])} | {f(per) if per else '-'} "
                 f"| {s.get('equal_to_ar', '-')} | {f(s['nll_retention']) if 'nll_retention' in s else '-'} "
                 f"| {f(s['distinct4_retention']) if 'distinct4_retention' in s else '-'} "
                 f"| {f(s['prefix_agreement'], '.1f') if 'prefix_agreement' in s else '-'} | {f(nl) if nl else '-'} |")
    L += ["", f"fastest AR on this CPU: {f(agg['fastest_ar_tok_per_s'], '.1f')} tok/s", ""]
    for name, texts in samples.items():
        L.append(f"**{name}**")
        L += [f"    {t!r}" for t in texts]
    return "\n".join(L)


def load_model(name: str, key: str, device="cpu") -> TwoTowerLM:
    """The model of MODELS[key]: `name` in its dtype on `device`, with its inference copies made (after the move:
    moving drops them)."""
    dtype, merge = MODELS[key]
    model = TwoTowerLM.from_pretrained(name, dtype=dtype).eval().to(device)
    if merge is not None and "draft_vocab" in merge:  # (K, F): the subset, counted on the training split
        k, f = merge["draft_vocab"]
        merge = merge | {"draft_vocab": frequent_tokens(model.tokenizer, training_texts(), k, first_ids=f)}
        print(f"{key}: a draft vocabulary of {len(merge['draft_vocab'])} tokens", file=sys.stderr)
    if merge is not None:
        made = model.merge_adapters(**merge)
        shown = {k: f"<{len(v)} ids>" if k == "draft_vocab" else v for k, v in merge.items()}
        print(f"{key}: merge_adapters(**{shown}) made {made / 1e6:.1f} MB of inference copies", file=sys.stderr)
    return model


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    modes = build_modes(args.diffusion, args.spec_cuts, args.merged, args.only, args.baseline, args.short_drafts,
                        args.draft_steps, args.lookup, args.lookup_max_tokens, args.draft_vocab,
                        args.alt_model is not None)
    models = {key: load_model(args.alt_model if key.endswith(ALT) else args.model, key, args.device)
              for key in sorted({m for m, _ in modes.values()} | {"fp32"})}
    tok = models["fp32"].tokenizer
    docs = {"prose": held_out_documents("stdlib-docs"), "python": held_out_documents("stdlib")}
    judge = models["fp32"].context
    if args.next_line_only:
        with torch.inference_mode():
            scores = [next_line_task(models, modes, tok, docs["python"], random.Random(seed), args) for seed in args.seeds]
        agg = {name: seed_stats([s[name] for s in scores]) for name in scores[0]}
        print(json.dumps(agg, indent=1))
        Path(args.out).write_text(json.dumps({"args": vars(args), "next_line": scores, "aggregate": agg}, indent=1))
        return 0
    results, per_seed = [], []
    with torch.inference_mode():
        for seed in args.seeds:
            res = measure_seed(models, modes, tok, seed, args, docs)
            results.append(res)
            per_seed.append(summarize_seed(res, judge, modes, args.baseline))
    agg = aggregate(per_seed)
    samples = {name: [tok.decode(r["prompt"][-24:]) + " ||| " + tok.decode(r["tokens"])
                      for r in results[0]["rows"][name] if r["kind"] == kind][:1]
               for name in modes for kind in ("instruction",)}
    for kind in ("prose", "python"):
        samples[f"ar ({kind})"] = [tok.decode(r["prompt"][-24:]) + " ||| " + tok.decode(r["tokens"])
                                   for r in results[0]["rows"][args.baseline] if r["kind"] == kind][:args.samples]
        samples[f"spec ({kind})"] = [tok.decode(r["tokens"]) for r in results[0]["rows"].get("spec", [])
                                     if r["kind"] == kind][:args.samples]
    print(render(agg, samples, args.baseline))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "per_seed": per_seed, "aggregate": agg,
                               "runs": results}, indent=1))
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
