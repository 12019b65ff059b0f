"""Shared fixtures: tiny NemotronH configs with every block type, built in memory (no downloads)."""

from __future__ import annotations

import contextlib

import pytest
import torch
from transformers import NemotronHConfig

# Shared with the checks a plug-in runs: the same tiny configs and random weights.
from twotower.testing import (MASK, PAD, TINY_CONFIGS, left_pad, random_prompts, randomize_,  # noqa: F401  (re-exported to tests)
                              randomize_time_)


def tiny_config(pattern: str = "M*-EM*E", **overrides) -> NemotronHConfig:
    """A NemotronH config small enough for exact float32 tests on CPU (`twotower.testing.TINY_CONFIGS`).

    `pattern` uses the hybrid_override_pattern letters: M Mamba-2, * attention, - MLP, E MoE.
    """
    return NemotronHConfig(**{**TINY_CONFIGS["nemotron_h"], "hybrid_override_pattern": pattern, **overrides})


def trained_time_steps_(module: torch.nn.Module, seed: int = 0, bc_scale: float = 3.0) -> torch.nn.Module:
    """Put every Mamba-2 mixer of `module` (our tower or transformers' NemotronH) in the regime of
    trained checkpoints, where the time-step clamp (`time_step_limit`) decides the numbers.

    `randomize_` never gets there: its dt = softplus(dt_raw + dt_bias) stays above 0.05, and a fresh
    model starts in [time_step_min, time_step_max]. Trained heads go below time_step_min (1e-3).
    Here dt_bias runs from -9 to 0.5 across heads, so with dt_raw ~ N(0, ~1) the first head's dt
    is about 1e-4 (always below 1e-3), the second straddles 1e-3 and the rest are ordinary; the
    in_proj rows that produce B and C are scaled by `bc_scale`, so that such small steps still
    move the logits well above test tolerance (a floor at 1e-3 changes them by far more).
    """
    g = torch.Generator().manual_seed(seed + 77)
    with torch.no_grad():
        for mixer in module.modules():
            if not (hasattr(mixer, "dt_bias") and hasattr(mixer, "in_proj") and hasattr(mixer, "conv1d")):
                continue
            h = mixer.dt_bias.numel()
            mixer.dt_bias.copy_(torch.linspace(-9.0, 0.5, h)[torch.randperm(h, generator=g)])
            # in_proj rows: [z (I) | x (I) | B (g n) | C (g n) | dt (h)], with conv_dim = I + 2 g n.
            conv_dim = mixer.conv1d.out_channels
            inter = mixer.in_proj.out_features - conv_dim - h
            mixer.in_proj.weight[2 * inter: inter + conv_dim] *= bc_scale
    return module


INF = float("inf")
# The builders' dt regimes, for tests that must hold in each: random init (dt >= 0.05); trained
# time steps (`trained_time_steps_`, small chunks so that scans span many chunks) with
# transformers' default time_step_limit (no clamp); the same with a recorded floor at 1e-3.
DT_REGIMES = {
    "random": {},
    "low_dt": dict(low_dt=True, chunk_size=4),
    "low_dt_floor": dict(low_dt=True, chunk_size=4, time_step_limit=[0.001, INF]),
}
dt_regimes = pytest.mark.parametrize("regime", list(DT_REGIMES.values()), ids=list(DT_REGIMES))


@pytest.fixture
def config() -> NemotronHConfig:
    return tiny_config()


@pytest.fixture(autouse=True)
def _deterministic_single_thread():
    """Seeded, and one intra-op thread: the models here are tiny, so extra threads only add
    synchronisation overhead (and heavy contention on a busy 2-core machine)."""
    torch.manual_seed(0)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ---- shared builders: towers, prompts, and decoder calls on bare towers -------------------------



# ---- tiny models: the one family of builders every test file uses -------------------------------
#
# Each builder makes the same calls, in the same order, as the inline code it replaced: module
# construction draws from the global RNG, so a test's later unseeded draws stay what they were.

