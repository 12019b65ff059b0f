"""Tests for twotower.tokenizers and twotower.data: tokenizers, corpus reading, split, packing,
the training and prompt DataModules. Everything is local and small (tmp corpora, a handful of
stdlib files)."""

from __future__ import annotations

import json
import random
import sys
import sysconfig
from pathlib import Path

import pytest
import torch

from twotower.data import (
    PromptDataModule,
    TextDataModule,
    collate_prompts,
    iter_documents,
    pack_documents,
    read_corpus,
    read_prompts,
    split_documents,
    stdlib_source_files,
)
from twotower.tokenizers import ByteTokenizer, HFTokenizer, Tokenizer

# ----------------------------------------------------------------------------- ByteTokenizer


@pytest.mark.parametrize("text", ["hello world", "naïve café — 漢字 🙂", "", "tab\tnew\nline\x00"])
def test_byte_tokenizer_round_trip(text):
    tok = ByteTokenizer()
    ids = tok.encode(text)
    assert len(ids) == len(text.encode("utf-8"))
    assert all(4 <= i < 260 for i in ids)
    assert tok.decode(ids) == text


def test_byte_tokenizer_ids_and_specials():
    tok = ByteTokenizer()
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.mask_token_id) == (0, 1, 2, 3)
    assert tok.vocab_size == 260
    assert tok.encode("A") == [ord("A") + 4]
    assert tok.encode("A", add_bos=True, add_eos=True) == [1, ord("A") + 4, 2]
    assert tok.encode_tensor("Ab", add_bos=True).tolist() == tok.encode("Ab", add_bos=True)
    ids = [1] + tok.encode("hi") + [3, 0, 2]
    assert tok.decode(ids) == "hi"
    assert tok.decode(ids, skip_special_tokens=False) == "<bos>hi<mask><pad><eos>"
    assert tok.decode(torch.tensor(ids)) == "hi"
    assert tok.batch_decode(torch.tensor([[1, 108, 2], [108, 109, 0]])) == ["h", "hi"]


def test_byte_tokenizer_decode_is_robust():
    tok = ByteTokenizer(vocab_size=264)
    assert tok.vocab_size == 264
    euro = tok.encode("€")  # 3 bytes
    # A truncated character and an out-of-UTF-8 byte decode to U+FFFD instead of raising.
    assert tok.decode(euro[:2]) == "\ufffd"
    assert tok.decode([0xFF + 4]) == "\ufffd"
    # Skipped specials (and unused padding ids) inside a character do not split it.
    assert tok.decode(euro[:1] + [3, 262] + euro[1:]) == "€"
    assert tok.decode([262], skip_special_tokens=False) == "<unused_262>"
    with pytest.raises(ValueError, match="264"):
        tok.decode([264])
    with pytest.raises(ValueError, match="at least 260"):
        ByteTokenizer(vocab_size=100)


# ----------------------------------------------------------------------------- HFTokenizer


def _save_tiny_hf_tokenizer(directory: Path, **specials) -> Path:
    from tokenizers import Tokenizer as RawTokenizer
    from tokenizers import decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[PAD]": 0, "<s>": 1, "</s>": 2, "[MASK]": 3, "[UNK]": 4, "hello": 5, "world": 6, "cat": 7}
    raw = RawTokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    raw.decoder = decoders.WordPiece()  # joins words with spaces
    kwargs = dict(pad_token="[PAD]", bos_token="<s>", eos_token="</s>", unk_token="[UNK]") | specials
    PreTrainedTokenizerFast(tokenizer_object=raw, **kwargs).save_pretrained(str(directory))
    return directory


def test_hf_tokenizer_local_round_trip(tmp_path):
    tok = HFTokenizer(str(_save_tiny_hf_tokenizer(tmp_path / "tok")))
    assert isinstance(tok, Tokenizer)
    assert tok.vocab_size == 8
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    assert tok.mask_token_id == 3  # no mask token declared: NemotronH convention
    ids = tok.encode("hello cat world", add_bos=True, add_eos=True)
    assert ids == [1, 5, 7, 6, 2]
    assert tok.decode(ids) == "hello cat world"
    assert tok.decode([5, 3, 6]) == "hello world"  # the fallback mask id is skipped too
    assert tok.batch_decode([[5], [6, 7]]) == ["hello", "world cat"]


