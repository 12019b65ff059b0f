"""Corpus sources and the train / held-out split.

`iter_documents` turns a source into `Document(name, text)`s in a deterministic order:

    "stdlib"            one document per standard-library `.py` file (no download needed)
    "stdlib-docs"       English prose: one document per stdlib file's docstrings, plus one per topic
                        of the interpreter's own reference pages (`pydoc_data.topics`)
    "A+B"               the documents of built-in sources A and B, in that order (e.g. "stdlib+stdlib-docs")
    a folder            one per file matching a glob; `.jsonl` files among them, one per line
    a `.jsonl` file     one per line's text field, named `file.jsonl:LINE`
    a `datasets` dir    one per row's text field, all splits (what `save_to_disk` writes)
    any other file      one per blank-line-separated block, named `file#K`

`split_documents` then holds documents out by a hash of their *name*: the split does not move
when files are listed in another order or a seed changes, and no document lands in both splits.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import re
import sysconfig
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import NamedTuple

# The literal source name for the embedded corpus. A local folder called "stdlib" can still be
# used by spelling it as a path ("./stdlib").
STDLIB = "stdlib"
# English prose that every Python ships: docstrings and the reference topics of `help()`.
STDLIB_DOCS = "stdlib-docs"
# Shorter docstring collections are mostly one-liners, not prose.
_MIN_DOCSTRING_CHARS = 400

# Directories of the stdlib that are not representative library code (test suites, the IDLE
# app, the deprecated 2to3 fixers, turtle demos) or not stdlib at all (installed packages).
_STDLIB_EXCLUDED_DIRS = frozenset(
    {"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3", "turtledemo"}
)


class Document(NamedTuple):
    """One corpus document. `name` is its stable identity (relative path, `file.jsonl:LINE`, ...)."""

    name: str
    text: str


# ----------------------------------------------------------------------------- corpus reading


def stdlib_source_files() -> list[Path]:
    """The standard library's own `.py` files, sorted: the embedded corpus that needs no download.

    Found under `sysconfig.get_paths()["stdlib"]` (the base interpreter's stdlib, also inside a
    virtual environment); installed packages, test suites, idlelib, lib2to3 and turtledemo are
    excluded.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    if not root.is_dir():
        raise FileNotFoundError(f"Python standard library directory {str(root)!r} not found")
    files = []
    for directory, subdirs, names in os.walk(root):
        # Prune in place: site-packages alone can hold tens of thousands of files.
        subdirs[:] = [d for d in subdirs if d not in _STDLIB_EXCLUDED_DIRS and d != "__pycache__"]
        files += [Path(directory, n) for n in names if n.endswith(".py")]
    return sorted(p for p in files if p.is_file())


def _docstrings(text: str) -> str:
    """Every docstring of a module (module, classes, functions), blank-line separated, in source order."""
    try:
        tree = ast.parse(text)
    except (SyntaxError, ValueError):  # a stdlib file of another Python version's grammar
        return ""
    nodes = [tree] + [n for n in ast.walk(tree) if isinstance(n, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))]
    docs = [ast.get_docstring(n) for n in nodes]
    return "\n\n".join(d.strip() for d in docs if d and len(d.split()) > 3)