BYTE_CHECKPOINT = dict(vocab_size=260, scale=0.1)  # the on-disk tiny checkpoints: byte-tokenizer vocabulary


def make_context(pattern: str = "M*-EM*E", seed: int = 0, scale: float = 0.2, *, low_dt: bool = False, **overrides):
    """A random tiny ContextTower (eval mode) on tiny_config(pattern, **overrides); low_dt: with
    trained_time_steps_(seed) applied (time steps below time_step_min)."""
    from twotower.towers.nemotron_h.context import ContextTower

    tower = randomize_(ContextTower(tiny_config(pattern, **overrides)), seed=seed, scale=scale)
    return (trained_time_steps_(tower, seed) if low_dt else tower).eval()


def perturb_denoiser_(den, seed: int, *, identity: bool = False, time_seed: int | None = None,
                      time_scale: float = 0.05, denoiser_seed: int | None = None, scale: float = 0.2):
    """Make a fresh denoiser (a copy of its context tower) differ from it, one of four ways:

    - default: randomize_time_(den, seed + 1000) (adaLN gates around 1, a sharper head);
    - identity=True: left as is (identity time conditioning: the denoiser's layers are the AR layers);
    - time_seed: plain random time modules, randomize_(den.time, time_seed, time_scale);
    - denoiser_seed: every denoiser weight random, randomize_(den, denoiser_seed, scale).
    """
    if identity + (time_seed is not None) + (denoiser_seed is not None) > 1:
        raise ValueError("choose at most one of identity, time_seed and denoiser_seed")
    if denoiser_seed is not None:
        randomize_(den, seed=denoiser_seed, scale=scale)
    elif time_seed is not None:
        randomize_(den.time, seed=time_seed, scale=time_scale)
    elif not identity:
        randomize_time_(den, seed + 1000)
    return den


def make_towers(pattern: str = "M*-EM*E", seed: int = 0, *, scale: float = 0.2, time_init: str = "identity",
                identity: bool = False, time_seed: int | None = None, time_scale: float = 0.05,
                denoiser_seed: int | None = None, low_dt: bool = False, **overrides):
    """(context, denoiser): make_context(pattern, seed, scale, low_dt=..., **overrides) and its denoiser
    copy (DenoiserTower.from_context(ctx, time_init=...)), perturbed by perturb_denoiser_ (default:
    random time modules; identity / time_seed / denoiser_seed as there). Both in eval mode; with
    low_dt a randomized denoiser gets trained time steps too."""
    from twotower.towers.nemotron_h.denoiser import DenoiserTower

    ctx = make_context(pattern, seed, scale, low_dt=low_dt, **overrides)
    den = DenoiserTower.from_context(ctx, time_init=time_init).eval()
    perturb_denoiser_(den, seed, identity=identity, time_seed=time_seed, time_scale=time_scale,
                      denoiser_seed=denoiser_seed, scale=scale)
    if low_dt and denoiser_seed is not None:
        trained_time_steps_(den, denoiser_seed)
    return ctx, den


def make_model(seed: int = 0, block_size: int | None = 8, pattern: str = "M*-EM*E", *, scale: float = 0.2,
               identity: bool = False, time_seed: int | None = None, time_scale: float = 0.05,
               denoiser_seed: int | None = None, low_dt: bool = False, **overrides):
    """A TwoTowerLM (eval mode): TwoTowerLM.from_backbone(make_context(pattern, seed, scale, low_dt=...,
    **overrides), block_size=...) with its denoiser perturbed by perturb_denoiser_ (default: random
    time modules; identity=True: from_backbone as is). block_size=None: from_backbone's default (16)."""
    from twotower.model import TwoTowerLM

    kwargs = {} if block_size is None else {"block_size": block_size}
    model = TwoTowerLM.from_backbone(make_context(pattern, seed, scale, low_dt=low_dt, **overrides), **kwargs)
    perturb_denoiser_(model.denoiser, seed, identity=identity, time_seed=time_seed, time_scale=time_scale,
                      denoiser_seed=denoiser_seed, scale=scale)
    if low_dt and denoiser_seed is not None:
        trained_time_steps_(model.denoiser, denoiser_seed)
    return model.eval()