def test_hf_tokenizer_mask_sources(tmp_path):
    declared = HFTokenizer(str(_save_tiny_hf_tokenizer(tmp_path / "a", mask_token="cat")))
    assert declared.mask_token_id == 7
    path = str(_save_tiny_hf_tokenizer(tmp_path / "b"))
    assert HFTokenizer(path, mask_token="world").mask_token_id == 6
    with pytest.raises(ValueError, match="nope"):
        HFTokenizer(path, mask_token="nope")


def test_hf_tokenizer_missing_dir(tmp_path):
    missing = tmp_path / "no_such_tokenizer"
    with pytest.raises(FileNotFoundError, match="no_such_tokenizer"):
        HFTokenizer(str(missing))


# ----------------------------------------------------------------------------- corpus reading


def test_read_corpus_folder(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "b.txt").write_text("second")
    (tmp_path / "sub" / "a.txt").write_text("nested")
    (tmp_path / "a.txt").write_text("first")
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "skip.md").write_text("not matched")
    (tmp_path / "bad.txt").write_bytes(b"ok \xff end")
    docs = list(iter_documents(tmp_path))
    assert [d.name for d in docs] == ["a.txt", "b.txt", "bad.txt", "sub/a.txt"]
    assert [d.text for d in docs] == ["first", "second", "ok \ufffd end", "nested"]
    assert list(read_corpus(tmp_path, pattern="*.md")) == ["not matched"]
    with pytest.raises(ValueError, match=r"\*\.rst"):
        list(read_corpus(tmp_path, pattern="*.rst"))


def test_read_corpus_text_file_splits_on_blank_lines(tmp_path):
    path = tmp_path / "book.txt"
    path.write_text("para one\nline two\n\n  \n\npara two\n\n    indented three\n")
    assert list(read_corpus(path)) == ["para one\nline two", "para two", "    indented three"]