def stdlib_docs_documents() -> Iterator[Document]:
    """English prose from the interpreter itself: per stdlib file, its docstrings (when they add up to
    `_MIN_DOCSTRING_CHARS`), then the reference topics `help()` shows (`pydoc_data.topics`)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    for path in stdlib_source_files():
        prose = _docstrings(_read_text(path))
        if len(prose) >= _MIN_DOCSTRING_CHARS:
            yield Document(f"docs:{path.relative_to(root).as_posix()}", prose)
    try:
        from pydoc_data.topics import topics
    except ImportError:  # some distributions leave the help topics out
        return
    for name in sorted(topics):
        yield Document(f"topics:{name}", topics[name].strip())


BUILTIN_SOURCES = {STDLIB: lambda: _stdlib_documents(), STDLIB_DOCS: stdlib_docs_documents}


def _stdlib_documents() -> Iterator[Document]:
    root = Path(sysconfig.get_paths()["stdlib"])
    for path in stdlib_source_files():
        text = _read_text(path)
        if text:
            yield Document(path.relative_to(root).as_posix(), text)


def _read_text(path: Path) -> str:
    # errors="replace": one badly encoded file must not stop a training run.
    return path.read_text(encoding="utf-8", errors="replace")


def _is_datasets_dir(path: Path) -> bool:
    # What `Dataset.save_to_disk` / `DatasetDict.save_to_disk` leave behind.
    return (path / "dataset_dict.json").is_file() or (
        (path / "state.json").is_file() and (path / "dataset_info.json").is_file()
    )


def _jsonl_documents(path: Path, name: str, text_field: str) -> Iterator[Document]:
    with path.open(encoding="utf-8", errors="replace") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{line_no}: invalid JSON ({e.msg})") from None
            if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
                raise ValueError(
                    f"{path}:{line_no}: expected an object with a string field {text_field!r} "
                    "(set text_field=... to the name of the text column)"
                )
            if record[text_field]:
                yield Document(f"{name}:{line_no}", record[text_field])


def _text_file_documents(path: Path) -> Iterator[Document]:
    # A lone text file is split into blank-line-separated blocks; as a single document it could
    # only land wholly in train or wholly in the held-out split.
    for k, block in enumerate(re.split(r"\n[ \t\r\f\v]*\n", _read_text(path))):
        block = block.strip("\r\n")
        if block.strip():
            yield Document(f"{path.name}#{k}", block)


def _datasets_documents(path: Path, text_field: str) -> Iterator[Document]:
    try:
        import datasets  # optional, and heavy: only a `datasets` directory needs it
    except ImportError:
        raise ImportError(
            f"{str(path)!r} is a `datasets` directory, which needs the datasets library: pip install datasets"
        ) from None
    loaded = datasets.load_from_disk(str(path))
    splits = [(name, loaded[name]) for name in sorted(loaded)] if isinstance(loaded, dict) else [("", loaded)]
    for split, ds in splits:
        if text_field not in ds.column_names:
            raise ValueError(
                f"dataset at {str(path)!r} has no column {text_field!r} (columns: {ds.column_names}); "
                "set text_field=..."
            )
        prefix = f"{split}/" if split else ""
        for i, text in enumerate(ds[text_field]):
            if text:
                yield Document(f"{prefix}{i}", text)


def _folder_documents(root: Path, pattern: str, text_field: str) -> Iterator[Document]:
    files = sorted(p for p in root.glob(pattern) if p.is_file())
    if not files:
        raise ValueError(f"no files match pattern {pattern!r} under {str(root)!r}; set pattern=...")
    for path in files:
        name = path.relative_to(root).as_posix()
        if path.suffix == ".jsonl":
            yield from _jsonl_documents(path, name, text_field)
        else:
            text = _read_text(path)
            if text:
                yield Document(name, text)


def iter_documents(
    source: str | os.PathLike, *, pattern: str = "**/*.txt", text_field: str = "text"
) -> Iterator[Document]:
    """Yield the documents of a corpus in a deterministic order, with stable names.

    Source kinds (empty documents are skipped):
      * "stdlib": one document per `stdlib_source_files()` file, named by its relative path.
      * "stdlib-docs": English prose (`stdlib_docs_documents`), named `docs:PATH` / `topics:NAME`.
      * "A+B": built-in sources chained, e.g. "stdlib+stdlib-docs".
      * a folder: one document per file matching `pattern` (sorted), named by its relative
        path; `.jsonl` files among them contribute one document per line.
      * a `.jsonl` file: one document per line's `text_field`, named `file.jsonl:LINE`.
      * a `datasets` directory (`save_to_disk`): one per row's `text_field` (all splits).
      * any other file: one document per blank-line-separated block, named `file#K`.
    Files are read as UTF-8 with errors="replace".
    """
    parts = str(source).split("+")
    if all(p in BUILTIN_SOURCES for p in parts):
        for part in parts:
            yield from BUILTIN_SOURCES[part]()
        return
    path = Path(source).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"corpus source {str(source)!r} does not exist")
    if path.is_dir():
        if _is_datasets_dir(path):
            yield from _datasets_documents(path, text_field)
        else:
            yield from _folder_documents(path, pattern, text_field)
    elif path.suffix == ".jsonl":
        yield from _jsonl_documents(path, path.name, text_field)
    else:
        yield from _text_file_documents(path)


def read_corpus(
    source: str | os.PathLike, *, pattern: str = "**/*.txt", text_field: str = "text"
) -> Iterator[str]:
    """The texts of `iter_documents(source, ...)`."""
    for doc in iter_documents(source, pattern=pattern, text_field=text_field):
        yield doc.text


# ----------------------------------------------------------------------------- split


def unit_hash(name: str) -> float:
    # sha256, not hash(): Python's str hash is salted per process.
    digest = hashlib.sha256(name.encode("utf-8", errors="surrogatepass")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def held_out(name: str, val_fraction: float) -> bool:
    """Whether the document called `name` belongs to the held-out split: u(name) < val_fraction.

    The per-document rule of `split_documents`, usable on a stream (no listing of the corpus).
    """
    return unit_hash(name) < val_fraction


def split_documents(names: Sequence[str], val_fraction: float = 0.02) -> tuple[list[int], list[int]]:
    """Deterministic train / held-out split by document name.

    Document i is held out iff u(name_i) < val_fraction, with u a sha256-derived number in
    [0, 1). The result depends on neither the order of `names` nor any seed. So that small
    corpora still get both splits, when val_fraction > 0 and there are >= 2 documents, an empty
    held-out set receives the document with the smallest u and an empty train set gives up the
    one with the largest u.

    Returns:
        (train_idx, val_idx): indices into `names`, each ascending.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction={val_fraction} must be in [0, 1)")
    scores = [unit_hash(n) for n in names]
    held = [held_out(n, val_fraction) for n in names]
    if val_fraction > 0 and len(names) >= 2:
        # Ties broken by name so the choice stays independent of order.
        if not any(held):
            held[min(range(len(names)), key=lambda i: (scores[i], names[i]))] = True
        elif all(held):
            held[max(range(len(names)), key=lambda i: (scores[i], names[i]))] = False
    train_idx = [i for i, h in enumerate(held) if not h]
    val_idx = [i for i, h in enumerate(held) if h]
    return train_idx, val_idx
