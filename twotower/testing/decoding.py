"""`check_decoder`, `check_sampler` and `check_time_conditioning`: the decoding contracts
(`twotower.decoding.base`, `twotower.samplers.base`, `twotower.time_embedding`) on a tiny model.

A decoder's own errors (the base class raises RuntimeError / TypeError when a decoder breaks its
contract) come back as AssertionError naming the check that ran, so that every failure of a check
is an AssertionError.
"""

from __future__ import annotations

import tempfile

import torch

from ..decoding import MaskDiffusion, Towers
from ..decoding.checks import default_pad_id
from ..model import TwoTowerLM
from ..samplers import Sampler
from ..serving.requests import CompletionRequest
from ..serving.scheduler import Job
from ..serving.stepper import Stepper
from ..time_embedding import TimeConditioning, build_time_conditioning, time_spec
from .builders import (MASK, assert_close, assert_equal, expect, family_of, left_pad, random_prompts, randomize_,
                       tiny_config, tiny_model)

PROMPT_LENGTHS = [5, 2, 7]


def _run(what: str, fn, *args, **kwargs):
    """fn(*args, **kwargs); an exception other than AssertionError becomes one naming `what`."""
    try:
        return fn(*args, **kwargs)
    except AssertionError:
        raise
    except Exception as e:
        raise AssertionError(f"{what} raised {type(e).__name__}: {e}") from e


# ---- decoders ---------------------------------------------------------------------------------------


def check_decoder(decoder, model=None, *, max_new_tokens: int = 9, seed: int = 0) -> None:
    """Run the decoder contract on `decoder`; AssertionError naming what broke.

    decoder: a `twotower.decoding.Decoder` (its settings as you would use it; temperature > 0 adds
        the seeded-sampling checks).
    model: a TwoTowerLM or `Towers` (default: `tiny_model("llama")`, block size 4). With the default,
        a generated [MASK] is an error too (the tiny model never predicts one).

    Checks: `generate`'s output contract (with an EOS), rows independent of their batch (greedy),
    seeded sampling repeats, the step callback, `start` / `step` == `generate` (with `prefill`
    setting `state.cache`), and the server's working batch (`serving.Stepper`, requests joining and
    leaving between steps) == each request's `generate` alone. A decoder that implements only the
    older `_decode` loop gets the `generate` checks (the server refuses it anyway).
    """
    own_model = model is None
    model = tiny_model("llama", block_size=4) if own_model else model
    name = type(decoder).__name__
    ids, mask = left_pad(random_prompts(PROMPT_LENGTHS, seed=11 + seed, vocab_size=_vocab(model)))
    eos = int(ids[0, -1])  # row 0's own last token: a decoder that repeats it ends that row at once
    out = _generate(decoder, model, ids, mask, max_new_tokens, eos, seed)
    check_output(out, ids, max_new_tokens, eos, _pad_id(model, eos), name, no_mask=own_model)
    if decoder.temperature <= 0:
        check_rows_independent(decoder, model, ids, mask, out, max_new_tokens, eos)
    else:
        check_seeded_repeats(decoder, model, ids, mask, out, max_new_tokens, eos, seed)
    check_step_callback(decoder, model, ids, mask, out, max_new_tokens, eos, seed)
    if decoder.steps_implemented():
        check_steps_equal_generate(decoder, model, ids, mask, out, max_new_tokens, eos, seed)
        check_served_equals_alone(decoder, model, eos, seed)


def _vocab(model) -> int:
    return Towers.of(model).context.config.vocab_size


def _pad_id(model, eos: int) -> int:
    towers = Towers.of(model)
    return towers.pad_token_id if towers.pad_token_id is not None else default_pad_id(towers.context.config, eos)


def _generator(decoder, seed: int):
    """A seeded generator for a sampling decoder, None for a greedy one (what a request gets)."""
    return torch.Generator().manual_seed(seed) if decoder.temperature > 0 else None


