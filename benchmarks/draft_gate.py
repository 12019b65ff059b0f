"""Would an AR step pay where the draft is likely to fail? (issue 23, lever 3 taken to zero positions)

    python benchmarks/draft_gate.py smollm2-135m --block 6 --cost 2.2
    python benchmarks/draft_gate.py twotower/assets/twotower --cost 3.5

An iteration of `Speculative` costs about `--cost` AR steps (`real_model_phases.py` / `spec_cost.py`
measure it) and keeps k tokens; an AR step costs 1 and keeps 1. Before drafting, the only free signal
is the context tower's own confidence in the block's first token (the probability of the token it
chose, from the forward that chose it). This script decodes held-out prompts with `Speculative` at
batch 1 in float32 and records, per iteration after the first, that confidence and the tokens kept.
It prints the tokens kept per confidence bin and, for thresholds tau, the speed over AR of a policy
that takes one AR step instead of an iteration wherever the confidence is below tau.

The policy's figure is an estimate from the recorded iterations (it assumes an iteration's tokens
do not depend on whether the step before it was an AR step), optimistic for the gate: it is an upper
bound only in spirit. Where it does not beat "always draft", a gate built on this signal cannot pay.
Prompts: the embedded default's held-out byte windows (`workload.select_windows`, 128 bytes) for a byte
model, else the real model's three held-out kinds (`real_model.py`): 3 x --per-kind per seed either way.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import workload  # noqa: E402
from benchmarks.real_model import held_out_documents  # noqa: E402
from benchmarks.real_model_drafts import seed_prompts  # noqa: E402
from twotower.decoding import Speculative  # noqa: E402
from twotower.model import TwoTowerLM  # noqa: E402
from twotower.tokenizers import ByteTokenizer  # noqa: E402

BINS = (0.0, 0.3, 0.5, 0.7, 0.9, 0.99, 1.0)


class RecordingSpeculative(Speculative):
    """`Speculative` that records, per iteration of row 0 (batch 1), the context tower's confidence in the
    block's first token (from the previous verify) and the tokens the iteration keeps."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.records: list[tuple[float, int]] = []
        self._confidence: float | None = None  # None: the first iteration (its token came from the prefill)

    def kept(self, logits, ar, x):
        keep = super().kept(logits, ar, x)
        k = int(keep[0])
        if self._confidence is not None:
            self.records.append((self._confidence, k))
        # The next block's first token is the context tower's choice after the kept prefix.
        self._confidence = float(torch.softmax(logits[0, k - 1].float(), -1).max())
        return keep


def prompts_of(model: TwoTowerLM, seeds: list[int], per_kind: int) -> list[list[int]]:
    """Held-out prompts: the embedded default's byte windows for a byte model, else the real model's kinds."""
    tok = model.tokenizer
    if isinstance(tok, ByteTokenizer):
        docs, _ = workload.heldout_token_docs(False, tok)
        return [w.ids for seed in seeds
                for w in workload.select_windows(docs, 3 * per_kind, 128, 64, bos_id=tok.bos_token_id, seed=seed)]
    docs = {"prose": held_out_documents("stdlib-docs"), "python": held_out_documents("stdlib")}
    return [ids for seed in seeds for _, ids in seed_prompts(tok, docs, seed, per_kind, 48)]


def policy_table(records: list[tuple[float, int]], cost: float, taus=(0.0, 0.3, 0.5, 0.7, 0.9)) -> list[dict]:
    """Per tau: estimated speed over AR of 'an AR step where the confidence is below tau'."""
    rows = []
    for tau in taus:
        tokens = sum(k if p >= tau else 1 for p, k in records)
        steps = sum(cost if p >= tau else 1.0 for p, _ in records)
        rows.append({"tau": tau, "gated": sum(p < tau for p, _ in records) / len(records), "x_ar": tokens / steps})
    return rows


def add_prompt_arguments(p: argparse.ArgumentParser, seeds: list[int]) -> None:
    """The model, draft width, prompts (`prompts_of`'s seeds and count) and threads: the arguments this
    script shares with the others that decode its prompts (`lookup_potential.py`)."""
    p.add_argument("model", help="a two-tower folder or a built-in name")
    p.add_argument("--block", type=int, default=None, help="draft positions (default: the model's block)")
    p.add_argument("--seeds", type=int, nargs="+", default=seeds)
    p.add_argument("--per-kind", type=int, default=3, help="prompts per kind and seed (3 kinds)")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=None)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_prompt_arguments(p, seeds=[0, 1, 2])
    p.add_argument("--cost", type=float, required=True, help="an iteration's cost in AR steps (measured elsewhere)")
    p.add_argument("--out", default=None, help="JSON of the records and tables")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model = TwoTowerLM.from_pretrained(args.model, dtype=torch.float32).eval()
    records = []
    prompts = prompts_of(model, args.seeds, args.per_kind)
    with torch.inference_mode():
        for k, ids in enumerate(prompts):
            dec = RecordingSpeculative(block_size=args.block)
            t = torch.tensor([ids])
            dec.generate(model, t, torch.ones_like(t), max_new_tokens=args.new_tokens,
                         eos_token_id=model.tokenizer.eos_token_id)
            records += dec.records
            print(f"  prompt {k + 1}/{len(prompts)}: {len(records)} iterations recorded", file=sys.stderr, flush=True)
    print(f"{len(records)} iterations, {sum(k for _, k in records) / len(records):.2f} tokens each\n")
    print("| confidence in the first token | iterations | tokens kept |\n|---|---|---|")
    bins = []
    for lo, hi in zip(BINS, BINS[1:]):
        ks = [k for p_, k in records if lo <= p_ < hi or (hi == 1.0 and p_ == 1.0)]
        bins.append({"low": lo, "high": hi, "iterations": len(ks), "kept": sum(ks) / len(ks) if ks else None})
        print(f"| [{lo}, {hi}) | {len(ks)} | {sum(ks) / len(ks):.2f} |" if ks else f"| [{lo}, {hi}) | 0 | - |")
    table = policy_table(records, args.cost)
    print(f"\n| AR step below tau | share gated | x AR (iteration = {args.cost} AR steps) |\n|---|---|---|")
    for r in table:
        print(f"| {r['tau']} | {r['gated']:.2f} | {r['x_ar']:.3f} |")
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "records": records, "bins": bins,
                                              "policy": table}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
