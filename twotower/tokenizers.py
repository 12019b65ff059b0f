"""Tokenizer adapters: one small interface over a byte-level tokenizer and local HF tokenizers.

The model code needs five ids (pad, bos, eos, mask, vocabulary size) and encode/decode; it
never talks to `transformers` tokenizers directly. Two implementations:

* `ByteTokenizer`: UTF-8 bytes, nothing to download. Ids 0..3 are pad, bos, eos, mask
  (mask = 3 follows the NemotronH convention), byte `b` is id `b + 4`.
* `HFTokenizer`: a tokenizer directory on local disk, loaded with `local_files_only=True`.

Both are plain classes with typed constructors, so a LightningCLI recipe can pick one with
`class_path` / `init_args`.
"""

from __future__ import annotations

import abc
import functools
import importlib
import json
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch

from .hub import builtin_name, resolve_model

__all__ = ["Tokenizer", "ByteTokenizer", "HFTokenizer", "DEFAULT_MASK_TOKEN_ID", "load_tokenizer", "find_tokenizer",
           "check_tokenizer_fits", "save_tokenizer", "tokenizer_for", "tokenizer_spec", "tokenizer_from_spec",
           "BYTE_TOKENIZER", "frequent_tokens", "DRAFT_VOCAB_FILE", "save_draft_vocab", "load_draft_vocab"]

# config.json's "tokenizer" entry for byte-level models (ByteTokenizer, ids = UTF-8 bytes + 4).
BYTE_TOKENIZER = "byte"
_HF_FILES = ("tokenizer.json", "tokenizer_config.json")
# A model folder's draft vocabulary (`save_draft_vocab`): predict / serve take the folder for `draft_vocab`.
DRAFT_VOCAB_FILE = "draft_vocab.json"

# The one default [MASK] id, for a tokenizer that declares no mask token and a model or run that
# names none: NemotronH checkpoints reserve id 3 for [MASK], and the byte tokenizer follows them.
# Everything else takes the id from the model (`TwoTowerLM.mask_token_id`, config.json).
DEFAULT_MASK_TOKEN_ID = 3


def _as_int_list(ids: Sequence[int] | torch.Tensor) -> list[int]:
    # Accept tensors and numpy rows as well as lists: decode is often called on model output.
    if isinstance(ids, torch.Tensor):
        if ids.dim() != 1:
            raise ValueError(f"decode expects a 1-D sequence of ids, got shape {tuple(ids.shape)}")
        return ids.tolist()
    return [int(i) for i in ids]


class Tokenizer(abc.ABC):
    """What the rest of twotower needs from a tokenizer.

    Ids are plain Python ints. `encode` never adds special tokens unless asked, so that packing
    and prompting decide where bos/eos go (HF tokenizers differ in their defaults).
    """

    @property
    @abc.abstractmethod
    def vocab_size(self) -> int:
        """Number of ids the model's embedding must cover (all ids are in [0, vocab_size))."""

    @property
    @abc.abstractmethod
    def pad_token_id(self) -> int: ...

    @property
    @abc.abstractmethod
    def bos_token_id(self) -> int: ...

    @property
    @abc.abstractmethod
    def eos_token_id(self) -> int: ...

    @property
    @abc.abstractmethod
    def mask_token_id(self) -> int: ...

    @property
    def special_token_ids(self) -> frozenset[int]:
        """pad, bos, eos and mask ids (some may coincide)."""
        return frozenset({self.pad_token_id, self.bos_token_id, self.eos_token_id, self.mask_token_id})

    @abc.abstractmethod
    def encode(self, text: str, *, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        """Text -> ids, optionally framed by bos / eos."""

    @property
    def adds_bos(self) -> bool:
        """Whether a text prompt starts with BOS for this tokenizer (`prompting.encode_prompt` asks).
        True here: the models this library trains see BOS before every document."""
        return True

    def apply_chat_template(self, messages: list[dict]) -> list[int]:
        """Chat messages -> the ids of the rendered conversation, ending where the assistant's reply
        starts. Only tokenizers with a chat template can; this one cannot."""
        raise ValueError(f"{self!r} has no chat template, so chat messages cannot be encoded for this model; send a "
                         "plain text prompt instead (/v1/completions, or a {\"prompt\": ...} row), or use a model whose "
                         "Hugging Face tokenizer has a chat_template")

    @abc.abstractmethod
    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = True) -> str:
        """Ids -> text. Never raises on ids the model can produce (any id in [0, vocab_size))."""

    def encode_tensor(self, text: str, *, add_bos: bool = False, add_eos: bool = False) -> torch.Tensor:
        """Like `encode` but returns a LongTensor (L,); subclasses may override for speed."""
        return torch.tensor(self.encode(text, add_bos=add_bos, add_eos=add_eos), dtype=torch.long)

    def batch_decode(
        self, sequences: Sequence[Sequence[int]] | torch.Tensor, *, skip_special_tokens: bool = True
    ) -> list[str]:
        """Decode each row of a (B, L) tensor or a list of id lists."""
        return [self.decode(seq, skip_special_tokens=skip_special_tokens) for seq in sequences]