def _generate(decoder, model, ids, mask, n: int, eos, seed: int, **kwargs):
    """decoder.generate with a seeded generator, failures named."""
    what = f"{type(decoder).__name__}.generate(max_new_tokens={n}, eos_token_id={eos})"
    return _run(what, decoder.generate, model, ids, mask, max_new_tokens=n, eos_token_id=eos,
                generator=_generator(decoder, seed), **kwargs)


def check_output(out, ids, n: int, eos: int, pad: int, name: str, *, no_mask: bool = False) -> None:
    """The GenerationOutput contract: shapes, the prompt kept, 1 .. n tokens per row, an EOS only as a
    row's last token, rows without one full length, the pad id after a row's end."""
    B, T = ids.shape
    N = out.new_tokens.shape[1]
    expect(tuple(out.sequences.shape) == (B, T + N) and N <= n,
           f"{name}: sequences {tuple(out.sequences.shape)} for prompts {(B, T)} and {N} new columns (<= {n})")
    assert_equal(out.sequences[:, :T], ids.to(out.sequences.device), f"{name}: the prompt part of sequences")
    assert_equal(out.sequences[:, T:], out.new_tokens, f"{name}: new_tokens vs sequences[:, T:]")
    for r in range(B):
        _check_row(out.new_tokens[r].tolist(), int(out.num_generated[r]), n, eos, pad, f"{name}: row {r}")
    expect(tuple(out.nfe.shape) == (B,) and int(out.nfe.min()) >= 0, f"{name}: nfe {out.nfe.tolist()}")
    if no_mask:
        expect(not bool((out.new_tokens == MASK).any()),
               f"{name} emitted [MASK] (id {MASK}): {out.new_tokens.tolist()}")


def _check_row(tokens: list[int], k: int, n: int, eos: int, pad: int, what: str) -> None:
    """One row of new_tokens with num_generated k (see `check_output`)."""
    expect(1 <= k <= n, f"{what}: num_generated {k}, expected 1 .. {n}")
    made, after = tokens[:k], tokens[k:]
    expect(eos not in made[:-1], f"{what}: EOS {eos} inside the row before its end: {made}")
    expect(made[-1] == eos or k == n, f"{what}: ended after {k} of {n} tokens without an EOS: {made}")
    expect(all(t == pad for t in after), f"{what}: after its {k} tokens {after}, expected pad id {pad}")


def check_rows_independent(decoder, model, ids, mask, out, n: int, eos: int) -> None:
    """Greedy: each row of the batch == the same prompt decoded alone, tokens and forward count."""
    name = type(decoder).__name__
    for r in range(ids.shape[0]):
        prompt = ids[r][mask[r].bool()][None]
        alone = _generate(decoder, model, prompt, None, n, eos, 0)
        k = int(out.num_generated[r])
        expect(int(alone.num_generated[0]) == k, f"{name}: row {r} made {k} tokens in the batch, "
                                                 f"{int(alone.num_generated[0])} alone")
        assert_equal(out.new_tokens[r, :k][None], alone.new_tokens[:, :k], f"{name}: row {r} in the batch vs alone")
        # The forward count too: a row whose drafts were cut or lengthened by its neighbours would
        # still give AR's tokens, only slower, and the tokens alone would not show it.
        expect(int(out.nfe[r]) == int(alone.nfe[0]), f"{name}: row {r} took {int(out.nfe[r])} forwards in the "
                                                     f"batch, {int(alone.nfe[0])} alone")


def check_seeded_repeats(decoder, model, ids, mask, out, n: int, eos: int, seed: int) -> None:
    """temperature > 0: the same seed repeats the output whatever the global RNG; other seeds differ."""
    name = type(decoder).__name__
    torch.manual_seed(12345)  # only the call's generator may matter
    again = _generate(decoder, model, ids, mask, n, eos, seed)
    assert_equal(again.new_tokens, out.new_tokens, f"{name}: the same seed ({seed}) again")
    others = [_generate(decoder, model, ids, mask, n, eos, seed + s).new_tokens for s in (1, 2, 3)]
    expect(any(o.shape != out.new_tokens.shape or not torch.equal(o, out.new_tokens) for o in others),
           f"{name}: temperature {decoder.temperature} but seeds {seed}..{seed + 3} all gave {out.new_tokens.tolist()}")


