"""Prompt-lookup drafts in batches: would skipping the denoiser more often pay? (issue 23, batch 8)

    python benchmarks/lookup_policy.py --batch 8 --shares 0.75 0.5 0.25 0 --seeds 1 2 3

`Speculative(lookup=...)` skips the denoiser's forward only in an iteration where every row found a
lookup draft; otherwise the denoiser drafts the whole batch and the rows with a lookup replace their
draft. At batch 8 on the embedded default that costs a little against plain `Speculative`
(benchmarks/README.md, "Prompt-lookup drafts"). This script tries the policy the first result
suggests: skip the denoiser once a share `s` of the rows found a lookup, and let the rows without one
verify their next token alone (an AR step for them). s = 1 is the shipped rule; s = 0 never drafts
with the denoiser. Greedy only (a sampled row's draws would then depend on the other rows).

Batches of the embedded default's held-out byte windows (`workload.select_windows`: 128-byte
prompts, 64 new tokens), 1 thread, each mode on the same batches, every output checked against AR.
It prints and writes (`--out`) each mode's speed over AR per seed (wall time of whole batches), the
share of iterations that skipped the denoiser, and the rows' lookup hit rate.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import workload  # noqa: E402
from twotower.decoding import Autoregressive, Speculative  # noqa: E402
from twotower.decoding.speculative import room_left  # noqa: E402
from twotower.model import TwoTowerLM  # noqa: E402
from twotower.tokenizers import ByteTokenizer  # noqa: E402


class ShareSkipSpeculative(Speculative):
    """`Speculative(lookup=...)` that skips the denoiser once a share `share` of the rows found a
    lookup draft (the shipped rule is share = 1); rows without one verify their next token alone."""

    def __init__(self, share: float, **kwargs):
        super().__init__(**kwargs)
        self.share = share
        self.counts: Counter = Counter()

    def draft(self, state):
        n = min(self._width(state), room_left(state))
        found = self.looked_up(state, n)
        hits = sum(bool(f) for f in found)
        self.counts.update(iterations=1, rows=len(found), hits=hits)
        if hits < self.share * len(found) or hits == 0:
            return super().draft(state)
        self.counts.update(skipped=1)
        return self.lookup_draft(state, found, n, None, None)  # rows without a lookup verify their next token


def batches_of(tok: ByteTokenizer, seed: int, batch: int, count: int) -> list[torch.Tensor]:
    docs, _ = workload.heldout_token_docs(False, tok)
    wins = workload.select_windows(docs, batch * count, 128, 64, bos_id=tok.bos_token_id, seed=seed)
    return [torch.tensor([w.ids for w in wins[i:i + batch]]) for i in range(0, batch * count, batch)]


def modes_for(shares: list[float], ngram: int) -> dict:
    modes = {"ar": Autoregressive, "spec": Speculative, f"spec_lk{ngram}": lambda: Speculative(lookup=ngram)}
    for s in shares:
        modes[f"spec_lk{ngram}_share{s:g}"] = lambda s=s: ShareSkipSpeculative(s, lookup=ngram)
    return modes


def run_seed(model: TwoTowerLM, batches: list[torch.Tensor], modes: dict, new: int) -> dict:
    """Each mode's total wall time over the batches (interleaved per batch), its skip and hit counts."""
    wall, counts = Counter(), {k: Counter() for k in modes}
    for ids in batches:
        mask, reference = torch.ones_like(ids), None
        for name, make in modes.items():
            decoder = make()
            start = time.perf_counter()
            out = decoder.generate(model, ids, mask, max_new_tokens=new)
            wall[name] += time.perf_counter() - start
            seq = out.sequences if hasattr(out, "sequences") else out
            reference = seq if reference is None else reference
            if not torch.equal(seq, reference):
                raise SystemExit(f"{name}: output differs from AR's")
            counts[name].update(getattr(decoder, "counts", {}))
    return {name: {"x_ar": wall["ar"] / wall[name], **counts[name]} for name in modes}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="twotower/assets/twotower")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--batches", type=int, default=4, help="batches per seed")
    p.add_argument("--new", type=int, default=64, help="new tokens per row")
    p.add_argument("--ngram", type=int, default=4)
    p.add_argument("--shares", type=float, nargs="+", default=[0.75, 0.5, 0.25, 0.0])
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="benchmarks/results/lookup_policy_b8.json")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model = TwoTowerLM.from_pretrained(args.model).eval()
    tok = ByteTokenizer(model.config.vocab_size)
    modes = modes_for(args.shares, args.ngram)
    results = {}
    with torch.inference_mode():
        warm = batches_of(tok, 0, args.batch, 1)[0]
        for make in modes.values():  # first calls allocate and pick kernels: outside the timings
            make().generate(model, warm, torch.ones_like(warm), max_new_tokens=16)
        for seed in args.seeds:
            results[seed] = run_seed(model, batches_of(tok, seed, args.batch, args.batches), modes, args.new)
            print(f"seed {seed}: " + ", ".join(f"{k} {v['x_ar']:.3f}x" for k, v in results[seed].items()), flush=True)
    print(f"\nbatch {args.batch}, {len(args.seeds)} seeds x {args.batches} batches, output AR's in every mode")
    for name in modes:
        per = [results[s][name] for s in args.seeds]
        mean = sum(r["x_ar"] for r in per) / len(per)
        spread = " / ".join(f"{r['x_ar']:.2f}" for r in per)
        line = f"{name:24s} {mean:.3f}x AR ({spread})"
        if per[0].get("iterations"):
            it = sum(r["iterations"] for r in per)
            line += (f"  skipped {sum(r.get('skipped', 0) for r in per) / it:.2f} of iterations, "
                     f"rows with a lookup {sum(r['hits'] for r in per) / sum(r['rows'] for r in per):.2f}")
        print(line)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"args": vars(args), "results": results}, indent=1))


if __name__ == "__main__":
    main()
