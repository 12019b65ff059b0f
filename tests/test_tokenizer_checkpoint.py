"""The checkpoint's own tokenizer: found beside the weights, used by predict by default, carried by
save_pretrained / convert, and refused when it does not fit the model."""

from __future__ import annotations

import pytest
from conftest import BYTE_CHECKPOINT, WORDS, make_model, save_word_tokenizer, save_word_twotower

from twotower.tokenizers import ByteTokenizer, HFTokenizer, find_tokenizer, load_tokenizer


@pytest.fixture
def word_model_dir(tmp_path):
    """A tiny two-tower checkpoint (vocab 64) with a 44-word tokenizer saved beside it."""
    return save_word_twotower(tmp_path / "word", save_word_tokenizer(tmp_path / "tok"))


def test_save_pretrained_writes_the_tokenizer_and_loaders_find_it(word_model_dir, tmp_path):
    from twotower.model import TwoTowerLM

    assert (word_model_dir / "tokenizer.json").is_file()
    tok = load_tokenizer(word_model_dir)
    assert isinstance(tok, HFTokenizer) and tok.vocab_size == len(WORDS)
    model = TwoTowerLM.from_pretrained(word_model_dir)
    assert isinstance(model.tokenizer, HFTokenizer)
    model.save_pretrained(tmp_path / "again")  # carried along by default
    assert (tmp_path / "again" / "tokenizer.json").is_file()


def test_byte_checkpoints_say_so_and_bare_ones_are_refused(tmp_path, twotower_dir):
    assert isinstance(find_tokenizer(twotower_dir), ByteTokenizer)
    bare = tmp_path / "bare"
    make_model(0, 8, **BYTE_CHECKPOINT).save_pretrained(bare)
    assert find_tokenizer(bare) is None
    with pytest.raises(FileNotFoundError, match="no tokenizer in .*tokenizer.json.*\"tokenizer\": \"byte\""):
        load_tokenizer(bare)


def test_embedded_assets_are_byte_level():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "twotower" / "assets"
    for name in ("twotower", "backbone"):
        assert isinstance(find_tokenizer(root / name), ByteTokenizer)


def test_generation_module_decodes_with_the_checkpoints_tokenizer(word_model_dir):
    import torch

    from twotower.decoding import Autoregressive
    from twotower.inference import GenerationModule

    gm = GenerationModule(str(word_model_dir), decoder=Autoregressive(), max_new_tokens=6, stop_at_eos=False)
    assert isinstance(gm.tokenizer, HFTokenizer)
    ids = torch.tensor([gm.tokenizer.encode("w1 w2 w3", add_bos=True)])
    rows = gm.predict_step({"input_ids": ids, "attention_mask": torch.ones_like(ids), "prompts": ["w1 w2 w3"],
                            "index": torch.tensor([0])}, 0)
    out = gm.model.generate(ids, torch.ones_like(ids), Autoregressive(), max_new_tokens=6)
    new = out.new_tokens[0, :int(out.num_generated[0])].tolist()
    assert rows[0]["completion"] == gm.tokenizer.decode(new)
    words = rows[0]["completion"].split()
    assert words and all(w in WORDS for w in words)  # word pieces, not bytes


def test_mismatched_tokenizers_are_refused(word_model_dir, tmp_path, twotower_dir):
    from twotower.inference import GenerationModule

    bare = tmp_path / "bare"  # 260 ids but not marked byte-level: byte ids would mean nothing to it
    make_model(0, 8, **BYTE_CHECKPOINT).save_pretrained(bare)
    with pytest.raises(ValueError, match="not byte-level"):
        GenerationModule(str(bare), tokenizer=ByteTokenizer())
    big = HFTokenizer(str(save_word_tokenizer(tmp_path / "big", WORDS + [f"x{i}" for i in range(300)])))
    with pytest.raises(ValueError, match="344 ids but the model .* embeds only 260"):
        GenerationModule(str(twotower_dir), tokenizer=big)


def test_predict_cli_links_the_models_tokenizer_into_the_data(word_model_dir, tmp_path):
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "w1 w2"}) + "\n" + json.dumps({"prompt": "w3"}) + "\n")
    out = tmp_path / "pred.jsonl"
    cmd = [sys.executable, "-m", "twotower.cli", "predict", "--config", "recipes/generate.yaml",
           "--model.init_args.model", str(word_model_dir), "--data.init_args.prompts", str(prompts),
           "--model.init_args.max_new_tokens", "4", "--model.init_args.stop_at_eos", "false",
           "--trainer.callbacks.init_args.output", str(out), "--trainer.enable_progress_bar", "false"]
    proc = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    # word tokens, encoded with the word tokenizer (which, like SmolLM2's, puts no BOS before text)
    assert [r["prompt_tokens"] for r in rows] == [2, 1]
    assert all(w in WORDS for r in rows for w in r["completion"].split())


def test_frequent_tokens_keeps_the_most_frequent_the_first_ids_and_every_special_id():
    import torch

    from twotower.tokenizers import frequent_tokens

    tok = ByteTokenizer()
    got = frequent_tokens(tok, ["aaab", "ab", "c"], 2)
    a, b = tok.encode("a")[0], tok.encode("b")[0]
    assert got.tolist() == sorted({a, b} | set(tok.special_token_ids))
    assert got.dtype == torch.long
    with_first = frequent_tokens(tok, [], 0, first_ids=10)
    assert with_first.tolist() == list(range(10))  # ids 0..3 are the byte tokenizer's specials
    with pytest.raises(ValueError, match="k=-1"):
        frequent_tokens(tok, ["a"], -1)
