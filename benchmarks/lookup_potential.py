"""How many tokens per iteration the better of two drafts would keep: the lookup or the denoiser's (issue 23, lever 4).

    python benchmarks/lookup_potential.py twotower/assets/twotower --ngram 4 --max-tokens 32
    python benchmarks/lookup_potential.py smollm2-135m --ngram 3 --max-tokens 15 --per-kind 3

`Speculative(lookup=...)` replaces a row's denoiser draft with its prompt-lookup draft wherever one is
found. A two-branch verify (`TwoBranchSpeculative`'s tree) could instead verify both and keep the longer
accepted prefix. This script measures the ceiling of that idea without building it: every iteration
runs the denoiser, looks the row up, and lets the draft that matches AR's own greedy continuation for
longer take effect (an oracle choice: a tree verify would keep exactly that much, at the cost of
verifying both). Tokens per iteration (generated tokens / iterations, batch 1, greedy, EOS ignored) for:

- `denoiser`: `Speculative` alone;
- `lookup`: `Speculative(lookup=NgramLookup(ngram, max_tokens))`, the shipped rule;
- `best_of_both`: the oracle above (the denoiser runs every iteration);
- `two_branch`: `TwoBranchSpeculative(lookup=...)` itself (where a row found a lookup, the better of
  it and the draft; elsewhere the draft with its runner-up branch);
- `three_way`: the ceiling of a three-candidate tree: the best of the lookup, the draft and the
  draft with its runner-up at `TwoBranchSpeculative`'s fork (an oracle choice, as above);
- `forks2`, `forks3`, `forks4`: `TwoBranchSpeculative(lookup=..., forks=K)` itself: runner-up branches
  at the K likeliest first rejections, the lookup in the last one's place where a row found one
  (`forks3_expected`: ranked by the "expected" rule);
- `pairs3`, `pairs4`, `pairs6`: `TwoBranchSpeculative(lookup=..., forks=K, alternatives=3)`: the K best
  (position, token) pairs among each position's three runner-ups, by the chance the branch is taken;
- `oracle_fork`: the ceiling of one runner-up branch placed at the draft's true first rejection,
  beside the lookup (an oracle: no rule can place it better).

Every output is checked against AR's. Prompts as `draft_gate.py` takes them: the embedded default's
held-out byte windows, or the real model's three held-out kinds (3 x --per-kind per seed).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.draft_gate import add_prompt_arguments, prompts_of  # noqa: E402
from twotower.decoding import Autoregressive, NgramLookup, Speculative, TwoBranchSpeculative  # noqa: E402
from twotower.decoding.two_branch import branch_position, draft_with_runner_up  # noqa: E402
from twotower.decoding.speculative import room_left  # noqa: E402
from twotower.model import TwoTowerLM  # noqa: E402


MODES = ("denoiser", "lookup", "best_of_both", "two_branch", "three_way", "forks2", "forks3", "forks4",
         "forks3_expected", "pairs3", "pairs4", "pairs6", "oracle_fork")


class BestOfBoth(Speculative):
    """`Speculative(lookup=...)` whose every iteration drafts with the denoiser and keeps whichever of
    the two drafts matches `reference` (AR's new tokens) for longer: the ceiling of verifying both."""

    def __init__(self, reference: list[int], **kwargs):
        super().__init__(**kwargs)
        self.reference = reference
        self.lookup_won = 0

    def draft(self, state):
        n = min(self._width(state), room_left(state))
        found = self.looked_up(state, n)[0]
        x, width = self.denoiser_draft(state, n, state)
        # This iteration's first token is reference[done]; a draft is right while it follows the reference.
        done = len(state.carry["lookup"][0].tokens) - state.call.input_ids.shape[1]
        if found and _run(found, self.reference[done + 1:]) > _run(x[0, 1:].tolist(), self.reference[done + 1:]):
            self.lookup_won += 1
            return self.lookup_draft(state, [found], n, None, None)
        return x, width


class ThreeWay(BestOfBoth):
    """`BestOfBoth` with a third candidate: the draft with its runner-up token at the position
    `TwoBranchSpeculative` forks at (its continuation the draft's), the ceiling of verifying all three.
    oracle: the runner-up at the draft's true first rejection instead (a fork no rule can place better)."""

    def __init__(self, reference: list[int], oracle: bool = False, **kwargs):
        super().__init__(reference, **kwargs)
        self.oracle = oracle

    def draft(self, state):
        n = min(self._width(state), room_left(state))
        found = self.looked_up(state, n)[0]
        call, den = state.call, state.den_cache()
        x, alt, c, q = draft_with_runner_up(call.denoiser, den, n, first=state.carry["next"], shift=call.shifted,
                                            mask_token_id=call.mask_token_id, tracker=state,
                                            block_index=state.iterations)
        d = x[0].tolist()
        done = len(state.carry["lookup"][0].tokens) - state.call.input_ids.shape[1]
        truth = self.reference[done + 1:]
        j = min(1 + _run(d[1:], truth), n - 1) if self.oracle else int(branch_position("likeliest", c, q)[0])
        candidates = [d[1:], d[1:j] + [int(alt[0, j - 1])] + d[j + 1:]] + ([found] if found else [])
        return self.lookup_draft(state, [max(candidates, key=lambda cand: _run(cand, truth))], n, None, None)


def _run(draft: list[int], truth: list[int]) -> int:
    """How many leading tokens of `draft` equal `truth`'s."""
    k = 0
    while k < min(len(draft), len(truth)) and draft[k] == truth[k]:
        k += 1
    return k


def tokens_per_iteration(model: TwoTowerLM, ids: list[int], new: int, block: int | None, lookup: NgramLookup,
                         modes=MODES) -> dict:
    """Each of `modes`' iterations for `new` tokens of one prompt (output checked against AR's), and how
    many of best_of_both's iterations took the lookup's draft (where it ran)."""
    t = torch.tensor([ids])
    mask = torch.ones_like(t)
    ar = Autoregressive().generate(model, t, mask, max_new_tokens=new).sequences
    reference = ar[0, t.shape[1]:].tolist()
    decoders = {"denoiser": Speculative(block_size=block), "lookup": Speculative(block_size=block, lookup=lookup),
                "best_of_both": BestOfBoth(reference, block_size=block, lookup=lookup),
                "two_branch": TwoBranchSpeculative(block_size=block, lookup=lookup),
                "three_way": ThreeWay(reference, block_size=block, lookup=lookup),
                "forks2": TwoBranchSpeculative(block_size=block, lookup=lookup, forks=2),
                "forks3": TwoBranchSpeculative(block_size=block, lookup=lookup, forks=3),
                "oracle_fork": ThreeWay(reference, oracle=True, block_size=block, lookup=lookup),
                "forks4": TwoBranchSpeculative(block_size=block, lookup=lookup, forks=4),
                "forks3_expected": TwoBranchSpeculative("expected", block_size=block, lookup=lookup, forks=3),
                **{f"pairs{k}": TwoBranchSpeculative(block_size=block, lookup=lookup, forks=k, alternatives=3)
                   for k in (3, 4, 6)}}
    out = {"lookup_won": 0}
    for name in modes:
        decoder = decoders[name]
        got = decoder.generate(model, t, mask, max_new_tokens=new)
        if not torch.equal(got.sequences, ar):
            raise SystemExit(f"{name}: output differs from AR's")
        out[name] = got.blocks  # iterations
        if name == "best_of_both":
            out["lookup_won"] = decoder.lookup_won
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_prompt_arguments(p, seeds=[1, 2, 3])
    p.add_argument("--ngram", type=int, nargs="+", default=[3])
    p.add_argument("--max-tokens", type=int, default=None, help="the longest lookup draft (NgramLookup.max_tokens)")
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES, help="which modes to run (default: all)")
    p.add_argument("--out", default=None, help="JSON of the per-seed figures")
    args = p.parse_args(argv)
    modes = args.modes
    if args.threads:
        torch.set_num_threads(args.threads)
    model = TwoTowerLM.from_pretrained(args.model, dtype=torch.float32).eval()
    lookup = NgramLookup(args.ngram, max_tokens=args.max_tokens)
    per_seed = {}
    with torch.inference_mode():
        for seed in args.seeds:
            prompts = prompts_of(model, [seed], args.per_kind)
            counts = [tokens_per_iteration(model, ids, args.new_tokens, args.block, lookup, modes) for ids in prompts]
            total = {k: sum(c[k] for c in counts) for k in counts[0]}
            tokens = args.new_tokens * len(prompts)
            per_seed[seed] = {name: tokens / total[name] for name in modes}
            per_seed[seed].update(lookup_won=total["lookup_won"], iterations=total.get("best_of_both"))
            print(f"seed {seed}: " + ", ".join(f"{k} {per_seed[seed][k]:.2f}" for k in modes), flush=True)
    print(f"\n{args.model}, {lookup}, block {args.block or 'default'}: tokens per iteration, outputs AR's")
    for name in modes:
        vals = [per_seed[s][name] for s in args.seeds]
        print(f"  {name:15s} {sum(vals) / len(vals):.2f} ({' / '.join(f'{v:.2f}' for v in vals)})")
    if "best_of_both" in modes:
        won = sum(per_seed[s]["lookup_won"] for s in args.seeds) / sum(per_seed[s]["iterations"] for s in args.seeds)
        print(f"  the lookup was the longer draft in {won:.0%} of best_of_both's iterations")
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "per_seed": per_seed}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