def test_read_corpus_jsonl(tmp_path):
    path = tmp_path / "data.jsonl"
    rows = [{"text": "alpha", "id": 1}, {"text": ""}, {"text": "gamma"}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    assert list(read_corpus(path)) == ["alpha", "gamma"]
    assert [d.name for d in iter_documents(path)] == ["data.jsonl:1", "data.jsonl:3"]
    other = tmp_path / "other.jsonl"
    other.write_text(json.dumps({"body": "x"}) + "\n")
    assert list(read_corpus(other, text_field="body")) == ["x"]
    with pytest.raises(ValueError, match=r"other\.jsonl:1.*'text'"):
        list(read_corpus(other))


def test_read_corpus_missing_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        list(read_corpus(tmp_path / "nowhere"))


def test_read_corpus_datasets_dir(tmp_path):
    datasets = pytest.importorskip("datasets")
    pa = pytest.importorskip("pyarrow")

    def make(texts, fingerprint):
        # An explicit fingerprint skips datasets' dill hashing, which breaks on some pyarrow versions.
        table = pa.table({"text": texts, "n": list(range(len(texts)))})
        return datasets.Dataset(table, fingerprint=fingerprint)

    make(["one", "", "three"], "f0").save_to_disk(str(tmp_path / "ds"))
    assert list(read_corpus(tmp_path / "ds")) == ["one", "three"]
    datasets.DatasetDict({"train": make(["a", "b"], "f1"), "test": make(["c"], "f2")}).save_to_disk(
        str(tmp_path / "dd")
    )
    assert [d.name for d in iter_documents(tmp_path / "dd")] == ["test/0", "train/0", "train/1"]
    with pytest.raises(ValueError, match="'body'"):
        list(read_corpus(tmp_path / "ds", text_field="body"))


def test_read_corpus_datasets_dir_without_library(tmp_path, monkeypatch):
    (tmp_path / "state.json").write_text("{}")
    (tmp_path / "dataset_info.json").write_text("{}")
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    with pytest.raises(ImportError, match="pip install datasets"):
        list(read_corpus(tmp_path))


def test_stdlib_source_files():
    files = stdlib_source_files()
    root = Path(sysconfig.get_paths()["stdlib"])
    rel = {f.relative_to(root).as_posix() for f in files}
    assert "json/__init__.py" in rel and "os.py" in rel
    assert files == sorted(files)
    excluded = {"site-packages", "test", "tests", "idlelib", "lib2to3", "turtledemo"}
    assert not any(excluded & set(Path(r).parts[:-1]) for r in rel)
    assert all(f.suffix == ".py" for f in files)


# ----------------------------------------------------------------------------- split and packing


def test_pack_documents():
    docs = [[10, 11, 12], [20], [30, 31, 32, 33]]
    packed = pack_documents(docs, 4, bos_id=1, eos_id=2)
    # stream: 1 10 11 12 2 | 1 20 2 | 1 30 31 32 33 2  (15 tokens -> 3 rows, tail of 3 dropped)
    assert packed.dtype == torch.long
    assert packed.tolist() == [[1, 10, 11, 12], [2, 1, 20, 2], [1, 30, 31, 32]]
    assert pack_documents(docs, 4, bos_id=1, eos_id=2, max_sequences=2).shape == (2, 4)
    assert pack_documents([[5]], 8, bos_id=1, eos_id=2).shape == (0, 8)
    no_markers = pack_documents([torch.tensor([7, 8]), [9, 10]], 2, bos_id=None, eos_id=None)
    assert no_markers.tolist() == [[7, 8], [9, 10]]


def test_max_sequences_stops_consuming():
    consumed = []

    def docs():
        for i in range(100):
            consumed.append(i)
            yield [i] * 10

    assert pack_documents(docs(), 8, bos_id=1, eos_id=2, max_sequences=3).shape == (3, 8)
    assert len(consumed) < 5


def test_split_is_deterministic_disjoint_and_order_free():
    names = [f"doc_{i}.txt" for i in range(2000)]
    train, val = split_documents(names, 0.1)
    assert set(train).isdisjoint(val) and sorted(train + val) == list(range(2000))
    assert 120 < len(val) < 280  # ~10% held out
    held = {names[i] for i in val}
    shuffled = names[:]
    random.Random(1).shuffle(shuffled)
    _, val2 = split_documents(shuffled, 0.1)
    assert {shuffled[i] for i in val2} == held
    # A larger fraction only adds documents (each document's score is fixed).
    _, val3 = split_documents(names, 0.2)
    assert held < {names[i] for i in val3}
    assert split_documents(names, 0.0) == (list(range(2000)), [])
    with pytest.raises(ValueError, match="val_fraction"):
        split_documents(names, 1.0)


def test_split_small_corpus_gets_both_sides():
    train, val = split_documents(["a", "b", "c"], 0.01)
    assert len(val) == 1 and len(train) == 2
    assert split_documents(["c", "b", "a"], 0.01)[1] == [2 - val[0]]  # same document


# ----------------------------------------------------------------------------- TextDataModule


@pytest.fixture
def corpus(tmp_path) -> Path:
    rng = random.Random(0)
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta"]
    root = tmp_path / "corpus"
    root.mkdir()
    for i in range(40):
        text = " ".join(rng.choice(words) for _ in range(rng.randint(20, 80)))
        (root / f"doc{i:02d}.txt").write_text(f"{i}: {text}\n")
    return root


def test_text_datamodule_shapes(corpus):
    dm = TextDataModule(str(corpus), seq_len=32, block_size=8, batch_size=4, val_fraction=0.2)
    dm.setup("fit")
    assert dm.train_data.shape[1] == 32 and dm.val_data.shape[1] == 32
    assert dm.train_data.shape[0] > dm.val_data.shape[0] > 0
    batch = next(iter(dm.train_dataloader()))
    assert isinstance(batch, torch.Tensor) and batch.dtype == torch.long and batch.shape == (4, 32)
    assert int(batch.min()) >= 0 and int(batch.max()) < dm.tokenizer.vocab_size
    # Held-out texts are exactly what the val rows were packed from.
    heldout = dm.heldout_documents()
    stream = torch.cat([torch.tensor(dm.tokenizer.encode(t, add_bos=True, add_eos=True)) for t in heldout])
    assert torch.equal(dm.val_data.reshape(-1), stream[: dm.val_data.numel()])
    all_texts = set(read_corpus(corpus))
    train_texts = all_texts - set(heldout)
    assert set(heldout) <= all_texts and len(train_texts) == 40 - len(heldout)
    val_batches = [b for b in dm.val_dataloader()]
    assert torch.equal(torch.cat(val_batches), dm.val_data)  # not shuffled


def test_text_datamodule_seq_len_must_be_multiple_of_block(corpus):
    with pytest.raises(ValueError, match=r"seq_len=100.*block_size=16.*seq_len=96"):
        TextDataModule(str(corpus), seq_len=100, block_size=16)


def test_text_datamodule_seeded_shuffle(corpus):
    def first_epoch(seed):
        dm = TextDataModule(str(corpus), seq_len=16, block_size=8, batch_size=4, seed=seed)
        return torch.cat(list(dm.train_dataloader()))

    a, b, c = first_epoch(0), first_epoch(0), first_epoch(1)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    # Same rows, other order.
    assert sorted(map(tuple, a.tolist())) == sorted(map(tuple, c.tolist()))


def test_text_datamodule_limits_and_cache(corpus, tmp_path):
    cache_dir = str(tmp_path / "cache")
    kwargs = dict(seq_len=16, block_size=8, max_train_sequences=5, max_val_sequences=2, cache_dir=cache_dir)
    dm = TextDataModule(str(corpus), **kwargs)
    dm.setup()
    assert dm.train_data.shape == (5, 16) and dm.val_data.shape == (2, 16)
    cached = list((tmp_path / "cache").glob("packed-*.pt"))
    assert len(cached) == 1
    again = TextDataModule(str(corpus), **kwargs)
    again._pack = None  # a cache hit must not tokenise again
    again.setup()
    assert torch.equal(again.train_data, dm.train_data) and torch.equal(again.val_data, dm.val_data)
    TextDataModule(str(corpus), **(kwargs | {"seq_len": 24})).setup()
    assert len(list((tmp_path / "cache").glob("packed-*.pt"))) == 2  # other settings, other file


def test_text_datamodule_stdlib_quick():
    dm = TextDataModule(max_documents=12, seq_len=64, block_size=16, max_train_sequences=50)
    dm.setup()
    assert dm.train_data.shape == (50, 64)
    assert dm.val_data.shape[0] >= 1
    assert len(dm.heldout_documents()) >= 1


def test_text_datamodule_too_small_corpus(tmp_path):
    (tmp_path / "a.txt").write_text("tiny")
    with pytest.raises(ValueError, match="seq_len=64"):
        TextDataModule(str(tmp_path), seq_len=64, block_size=16, val_fraction=0.0).setup()


# ----------------------------------------------------------------------------- prompts


def test_read_prompts_jsonl(tmp_path):
    path = tmp_path / "p.jsonl"
    lines = ['{"prompt": "first\\nline"}', "", '{"text": "second", "x": 1}', '{"prompt": "p", "text": "t"}']
    path.write_text("\n".join(lines) + "\n")
    assert read_prompts(path) == ["first\nline", "second", "p"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"body": "no"}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:2"):
        read_prompts(bad)
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"prompt": \n')
    with pytest.raises(ValueError, match=r"broken\.jsonl:1"):
        read_prompts(broken)


def test_read_prompts_text_file(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("def f(x):\n\n   \n  indented\\n literal \r\nlast")
    assert read_prompts(path) == ["def f(x):", "  indented\\n literal ", "last"]


def test_read_prompts_errors(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    with pytest.raises(ValueError, match="empty.txt"):
        read_prompts(empty)
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        read_prompts(tmp_path / "missing.txt")


def test_collate_prompts_left_pads():
    ids, mask = collate_prompts([[5, 6, 7], [8], torch.tensor([9, 10])], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8], [0, 9, 10]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1], [0, 1, 1]]
    with pytest.raises(ValueError, match="prompt 1"):
        collate_prompts([[5], []], pad_id=0)


def test_prompt_datamodule_batches(tmp_path):
    prompts = ["a", "hello there", "", "mid", "ünï"]
    tok = ByteTokenizer()
    dm = PromptDataModule(prompt_list=prompts, tokenizer=tok, batch_size=2)
    batches = list(dm.predict_dataloader())
    assert [b["prompts"] for b in batches] == [prompts[0:2], prompts[2:4], prompts[4:]]
    assert torch.cat([b["index"] for b in batches]).tolist() == list(range(5))
    for b in batches:
        ids, mask = b["input_ids"], b["attention_mask"]
        assert ids.dtype == torch.long and mask.shape == ids.shape
        for row, m, text in zip(ids, mask, b["prompts"]):
            expected = tok.encode(text, add_bos=True)
            assert row[m.bool()].tolist() == expected
            assert int(row[-1]) == expected[-1]  # left padded: last column is the last token
            assert (row[~m.bool()] == tok.pad_token_id).all()
            assert m.tolist() == sorted(m.tolist())  # padding only on the left


def test_prompt_datamodule_from_file_and_errors(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("one\ntwo\n")
    dm = PromptDataModule(prompts=str(path), add_bos=False)
    (batch,) = list(dm.predict_dataloader())
    assert batch["input_ids"].tolist() == [[ord(c) + 4 for c in "one"], [ord(c) + 4 for c in "two"]]
    with pytest.raises(ValueError, match="prompt 1"):
        PromptDataModule(prompt_list=["x", ""], add_bos=False).setup()
    with pytest.raises(ValueError, match="exactly one"):
        PromptDataModule()


# ----------------------------------------------------------------------------- built-in sources

STOPWORDS = {"the", "a", "an", "of", "to", "is", "and", "in", "it", "if", "for", "this", "that", "be", "are", "or"}
FEW_STDLIB = ["json/__init__.py", "keyword.py", "textwrap.py", "this.py"]  # 8.9k, 0.4k, 6.4k, 0 docstring chars


@pytest.fixture
def few_stdlib_files(monkeypatch):
    """Make the built-in sources read 4 stdlib files only (sorted as stdlib_source_files() sorts)."""
    import twotower.data.sources as sources

    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(root / f for f in FEW_STDLIB)
    monkeypatch.setattr(sources, "stdlib_source_files", lambda: files)
    return files


def _stopword_share(text: str) -> float:
    """The share of words that are common English function words (about a fifth in prose, little in code)."""
    import re

    words = re.findall(r"[A-Za-z]+", text.lower())
    return sum(w in STOPWORDS for w in words) / max(1, len(words))


def test_stdlib_docs_are_docstrings_and_help_topics(few_stdlib_files):
    import inspect
    import json as json_module
    import textwrap

    docs = list(iter_documents("stdlib-docs"))
    files = [d for d in docs if d.name.startswith("docs:")]
    topics = [d for d in docs if d.name.startswith("topics:")]
    assert len(files) + len(topics) == len(docs) and docs[:len(files)] == files  # files first, then topics
    # keyword.py's docstrings are too short to count as prose; this.py has none.
    assert [d.name for d in files] == ["docs:json/__init__.py", "docs:textwrap.py"]
    js, tw = files[0].text, files[1].text
    assert js.startswith(json_module.__doc__.strip()[:200]) and inspect.getdoc(json_module.dumps) in js
    assert inspect.getdoc(textwrap.TextWrapper.wrap) in tw
    assert "def dumps(" not in js and "import codecs" not in js  # the code itself is left out
    for d in files:
        assert _stopword_share(d.text) > 0.1, d.name
    code = (Path(sysconfig.get_paths()["stdlib"]) / "json/__init__.py").read_text()
    assert _stopword_share(code) < _stopword_share(js)
    pydoc_topics = pytest.importorskip("pydoc_data.topics").topics
    assert [d.name for d in topics] == [f"topics:{k}" for k in sorted(pydoc_topics)]
    assert all(d.text == pydoc_topics[d.name.removeprefix("topics:")].strip() and d.text for d in topics)
    assert _stopword_share(" ".join(d.text for d in topics)) > 0.1


def test_builtin_sources_chain_in_order(few_stdlib_files, tmp_path):
    code = list(iter_documents("stdlib"))
    prose = list(iter_documents("stdlib-docs"))
    assert [d.name for d in code] == ["json/__init__.py", "keyword.py", "textwrap.py", "this.py"]
    assert list(iter_documents("stdlib+stdlib-docs")) == code + prose
    assert list(iter_documents("stdlib-docs+stdlib")) == prose + code
    # A name that is not built-in makes the whole source a path.
    with pytest.raises(FileNotFoundError):
        list(iter_documents("stdlib+nonexistent-corpus"))


def test_stdlib_cache_fingerprint_is_unchanged_and_other_builtins_get_their_own():
    import hashlib

    from twotower.data.cache import source_fingerprint

    # The rule before "stdlib-docs" existed: header "stdlib {version} {root}", then each file's stats.
    root = Path(sysconfig.get_paths()["stdlib"])
    h = hashlib.sha256(f"stdlib {sys.version} {root}".encode())
    for p in stdlib_source_files():
        st = p.stat()
        h.update(f"\n{p.relative_to(root).as_posix()}\t{st.st_size}\t{st.st_mtime_ns}".encode())
    assert source_fingerprint("stdlib") == h.hexdigest()
    keys = {source_fingerprint(s) for s in ("stdlib", "stdlib-docs", "stdlib+stdlib-docs", "stdlib-docs+stdlib")}
    assert len(keys) == 4
