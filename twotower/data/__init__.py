"""Data: text corpora -> training rows, prompt files -> left-padded generation batches.

What lives where:

    sources   Document, STDLIB, stdlib_source_files, iter_documents, read_corpus: corpus readers
              (the embedded stdlib, folders, text / JSONL files, `datasets` directories);
              split_documents, held_out: the deterministic train / held-out split by name hash
    packing   pack_documents: `[bos] + doc + [eos]` streams cut into (N, seq_len) rows
    sampling  ResumableLoader: a training loader whose place in the epoch survives a checkpoint
    cache     save_cache / load_cache / cache_file: the on-disk cache and its keys (fingerprints
              of the tokenizer, the corpus files and checkpoint files)
    text      TextDataModule: packed (B, seq_len) rows of a corpus, train and held-out
    streaming StreamingTextDataModule, StreamingRows: the same rows read as a stream (sharded
              over workers and ranks, a seeded shuffle buffer) for corpora too large for memory
    prompts   read_prompts, collate_prompts, PromptDataModule: left-padded prompt batches, every prompt
              checked before the first forward (PromptError lists the bad ones)
    distill   DistilledDataModule, distill_rows: real prompts continued by the frozen AR
              backbone, with a loss mask on the continuation
    instructions  user_turn_prefix, write_instructions: user messages the backbone writes itself
              (Magpie), for `DistilledDataModule(self_instruct=...)`'s chat rows
    failure_points  FailurePointDataModule, mine_draft_starts: training blocks that start where a
              drafter's speculative iterations start (after its own failed drafts)

Every name below is importable from `twotower.data` directly; recipes name the data modules as
`twotower.data.TextDataModule`, `twotower.data.StreamingTextDataModule`,
`twotower.data.PromptDataModule`, `twotower.data.DistilledDataModule`, `twotower.data.FailurePointDataModule`.
"""

from __future__ import annotations

from .cache import cache_file, load_cache, save_cache
from .distill import DistilledDataModule, distill_rows
from .failure_points import FailurePointDataModule, mine_draft_starts
from .instructions import user_turn_prefix, write_instructions
from .packing import pack_documents
from .prompts import PromptDataModule, PromptError, collate_prompts, read_prompts
from .sampling import ResumableLoader
from .sources import STDLIB, Document, held_out, iter_documents, read_corpus, split_documents, stdlib_source_files
from .streaming import StreamingRows, StreamingTextDataModule
from .text import TextDataModule

__all__ = [
    "STDLIB",
    "Document",
    "stdlib_source_files",
    "iter_documents",
    "read_corpus",
    "split_documents",
    "held_out",
    "pack_documents",
    "ResumableLoader",
    "save_cache",
    "load_cache",
    "cache_file",
    "TextDataModule",
    "StreamingTextDataModule",
    "StreamingRows",
    "read_prompts",
    "PromptError",
    "collate_prompts",
    "PromptDataModule",
    "DistilledDataModule",
    "distill_rows",
    "user_turn_prefix",
    "write_instructions",
    "FailurePointDataModule",
    "mine_draft_starts",
]
