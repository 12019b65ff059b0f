"""`check_family`: the tower-family contract (`twotower.towers.base`) on a tiny random model.

Every check is one small function over the two towers; each raises AssertionError naming the
family, what broke and the values. Sequences are short (under 32 positions) so a check of a
family takes a few seconds on CPU.
"""

from __future__ import annotations

import tempfile

import torch

from ..caches import Cache
from ..decoding import Autoregressive, Speculative, Towers
from ..model import TwoTowerLM
from ..time_embedding import TimeConditioning
from ..towers.base import ContextTowerBase, DenoiserTowerBase
from .builders import (MASK, PAD, assert_close, assert_equal, expect, family_of, left_pad, random_prompts,
                       randomize_, randomize_time_, tiny_config, tiny_towers)


def check_family(family_or_model_type, config=None, *, reference=None, seed: int = 0) -> None:
    """Run the tower-family contract on a tiny random model of a family; AssertionError if it breaks.

    family_or_model_type: a registered model_type ("llama", "myllama") or a `TowerFamily`.
    config: a small config of the family (default: `tiny_config`, vocabulary 64, ids 0-3 special).
    reference: the transformers causal-LM class to compare against (logits and greedy `generate`);
        None = `transformers.<TowerFamily.hf_architecture>` when transformers has it; False = none.
        The reference is read back through the family's own loader (`ContextTowerBase.from_pretrained`
        of its `save_pretrained` folder), so the family must be registered for it.
    """
    family = family_of(family_or_model_type)
    config = tiny_config(family) if config is None else config
    ctx, den = tiny_towers(family, config, seed=seed)
    name = family.model_type
    for check in (check_interfaces, check_prefill_and_extends, check_left_padding, check_provisional_accept,
                  check_cache_contract, check_forward_block, check_training_forward, check_skip_layers):
        with torch.inference_mode():
            check(ctx, den, name)
    check_speculative_equals_ar(ctx, den, name)
    hf_class = _reference_class(family, reference)
    if hf_class is not None:
        check_against_transformers(family, config, hf_class, seed=seed)


def _ids(shape, ctx, seed: int = 0):
    """Random non-special ids (4 .. vocab - 1) of `shape`, from a seeded generator."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(4, ctx.config.vocab_size, shape, generator=g)


def check_interfaces(ctx, den, name: str) -> None:
    """The towers subclass the bases, the denoiser's `time` is a TimeConditioning, caches are Caches."""
    expect(isinstance(ctx, ContextTowerBase), f"{name}: context tower {type(ctx).__name__} is no ContextTowerBase")
    expect(isinstance(den, DenoiserTowerBase), f"{name}: denoiser {type(den).__name__} is no DenoiserTowerBase")
    expect(isinstance(den.time, TimeConditioning),
           f"{name}: denoiser.time is a {type(den.time).__name__}, not a twotower.time_embedding.TimeConditioning")
    cache = ctx.empty_cache(2)
    expect(isinstance(cache, Cache), f"{name}: empty_cache(2) gave a {type(cache).__name__}, not a caches.Cache")
    expect(cache.batch_size == 2 and cache.length == 0,
           f"{name}: empty_cache(2) has batch {cache.batch_size} and length {cache.length}, expected 2 and 0")


def check_prefill_and_extends(ctx, den, name: str) -> None:
    """prefill + extends of 1 and several tokens (the cache growing past its capacity) == the full forward."""
    ids = _ids((2, 19), ctx, 1)
    full = ctx(ids)
    got, cache = ctx.prefill(ids[:, :6], capacity=8)
    assert_close(got, full[:, :6], f"{name}: prefill of 6 tokens vs the full forward")
    for lo, hi in ((6, 7), (7, 13), (13, 14), (14, 19)):
        part = ctx.extend(cache, ids[:, lo:hi])
        assert_close(part, full[:, lo:hi], f"{name}: extend of {hi - lo} token(s) at {lo} vs the full forward")
    expect(cache.length == 19, f"{name}: cache length {cache.length} after 19 tokens")