def check_step_callback(decoder, model, ids, mask, out, n: int, eos: int, seed: int) -> None:
    """A step callback is called after the decoder's forwards with (block, step, before, logits (R, m, V),
    after (R, n)) and changes no output."""
    name = type(decoder).__name__
    calls = []
    seen = _generate(decoder, model, ids, mask, n, eos, seed, step_callback=lambda *a: calls.append(a))
    assert_equal(seen.new_tokens, out.new_tokens, f"{name}: output with a step_callback vs without")
    expect(bool(calls) or int(out.nfe.max()) == 0,
           f"{name}: ran {int(out.nfe.max())} forward(s) but never called the step_callback")
    for i, args in enumerate(calls):
        _check_callback_args(args, f"{name}: step_callback call {i}")


def _check_callback_args(args, what: str) -> None:
    """(block_index, step_index, tokens_before, logits, tokens_after) as the decoding docs say."""
    expect(len(args) == 5, f"{what}: {len(args)} arguments, expected 5 (block, step, before, logits, after)")
    block, step, before, logits, after = args
    expect(isinstance(block, int) and isinstance(step, int), f"{what}: block {block!r} / step {step!r} not ints")
    expect(torch.is_tensor(logits) and logits.dim() == 3, f"{what}: logits {_shape(logits)}, expected (R, m, V)")
    # Rows must agree; positions need not (a decoder writing one token twice passes one position's logits).
    expect(torch.is_tensor(after) and after.dim() == 2 and after.shape[0] == logits.shape[0],
           f"{what}: tokens_after {_shape(after)}, expected ({logits.shape[0]}, n) (the logits' rows)")
    expect(before is None or tuple(before.shape) == tuple(after.shape),
           f"{what}: tokens_before {_shape(before)} vs tokens_after {_shape(after)}")


def _shape(x):
    return tuple(x.shape) if torch.is_tensor(x) else type(x).__name__


def check_steps_equal_generate(decoder, model, ids, mask, out, n: int, eos: int, seed: int) -> None:
    """`start` then `step` until `state.done` == `generate` (tokens, forwards, blocks); a step past the end
    is refused."""
    name = type(decoder).__name__
    state = _run(f"{name}.start", decoder.start, model, ids, mask, max_new_tokens=n, eos_token_id=eos,
                 generator=_generator(decoder, seed))
    # The server joins rows started apart by concatenating their caches (`DecodeState.join`).
    expect(state.cache is not None, f"{name}.prefill left state.cache None: the server joins rows by their caches; "
                                    "set state.cache in prefill (e.g. the context tower's prefill of the prompts)")
    steps = 0
    while not state.done:
        _run(f"{name}.step {steps}", decoder.step, state)
        steps += 1
        expect(steps <= n, f"{name}: still not done after {steps} steps for max_new_tokens {n}")
    got = state.output()
    assert_equal(got.sequences, out.sequences, f"{name}: start/step sequences vs generate")
    assert_equal(got.nfe, out.nfe, f"{name}: start/step nfe vs generate")
    want_blocks = steps if decoder.counts_blocks else 0
    expect(got.blocks == want_blocks == out.blocks, f"{name}: blocks {got.blocks} by steps, {out.blocks} by "
                                                    f"generate, expected {want_blocks} ({steps} steps)")
    try:
        decoder.step(state)
    except RuntimeError:
        return
    raise AssertionError(f"{name}.step on a finished state did not raise RuntimeError")


class _IdText:
    """A stand-in tokenizer for the server's jobs: a text of the ids (the checks compare ids)."""

    eos_token_id = None

    def decode(self, ids) -> str:
        return " ".join(map(str, ids))


