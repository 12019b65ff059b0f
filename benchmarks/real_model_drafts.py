"""Draft quality of several SmolLM2 two-tower models side by side (issue 23 on the real model), no timing.

    python benchmarks/real_model_drafts.py smollm2-135m runs/smollm2_denoiser_focal_chain/export
    python benchmarks/real_model_drafts.py smollm2-135m OTHER --seeds 0 1 2 --per-kind 8

The held-out prompts of `real_model.py` (prose and Python windows of held-out documents, chat
instructions; each seed draws its own). Every model decodes them with `Speculative` (block 16, one
draft forward, greedy) in float32, where its output must equal AR's token for token; a seed's
prompts go in one left-padded batch, which gives each row what it gets alone (rows are independent
of their batch: `twotower.testing.check_rows_independent`). Per model and seed: tokens per iteration
(generated tokens / iterations, the figure of `real_model.py`), and the same per prompt kind.
Mean, min and max over seeds; JSON to --out.

Models load over the same backbone, so only their denoisers differ; they run interleaved seed by
seed. The speed of a chosen model is `real_model.py --model DIR`'s job (timings need batch 1).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.real_model import INSTRUCTIONS, chat_ids, held_out_documents, seed_stats, windows  # noqa: E402
from twotower.decoding import Autoregressive, Speculative  # noqa: E402
from twotower.model import TwoTowerLM  # noqa: E402
from twotower.testing import left_pad  # noqa: E402

KINDS = ("prose", "python", "instruction")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("models", nargs="+", help="two-tower folders or built-in names over the same backbone")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--per-kind", type=int, default=8, help="prompts of each kind per seed")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--prompt-tokens", type=int, default=48, help="prose / python prompt window")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--out", default="benchmarks/results/real_model_drafts.json")
    return p.parse_args(argv)


def seed_prompts(tok, docs: dict, seed: int, per_kind: int, length: int) -> list[tuple[str, list[int]]]:
    """(kind, ids) of one seed, drawn as `real_model.py` draws them."""
    rng = random.Random(seed)
    prompts = [("prose", ids) for ids in windows(tok, docs["prose"], per_kind, length, rng)]
    prompts += [("python", ids) for ids in windows(tok, docs["python"], per_kind, length, rng)]
    return prompts + [("instruction", chat_ids(tok, t)) for t in rng.sample(INSTRUCTIONS, per_kind)]


def run_model(model, ids: torch.Tensor, mask: torch.Tensor, n: int, eos) -> dict:
    out = Speculative(block_size=16).generate(model, ids, mask, max_new_tokens=n, eos_token_id=eos)
    k = out.num_generated
    return {"tokens": [out.new_tokens[r, :int(k[r])].tolist() for r in range(ids.shape[0])],
            "iterations": out.nfe.tolist()}


def seed_figures(res: dict, kinds: list[str], ar_tokens: list[list[int]]) -> dict:
    """tokens / iteration overall and per kind, and whether every row equals AR's."""
    def per_iter(rows):
        return sum(len(res["tokens"][r]) for r in rows) / sum(res["iterations"][r] for r in rows)

    fig = {"tokens_per_iteration": per_iter(range(len(kinds))), "equal_to_ar": res["tokens"] == ar_tokens}
    for kind in KINDS:
        fig[f"tokens_per_iteration_{kind}"] = per_iter([r for r, k in enumerate(kinds) if k == kind])
    return fig


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    models = {name: TwoTowerLM.from_pretrained(name, dtype=torch.float32).eval() for name in args.models}
    first = next(iter(models.values()))
    tok, eos = first.tokenizer, first.tokenizer.eos_token_id
    docs = {"prose": held_out_documents("stdlib-docs"), "python": held_out_documents("stdlib")}
    per_seed = {name: [] for name in models}
    with torch.inference_mode():
        for seed in args.seeds:
            prompts = seed_prompts(tok, docs, seed, args.per_kind, args.prompt_tokens)
            kinds = [k for k, _ in prompts]
            ids, mask = left_pad([torch.tensor(p) for _, p in prompts], pad=tok.pad_token_id or 0)
            ar = Autoregressive().generate(first, ids, mask, max_new_tokens=args.new_tokens, eos_token_id=eos)
            ar_tokens = [ar.new_tokens[r, :int(ar.num_generated[r])].tolist() for r in range(len(prompts))]
            for name, model in models.items():
                fig = seed_figures(run_model(model, ids, mask, args.new_tokens, eos), kinds, ar_tokens)
                per_seed[name].append(fig)
                print(f"seed {seed} {name}: {fig['tokens_per_iteration']:.3f} tokens/iteration "
                      f"(equal to AR: {fig['equal_to_ar']})", file=sys.stderr, flush=True)
    agg = {name: {key: seed_stats([s[key] for s in seeds]) for key in seeds[0]} for name, seeds in per_seed.items()}
    print(render(agg))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "per_seed": per_seed, "aggregate": agg}, indent=1))
    print(f"wrote {out}", file=sys.stderr)
    return 0


def render(agg: dict) -> str:
    f = lambda d: f"{d['mean']:.3f} ({d['min']:.3f}-{d['max']:.3f})"
    L = ["| model | tokens / iteration | prose | python | instruction | equal to AR |", "|---|---|---|---|---|---|"]
    for name, a in agg.items():
        L.append(f"| {name} | {f(a['tokens_per_iteration'])} | {f(a['tokens_per_iteration_prose'])} | "
                 f"{f(a['tokens_per_iteration_python'])} | {f(a['tokens_per_iteration_instruction'])} | "
                 f"{a['equal_to_ar']} |")
    return "\n".join(L)


if __name__ == "__main__":
    sys.exit(main())
