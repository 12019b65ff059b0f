"""Data: text corpora -> packed training rows, prompt files -> left-padded generation batches.

Pipeline for training (`TextDataModule`):

    source --iter_documents--> [Document(name, text)] --split_documents--> train / held-out
           --tokenizer.encode + pack_documents--> LongTensor (N, seq_len) per split

Sources: the embedded Python standard library ("stdlib", no download), a folder of text /
JSONL files, one text file, one JSONL file, or a `datasets` directory saved with
`save_to_disk`. The held-out split is by document and uses a hash of the document's name,
so it does not move when files are listed in another order or the seed changes, and no
document contributes to both splits.

Pipeline for generation (`PromptDataModule`): a prompt file (JSONL or one prompt per line)
or a list of strings -> dicts with LEFT-padded `input_ids` (B, T), so that every row's
last column is its last prompt token and generation appends at the same position.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
import sysconfig
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from twotower.tokenizers import ByteTokenizer, Tokenizer

__all__ = [
    "STDLIB",
    "Document",
    "stdlib_source_files",
    "iter_documents",
    "read_corpus",
    "split_documents",
    "pack_documents",
    "TextDataModule",
    "read_prompts",
    "collate_prompts",
    "PromptDataModule",
]

# The literal source name for the embedded corpus. A local folder called "stdlib" can still be
# used by spelling it as a path ("./stdlib").
STDLIB = "stdlib"

# Directories of the stdlib that are not representative library code (test suites, the IDLE
# app, the deprecated 2to3 fixers, turtle demos) or not stdlib at all (installed packages).
_STDLIB_EXCLUDED_DIRS = frozenset(
    {"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3", "turtledemo"}
)

# Bump when the packed layout changes, so that stale caches are not reused.
_CACHE_FORMAT = 1


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
        import datasets
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
      * a folder: one document per file matching `pattern` (sorted), named by its relative
        path; `.jsonl` files among them contribute one document per line.
      * a `.jsonl` file: one document per line's `text_field`, named `file.jsonl:LINE`.
      * a `datasets` directory (`save_to_disk`): one per row's `text_field` (all splits).
      * any other file: one document per blank-line-separated block, named `file#K`.
    Files are read as UTF-8 with errors="replace".
    """
    if str(source) == STDLIB:
        root = Path(sysconfig.get_paths()["stdlib"])
        for path in stdlib_source_files():
            text = _read_text(path)
            if text:
                yield Document(path.relative_to(root).as_posix(), text)
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


# ----------------------------------------------------------------------------- split and packing