def make_hf_model(pattern: str = "M*-EM*E", seed: int = 0, *, low_dt: bool = False, **overrides):
    """transformers' NemotronHForCausalLM (eval mode) on tiny_config(pattern, **overrides), randomize_(seed)
    (and trained_time_steps_(seed) with low_dt): the independent reference."""
    from transformers import NemotronHForCausalLM

    ref = randomize_(NemotronHForCausalLM(tiny_config(pattern, **overrides)).eval(), seed=seed)
    return trained_time_steps_(ref, seed) if low_dt else ref


def hf_backbone_state(ref) -> dict[str, torch.Tensor]:
    """A transformers NemotronH model's weights (copies) under backbone names (`model.` prefix dropped)."""
    return {k.removeprefix("model."): v.detach().clone() for k, v in ref.state_dict().items()}


def make_hf_pair(pattern: str = "M*-EM*E", seed: int = 0, *, low_dt: bool = False, **overrides):
    """(reference, tower): make_hf_model(pattern, seed, low_dt=..., **overrides) and our ContextTower
    (eval mode) holding the same weights."""
    from twotower.towers.nemotron_h.context import ContextTower

    ref = make_hf_model(pattern, seed, low_dt=low_dt, **overrides)
    tower = ContextTower(ref.config).eval()
    tower.load_backbone_state(hf_backbone_state(ref))
    return ref, tower


def run_decoder(decoder, ctx, den, ids, mask=None, *, max_new_tokens: int, eos_token_id=None, generator=None,
                step_callback=None, pad_token_id: int = PAD, mask_token_id: int = MASK, shifted: bool = False,
                denoiser_device=None):
    """Run `decoder` on bare towers with the tiny configs' token ids."""
    from twotower.decoding import Towers

    towers = Towers(ctx, den, mask_token_id=mask_token_id, pad_token_id=pad_token_id, shifted=shifted,
                    denoiser_device=denoiser_device)
    return decoder.generate(towers, ids, mask, max_new_tokens=max_new_tokens, eos_token_id=eos_token_id,
                            generator=generator, step_callback=step_callback)


def diffusion(ctx, den, ids, mask=None, *, sampler=None, block_size: int = 8, steps_per_block: int = 8,
              temperature: float = 0.0, max_new_tokens: int = 20, **call):
    """MaskDiffusion (default ConfidenceThreshold(0.5), block 8, 8 steps) on bare towers."""
    from twotower.decoding import MaskDiffusion
    from twotower.samplers import ConfidenceThreshold

    decoder = MaskDiffusion(ConfidenceThreshold(0.5) if sampler is None else sampler, block_size=block_size,
                            steps_per_block=steps_per_block, temperature=temperature)
    return run_decoder(decoder, ctx, den, ids, mask, max_new_tokens=max_new_tokens, **call)


def speculative(ctx, den, ids, mask=None, *, sampler=None, block_size: int = 6, draft_steps: int = 1,
                temperature: float = 0.0, max_new_tokens: int = 21, **call):
    """Speculative decoding (block 6, one draft step) on bare towers."""
    from twotower.decoding import Speculative

    decoder = Speculative(block_size=block_size, draft_steps=draft_steps, sampler=sampler, temperature=temperature)
    return run_decoder(decoder, ctx, den, ids, mask, max_new_tokens=max_new_tokens, **call)


