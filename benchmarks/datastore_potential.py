"""Would drafts retrieved from a datastore pay? (issue 23: a lever beside the prompt lookup)

    python benchmarks/datastore_potential.py smollm2-135m --store train --block 6
    python benchmarks/datastore_potential.py smollm2-135m --store own --own-windows 512 --own-chat 256 --block 6

`Speculative(lookup=NgramLookup(3, max_tokens=15))` drafts from the row's own earlier tokens where its
last n-gram occurred before, and from the denoiser elsewhere. Retrieval-based speculative decoding (REST,
He et al. 2023, arXiv 2311.08252) looks the n-gram up in a large datastore instead, where a row's own text
rarely repeats. This script measures that idea without building it into the decoder: where the row's own
index finds nothing, the row's last `--store-ngram` tokens (the context tower's next one included) are
looked up in a `Datastore`, and what followed them there (the continuation after the most frequent next
token's latest occurrence) replaces the denoiser's draft. Two stores:

- `train`: the training split of the real model's recipe (stdlib + stdlib-docs, tokenized), 3.6M tokens;
- `own`: the AR model's own greedy continuations (`--own-new` tokens) of `--own-windows` training-split
  windows and of `--own-chat` instructions the model wrote itself (`write_instructions`), prompts included:
  the text speculative decoding will have to match.

Tokens per iteration (batch 1, greedy, EOS ignored, every output checked against AR's) for `denoiser`
(`Speculative` alone), `lookup` (the row's own lookup only, the shipped rule), `store_c<k>` (the store
where the row has nothing and the chosen continuation occurred at least k times) and `store_c<k>_best`
(the better of the denoiser's draft and the lookup's, an oracle: the ceiling of verifying both). Prompts
as `lookup_potential.py` takes them (the real model's three held-out kinds, 3 x --per-kind per seed).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.draft_gate import add_prompt_arguments, prompts_of  # noqa: E402
from benchmarks.lookup_potential import tokens_per_iteration  # noqa: E402
from benchmarks.real_model import chat_ids, training_texts  # noqa: E402
from twotower.data.instructions import write_instructions  # noqa: E402
from twotower.decoding import Autoregressive, NgramLookup  # noqa: E402
from twotower.decoding.lookup import RowIndex  # noqa: E402
from twotower.model import TwoTowerLM  # noqa: E402


class Datastore:
    """Every n-gram of some token sequences, each with the continuation its most frequent next token had.

    Keys are the n ids packed into one uint64 (so n * bits(vocab) <= 64: n <= 4 for a 49152-token
    vocabulary), sorted for `np.searchsorted`. Per key the store keeps the latest occurrence followed by
    that key's most frequent next token (ties: the smallest token id) and how often that token followed.
    No n-gram or continuation crosses from one sequence into the next.
    """

    def __init__(self, sequences: Sequence[Sequence[int]], n: int, vocab_size: int):
        self.n, self.bits = n, max(1, int(vocab_size - 1).bit_length())
        if n < 1 or n * self.bits > 64:
            raise ValueError(f"n={n}: {n} ids of {self.bits} bits do not fit one 64-bit key; use n <= {64 // self.bits}")
        flat = [t for seq in sequences for t in (*seq, -1)]  # -1 ends each sequence
        self.corpus = np.asarray(flat, dtype=np.int64)
        key, nxt, pos = self._grams()
        order = np.lexsort((pos, nxt, key))  # by key, then next token, then position
        key, nxt, pos = key[order], nxt[order], pos[order]
        run = np.r_[True, (key[1:] != key[:-1]) | (nxt[1:] != nxt[:-1])]  # runs of one (key, next token)
        starts = np.flatnonzero(run)
        counts = np.diff(np.r_[starts, len(key)])
        latest = pos[np.r_[starts[1:], len(key)] - 1]
        first_of_key = np.r_[True, key[starts][1:] != key[starts][:-1]]
        group = np.cumsum(first_of_key) - 1
        best = np.maximum.reduceat(counts, np.flatnonzero(first_of_key))
        # The first run (smallest next token) reaching its key's best count represents the key.
        winners = np.flatnonzero(counts == best[group])
        chosen = winners[np.unique(group[winners], return_index=True)[1]]
        self.keys, self.starts, self.counts = key[starts][chosen], latest[chosen] + n, counts[chosen]

    def _grams(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(key, next token, position) of every n-gram followed by a token of the same sequence."""
        c, n = self.corpus, self.n
        m = max(len(c) - n, 0)
        valid = np.ones(m, dtype=bool)
        for j in range(n + 1):
            valid &= c[j:j + m] >= 0
        pos = np.flatnonzero(valid)
        key = np.zeros(len(pos), dtype=np.uint64)
        for j in range(n):
            key = (key << np.uint64(self.bits)) | c[pos + j].astype(np.uint64)
        return key, c[pos + n], pos

    def __len__(self) -> int:
        return len(self.keys)

    def propose(self, last: Sequence[int], width: int, min_count: int = 1) -> list[int]:
        """Up to `width` tokens that followed `last` (n ids) in the store, [] when it never occurred
        or its continuation's next token occurred fewer than `min_count` times."""
        key = 0
        for t in last:
            key = (key << self.bits) | int(t)
        i = int(np.searchsorted(self.keys, np.uint64(key)))
        if i == len(self.keys) or int(self.keys[i]) != key or self.counts[i] < min_count:
            return []
        draft = self.corpus[self.starts[i]:self.starts[i] + width].tolist()
        return draft[:draft.index(-1)] if -1 in draft else draft