def _unit_hash(name: str) -> float:
    # sha256, not hash(): Python's str hash is salted per process.
    digest = hashlib.sha256(name.encode("utf-8", errors="surrogatepass")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


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
    scores = [_unit_hash(n) for n in names]
    held = [s < val_fraction for s in scores]
    if val_fraction > 0 and len(names) >= 2:
        # Ties broken by name so the choice stays independent of order.
        if not any(held):
            held[min(range(len(names)), key=lambda i: (scores[i], names[i]))] = True
        elif all(held):
            held[max(range(len(names)), key=lambda i: (scores[i], names[i]))] = False
    train_idx = [i for i, h in enumerate(held) if not h]
    val_idx = [i for i, h in enumerate(held) if h]
    return train_idx, val_idx


def _as_long_tensor(ids: Sequence[int] | torch.Tensor) -> torch.Tensor:
    if isinstance(ids, torch.Tensor):
        return ids.long().reshape(-1)
    return torch.tensor(list(ids), dtype=torch.long)


def pack_documents(
    docs: Iterable[Sequence[int] | torch.Tensor],
    seq_len: int,
    *,
    bos_id: int | None,
    eos_id: int | None,
    max_sequences: int | None = None,
) -> torch.Tensor:
    """Concatenate `[bos] + doc + [eos]` for every doc and cut the stream into rows.

    Rows may start or end mid-document (standard LM packing); the last partial row is dropped.
    `bos_id` / `eos_id` = None omits that marker. `max_sequences` stops reading `docs` once
    that many rows are full, so a lazy iterable is only tokenised as far as needed.

    Returns:
        LongTensor (N, seq_len); N may be 0.
    """
    if seq_len <= 0:
        raise ValueError(f"seq_len={seq_len} must be positive")
    bos = torch.tensor([bos_id] if bos_id is not None else [], dtype=torch.long)
    eos = torch.tensor([eos_id] if eos_id is not None else [], dtype=torch.long)
    pieces: list[torch.Tensor] = []
    total = 0
    limit = None if max_sequences is None else max_sequences * seq_len
    for doc in docs:
        if limit is not None and total >= limit:
            break
        ids = _as_long_tensor(doc)
        pieces += [bos, ids, eos]
        total += bos.numel() + ids.numel() + eos.numel()
    stream = torch.cat(pieces) if pieces else torch.empty(0, dtype=torch.long)
    n = stream.numel() // seq_len
    if max_sequences is not None:
        n = min(n, max_sequences)
    return stream[: n * seq_len].reshape(n, seq_len).clone()


# ----------------------------------------------------------------------------- training data


class _Rows(Dataset):
    """Rows of a (N, L) tensor; items are (L,) tensors, so default collation gives (B, L)."""

    def __init__(self, data: torch.Tensor) -> None:
        self.data = data

    def __len__(self) -> int:
        return self.data.shape[0]

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.data[i]


def _tokenizer_fingerprint(tokenizer: Tokenizer) -> str:
    # The probe catches two tokenizers with identical settings but different vocabularies.
    probe = "Hello, wörld! 123\n\tdef f(x): return x  # ünïcode ✓"
    ids = tokenizer.encode(probe)
    return json.dumps(
        [repr(tokenizer), tokenizer.vocab_size, sorted(tokenizer.special_token_ids), ids[:64]]
    )


def _source_fingerprint(source: str) -> str:
    """Hash of the files behind `source` (paths, sizes, mtimes): a changed corpus misses the cache."""
    if source == STDLIB:
        root = Path(sysconfig.get_paths()["stdlib"])
        files = stdlib_source_files()
        header = f"stdlib {sys.version} {root}"
    else:
        root = Path(source).expanduser().resolve()
        files = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else [root]
        header = str(root)
    h = hashlib.sha256(header.encode())
    for p in files:
        st = p.stat()
        rel = p.relative_to(root).as_posix() if p != root else p.name
        h.update(f"\n{rel}\t{st.st_size}\t{st.st_mtime_ns}".encode())
    return h.hexdigest()


def save_cache(path: Path, obj) -> None:
    """torch.save to `path` by write-then-rename: concurrent ranks never read a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


class TextDataModule(L.LightningDataModule):
    """Packed next-token / denoising training rows from a text corpus.

    Batches are LongTensors (B, seq_len). Rows are packed from `[bos] + doc + [eos]` streams,
    train and held-out documents packed separately (see `split_documents`).

    Args:
        source: "stdlib" (the embedded Python stdlib corpus), a folder, a text / JSONL file or
            a `datasets` directory; see `iter_documents`.
        tokenizer: defaults to `ByteTokenizer()`.
        seq_len: row length; must be a multiple of `block_size`.
        block_size: the denoiser's block size (only checked against seq_len here).
        batch_size: rows per batch.
        val_fraction: expected fraction of documents held out. If the held-out documents are
            too short for one row, train documents move over (in split-hash order) until they are.
        max_documents: keep only the first N documents in source order (quick runs).
        max_train_sequences / max_val_sequences: cap the number of packed rows per split.
        num_workers: DataLoader workers.
        seed: seeds the training shuffle (each epoch draws a new order from this generator).
        text_field: JSONL / datasets column holding the text.
        pattern: glob for folder sources.
        cache_dir: if set, packed tensors are cached there as `packed-<hash>.pt`, keyed by the
            settings above, the tokenizer and the source files' sizes and mtimes.
    """

    def __init__(
        self,
        source: str = STDLIB,
        tokenizer: Tokenizer | None = None,
        seq_len: int = 256,
        block_size: int = 16,
        batch_size: int = 8,
        val_fraction: float = 0.02,
        max_documents: int | None = None,
        max_train_sequences: int | None = None,
        max_val_sequences: int | None = None,
        num_workers: int = 0,
        seed: int = 0,
        text_field: str = "text",
        pattern: str = "**/*.txt",
        cache_dir: str | None = None,
    ) -> None:
        super().__init__()
        _check_seq_len(seq_len, block_size)
        if batch_size <= 0:
            raise ValueError(f"batch_size={batch_size} must be positive")
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"val_fraction={val_fraction} must be in [0, 1)")
        for name, value in [
            ("max_documents", max_documents),
            ("max_train_sequences", max_train_sequences),
            ("max_val_sequences", max_val_sequences),
        ]:
            if value is not None and value <= 0:
                raise ValueError(f"{name}={value} must be positive (or None for no limit)")
        self.source = str(source)
        self.tokenizer = tokenizer if tokenizer is not None else ByteTokenizer()
        self.seq_len = seq_len
        self.block_size = block_size
        self.batch_size = batch_size
        self.val_fraction = val_fraction
        self.max_documents = max_documents
        self.max_train_sequences = max_train_sequences
        self.max_val_sequences = max_val_sequences
        self.num_workers = num_workers
        self.seed = seed
        self.text_field = text_field
        self.pattern = pattern
        self.cache_dir = cache_dir
        self.train_data: torch.Tensor | None = None  # (N_train, seq_len)
        self.val_data: torch.Tensor | None = None  # (N_val, seq_len)
        self._split: tuple[list[Document], list[Document]] | None = None

    # -- documents

    def _load_split(self) -> tuple[list[Document], list[Document]]:
        if self._split is None:
            docs = []
            for doc in iter_documents(self.source, pattern=self.pattern, text_field=self.text_field):
                if self.max_documents is not None and len(docs) >= self.max_documents:
                    break
                docs.append(doc)
            if not docs:
                raise ValueError(f"corpus {self.source!r} contains no non-empty documents")
            train_idx, val_idx = split_documents([d.name for d in docs], self.val_fraction)
            if self.val_fraction > 0:
                train_idx, val_idx = self._top_up_heldout(docs, train_idx, val_idx)
            self._split = [docs[i] for i in train_idx], [docs[i] for i in val_idx]
        return self._split

    def _top_up_heldout(
        self, docs: list[Document], train_idx: list[int], val_idx: list[int]
    ) -> tuple[list[int], list[int]]:
        """Move train documents to the held-out split until it fills at least one row.

        Only small corpora (or small max_documents) need this. Documents move in order of their
        split hash, so the result still ignores listing order; one train document always stays.
        """
        def length(i: int) -> int:
            return self.tokenizer.encode_tensor(docs[i].text).numel() + 2  # + bos, eos

        have = sum(length(i) for i in val_idx)
        moved = set()
        for i in sorted(train_idx, key=lambda i: (_unit_hash(docs[i].name), docs[i].name))[:-1]:
            if have >= self.seq_len:
                break
            moved.add(i)
            have += length(i)
        return [i for i in train_idx if i not in moved], sorted(val_idx + list(moved))

    def heldout_documents(self) -> list[str]:
        """Texts of the held-out documents (the benchmark draws prompts and continuations here)."""
        return [doc.text for doc in self._load_split()[1]]

    # -- packing

    def _pack(self, docs: list[Document], max_sequences: int | None) -> torch.Tensor:
        tok = self.tokenizer
        return pack_documents(
            (tok.encode_tensor(d.text) for d in docs),
            self.seq_len,
            bos_id=tok.bos_token_id,
            eos_id=tok.eos_token_id,
            max_sequences=max_sequences,
        )

    def _cache_path(self) -> Path | None:
        if self.cache_dir is None:
            return None
        settings = {
            "format": _CACHE_FORMAT,
            "source": self.source,
            "files": _source_fingerprint(self.source),
            "tokenizer": _tokenizer_fingerprint(self.tokenizer),
            "seq_len": self.seq_len,
            "val_fraction": self.val_fraction,
            "max_documents": self.max_documents,
            "max_train_sequences": self.max_train_sequences,
            "max_val_sequences": self.max_val_sequences,
            "text_field": self.text_field,
            "pattern": self.pattern,
        }
        key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:20]
        return Path(self.cache_dir).expanduser() / f"packed-{key}.pt"

    def setup(self, stage: str | None = None) -> None:
        """Tokenise and pack both splits (or load them from the cache); idempotent."""
        if self.train_data is not None:
            return
        cache = self._cache_path()
        if cache is not None and cache.is_file():
            packed = torch.load(cache, weights_only=True)
            self.train_data, self.val_data = packed["train"], packed["val"]
            return
        train_docs, val_docs = self._load_split()
        train = self._pack(train_docs, self.max_train_sequences)
        val = self._pack(val_docs, self.max_val_sequences)
        if train.shape[0] == 0:
            raise ValueError(
                f"corpus {self.source!r}: the {len(train_docs)} training documents give no full row of "
                f"seq_len={self.seq_len} tokens; lower seq_len or add documents"
            )
        if self.val_fraction > 0 and val.shape[0] == 0:
            raise ValueError(
                f"corpus {self.source!r}: the {len(val_docs)} held-out documents give no full row of "
                f"seq_len={self.seq_len} tokens; raise val_fraction, lower seq_len or add documents"
            )
        if cache is not None:
            save_cache(cache, {"train": train, "val": val})
        self.train_data, self.val_data = train, val

    # -- loaders

    def train_dataloader(self) -> DataLoader:
        self.setup()
        return DataLoader(
            _Rows(self.train_data),
            batch_size=self.batch_size,
            shuffle=True,
            generator=torch.Generator().manual_seed(self.seed),
            num_workers=self.num_workers,
        )

    def val_dataloader(self) -> DataLoader:
        self.setup()
        return DataLoader(
            _Rows(self.val_data), batch_size=self.batch_size, shuffle=False, num_workers=self.num_workers
        )


def _check_seq_len(seq_len: int, block_size: int) -> None:
    if block_size <= 0:
        raise ValueError(f"block_size={block_size} must be positive")
    if seq_len <= 0 or seq_len % block_size:
        nearest = max(block_size, round(seq_len / block_size) * block_size)
        raise ValueError(
            f"seq_len={seq_len} must be a positive multiple of block_size={block_size}; "
            f"nearest valid value: seq_len={nearest}"
        )


# ----------------------------------------------------------------------------- prompts


def read_prompts(path: str | os.PathLike) -> list[str]:
    """Prompts from a file, in file order.

    * `.jsonl`: one JSON object per non-blank line with a string `prompt` (preferred) or
      `text` field.
    * anything else: one prompt per non-blank line, taken verbatim (a literal `\\n` stays two
      characters; use JSONL for multi-line prompts).
    """
    file = Path(path).expanduser()
    if not file.is_file():
        raise FileNotFoundError(f"prompt file {str(path)!r} does not exist")
    prompts: list[str] = []
    with file.open(encoding="utf-8", errors="replace", newline="") as f:
        for line_no, line in enumerate(f, start=1):
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            prompts.append(_jsonl_prompt(file, line_no, line) if file.suffix == ".jsonl" else line)
    if not prompts:
        raise ValueError(f"prompt file {str(path)!r} contains no prompts")
    return prompts


def _jsonl_prompt(file: Path, line_no: int, line: str) -> str:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"{file}:{line_no}: invalid JSON ({e.msg})") from None
    if isinstance(record, dict):
        for key in ("prompt", "text"):
            if isinstance(record.get(key), str):
                return record[key]
    raise ValueError(f"{file}:{line_no}: expected an object with a string 'prompt' or 'text' field")


def collate_prompts(
    token_lists: Sequence[Sequence[int] | torch.Tensor], pad_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad prompts to a common length.

    Left padding puts every prompt's last token in the last column, so that a batch extends
    all rows at the same position.

    Returns:
        input_ids: LongTensor (B, T), T = longest prompt; padding is `pad_id`.
        attention_mask: LongTensor (B, T), 1 on real tokens, 0 on padding.
    """
    if len(token_lists) == 0:
        raise ValueError("collate_prompts needs at least one prompt")
    rows = [_as_long_tensor(t) for t in token_lists]
    for i, row in enumerate(rows):
        if row.numel() == 0:
            raise ValueError(f"prompt {i} of the batch has no tokens; generation needs at least one")
    width = max(row.numel() for row in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, width - row.numel():] = row
        attention_mask[i, width - row.numel():] = 1
    return input_ids, attention_mask


class _PromptCollator:
    """Picklable collate_fn (DataLoader workers need one) turning items into a prompt batch dict."""

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, items: list[tuple[int, str, list[int]]]) -> dict[str, Any]:
        input_ids, attention_mask = collate_prompts([ids for _, _, ids in items], self.pad_id)
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "prompts": [text for _, text, _ in items],
            "index": torch.tensor([i for i, _, _ in items], dtype=torch.long),
        }