def ar_continuation(ctx, x, cache):
    """(b, n): the context tower's greedy continuation of a cache, starting with x[:, 0], n = x's width
    (what a perfect drafter would draft; denoiser stand-ins in the decoder tests build on it)."""
    work = cache.clone()
    tok, seq = x[:, :1], [x[:, 0]]
    for _ in range(x.shape[1] - 1):
        tok = ctx.extend(work, tok, logits="last")[:, -1].argmax(-1, keepdim=True)
        seq.append(tok[:, 0])
    return torch.stack(seq, 1)


def assert_lookup_decoder_keeps_ar_output(decoder, ctx, den, max_new_tokens: int) -> None:
    """A lookup decoder's greedy output is `Autoregressive`'s, batched and alone, on repetitive prompts
    (a vocabulary of 5, so that lookups hit) of unequal lengths (left padding in the batch)."""
    gen = torch.Generator().manual_seed(3)
    ids, mask = left_pad([torch.randint(4, 9, (n,), generator=gen) for n in (5, 11, 8)])
    ar = autoregressive(ctx, ids, mask, max_new_tokens=max_new_tokens, pad_token_id=PAD)
    out = run_decoder(decoder, ctx, den, ids, mask, max_new_tokens=max_new_tokens)
    assert torch.equal(out.new_tokens, ar.new_tokens)
    alone = run_decoder(decoder, ctx, den, ids[1:2, mask[1].bool()], None, max_new_tokens=max_new_tokens)
    assert torch.equal(alone.new_tokens, ar.new_tokens[1:2])


def autoregressive(ctx, ids, mask=None, *, temperature: float = 0.0, max_new_tokens: int, **call):
    """The context tower alone (Autoregressive) on a bare context tower."""
    from twotower.decoding import Autoregressive

    return run_decoder(Autoregressive(temperature), ctx, None, ids, mask, max_new_tokens=max_new_tokens, **call)


# ----------------------------------------------------------------------------- training scaffolding


def save_backbone(ctx, path, **kwargs):
    """Write a ContextTower to `path` as an AR NemotronH checkpoint (what from_backbone reads)."""
    from twotower.towers.saving import save_backbone_hf

    state = {k.removeprefix("backbone."): v for k, v in ctx.state_dict().items()}
    save_backbone_hf(state, path, config=ctx.config, **kwargs)
    return path


def save_tiny_backbone(path, seed: int = 0):
    """Write a tiny random AR NemotronH checkpoint (byte-tokenizer vocabulary, 260) to `path`.

    Used by the fine-tuning and self-distillation tests as the frozen backbone; another seed
    gives a checkpoint with other weights (what invalidates caches and init_from checks).
    """
    return save_backbone(make_context("M*-EM*E", seed, **BYTE_CHECKPOINT), path, extra_config={"tokenizer": "byte"})


def save_tiny_twotower(path, seed: int = 0, block_size: int = 8):
    """Write a tiny two-tower checkpoint (byte-tokenizer vocabulary, 260) to `path`: the context
    tower of save_tiny_backbone(seed) and a denoiser with plain random time modules (seed + 1)."""
    from twotower.tokenizers import ByteTokenizer

    model = make_model(seed, block_size, time_seed=seed + 1, **BYTE_CHECKPOINT)
    model.save_pretrained(path, tokenizer=ByteTokenizer(model.config.vocab_size))
    return path


WORDS = ["<pad>", "<s>", "</s>", "[MASK]"] + [f"w{i}" for i in range(40)]
# A small Jinja chat template over WORDS-style vocabularies: each turn is "<s> role content </s>".
WORD_CHAT_TEMPLATE = ("{% for m in messages %}<s> {{ m['role'] }} {{ m['content'] }} </s> {% endfor %}"
                 "{% if add_generation_prompt %}<s> assistant {% endif %}")


