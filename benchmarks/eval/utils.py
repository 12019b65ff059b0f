"""Loaders and metrics of the local evaluation suite (lm_eval calls these through `!function`).

The data lives beside this file (data/*.jsonl, written by make_data.py), so the tasks load the
same files whatever the working directory.
"""

from __future__ import annotations

import difflib
import json
from pathlib import Path

DATA = Path(__file__).resolve().parent / "data"


def _split(name: str):
    import datasets

    rows = [json.loads(line) for line in (DATA / f"{name}.jsonl").read_text(encoding="utf-8").splitlines() if line]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def load_nextline(**_):
    return _split("nextline")


def load_complete(**_):
    return _split("complete")


def _body(prompt: str, text: str) -> list[str]:
    """The generated lines that still belong to the function the prompt opened (deeper indent)."""
    def_line = next(ln for ln in reversed(prompt.splitlines()) if ln.lstrip().startswith("def "))
    indent = len(def_line) - len(def_line.lstrip())
    lines = []
    for ln in text.splitlines():
        if ln.strip() and len(ln) - len(ln.lstrip()) <= indent:
            break
        lines.append(ln)
    while lines and not lines[-1].strip():
        lines.pop()
    return lines


def process_complete(doc: dict, results: list[str]) -> dict:
    """first_line_exact: the first generated body line equals the reference's (stripped);
    edit_similarity: difflib's ratio between the generated body and the reference body."""
    got = _body(doc["prompt"], results[0])
    want = [ln for ln in doc["reference"].splitlines()]
    while want and not want[-1].strip():
        want.pop()
    first_got = next((ln.strip() for ln in got if ln.strip()), "")
    first_want = next((ln.strip() for ln in want if ln.strip()), "")
    return {"first_line_exact": float(first_got == first_want),
            "edit_similarity": difflib.SequenceMatcher(None, "\n".join(got), "\n".join(want)).ratio()}