# (prompt length, max tokens) of the requests; the last two join after the first step.
REQUESTS = [(5, 4), (2, 9), (7, 6), (3, 7)]


def check_served_equals_alone(decoder, model, eos: int, seed: int) -> None:
    """The server's working batch (`serving.Stepper`, driven by hand): two requests start together (one
    prefill), two join one by one after the first step, rows leave as they finish; each request's tokens
    == `generate` on it alone (with its own seed when sampling)."""
    name = type(decoder).__name__
    prompts = random_prompts([n for n, _ in REQUESTS], seed=21 + seed, vocab_size=_vocab(model))
    jobs = [_job(decoder, p, cap, eos, seed + i) for i, (p, (_, cap)) in enumerate(zip(prompts, REQUESTS))]
    stepper = Stepper(Towers.of(model), decoder)
    _run(f"{name} in the server (Stepper.key)", Stepper.key, decoder, stepper.towers)
    # The server admits both ways: requests waiting at one boundary share one prefill, and requests that
    # arrive at different boundaries are each prefilled alone.
    _run(f"{name} in the server: admitting 2 requests together", stepper.admit, jobs[:2])
    _run(f"{name} in the server: step 0", stepper.step)
    for i in (2, 3):
        _run(f"{name} in the server: request {i} joining alone after step 0", stepper.admit, [jobs[i]])
    _drive(stepper, name)
    for i, (job, p) in enumerate(zip(jobs, prompts)):
        alone = _generate(decoder, model, p[None], None, job.max_tokens, eos, seed + i)
        want = alone.new_tokens[0, : int(alone.num_generated[0])].tolist()
        expect(job.tokens == want, f"{name}: request {i} served in a batch made {job.tokens}, alone {want}")


def _job(decoder, prompt, cap: int, eos: int, seed: int):
    """A server Job for `prompt` (no HTTP): its own cap, EOS and seed."""
    request = CompletionRequest(prompt="", prompt_ids=prompt.tolist(), max_tokens=cap, decoder=decoder,
                                decoder_name=type(decoder).__name__, seed=seed)
    return Job(request, _IdText(), [eos])


def _drive(stepper, name: str) -> None:
    """Step the working batch until every row has left (bounded)."""
    for i in range(1, 100):
        if not len(stepper):
            return
        _run(f"{name} in the server: step {i}", stepper.step)
    raise AssertionError(f"{name} in the server: rows still running after 100 steps: "
                         f"{[j.tokens for j in stepper.jobs]}")


# ---- samplers --------------------------------------------------------------------------------------


def check_sampler(sampler, *, seed: int = 0) -> None:
    """Run the sampler contract on `sampler` (a `twotower.samplers.Sampler`); AssertionError naming
    what broke.

    Simulated blocks (B 3, S 8; 1, 3 and 8 steps): `select` returns a (B, S) bool subset of `masked`
    (the base class trims and completes it anyway, but a policy that relies on that wastes steps),
    every block finishes within its steps, and a seeded call repeats whatever the global RNG (draw
    from `generator`). Then MaskDiffusion with the sampler on a tiny model: a seeded repeat and the
    decoder contract (`check_decoder`).
    """
    name = type(sampler).__name__
    expect(isinstance(sampler, Sampler), f"{name} is not a twotower.samplers.Sampler")
    for steps in (1, 3, 8):
        first = _simulate(sampler, steps, seed)
        torch.manual_seed(999)  # only the call's generator may matter
        assert_equal(_simulate(sampler, steps, seed), first, f"{name}: commits of a block of {steps} steps, "
                                                              f"seed {seed}, again")
    _check_in_mask_diffusion(MaskDiffusion(sampler, block_size=4, steps_per_block=4), seed)