class ByteTokenizer(Tokenizer):
    """UTF-8 byte tokenizer: pad=0, bos=1, eos=2, mask=3, byte b -> b + 4.

    Args:
        vocab_size: at least 260. Larger values pad the vocabulary (e.g. to 264 or 320, so the
            embedding's row count is a multiple of 8 / 64); ids 260..vocab_size-1 are unused
            and decode like special tokens.
    """

    PAD, BOS, EOS, MASK = 0, 1, 2, 3
    OFFSET = 4
    MIN_VOCAB = 256 + OFFSET
    _SPECIAL_NAMES = {0: "<pad>", 1: "<bos>", 2: "<eos>", 3: "<mask>"}

    def __init__(self, vocab_size: int = MIN_VOCAB) -> None:
        if vocab_size < self.MIN_VOCAB:
            raise ValueError(
                f"ByteTokenizer vocab_size={vocab_size} is too small: it needs at least "
                f"{self.MIN_VOCAB} ids (4 specials + 256 bytes)"
            )
        self._vocab_size = int(vocab_size)

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def pad_token_id(self) -> int:
        return self.PAD

    @property
    def bos_token_id(self) -> int:
        return self.BOS

    @property
    def eos_token_id(self) -> int:
        return self.EOS

    @property
    def mask_token_id(self) -> int:
        return self.MASK

    def encode(self, text: str, *, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        return self.encode_tensor(text, add_bos=add_bos, add_eos=add_eos).tolist()

    def encode_tensor(self, text: str, *, add_bos: bool = False, add_eos: bool = False) -> torch.Tensor:
        data = text.encode("utf-8", errors="surrogatepass")
        # frombuffer avoids a Python-level loop: the stdlib corpus is ~10 MB of bytes.
        if data:
            body = torch.frombuffer(bytearray(data), dtype=torch.uint8).long() + self.OFFSET
        else:  # frombuffer rejects an empty buffer
            body = torch.empty(0, dtype=torch.long)
        parts = []
        if add_bos:
            parts.append(torch.tensor([self.BOS]))
        parts.append(body)
        if add_eos:
            parts.append(torch.tensor([self.EOS]))
        return torch.cat(parts) if len(parts) > 1 else body

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = True) -> str:
        out: list[str] = []
        run = bytearray()
        for i in _as_int_list(ids):
            if not 0 <= i < self._vocab_size:
                raise ValueError(f"id {i} is outside the ByteTokenizer vocabulary [0, {self._vocab_size})")
            if self.OFFSET <= i < self.MIN_VOCAB:
                run.append(i - self.OFFSET)
                continue
            if skip_special_tokens:
                # Skipping must not split a multi-byte character: keep accumulating bytes.
                continue
            # Flush bytes first so that a special between two halves of a character shows where it was.
            out.append(run.decode("utf-8", errors="replace"))
            run.clear()
            out.append(self._SPECIAL_NAMES.get(i, f"<unused_{i}>"))
        out.append(run.decode("utf-8", errors="replace"))
        return "".join(out)

    def __repr__(self) -> str:
        return f"ByteTokenizer(vocab_size={self._vocab_size})"


