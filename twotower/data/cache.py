"""The on-disk cache of prepared data (packed rows, distilled rows).

A cache file is named `<kind>-<key>.pt`, where key is the first 20 hex digits of the sha256 of
the JSON of every setting that shapes its contents (`cache_file`). The settings include
fingerprints of what the data came from, so that a changed input misses the cache instead of
silently reusing stale rows:

    tokenizer_fingerprint   the tokenizer's repr, vocabulary size, specials and a probe encoding
    source_fingerprint      the corpus files' relative paths, sizes and mtimes
    files_fingerprint       the content of a checkpoint directory's config and weight files

`save_cache` writes by write-then-rename, so concurrent ranks never read a half-written file.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import sysconfig
from pathlib import Path
from typing import Any

import torch

from twotower.tokenizers import Tokenizer

from .sources import BUILTIN_SOURCES, stdlib_source_files


def cache_file(cache_dir: str | os.PathLike, kind: str, settings: dict[str, Any]) -> Path:
    """`cache_dir/<kind>-<key>.pt`, key = sha256 of the sorted-key JSON of `settings`, 20 hex digits."""
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:20]
    return Path(cache_dir).expanduser() / f"{kind}-{key}.pt"


def save_cache(path: Path, obj) -> None:
    """torch.save to `path` by write-then-rename: concurrent ranks never read a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # One temporary name per process: two ranks writing the same cache never share a partial file.
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    torch.save(obj, tmp)
    # Atomic on one filesystem: a reader sees the old file or the whole new one.
    os.replace(tmp, path)


def load_cache(path: Path) -> dict[str, torch.Tensor]:
    """What `save_cache` wrote: a dict of tensors (weights_only, so no code runs on load)."""
    return torch.load(path, weights_only=True)


def tokenizer_fingerprint(tokenizer: Tokenizer) -> str:
    # The probe catches two tokenizers with identical settings but different vocabularies.
    probe = "Hello, wörld! 123\n\tdef f(x): return x  # ünïcode ✓"
    ids = tokenizer.encode(probe)
    return json.dumps(
        [repr(tokenizer), tokenizer.vocab_size, sorted(tokenizer.special_token_ids), ids[:64]]
    )


def source_fingerprint(source: str) -> str:
    """Hash of the files behind `source` (paths, sizes, mtimes): a changed corpus misses the cache."""
    if all(part in BUILTIN_SOURCES for part in str(source).split("+")):  # built-in sources all read the stdlib
        root = Path(sysconfig.get_paths()["stdlib"])
        files = stdlib_source_files()
        header = f"{source} {sys.version} {root}"
    else:
        root = Path(source).expanduser().resolve()
        files = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else [root]
        header = str(root)
    h = hashlib.sha256(header.encode())
    for p in files:
        st = p.stat()
        rel = p.relative_to(root).as_posix() if p != root else p.name
        # Sizes and mtimes, not contents: a corpus is too large to hash at every start, and an edit
        # changes the mtime.
        h.update(f"\n{rel}\t{st.st_size}\t{st.st_mtime_ns}".encode())
    return h.hexdigest()


def files_fingerprint(path: Path) -> str:
    """Content hash of a checkpoint directory's config and weight files."""
    h = hashlib.sha256()
    for f in sorted(path.iterdir()):
        if f.suffix in (".json", ".safetensors", ".bin") and f.is_file():
            h.update(f.name.encode())
            with open(f, "rb") as fh:
                # In 1 MiB chunks: weight files may not fit in memory at once.
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    h.update(chunk)
    return h.hexdigest()[:20]