def check_left_padding(ctx, den, name: str) -> None:
    """Each left-padded row of a prefill and its extends gives what the row gives alone."""
    prompts = random_prompts([3, 8, 5], seed=1, vocab_size=ctx.config.vocab_size)
    ids, mask = left_pad(prompts)
    logits, cache = ctx.prefill(ids, mask)
    nxt = _ids((3, 3), ctx, 2)
    more = ctx.extend(cache, nxt)
    for r, p in enumerate(prompts):
        assert_close(logits[r, -len(p):], ctx(p[None])[0], f"{name}: left-padded row {r} (length {len(p)}) "
                                                           "vs the row alone")
        assert_close(more[r], ctx(torch.cat([p, nxt[r]])[None])[0, -3:],
                     f"{name}: extend after left-padded row {r} vs the row alone")


def check_provisional_accept(ctx, den, name: str) -> None:
    """A provisional extend gives the plain extend's logits, and `accept(keep)` leaves each row as if
    only its first keep[r] tokens had been appended (checked by the next extends)."""
    prompt, block, keep = _ids((3, 5), ctx, 3), _ids((3, 4), ctx, 4), torch.tensor([1, 4, 2])
    nxt, more = _ids((3, 1), ctx, 5), _ids((3, 3), ctx, 6)
    _, cache = ctx.prefill(prompt, capacity=16)
    _, plain = ctx.prefill(prompt, capacity=16)
    assert_close(ctx.extend(cache, block, provisional=True), ctx.extend(plain, block),
                 f"{name}: provisional extend vs plain extend")
    ctx.accept(cache, keep)
    got = torch.cat([ctx.extend(cache, nxt), ctx.extend(cache, more)], 1)
    for r in range(3):
        kept = torch.cat([prompt[r], block[r, : int(keep[r])], nxt[r], more[r]])[None]
        assert_close(got[r], ctx(kept)[0, -4:], f"{name}: row {r} after accept(keep={int(keep[r])}) vs the "
                                                "kept tokens alone")


def check_cache_contract(ctx, den, name: str) -> None:
    """Caches of other batches join (`concat`, shorter ones left-padded) and split (`select`) without
    changing a row; a mirror and a clone read the same; `nbytes` counts."""
    a, b = _ids((1, 5), ctx, 7), _ids((2, 8), ctx, 8)
    nxt, block, t = _ids((3, 3), ctx, 9), torch.full((3, 4), MASK), torch.tensor([0.2, 0.5, 0.9])
    _, ca = ctx.prefill(a)
    _, cb = ctx.prefill(b)
    joined = type(ca).concat([ca, cb])
    expect(isinstance(joined, type(ca)) and joined.batch_size == 3,
           f"{name}: concat of batches 1 and 2 gave a {type(joined).__name__} of batch {joined.batch_size}")
    expect(joined.nbytes() > 0, f"{name}: a filled cache reports nbytes() = {joined.nbytes()}")
    den_joined = den.forward_block(block, joined, t)
    assert_close(den.forward_block(block, joined.mirror_to("cpu"), t), den_joined, f"{name}: denoiser on a mirror")
    assert_close(den_joined[1:], den.forward_block(block[1:], cb, t[1:]), f"{name}: denoiser on concat rows 1-2")
    assert_close(den_joined[:1], den.forward_block(block[:1], ca, t[:1]), f"{name}: denoiser on concat row 0")
    got = ctx.extend(joined.clone(), nxt)
    assert_close(got[:1], ctx.extend(ca.clone(), nxt[:1]), f"{name}: extend of concat row 0 (a clone)")
    assert_close(got[1:], ctx.extend(cb.clone(), nxt[1:]), f"{name}: extend of concat rows 1-2 (a clone)")
    picked = joined.select(torch.tensor([2, 0]))
    assert_close(ctx.extend(picked, nxt[[2, 0]]), got[[2, 0]], f"{name}: extend of select([2, 0])")


