"""Prompts for generation: a prompt file or list -> LEFT-padded token batches.

    read_prompts      a JSONL file (`prompt`, `text` or chat `messages` field) or one prompt per line
                      -> [str | messages]
    collate_prompts   token lists -> input_ids, attention_mask, both (B, T), left-padded
    PromptDataModule  `predict` batches {input_ids, attention_mask, prompts, index}

Prompts become ids through `twotower.prompting.encode_prompt`, the rule `serve`, the eval harness
and `TwoTowerLM.encode` share (BOS as the tokenizer does it; chat messages through its template).
Left padding puts every row's last prompt token in the last column, so that generation
appends to all rows at the same position.

Every prompt is checked before the first forward (`PromptDataModule.setup`, which Lightning runs
before the prediction writer's setup): its line, its type, that the tokenizer encodes it, and its
length against the model's context with max_new_tokens (the module's `prompt_budget()`). All bad
prompts are reported at once (`PromptError`: file:line and reason each), and nothing is generated
or written.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from twotower.hub import resolve_recipe
from twotower.prompting import Prompt, check_messages, encode_prompt
from twotower.tokenizers import ByteTokenizer, Tokenizer

from .packing import as_long_tensor


class PromptError(ValueError):
    """Prompts that cannot be generated, all of them: `problems` holds one "where: why" line each."""

    def __init__(self, problems: list[str], total: int, what: str = "prompts"):
        self.problems, self.total = list(problems), total
        shown = "\n  ".join(self.problems[:50])
        more = f"\n  ... and {len(self.problems) - 50} more" if len(self.problems) > 50 else ""
        super().__init__(f"{len(self.problems)} of {total} {what} cannot be generated (nothing was generated or "
                         f"written; fix or remove them):\n  {shown}{more}")


def read_prompts(path: str | os.PathLike) -> list[Prompt]:
    """Prompts from a file, in file order.

    * `.jsonl`: one JSON object per non-blank line with a string `prompt` (preferred) or `text`
      field, or chat `messages` (a list of {"role", "content"} objects, encoded with the model's
      chat template); the kinds may be mixed.
    * anything else: one prompt per non-blank line, taken verbatim (a literal `\\n` stays two
      characters; use JSONL for multi-line prompts).

    A path that does not exist is looked up among the files shipped with the package's recipes
    (`twotower.hub.find_recipe`), so a shipped recipe's `recipes/prompts.jsonl` is found from any
    directory. Every bad line is reported at once (`PromptError`, a ValueError: file:line and why).
    """
    return read_prompt_file(path)[0]


def read_prompt_file(path: str | os.PathLike) -> tuple[list[Prompt], list[str]]:
    """`read_prompts`, with each prompt's location ("file:line")."""
    file = resolve_recipe(Path(path).expanduser(), kind="prompt file")
    prompts: list[Prompt] = []
    where: list[str] = []
    problems: list[str] = []
    lines = 0
    # errors="replace": an undecodable byte becomes U+FFFD in its prompt instead of failing the whole file.
    with file.open(encoding="utf-8", errors="replace", newline="") as f:
        for line_no, line in enumerate(f, start=1):
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            lines += 1
            # A plain text file: each non-blank line is a prompt as written (no JSON unescaping).
            if file.suffix != ".jsonl":
                prompts.append(line)
                where.append(f"{file}:{line_no}")
                continue
            try:
                prompts.append(_jsonl_prompt(file, line_no, line))
                where.append(f"{file}:{line_no}")
            except ValueError as e:
                problems.append(str(e))
    if problems:
        raise PromptError(problems, lines, f"lines of {file}")
    if not prompts:
        raise ValueError(f"prompt file {str(path)!r} contains no prompts")
    return prompts, where


def _jsonl_prompt(file: Path, line_no: int, line: str) -> Prompt:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"{file}:{line_no}: invalid JSON ({e.msg})") from None
    except (ValueError, RecursionError) as e:  # an int of too many digits, nesting deeper than Python parses
        raise ValueError(f"{file}:{line_no}: invalid JSON ({type(e).__name__}: {str(e)[:100]})") from None
    if isinstance(record, dict):
        for key in ("prompt", "text"):
            if isinstance(record.get(key), str):
                return record[key]
        if "messages" in record:
            try:
                return check_messages(record["messages"])
            except ValueError as e:
                raise ValueError(f"{file}:{line_no}: {e}") from None
    raise ValueError(f"{file}:{line_no}: expected an object with a string 'prompt' or 'text' field, or chat 'messages'")


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
    rows = [as_long_tensor(t) for t in token_lists]
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

    def __call__(self, items: list[tuple[int, Prompt, list[int]]]) -> dict[str, Any]:
        input_ids, attention_mask = collate_prompts([ids for _, _, ids in items], self.pad_id)
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "prompts": [text for _, text, _ in items],
            "index": torch.tensor([i for i, _, _ in items], dtype=torch.long),
        }


class _PromptItems(Dataset):
    """The prompts at `indices` (positions in the full prompt list), as (index, prompt, tokens)."""

    def __init__(self, prompts: list[Prompt], tokens: list[list[int]], indices: list[int]) -> None:
        self.prompts, self.tokens, self.indices = prompts, tokens, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, k: int) -> tuple[int, Prompt, list[int]]:
        i = self.indices[k]
        return i, self.prompts[i], self.tokens[i]


