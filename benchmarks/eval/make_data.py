"""Write the local evaluation suite's data from the stdlib held-out split (no download).

    python benchmarks/eval/make_data.py            # rewrites benchmarks/eval/data/*.jsonl

Two tasks, both on Python source the embedded default never trained on:
* nextline.jsonl (multiple choice, `twotower_nextline`): the 12 lines before a line of code, and
  four candidates for that line: the true one and three lines taken from other held-out files.
* complete.jsonl (generate-until, `twotower_complete`): a function's `def` line and the first
  lines of its body as the prompt, the rest of the body (until the function's indentation ends)
  as the reference; scored by exact match of the first line and by edit similarity.
The selection is deterministic (seeded), so the files are reproducible.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))

CONTEXT_LINES = 12


def heldout_texts() -> list[str]:
    from twotower.data import TextDataModule
    from twotower.tokenizers import ByteTokenizer

    return TextDataModule(tokenizer=ByteTokenizer()).heldout_documents()


def _code_lines(text: str) -> list[str]:
    return [ln for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("#") and len(ln) <= 100]


def nextline_rows(texts: list[str], n: int, rng: random.Random) -> list[dict]:
    pool = [ln for t in texts for ln in _code_lines(t) if len(ln.strip()) >= 12]
    rows = []
    for doc, text in enumerate(texts):
        lines = text.splitlines()
        spots = [i for i in range(CONTEXT_LINES, len(lines)) if len(lines[i].strip()) >= 12 and len(lines[i]) <= 100]
        for i in rng.sample(spots, min(20, len(spots))):
            truth = lines[i]
            distractors = []
            while len(distractors) < 3:
                cand = rng.choice(pool)
                if cand.strip() != truth.strip() and cand not in distractors:
                    distractors.append(cand)
            choices = distractors + [truth]
            rng.shuffle(choices)
            rows.append({"context": "\n".join(lines[i - CONTEXT_LINES: i]) + "\n", "choices": choices,
                         "gold": choices.index(truth), "doc": doc})
    rng.shuffle(rows)
    return rows[:n]


def complete_rows(texts: list[str], n: int, rng: random.Random) -> list[dict]:
    rows = []
    for doc, text in enumerate(texts):
        lines = text.splitlines()
        for i, line in enumerate(lines):
            m = re.match(r"^(\s*)def \w+\(.*\):\s*$", line)
            if not m:
                continue
            indent = len(m.group(1))
            body = []
            for ln in lines[i + 1:]:
                if ln.strip() and len(ln) - len(ln.lstrip()) <= indent:
                    break
                body.append(ln)
            while body and not body[-1].strip():
                body.pop()
            code = [ln for ln in body if ln.strip()]
            if not 4 <= len(code) <= 16 or any(len(ln) > 100 for ln in body):
                continue
            keep = 1 if len(code) < 6 else 2  # prompt: the def line and the first line(s) of the body
            cut = body.index(code[keep - 1]) + 1
            start = max(0, i - 6)
            rows.append({"prompt": "\n".join(lines[start: i + 1] + body[:cut]) + "\n",
                         "reference": "\n".join(body[cut:]) + "\n", "doc": doc})
    rng.shuffle(rows)
    return rows[:n]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(HERE / "data"))
    p.add_argument("--nextline", type=int, default=200)
    p.add_argument("--complete", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    texts = heldout_texts()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, rows in (("nextline", nextline_rows(texts, a.nextline, random.Random(a.seed))),
                       ("complete", complete_rows(texts, a.complete, random.Random(a.seed + 1)))):
        with (out / f"{name}.jsonl").open("w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        print(f"wrote {len(rows)} rows to {out / name}.jsonl")
    return 0


if __name__ == "__main__":
    sys.exit(main())