def check_forward_block(ctx, den, name: str) -> None:
    """forward_block: (B, S, V) float32 logits, t=None allowed, and the cache is read, never written."""
    _, cache = ctx.prefill(_ids((2, 6), ctx, 10))
    x = torch.full((2, 4), MASK)
    x[:, 0] = _ids((2,), ctx, 11)
    before = cache.length
    for t in (torch.tensor([0.3, 0.8]), None):
        out = den.forward_block(x, cache, t)
        V = den.config.vocab_size
        expect(tuple(out.shape) == (2, 4, V) and out.dtype == torch.float32,
               f"{name}: forward_block(x (2, 4), t={t}) gave {tuple(out.shape)} {out.dtype}, "
               f"expected (2, 4, {V}) float32")
    expect(cache.length == before, f"{name}: forward_block changed the cache length {before} -> {cache.length}")
    expect(_refuses(lambda: den.forward_block(x[:1], cache, None)),
           f"{name}: forward_block of a batch-1 block over a batch-2 cache was not refused with a ValueError "
           "(start forward_block with DenoiserTowerBase.block_key_mask)")
    nxt = _ids((2, 2), ctx, 12)
    _, fresh = ctx.prefill(_ids((2, 6), ctx, 10))
    assert_close(ctx.extend(cache, nxt), ctx.extend(fresh, nxt), f"{name}: extend after forward_block read the "
                                                                  "cache vs a fresh cache")


def _refuses(fn) -> bool:
    """True when fn() raises ValueError (a clear refusal); False when it returns or fails otherwise
    (a shape error deep inside a forward names nothing the caller can fix)."""
    try:
        fn()
    except ValueError:
        return True
    except Exception:
        pass
    return False


def check_training_forward(ctx, den, name: str) -> None:
    """The all-blocks training forward == per-block inference, and its AR logits (all, or where a mask
    says) == the full forward."""
    S, nB = 4, 3
    x = _ids((2, S * nB), ctx, 13)
    g = torch.Generator().manual_seed(14)
    noisy = torch.where(torch.rand(x.shape, generator=g) < 0.5, torch.full_like(x, MASK), x)
    t = torch.rand((2, nB), generator=g)
    logits, states = ctx.forward_train(x, S, return_logits=True)
    full = ctx(x)
    assert_close(logits, full, f"{name}: context forward_train logits vs the full forward")
    # Objectives that ask for the AR model's logits take them only where a position is masked.
    where = torch.rand(x.shape, generator=g) < 0.4
    picked, _ = ctx.forward_train(x, S, return_logits=where)
    assert_close(picked, full[where], f"{name}: context forward_train logits at a bool mask vs the full forward there")
    expect(ctx.forward_train(x, S)[0] is None, f"{name}: forward_train without return_logits must give no logits")
    train = den.forward_train(noisy, states, t)
    for k in range(nB):
        cache = ctx.empty_cache(2) if k == 0 else ctx.prefill(x[:, : k * S])[1]
        block = den.forward_block(noisy[:, k * S: (k + 1) * S], cache, t[:, k])
        assert_close(train[:, k * S: (k + 1) * S], block, f"{name}: denoiser forward_train block {k} vs forward_block")


def check_skip_layers(ctx, den, name: str) -> None:
    """A skipped layer (`DenoiserTowerBase.set_skip_layers`) is not run: both denoiser forwards ignore its
    weights, and skipping it changes them (a family whose loops bypass `run_layers` would fail here)."""
    S, nB = 4, 2
    x = _ids((2, S * nB), ctx, 15)
    noisy = torch.where(x % 2 == 0, torch.full_like(x, MASK), x)
    t = torch.tensor([[0.4, 0.7], [0.9, 0.2]])
    _, states = ctx.forward_train(x, S)
    _, cache = ctx.prefill(x[:, :S])

    def both():
        return den.forward_train(noisy, states, t), den.forward_block(noisy[:, S:], cache, t[:, 1])

    skipped = len(den.backbone.layers) - 1  # the last layer: every family has one, of any type
    deep = both()
    saved = {k: v.clone() for k, v in den.backbone.layers[skipped].state_dict().items()}
    den.set_skip_layers([skipped])
    try:
        shallow = both()
        randomize_(den.backbone.layers[skipped], seed=16, scale=0.5)
        for got, want, what in zip(both(), shallow, ("forward_train", "forward_block")):
            assert_close(got, want, f"{name}: {what} with layer {skipped} skipped, after its weights changed")
        expect(any((a - b).abs().max() > 1e-4 for a, b in zip(shallow, deep)),
               f"{name}: skipping layer {skipped} left both denoiser forwards unchanged; loop over "
               "DenoiserTowerBase.run_layers()")
    finally:
        den.set_skip_layers([])
        den.backbone.layers[skipped].load_state_dict(saved)