def _check_in_mask_diffusion(decoder, seed: int) -> None:
    """The sampler inside MaskDiffusion on a tiny model: the output contract, and a seeded call repeats.

    (Not the whole `check_decoder`: a sampler that draws at random shares the global RNG when the
    server batches rows, so only `generate` with a generator is reproducible.)"""
    model = tiny_model("llama", block_size=4)
    ids, mask = left_pad(random_prompts(PROMPT_LENGTHS, seed=11 + seed, vocab_size=_vocab(model)))
    eos, name = int(ids[0, -1]), f"MaskDiffusion({type(decoder.sampler).__name__})"
    runs = []
    for global_seed in (1, 2):
        torch.manual_seed(global_seed)  # only the call's generator may matter
        runs.append(_run(f"{name}.generate", decoder.generate, model, ids, mask, max_new_tokens=9, eos_token_id=eos,
                         generator=torch.Generator().manual_seed(seed)))
    check_output(runs[0], ids, 9, eos, _pad_id(model, eos), name, no_mask=True)
    assert_equal(runs[1].new_tokens, runs[0].new_tokens, f"{name}: the same generator seed ({seed}) again")


def _simulate(sampler, steps: int, seed: int):
    """One block of 8 positions over `steps` steps with random confidences; the step at which each
    position committed (B, S)."""
    g = torch.Generator().manual_seed(seed)
    masked = torch.ones(3, 8, dtype=torch.bool)
    masked[2, 5:] = False  # a row that starts with some positions already committed
    when = torch.full((3, 8), -1)
    for step in range(steps):
        commit = _sampler_step(sampler, masked, step, steps, g)
        when[commit] = step
        masked &= ~commit
    expect(not bool(masked.any()), f"{type(sampler).__name__}: positions {masked.nonzero().tolist()} still masked "
                                   f"after the block's {steps} steps")
    return when


def _sampler_step(sampler, masked, step: int, steps: int, g):
    """One step: select's own result checked, then the commit the engine uses."""
    name = type(sampler).__name__
    logits = torch.randn(3, 8, 16, generator=g) * 3
    probs = logits.softmax(-1)
    confidence, candidates = probs.max(-1)
    raw = _run(f"{name}.select at step {step} of {steps}", sampler.select, confidence, candidates, masked.clone(),
               step=step, steps_per_block=steps, logits=logits, generator=g)
    expect(torch.is_tensor(raw) and raw.dtype == torch.bool and raw.shape == masked.shape,
           f"{name}.select returned {_shape(raw)} {getattr(raw, 'dtype', '')}, expected a {tuple(masked.shape)} bool")
    expect(not bool((raw & ~masked).any()), f"{name}.select at step {step} committed positions that are not "
                                            f"masked: {(raw & ~masked).nonzero().tolist()}")
    return sampler(confidence, candidates, masked, step=step, steps_per_block=steps, logits=logits, generator=g)


# ---- time conditionings ------------------------------------------------------------------------------


def check_time_conditioning(spec_or_class, family="llama") -> None:
    """Run the time-conditioning contract on a `TimeConditioning` (a class, an instance, or a
    {"class_path", "init_args"} spec; the class importable by its path); AssertionError naming what
    broke.

    On a tiny model of `family` with randomized time weights: `forward(t)` gives None or one
    (shift, scale, gate) per modulated sub-block, broadcastable to (B, S, H); the spec rebuilds the
    same module; the released state dict holds every time weight under the module's
    `released_prefix`; and `save_pretrained` / `from_pretrained` gives the same class, settings,
    weights and denoiser outputs.
    """
    spec = _time_spec(spec_or_class)
    family = family_of(family)
    ctx = randomize_(family.context(tiny_config(family))).eval()
    model = _run(f"TwoTowerLM.from_backbone(time={spec})", TwoTowerLM.from_backbone, ctx, block_size=4,
                 mask_token_id=MASK, time=spec).eval()
    randomize_(model.denoiser.time, seed=3, scale=0.1)
    name = spec["class_path"]
    _check_modulations(model.denoiser, name)
    _check_spec_rebuilds(model.denoiser, spec, name)
    _check_released_names(model, name)
    _check_save_load(model, name)