class HFTokenizer(Tokenizer):
    """A `transformers` tokenizer read from a local directory (no hub access).

    Special ids:
      * mask: the `mask_token` argument if given (it must be in the vocabulary), else the
        tokenizer's own mask token, else id 3 (the NemotronH convention: [MASK] is id 3).
      * bos / eos: the tokenizer's; if only one of them is defined it is used for both
        (GPT-2 style tokenizers use one <|endoftext|> token). Neither -> ValueError,
        because packing needs a document separator.
      * pad: the tokenizer's pad token, else eos. Padding is always masked out, so any id works.
    vocab_size is `len(tokenizer)`, which counts added tokens (the HF `vocab_size` attribute
    does not).

    Args:
        path: local tokenizer directory (as written by `save_pretrained`), or a built-in model's name
            (`twotower.hub`), whose folder holds its tokenizer.
        mask_token: token string to use as the mask, e.g. "[MASK]".
    """

    def __init__(self, path: str, mask_token: str | None = None) -> None:
        directory = Path(path).expanduser()
        if not directory.exists():  # a built-in model's name ("smollm2-135m-backbone") stands for its folder
            if builtin_name(path) is not None:
                directory = resolve_model(path)
        if not directory.is_dir():
            raise FileNotFoundError(
                f"tokenizer directory {str(path)!r} does not exist (HFTokenizer loads local "
                "directories only; download the tokenizer first and pass its folder)"
            )
        # Deferred: transformers is a heavy import that only an HF tokenizer needs (the byte tokenizer does not).
        from transformers import AutoTokenizer

        self.path = str(directory)
        self.mask_token = mask_token
        self.hf = AutoTokenizer.from_pretrained(self.path, local_files_only=True)
        self._vocab_size = len(self.hf)
        self._bos, self._eos = self._resolve_bos_eos()
        self._pad = self.hf.pad_token_id if self.hf.pad_token_id is not None else self._eos
        self._mask = self._resolve_mask(mask_token)

    def _resolve_bos_eos(self) -> tuple[int, int]:
        bos, eos = self.hf.bos_token_id, self.hf.eos_token_id
        if bos is None and eos is None:
            raise ValueError(
                f"tokenizer at {self.path!r} defines neither a bos nor an eos token; set one "
                "(e.g. tokenizer.eos_token = ...) and save it again"
            )
        return (bos if bos is not None else eos), (eos if eos is not None else bos)

    def _resolve_mask(self, mask_token: str | None) -> int:
        if mask_token is not None:
            mask_id = self.hf.convert_tokens_to_ids(mask_token)
            unk = self.hf.unk_token_id
            if mask_id is None or (mask_id == unk and mask_token != self.hf.unk_token):
                raise ValueError(
                    f"mask_token {mask_token!r} is not in the vocabulary of the tokenizer at {self.path!r}"
                )
            return int(mask_id)
        if self.hf.mask_token_id is not None:
            return int(self.hf.mask_token_id)
        if DEFAULT_MASK_TOKEN_ID >= self._vocab_size:
            raise ValueError(
                f"tokenizer at {self.path!r} has no mask token and only {self._vocab_size} ids; "
                "pass mask_token=... naming a token in its vocabulary"
            )
        return DEFAULT_MASK_TOKEN_ID

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def pad_token_id(self) -> int:
        return self._pad

    @property
    def bos_token_id(self) -> int:
        return self._bos

    @property
    def eos_token_id(self) -> int:
        return self._eos

    @property
    def mask_token_id(self) -> int:
        return self._mask

    def encode(self, text: str, *, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        # add_special_tokens=False: we place bos/eos ourselves, whatever the tokenizer's template.
        ids = list(self.hf.encode(text, add_special_tokens=False))
        return ([self._bos] if add_bos else []) + ids + ([self._eos] if add_eos else [])

    @functools.cached_property
    def adds_bos(self) -> bool:
        """What the tokenizer itself does when asked for its special tokens: Llama's put BOS first,
        GPT-2-style ones (SmolLM2, Qwen) add nothing, and forcing a BOS on those would feed the model
        a token it never saw before a prompt."""
        bos = self.hf.bos_token_id
        if bos is None:
            return False
        with_specials = self.hf.encode("a", add_special_tokens=True)
        return bool(with_specials) and with_specials[0] == bos and self.hf.encode("a", add_special_tokens=False)[:1] != [bos]

    def apply_chat_template(self, messages: list[dict]) -> list[int]:
        """The tokenizer's chat template, with the generation prompt (the assistant turn's opening);
        rendered to text and encoded without further special tokens, as transformers does."""
        if not self.hf.chat_template:
            raise ValueError(f"the tokenizer at {self.path!r} has no chat template, so chat messages cannot be encoded; "
                             "send a plain text prompt instead, or set tokenizer.chat_template (a Jinja string) and "
                             "save the tokenizer again")
        text = self.hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return list(self.hf.encode(text, add_special_tokens=False))

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = True) -> str:
        ids = _as_int_list(ids)
        if skip_special_tokens:
            # The fallback mask id (3) may not be registered as special in the HF tokenizer.
            special = self.special_token_ids
            ids = [i for i in ids if i not in special]
        return self.hf.decode(ids, skip_special_tokens=skip_special_tokens)

    def __repr__(self) -> str:
        return f"HFTokenizer(path={self.path!r}, vocab_size={self._vocab_size}, mask_token_id={self._mask})"