def check_speculative_equals_ar(ctx, den, name: str) -> None:
    """Speculative decoding through the library's decoders gives the context tower's greedy output,
    with the denoiser on the shared cache and on a mirror of it."""
    ids, mask = left_pad(random_prompts([2, 9, 5], seed=3, vocab_size=ctx.config.vocab_size))
    towers = Towers(ctx, den, mask_token_id=MASK, pad_token_id=PAD)
    ar = Autoregressive().generate(towers, ids, mask, max_new_tokens=13)
    spec = Speculative(block_size=5).generate(towers, ids, mask, max_new_tokens=13)
    assert_equal(spec.sequences, ar.sequences, f"{name}: Speculative(block_size=5) vs Autoregressive, greedy")
    # The two-device path on one device: the denoiser reads a mirror of the context cache.
    mirror = Towers(ctx, den, mask_token_id=MASK, pad_token_id=PAD, denoiser_device="cpu")
    spec = Speculative(block_size=5).generate(mirror, ids, mask, max_new_tokens=13)
    assert_equal(spec.sequences, ar.sequences, f"{name}: Speculative on a mirrored cache vs Autoregressive")


# ---- against transformers --------------------------------------------------------------------------


def _reference_class(family, reference):
    """The transformers class to compare against: `reference`, or the family's hf_architecture if
    transformers has it; None when there is none (or reference=False)."""
    if reference is False:
        return None
    if reference is not None:
        return reference
    import transformers

    return getattr(transformers, family.hf_architecture, None)


def check_against_transformers(family, config, hf_class, *, seed: int = 0) -> None:
    """A random `hf_class` model written by its own save_pretrained and read by the family's loader
    gives the same logits (full, prefill + extends), greedy AR == its `generate`, and speculative
    decoding through a `TwoTowerLM` built from the folder == AR."""
    name = f"{family.model_type} vs transformers {hf_class.__name__}"
    hf = randomize_(hf_class(config), seed=seed + 11).eval()
    with tempfile.TemporaryDirectory() as folder:
        hf.save_pretrained(folder)
        ctx = ContextTowerBase.from_pretrained(folder).eval()
        expect(isinstance(ctx, family.context), f"{name}: the folder loaded as {type(ctx).__name__}, "
                                                f"not the family's {family.context.__name__}")
        with torch.inference_mode():
            check_logits_parity(hf, ctx, name)
            check_greedy_equals_generate(hf, ctx, name)
        check_speculative_through_the_model(folder, name, seed)


def check_logits_parity(hf, ctx, name: str) -> None:
    """Our full forward and prefill + extends (the cache growing) give transformers' logits."""
    ids = _ids((2, 24), ctx, 15)
    want = hf(ids).logits.float()
    assert_close(ctx(ids), want, f"{name}: full-forward logits")
    got, cache = ctx.prefill(ids[:, :9], capacity=10)
    parts = [got] + [ctx.extend(cache, ids[:, lo:hi]) for lo, hi in ((9, 16), (16, 17), (17, 24))]
    assert_close(torch.cat(parts, 1), want, f"{name}: prefill + extends logits")


def check_greedy_equals_generate(hf, ctx, name: str) -> None:
    """Greedy Autoregressive on our context tower == transformers' greedy `generate` (no EOS)."""
    hf.generation_config.eos_token_id = None
    prompt = _ids((1, 7), ctx, 16)
    want = hf.generate(prompt, max_new_tokens=12, do_sample=False, pad_token_id=PAD)
    got = Autoregressive().generate(ctx, prompt, max_new_tokens=12)
    assert_equal(got.sequences, want, f"{name}: greedy Autoregressive vs generate")


def check_speculative_through_the_model(folder, name: str, seed: int) -> None:
    """`TwoTowerLM.from_backbone(folder)` with random time modules: Speculative == Autoregressive."""
    model = TwoTowerLM.from_backbone(folder, block_size=4, mask_token_id=MASK).eval()
    randomize_time_(model.denoiser, seed + 12)
    ids, mask = left_pad(random_prompts([3, 8, 5], seed=4, vocab_size=model.config.vocab_size))
    ar = model.generate(ids, mask, decoder=Autoregressive(), max_new_tokens=14)
    spec = model.generate(ids, mask, decoder=Speculative(block_size=4), max_new_tokens=14)
    assert_equal(spec.sequences, ar.sequences, f"{name}: Speculative through TwoTowerLM vs Autoregressive")