class _StoreIndex(RowIndex):
    """A row's own n-gram index that falls back to the datastore where the row has no match."""

    def __init__(self, ngrams, tokens, store: Datastore, min_count: int):
        super().__init__(ngrams, tokens)
        self.store, self.min_count = store, min_count

    def propose(self, first: int, width: int) -> list[int]:
        own = super().propose(first, width)
        if own or len(self.tokens) < self.store.n - 1:
            return own
        last = [*self.tokens[len(self.tokens) - self.store.n + 1:], int(first)]
        return self.store.propose(last, width, self.min_count)


class StoreLookup(NgramLookup):
    """`NgramLookup` whose rows fall back to a `Datastore` (the script's lever, not the library's)."""

    def __init__(self, store: Datastore, ngram=3, max_tokens: int | None = None, min_count: int = 1):
        super().__init__(ngram, max_tokens)
        self.store, self.min_count = store, min_count

    def index(self, tokens: Sequence[int]) -> RowIndex:
        return _StoreIndex(self.ngrams, tokens, self.store, self.min_count)


def own_outputs(model: TwoTowerLM, docs: list[list[int]], windows: int, chat: int, new: int, seed: int = 123,
                batch: int = 64) -> list[list[int]]:
    """The AR model's greedy continuations of training windows and of self-written instructions, prompts kept."""
    tok, rng = model.tokenizer, random.Random(seed)
    long_docs = [d for d in docs if len(d) > 100]
    prompts = [d[s:s + 48] for d in rng.choices(long_docs, k=windows) for s in [rng.randrange(len(d) - 48)]]
    if chat:
        messages = write_instructions(model.context, tok, chat, generator=torch.Generator().manual_seed(seed))
        prompts += [chat_ids(tok, m) for m in messages if m]
    prompts.sort(key=len)  # similar lengths per batch: less padding
    out = []
    for lo in range(0, len(prompts), batch):
        rows = prompts[lo:lo + batch]
        width = max(map(len, rows))
        ids = torch.full((len(rows), width), tok.pad_token_id)
        mask = torch.zeros_like(ids)
        for r, p in enumerate(rows):
            ids[r, width - len(p):], mask[r, width - len(p):] = torch.tensor(p), 1
        res = Autoregressive().generate(model, ids, mask, max_new_tokens=new, eos_token_id=tok.eos_token_id)
        out += [p + res.new_tokens[r, :int(res.num_generated[r])].tolist() for r, p in enumerate(rows)]
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_prompt_arguments(p, seeds=[1, 2, 3])
    p.add_argument("--store", choices=("train", "own"), default="train")
    p.add_argument("--store-ngram", type=int, default=4, help="the n of the datastore's n-grams")
    p.add_argument("--min-count", type=int, nargs="+", default=[1, 2])
    p.add_argument("--ngram", type=int, default=3, help="the row's own lookup (NgramLookup)")
    p.add_argument("--max-tokens", type=int, default=15)
    p.add_argument("--own-windows", type=int, default=512)
    p.add_argument("--own-chat", type=int, default=256)
    p.add_argument("--own-new", type=int, default=96)
    p.add_argument("--out", default=None, help="JSON of the per-seed figures")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model = TwoTowerLM.from_pretrained(args.model, dtype=torch.float32).eval()
    start = time.perf_counter()
    with torch.inference_mode():
        docs = [model.tokenizer.encode(text) for text in training_texts()]
        if args.store == "own":
            docs = own_outputs(model, docs, args.own_windows, args.own_chat, args.own_new)
        store = Datastore(docs, args.store_ngram, model.tokenizer.vocab_size)
        print(f"datastore {args.store}: {sum(map(len, docs))} tokens, {len(store)} {args.store_ngram}-grams "
              f"({time.perf_counter() - start:.0f} s)", flush=True)
        lookups = {"": NgramLookup(args.ngram, max_tokens=args.max_tokens)}
        lookups.update({f"store_c{k}": StoreLookup(store, args.ngram, args.max_tokens, k) for k in args.min_count})
        per_seed = {}
        for seed in args.seeds:
            prompts = prompts_of(model, [seed], args.per_kind)
            row = per_seed[seed] = {}
            for name, lookup in lookups.items():
                modes = ("denoiser", "lookup") if not name else ("lookup", "best_of_both")
                counts = [tokens_per_iteration(model, ids, args.new_tokens, args.block, lookup, modes) for ids in prompts]
                for mode in modes:
                    label = mode if not name else name if mode == "lookup" else f"{name}_best"
                    row[label] = args.new_tokens * len(prompts) / sum(c[mode] for c in counts)
            print(f"seed {seed}: " + ", ".join(f"{k} {v:.2f}" for k, v in row.items()), flush=True)
    names = list(per_seed[args.seeds[0]])
    print(f"\n{args.model}, store {args.store} ({args.store_ngram}-grams), row lookup {args.ngram}-grams up to "
          f"{args.max_tokens} tokens, block {args.block or 'default'}: tokens per iteration, outputs AR's")
    for name in names:
        vals = [per_seed[s][name] for s in args.seeds]
        print(f"  {name:15s} {sum(vals) / len(vals):.3f} ({' / '.join(f'{v:.2f}' for v in vals)})")
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "store_tokens": sum(map(len, docs)),
                                              "store_ngrams": len(store), "per_seed": per_seed}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