# ---- the model's own tokenizer -------------------------------------------------------------------


def _config_entry(path: Path) -> tuple[str | None, int | None]:
    file = path / "config.json"
    if not file.is_file():
        return None, None
    raw = json.loads(file.read_text(encoding="utf-8"))
    return raw.get("tokenizer"), raw.get("vocab_size")


def find_tokenizer(path: str | Path) -> Tokenizer | None:
    """The tokenizer saved with the checkpoint at `path`, or None when it has none.

    An HF tokenizer when tokenizer.json / tokenizer_config.json are there (as transformers'
    `save_pretrained` writes them); else a `ByteTokenizer` (of the model's vocab_size) when
    config.json says ``"tokenizer": "byte"``.
    """
    path = Path(path)
    if any((path / f).is_file() for f in _HF_FILES):
        return HFTokenizer(str(path))
    kind, vocab = _config_entry(path)
    if kind == BYTE_TOKENIZER:
        return ByteTokenizer(vocab or ByteTokenizer.MIN_VOCAB)
    if kind is not None:
        raise ValueError(f"{path / 'config.json'}: unknown \"tokenizer\": {kind!r}; expected {BYTE_TOKENIZER!r} "
                         "or tokenizer files (tokenizer.json) beside the weights")
    return None


def load_tokenizer(path: str | Path) -> Tokenizer:
    """`find_tokenizer`, refusing a checkpoint without one (the model's vocabulary is unknown then)."""
    tok = find_tokenizer(path)
    if tok is None:
        raise FileNotFoundError(
            f"no tokenizer in {path}: expected tokenizer.json / tokenizer_config.json (write them with "
            f"tokenizer.save_pretrained({str(path)!r})) or \"tokenizer\": \"byte\" in config.json for a byte-level "
            "model (`export` records the tokenizer a model was fine-tuned with; add the entry by hand for a model "
            "exported before it did); or pass a tokenizer explicitly")
    return tok


def check_tokenizer_fits(tokenizer: Tokenizer, *, vocab_size: int, byte_level: bool, where: str) -> Tokenizer:
    """Refuse a tokenizer that cannot be the model's: more ids than the embedding has rows, or a
    byte tokenizer on a model whose checkpoint is not byte-level. Returns the tokenizer."""
    if tokenizer.vocab_size > vocab_size:
        raise ValueError(f"tokenizer {tokenizer!r} has {tokenizer.vocab_size} ids but the model at {where} embeds only "
                         f"{vocab_size}: it is not this model's tokenizer (leave tokenizer unset to use the "
                         "checkpoint's own)")
    if isinstance(tokenizer, ByteTokenizer) and not byte_level:
        raise ValueError(f"a ByteTokenizer was given but the model at {where} is not byte-level (its config.json has "
                         f"no \"tokenizer\": \"byte\"); leave tokenizer unset to use the checkpoint's own, or, if the "
                         "model was trained on byte data, add \"tokenizer\": \"byte\" to its config.json")
    return tokenizer


def tokenizer_for(model, path: str | Path, tokenizer: Tokenizer | None = None) -> Tokenizer:
    """The tokenizer to run a loaded `TwoTowerLM` with (predict, serve and the eval harness ask here):
    `tokenizer` when given, else the checkpoint's own (`model.tokenizer`, else `load_tokenizer(path)`,
    which names the fix when there is none); refused when it does not fit (`check_tokenizer_fits`)."""
    if tokenizer is None:
        tokenizer = model.tokenizer if model.tokenizer is not None else load_tokenizer(path)
    byte_level = getattr(model.config, "tokenizer", None) == BYTE_TOKENIZER
    return check_tokenizer_fits(tokenizer, vocab_size=model.config.vocab_size, byte_level=byte_level, where=str(path))


def tokenizer_spec(tokenizer: Tokenizer | None) -> dict | None:
    """A JSON-able {"class_path", "init_args"} that rebuilds `tokenizer` (`tokenizer_from_spec`): what a
    fine-tuning checkpoint records so that `export` writes the tokenizer the model was trained with.
    None for None and for tokenizer classes this module cannot describe."""
    if isinstance(tokenizer, ByteTokenizer):
        return {"class_path": "twotower.tokenizers.ByteTokenizer", "init_args": {"vocab_size": tokenizer.vocab_size}}
    if isinstance(tokenizer, HFTokenizer):
        return {"class_path": "twotower.tokenizers.HFTokenizer",
                "init_args": {"path": str(Path(tokenizer.path).resolve()), "mask_token": tokenizer.mask_token}}
    return None