class _PromptItems(Dataset):
    def __init__(self, prompts: list[str], tokens: list[list[int]]) -> None:
        self.prompts, self.tokens = prompts, tokens

    def __len__(self) -> int:
        return len(self.prompts)

    def __getitem__(self, i: int) -> tuple[int, str, list[int]]:
        return i, self.prompts[i], self.tokens[i]


class PromptDataModule(L.LightningDataModule):
    """Prompts for `predict`, in their original order.

    Each batch is a dict:
        input_ids: LongTensor (B, T), LEFT-padded with the tokenizer's pad id
        attention_mask: LongTensor (B, T), 1 for real tokens
        prompts: list[str], the prompt texts
        index: LongTensor (B,), positions in the prompt list

    Args:
        prompts: path to a prompt file (see `read_prompts`).
        prompt_list: prompts given directly; exactly one of `prompts` / `prompt_list`.
        tokenizer: defaults to `ByteTokenizer()`.
        batch_size: prompts per batch.
        add_bos: prepend the bos token (an empty prompt then means unconditional generation).
        num_workers: DataLoader workers.
    """

    def __init__(
        self,
        prompts: str | None = None,
        prompt_list: list[str] | None = None,
        tokenizer: Tokenizer | None = None,
        batch_size: int = 8,
        add_bos: bool = True,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        if (prompts is None) == (prompt_list is None):
            raise ValueError("give exactly one of prompts (a file path) or prompt_list (a list of strings)")
        if batch_size <= 0:
            raise ValueError(f"batch_size={batch_size} must be positive")
        if prompt_list is not None and len(prompt_list) == 0:
            raise ValueError("prompt_list is empty")
        self.prompts = prompts
        self.prompt_list = list(prompt_list) if prompt_list is not None else None
        self.tokenizer = tokenizer if tokenizer is not None else ByteTokenizer()
        self.batch_size = batch_size
        self.add_bos = add_bos
        self.num_workers = num_workers
        self.prompt_texts: list[str] | None = None
        self.prompt_tokens: list[list[int]] | None = None

    def setup(self, stage: str | None = None) -> None:
        """Read (if from a file) and tokenise the prompts; idempotent."""
        if self.prompt_texts is not None:
            return
        texts = self.prompt_list if self.prompt_list is not None else read_prompts(self.prompts)
        tokens = [self.tokenizer.encode(t, add_bos=self.add_bos) for t in texts]
        for i, ids in enumerate(tokens):
            if not ids:
                raise ValueError(
                    f"prompt {i} ({texts[i]!r}) encodes to no tokens; remove it or set add_bos=True"
                )
        self.prompt_texts, self.prompt_tokens = texts, tokens

    def predict_dataloader(self) -> DataLoader:
        self.setup()
        return DataLoader(
            _PromptItems(self.prompt_texts, self.prompt_tokens),
            batch_size=self.batch_size,
            shuffle=False,
            collate_fn=_PromptCollator(self.tokenizer.pad_token_id),
            num_workers=self.num_workers,
        )