def save_word_tokenizer(path, words=WORDS, *, bos: bool = False, chat_template: str | None = None):
    """A tiny WordLevel Hugging Face tokenizer (no download), saved as transformers writes it.

    bos: its post-processor puts <s> before text when asked for special tokens (Llama-style); without
    it the tokenizer adds nothing (GPT-2 / SmolLM2-style). chat_template: set as its chat template.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                           special_tokens=[("<s>", words.index("<s>"))])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   mask_token="[MASK]")
    if chat_template is not None:
        fast.chat_template = chat_template
    fast.save_pretrained(str(path))
    return path


def save_word_twotower(path, tokenizer_dir, seed: int = 0, block_size: int = 8):
    """A tiny two-tower checkpoint (vocab 64) with the HF tokenizer at `tokenizer_dir` saved beside it."""
    from twotower.tokenizers import HFTokenizer

    model = make_model(seed, block_size, time_seed=seed + 1, vocab_size=64, scale=0.1)
    model.save_pretrained(path, tokenizer=HFTokenizer(str(tokenizer_dir)))
    return path


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_server(app, settings=None):
    """Serve a FastAPI `app` on 127.0.0.1 (a free port) in a daemon thread; yields the base URL and
    stops the server on exit. With `settings` (a ServeSettings), uvicorn runs as `serve` configures it."""
    import threading
    import time

    import uvicorn

    from twotower.serving.app import uvicorn_config

    port = free_port()
    if settings is None:
        config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning")
    else:
        config = uvicorn_config(app, settings, port=port)
    srv = uvicorn.Server(config)
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.time() + 60
    while not srv.started:
        assert time.time() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        srv.should_exit = True
        thread.join(20)


@pytest.fixture
def backbone_dir(tmp_path):
    """`save_tiny_backbone` at tmp_path/backbone, seed 0."""
    return save_tiny_backbone(tmp_path / "backbone", seed=0)


@pytest.fixture
def twotower_dir(tmp_path):
    """`save_tiny_twotower` at tmp_path/tt, seed 0."""
    return save_tiny_twotower(tmp_path / "tt", seed=0)


@pytest.fixture
def code_corpus(tmp_path):
    """A folder of 8 small Python-like `.txt` documents (about 300-450 bytes each) at tmp_path/corpus."""
    root = tmp_path / "corpus"
    root.mkdir()
    for i in range(8):
        (root / f"doc{i}.txt").write_text(("def g%d(y):\n    return y * %d  # %s\n" % (i, i, "ab" * i)) * 10)
    return root


# ----------------------------------------------------------------------------- other tower families


def tiny_llama_config(**overrides):
    """A transformers LlamaConfig small enough for exact float32 tests (ids 0-3 special, as above)."""
    from transformers import LlamaConfig

    return LlamaConfig(**{**TINY_CONFIGS["llama"], **overrides})


def tiny_qwen2_config(**overrides):
    """A transformers Qwen2Config of the same tiny shape (q/k/v biases, no o_proj bias, by design)."""
    from transformers import Qwen2Config

    return Qwen2Config(**{**TINY_CONFIGS["qwen2"], **overrides})


def tiny_mistral_config(**overrides):
    """A transformers MistralConfig of the same tiny shape; its sliding window (default 64) is longer
    than every sequence the contract tests run, so it never drops a key (longer runs are refused)."""
    from transformers import MistralConfig

    return MistralConfig(**{**TINY_CONFIGS["mistral"], **overrides})


# model_type -> a tiny config builder (**overrides). The family contract test (test_families.py)
# runs over every registered family and needs one here: a new family adds its builder.
FAMILY_CONFIGS = {"nemotron_h": tiny_config, "llama": tiny_llama_config, "qwen2": tiny_qwen2_config,
                  "mistral": tiny_mistral_config}


def make_family_towers(model_type: str, seed: int = 0, **overrides):
    """(context, denoiser) of any registered family: random context, copy with random time modules."""
    from twotower.towers.base import family_for

    family = family_for(model_type)
    ctx = randomize_(family.context(FAMILY_CONFIGS[model_type](**overrides)), seed=seed).eval()
    den = family.denoiser.from_context(ctx).eval()
    randomize_time_(den, seed + 1000)
    return ctx, den


def save_tiny_llama(path, seed: int = 0, **overrides):
    """Write a random transformers LlamaForCausalLM (its own save_pretrained) to `path`; returns the model."""
    from transformers import LlamaForCausalLM

    hf = LlamaForCausalLM(tiny_llama_config(**overrides))
    randomize_(hf, seed=seed, scale=0.2)
    hf.save_pretrained(path)
    return hf.eval()


# ----------------------------------------------------------------------------- a chat backbone

CHAT_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 0 (unk / pad), 1 (bos), 2 (eos)
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def save_chat_tokenizer(path):
    """A byte-level BPE tokenizer (3 specials + the 256 byte symbols + a few merges, no download) with a
    ChatML chat template, saved as transformers writes it; eos is <|im_end|> (id 2). Returns its size."""
    from tokenizers import Tokenizer as RawTokenizer
    from tokenizers import decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    merges = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("i", "n"), ("e", "r"), ("a", "n"), ("o", "n"), ("r", "e")]
    tokens = CHAT_SPECIALS + list(bytes_to_unicode().values()) + [a + b for a, b in merges]
    raw = RawTokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges))
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="<|endoftext|>", pad_token="<|endoftext|>",
                                   bos_token="<|im_start|>", eos_token="<|im_end|>", chat_template=CHAT_TEMPLATE)
    fast.save_pretrained(str(path))
    return len(tokens)


def save_chat_llama(path, seed: int = 0, **overrides):
    """A tiny random Llama backbone folder (transformers' own files) with `save_chat_tokenizer`'s
    tokenizer beside it, the vocabulary sized to fit; returns the path."""
    vocab = save_chat_tokenizer(path)
    save_tiny_llama(path, seed=seed, **({"vocab_size": vocab} | overrides))
    return path


def served_alone(srv, body: dict, tok=None) -> str:
    """What `decoder.generate` gives for one server request on its own: the reference that a request
    served beside others must equal. `srv` holds the server's `settings` and `model`; tok defaults to
    the byte tokenizer the serving tests use."""
    from twotower.decoding import StopStrings
    from twotower.serving.requests import parse_completion
    from twotower.tokenizers import ByteTokenizer

    tok = tok if tok is not None else ByteTokenizer()
    req = parse_completion(body, srv.settings, tok, context_limit=512, model_block_size=srv.model.block_size)
    stop = StopStrings(tok.decode, req.stop) if req.stop else None
    out = req.decoder.generate(srv.model, torch.tensor([req.prompt_ids]), max_new_tokens=req.max_tokens,
                               eos_token_id=tok.eos_token_id, generator=req.generator(), stop=stop)
    text = tok.decode(out.new_tokens[0, : int(out.num_generated[0])].tolist())
    return stop.truncate(text) if stop else text


def assert_first_two_tokens_follow_ar(ctx, ids, out, vocab_size: int = 8) -> None:
    """Sampled decoding of many copies of one prompt: the first token's frequencies match softmax of
    the prefill's last logits, and the second's (among rows whose first is the commonest) AR's
    conditional after it, each within 4 standard errors."""
    with torch.inference_mode():
        probs = ctx(ids[:1])[0, -1].softmax(-1)
    first, second = out.new_tokens[:, 0], out.new_tokens[:, 1]
    freq = torch.bincount(first, minlength=vocab_size).float() / len(first)
    assert torch.all((freq - probs).abs() < 4 * (probs * (1 - probs) / len(first)).sqrt() + 1e-3)
    pick = int(first.mode().values)
    with torch.inference_mode():
        cond = ctx(torch.cat([ids[:1], torch.tensor([[pick]])], 1))[0, -1].softmax(-1)
    rows = first == pick
    freq2 = torch.bincount(second[rows], minlength=vocab_size).float() / int(rows.sum())
    assert torch.all((freq2 - cond).abs() < 4 * (cond * (1 - cond) / int(rows.sum())).sqrt() + 1e-3)