def _time_spec(spec_or_class) -> dict:
    """A {"class_path", "init_args"} spec from a spec, a TimeConditioning class or an instance."""
    if isinstance(spec_or_class, dict):
        return spec_or_class
    if isinstance(spec_or_class, TimeConditioning):
        return spec_or_class.spec()
    if isinstance(spec_or_class, type) and issubclass(spec_or_class, TimeConditioning):
        return time_spec(spec_or_class)
    raise AssertionError(f"{spec_or_class!r} is not a TimeConditioning class, instance or class_path spec")


def _check_modulations(den, name: str) -> None:
    """forward(t (B,)) -> None or num_modulated (shift, scale, gate), each broadcastable to (B, S, H)."""
    B, H = 2, den.config.hidden_size
    mods = _run(f"{name}.forward(t of shape ({B},))", den.time, torch.tensor([0.25, 0.75]))
    if mods is None:
        return
    expect(len(mods) == den.num_modulated, f"{name}: {len(mods)} modulations for the denoiser's "
                                           f"{den.num_modulated} modulated sub-blocks")
    for i, mod in enumerate(mods):
        expect(len(mod) == 3, f"{name}: modulation {i} has {len(mod)} parts, expected (shift, scale, gate)")
        for part in mod:
            ok = torch.broadcast_shapes(part.shape, (B, 1, H)) == (B, 1, H)
            expect(ok, f"{name}: modulation {i} part of shape {tuple(part.shape)}, expected to broadcast to "
                       f"({B}, 1, {H})")


def _check_spec_rebuilds(den, spec: dict, name: str) -> None:
    """`spec()` of the built module rebuilds a module of the same class, names and shapes."""
    again = build_time_conditioning(den.time.spec(), den.config.hidden_size, den.num_modulated)
    expect(type(again) is type(den.time), f"{name}: spec() {den.time.spec()} rebuilt a {type(again).__name__}")
    want = {k: tuple(v.shape) for k, v in den.time.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in again.state_dict().items()}
    expect(got == want, f"{name}: spec() rebuilt weights {got}, the module has {want}")


def _check_released_names(model, name: str) -> None:
    """Every time weight is in the released state dict under the module's `released_prefix`."""
    released = model.released_state_dict()
    prefix = model.denoiser.time.released_prefix
    for k, v in model.denoiser.time.state_dict().items():
        expect(prefix + k in released, f"{name}: time weight {k!r} is not saved as {prefix + k!r}")
        expect(torch.equal(released[prefix + k], v), f"{name}: time weight {k!r} saved with other values")


def _check_save_load(model, name: str) -> None:
    """save_pretrained / from_pretrained: same class, init_args, weights and denoiser outputs."""
    with tempfile.TemporaryDirectory() as folder:
        _run(f"{name}: save_pretrained", model.save_pretrained, folder)
        back = _run(f"{name}: from_pretrained", TwoTowerLM.from_pretrained, folder).eval()
    a, b = model.denoiser.time, back.denoiser.time
    expect(type(b) is type(a) and b.init_args() == a.init_args(),
           f"{name}: loaded back as {type(b).__name__}{b.init_args()}, saved {type(a).__name__}{a.init_args()}")
    for k, v in model.state_dict().items():
        expect(torch.equal(v, back.state_dict()[k]), f"{name}: weight {k!r} differs after save / load")
    assert_close(_denoise(back), _denoise(model), f"{name}: denoiser outputs after save / load")


def _denoise(model):
    """The denoiser's logits for an all-[MASK] block after a fixed prompt, at t = 0.25 and 0.75."""
    ids = random_prompts([7], seed=3, vocab_size=model.config.vocab_size)[0][None]
    with torch.inference_mode():
        _, cache = model.context.prefill(ids)
        x = torch.full((1, model.block_size), MASK)
        return torch.stack([model.denoiser.forward_block(x, cache, torch.tensor([t])) for t in (0.25, 0.75)])