class PromptDataModule(L.LightningDataModule):
    """Prompts for `predict`, in their original order.

    Each batch is a dict:
        input_ids: LongTensor (B, T), LEFT-padded with the tokenizer's pad id
        attention_mask: LongTensor (B, T), 1 for real tokens
        prompts: list, the prompts (texts, or chat messages)
        index: LongTensor (B,), positions in the prompt list

    Args:
        prompts: path to a prompt file (see `read_prompts`).
        prompt_list: prompts given directly (strings, or chat messages lists); exactly one of
            `prompts` / `prompt_list`.
        tokenizer: defaults to `ByteTokenizer()`; `predict` hands it the model's own.
        batch_size: prompts per batch.
        add_bos: None puts BOS before a text prompt exactly when the tokenizer does
            (`prompting.encode_prompt`, the rule serve and the eval harness use too); True / False
            force it (with BOS an empty prompt means unconditional generation).
        num_workers: DataLoader workers.

    Resuming: `skip_prompts(indices)` leaves finished prompts out of `predict_dataloader`
    (`twotower.writers.JsonlPredictionWriter(resume=True)` calls it); batches keep the original
    indices. Under DDP, fewer remaining prompts than ranks are repeated up to the rank count
    (Lightning's predict sampler needs one per rank; the writer drops the repeats).
    """

    # A resumed run may have nothing left to do; Lightning then skips predict instead of failing.
    allow_zero_length_dataloader_with_multiple_devices = True

    def __init__(
        self,
        prompts: str | None = None,
        prompt_list: list[str | list[dict]] | None = None,
        tokenizer: Tokenizer | None = None,
        batch_size: int = 8,
        add_bos: bool | None = None,
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
        self.prompt_texts: list[Prompt] | None = None
        self.prompt_tokens: list[list[int]] | None = None
        self.prompt_where: list[str] | None = None  # each prompt's "file:line" (or "prompt i")
        self._length_checked = False
        self.skipped: set[int] = set()

    @property
    def num_prompts(self) -> int:
        self.setup()
        return len(self.prompt_texts)

    def skip_prompts(self, indices) -> int:
        """Leave the prompts at `indices` out of `predict_dataloader` (they are done); returns how
        many remain. Indices outside the prompt list are refused."""
        self.setup()
        indices = set(int(i) for i in indices)
        bad = sorted(i for i in indices if not 0 <= i < len(self.prompt_texts))
        if bad:
            raise ValueError(f"skip_prompts: indices {bad[:10]} are outside the {len(self.prompt_texts)} prompts")
        self.skipped = indices
        return len(self.prompt_texts) - len(indices)

    def setup(self, stage: str | None = None) -> None:
        """Read (if from a file), tokenise and check the prompts; idempotent. Raises `PromptError`
        listing every prompt that cannot be generated: a bad line, a value that is not a prompt, one
        the tokenizer cannot encode or that encodes to nothing, and, once the data module is attached
        to a trainer whose module has `prompt_budget()` (GenerationModule), one longer than the
        model's context leaves room for with max_new_tokens."""
        if self.prompt_texts is None:
            if self.prompt_list is not None:
                texts, where = self.prompt_list, [f"prompt {i}" for i in range(len(self.prompt_list))]
            else:
                texts, where = read_prompt_file(self.prompts)
            tokens, problems = [], []
            for text, at in zip(texts, where):
                try:
                    ids = encode_prompt(self.tokenizer, text, add_bos=self.add_bos)
                except Exception as e:  # noqa: BLE001 - every prompt's reason is reported, then raised
                    problems.append(f"{at}: cannot be encoded: {type(e).__name__}: {str(e)[:200]}")
                    tokens.append([])
                    continue
                if not ids:
                    problems.append(f"{at}: {text!r:.60} encodes to no tokens; remove it or set add_bos=True")
                tokens.append(ids)
            # Every problem is collected before raising: a user fixes a prompt file in one pass.
            problems += self._too_long(tokens, where)
            if problems:
                raise PromptError(problems, len(texts))
            self.prompt_texts, self.prompt_tokens, self.prompt_where = texts, tokens, where
        elif not self._length_checked:  # set up before a trainer (and its model's limit) was attached
            problems = self._too_long(self.prompt_tokens, self.prompt_where)
            if problems:
                raise PromptError(problems, len(self.prompt_texts))

    def _too_long(self, tokens: list[list[int]], where: list[str]) -> list[str]:
        """One problem per prompt longer than the attached module's `prompt_budget()` allows."""
        module = getattr(self.trainer, "lightning_module", None) if self.trainer is not None else None
        budget = getattr(module, "prompt_budget", None)
        limit = budget() if callable(budget) else None
        if limit is None:
            return []
        # Set only once a limit was known: a setup before the trainer was attached checks again later.
        self._length_checked = True
        most, why = limit
        return [f"{at}: the prompt is {len(ids)} tokens; at most {most} fit ({why})"
                for ids, at in zip(tokens, where) if len(ids) > most]

    def predict_dataloader(self) -> DataLoader:
        self.setup()
        keep = [i for i in range(len(self.prompt_texts)) if i not in self.skipped]
        ranks = self.trainer.world_size if self.trainer is not None else 1
        if 0 < len(keep) < ranks:
            keep = (keep * ranks)[:ranks]
        return DataLoader(
            _PromptItems(self.prompt_texts, self.prompt_tokens, keep),
            batch_size=self.batch_size,
            # Original order: resuming and the writer's index-based output rely on it.
            shuffle=False,
            collate_fn=_PromptCollator(self.tokenizer.pad_token_id),
            num_workers=self.num_workers,
        )