def tokenizer_from_spec(spec: dict | None) -> Tokenizer | None:
    """The tokenizer a `tokenizer_spec` describes (None for None)."""
    if spec is None:
        return None
    module, _, name = spec["class_path"].rpartition(".")
    cls = getattr(importlib.import_module(module), name)
    if not (isinstance(cls, type) and issubclass(cls, Tokenizer)):
        raise ValueError(f"tokenizer class_path {spec['class_path']!r} is not a twotower.tokenizers.Tokenizer")
    return cls(**spec.get("init_args", {}))


def save_tokenizer(tokenizer: Tokenizer | None, path: str | Path) -> dict:
    """Write `tokenizer` beside a checkpoint's weights; returns the config.json entries to add.

    HF tokenizers write their files (tokenizer.json, tokenizer_config.json, ...); a byte tokenizer
    writes nothing and returns ``{"tokenizer": "byte"}``; None writes nothing.
    """
    if tokenizer is None:
        return {}
    if isinstance(tokenizer, ByteTokenizer):
        return {"tokenizer": BYTE_TOKENIZER}
    if isinstance(tokenizer, HFTokenizer):
        tokenizer.hf.save_pretrained(str(path))
        return {}
    raise TypeError(f"cannot save a {type(tokenizer).__name__} beside a checkpoint; use HFTokenizer or ByteTokenizer")


def frequent_tokens(tokenizer: Tokenizer, texts: Iterable[str], k: int, *, first_ids: int = 0) -> torch.Tensor:
    """A draft vocabulary (`TwoTowerLM.merge_adapters(draft_vocab=...)`): the `k` ids seen most often in
    `texts`, every id below `first_ids`, and the tokenizer's special ids (EOS must stay draftable, or no
    draft could end a row). Sorted, distinct, int64.

    `first_ids` covers what `texts` under-represent: a BPE vocabulary numbers its tokens roughly in merge
    order, so its low ids are the ones its training corpus used most.
    """
    k = int(k)
    if k < 0 or first_ids < 0:
        raise ValueError(f"k and first_ids must be >= 0 (how many tokens to keep), got k={k}, first_ids={first_ids}")
    counts: Counter[int] = Counter()
    for text in texts:
        counts.update(tokenizer.encode(text))
    keep = {t for t, _ in counts.most_common(k)} | set(range(min(first_ids, tokenizer.vocab_size)))
    hf = getattr(tokenizer, "hf", None)  # a chat template's markers are special tokens of the HF tokenizer
    keep |= set(tokenizer.special_token_ids) | set(getattr(hf, "all_special_ids", ()))
    if not keep:
        raise ValueError("frequent_tokens kept no token: give texts, k > 0 or first_ids > 0")
    return torch.tensor(sorted(keep), dtype=torch.long)


def save_draft_vocab(ids, path: str | Path) -> Path:
    """Write a draft vocabulary (`frequent_tokens`) as a JSON list of ids, to `path` or, for a folder
    (a model's, say), to `path / DRAFT_VOCAB_FILE`. Returns the file written."""
    path = Path(path)
    if path.is_dir():
        path = path / DRAFT_VOCAB_FILE
    path.write_text(json.dumps(torch.as_tensor(ids).tolist()) + "\n")
    return path


def load_draft_vocab(where: str | Path) -> list[int]:
    """The ids of a draft vocabulary: a JSON file of ids (`save_draft_vocab`), a folder holding
    DRAFT_VOCAB_FILE, or a built-in model name that ships one ("smollm2-135m"). The ids are checked
    against a model's vocabulary where they are used (`merge_adapters(draft_vocab=...)`)."""
    path = Path(where).expanduser()
    if not path.exists() and builtin_name(where) is not None:
        path = resolve_model(where)
    if path.is_dir():
        path = path / DRAFT_VOCAB_FILE
    if not path.is_file():
        raise FileNotFoundError(f"draft_vocab {str(where)!r}: no file {path}; write one with "
                                "twotower.tokenizers.save_draft_vocab(frequent_tokens(...), PATH)")
    try:
        ids = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"draft_vocab {path} is not a JSON list of token ids ({e})") from None
    if not isinstance(ids, list) or not ids or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        shown = ids[:5] if isinstance(ids, list) else type(ids).__name__
        raise ValueError(f"draft_vocab {path} must hold a non-empty JSON list of integer token ids, got {shown!r}")
    return ids
