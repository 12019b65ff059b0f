"""One decoding loop, driven two ways: every decoder is a state machine (`prefill` / `draft` /
`advance` over a `DecodeState`) that `generate` runs to completion and the server's scheduler runs
one step at a time. A decoder defined here, in a test module, is served with no extra code; the one
registry of decoder names; the base class's checks of what a decoder returns and of the step
callback, each against a deliberately broken decoder; and a random-order sampler seeded by the
call's generator."""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest
import torch
from conftest import MASK, left_pad, make_model, random_prompts, save_tiny_twotower, served_alone

from twotower.decoding import (Autoregressive, Decoder, GenerationOutput, MaskDiffusion, MockAR, Speculative,
                               TolerantSpeculative, Towers, build_decoder, decoder_class, register_decoder,
                               registered_decoders)
from twotower.samplers import ConfidenceThreshold, Sampler, commit_top_n
from twotower.tokenizers import ByteTokenizer

TOK = ByteTokenizer()


# ---- decoders written in this test module -------------------------------------------------------


class Pairs(Decoder):
    """Two tokens per context forward: the context tower's choice, written twice."""

    uses_denoiser = False

    def prefill(self, state):
        call = state.call
        logits, state.cache = call.context.prefill(call.input_ids, call.valid, logits="last")
        state.carry["logits"] = logits[:, -1]

    def advance(self, state, drafted):
        logits = state.carry["logits"]
        pair = state.choose(logits)[:, None].repeat(1, 2)
        state.count_forward()
        self.notify(state, logits, pair)
        state.commit(pair)
        pair, = state.drop_finished(pair)  # finished rows leave: so do their rows of `pair`
        if not state.done:
            state.carry["logits"] = state.call.context.extend(state.cache, pair, logits="last")[:, -1]

    def notify(self, state, logits, pair):
        if state.step_callback is not None:
            state.step_callback(state.iterations, 0, None, logits[:, None], pair)


class DraftVerify(Decoder):
    """A one-step greedy draft by the denoiser (in `draft`, the half the server may overlap), the
    context tower keeping the prefix it agrees with (in `advance`)."""

    uses_mask_token = True

    def prefill(self, state):
        call = state.call
        room = call.input_ids.shape[1] + call.max_new_tokens + call.block_size
        logits, state.cache = call.context.prefill(call.input_ids, call.valid, logits="last", capacity=room)
        state.carry["next"] = state.choose(logits[:, -1])

    def draft(self, state):
        call, n = state.call, state.call.block_size
        den = state.den_cache()
        x = torch.full((len(state), n), call.mask_token_id, dtype=torch.long, device=den.device)
        x[:, 0] = state.carry["next"].to(den.device)
        logits = call.denoiser.forward_block(x, den, torch.full((len(state),), (n - 1) / n, device=den.device))
        state.count_forward()
        logits[..., call.mask_token_id] = float("-inf")
        x[:, 1:] = (logits[:, :-1] if call.shifted else logits[:, 1:]).argmax(-1)
        if state.step_callback is not None:
            state.step_callback(state.iterations, 0, None, logits, x)
        return x

    def advance(self, state, drafted):
        call = state.call
        x = drafted.to(call.ctx_device)
        own = state.choose(call.context.extend(state.cache, x, logits="all", provisional=True))
        keep = (own[:, :-1] == x[:, 1:]).long().cumprod(-1).sum(-1) + 1
        call.context.accept(state.cache, keep)
        state.carry["next"] = own.gather(1, (keep - 1)[:, None]).squeeze(1)
        state.commit(x, keep)
        state.drop_finished()


class OldStyle(Decoder):
    """A decoder written before the state machine: a whole loop in `_decode`."""

    uses_denoiser = False

    def _decode(self, call):
        logits, cache = call.context.prefill(call.input_ids, call.valid, logits="last")
        tracker = call.tracker(spare=1)
        for _ in range(call.max_new_tokens):
            tok = self.chooser(logits[:, -1], call.generator)[:, None]
            tracker.count_forward(None)
            tracker.commit(tok)
            logits = call.context.extend(cache, tok, logits="last")
        return tracker.output(call.input_ids, blocks=0)


@pytest.fixture(scope="module")
def model():
    return make_model(seed=3, block_size=4)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A tiny byte-level model as the server holds it, with these decoders registered by name."""
    from twotower.model import TwoTowerLM
    from twotower.serving.requests import ServeSettings

    register_decoder("test_pairs", Pairs)
    register_decoder("test_draft_verify", DraftVerify, aliases=("test_dv",))
    model = TwoTowerLM.from_pretrained(save_tiny_twotower(tmp_path_factory.mktemp("loop") / "tt")).eval()
    return SimpleNamespace(model=model, settings=ServeSettings(max_tokens=16))


def run_scheduler(sched, srv, requests) -> list:
    """Submit one Job per parsed request, wait (bounded) until all are over, stop; the jobs."""
    from twotower.serving.scheduler import Job

    sched.start()
    try:
        jobs = [sched.submit(Job(r, TOK, [TOK.eos_token_id])) for r in requests]
        wait_over(jobs)
    finally:
        sched.stop()
    return jobs


def wait_over(jobs, seconds: float = 120) -> None:
    """Wait until every job is over (done, failed or dropped), failing the test after `seconds`."""
    deadline = time.time() + seconds
    while not all(j.over for j in jobs):
        assert time.time() < deadline, "the jobs did not finish"
        time.sleep(0.02)


def parse(srv, body):
    from twotower.serving.requests import parse_completion

    return parse_completion(body, srv.settings, TOK, context_limit=512, model_block_size=8)


# ---- the state machine, driven by hand ------------------------------------------------------------


@pytest.mark.parametrize("decoder", [Autoregressive(), MockAR(), MaskDiffusion(block_size=4), Speculative(block_size=4),
                                     TolerantSpeculative(0.3, block_size=4), Pairs(), DraftVerify()],
                         ids=lambda d: type(d).__name__)
def test_start_and_step_by_hand_equal_generate(model, decoder):
    ids, mask = left_pad(random_prompts([5, 2, 7], seed=11))
    want = decoder.generate(model, ids, mask, max_new_tokens=9, eos_token_id=int(ids[0, -1]))
    state = decoder.start(model, ids, mask, max_new_tokens=9, eos_token_id=int(ids[0, -1]))
    steps = 0
    while not state.done:
        decoder.step(state)
        steps += 1
    out = state.output()
    assert torch.equal(out.sequences, want.sequences) and torch.equal(out.nfe, want.nfe)
    assert out.blocks == (steps if decoder.counts_blocks else 0) == want.blocks
    with pytest.raises(RuntimeError, match="finished state"):
        decoder.step(state)


def test_the_users_decoders_honour_the_contract(model):
    """Pairs and DraftVerify are real decoders: rows independent of their batch, and DraftVerify (greedy)
    is Speculative's one-step draft-and-verify, token for token."""
    ids, mask = left_pad(random_prompts([5, 2, 7], seed=11))
    for decoder in (Pairs(), DraftVerify()):
        out = decoder.generate(model, ids, mask, max_new_tokens=9)
        assert out.num_generated.tolist() == [9, 9, 9]
        for r, p in enumerate(random_prompts([5, 2, 7], seed=11)):
            assert torch.equal(decoder.generate(model, p[None], max_new_tokens=9).new_tokens[0], out.new_tokens[r])
    for p in random_prompts([5, 2, 7], seed=11):
        assert torch.equal(DraftVerify().generate(model, p[None], max_new_tokens=9).new_tokens,
                           Speculative().generate(model, p[None], max_new_tokens=9).new_tokens)


# ---- a decoder of this module, served with no extra code ------------------------------------------


def test_a_users_decoder_is_served_as_it_generates_alone(served, monkeypatch):
    """Requests naming the registered test decoders share working batches with the scheduler, rows
    joining and leaving between steps, and each equals the decoder's own `generate` on that request
    alone, greedy and seeded sampling alike."""
    from twotower.serving.scheduler import Scheduler
    from twotower.serving.stepper import Stepper

    widest: dict[str, int] = {}
    real_finish = Stepper.finish

    def finish(self, drafted):  # the most rows one working batch of each decoder held at a step
        name = type(self.decoder).__name__
        widest[name] = max(widest.get(name, 0), len(self))
        real_finish(self, drafted)

    monkeypatch.setattr(Stepper, "finish", finish)
    bodies = [{"prompt": p, "max_tokens": 5 + 3 * i, "decoder": d, **extra}
              for i, (p, d, extra) in enumerate([
                  ("ab", "test_pairs", {}), ("x = 1\n", "test_dv", {}), ("hello", "test_pairs", {}),
                  ("0123", "test_draft_verify", {}), ("q", "test_pairs", {"temperature": 0.9, "seed": 4}),
                  ("def", "test_dv", {"temperature": 0.8, "seed": 7}), ("zz", "test_dv", {})])]
    sched = Scheduler(Towers.of(served.model), max_batch=3)
    jobs = run_scheduler(sched, served, [parse(served, b) for b in bodies])
    assert widest["Pairs"] >= 2 and widest["DraftVerify"] >= 2  # rows of a user's decoder really shared a batch
    for b, j in zip(bodies, jobs):
        assert j.error is None and j.text == served_alone(served, b, TOK), b


def submitted_together(sched, jobs) -> list:
    """Start the loop but hold it before it takes requests until every job is submitted, so all of them
    wait at its first boundary. Waits (bounded) until they are over, stops; the jobs."""
    import threading

    ready, real_take = threading.Event(), sched._take

    def take(block):
        assert ready.wait(30)
        return real_take(block)

    sched._take = take
    sched.start()
    try:
        for job in jobs:
            sched.submit(job)
        ready.set()
        wait_over(jobs)
    finally:
        ready.set()
        sched.stop()
    return jobs


def counting_prefills(monkeypatch, context) -> list:
    """Record the batch size of every prefill of `context`."""
    sizes, real = [], context.prefill

    def prefill(ids, *a, **k):
        sizes.append(ids.shape[0])
        return real(ids, *a, **k)

    monkeypatch.setattr(context, "prefill", prefill)
    return sizes


@pytest.mark.parametrize("family", ["nemotron_h", "llama"])
def test_requests_waiting_together_are_prefilled_in_one_forward(served, monkeypatch, family):
    """The requests a batch takes at one boundary share one left-padded prefill (not one each); prompts of
    other lengths, greedy and seeded rows, AR and speculative: each output is still what it is alone (on a
    RoPE family too, whose padded rows must keep their logical positions)."""
    from conftest import make_family_towers

    from twotower.model import TwoTowerLM
    from twotower.serving.scheduler import Job, Scheduler

    if family == "llama":
        ctx, den = make_family_towers("llama", seed=4, vocab_size=260)
        model = TwoTowerLM(ctx.config, block_size=8, context=ctx, denoiser=den).eval()
        served = SimpleNamespace(model=model, settings=served.settings)
    sizes = counting_prefills(monkeypatch, served.model.context)
    bodies = [{"prompt": p, "max_tokens": 6 + i, "decoder": d, **extra}
              for i, (p, d, extra) in enumerate([
                  ("ab", "speculative", {}), ("def f(x):\n", "speculative", {}), ("x", "ar", {}),
                  ("hello world", "speculative", {"temperature": 0.9, "seed": 3}), ("0123456", "ar", {}),
                  ("q = [", "speculative", {}), ("import os", "ar", {"temperature": 0.7, "seed": 5}),
                  ("zz", "speculative", {})])]
    jobs = [Job(parse(served, b), TOK, [TOK.eos_token_id]) for b in bodies]
    submitted_together(Scheduler(Towers.of(served.model), max_batch=4), jobs)
    # First boundary: the 4 speculative rows that fit in one prefill, the 3 AR rows in another; the fifth
    # speculative row joins alone once a row is free. Not one prefill per request.
    assert sorted(sizes) == [1, 3, 4], sizes
    for b, j in zip(bodies, jobs):
        assert j.error is None and j.text == served_alone(served, b, TOK), b


def test_a_group_that_would_not_fit_padded_is_admitted_one_by_one(served, monkeypatch):
    """A short prompt asking for many tokens beside a long prompt: padded to the long one, the pair would pass
    the context limit that neither passes alone, so each is prefilled alone, and both are served."""
    import dataclasses

    from twotower.decoding.checks import length_limit
    from twotower.serving.scheduler import Job, Scheduler

    limit, _ = length_limit(served.model.context)
    sizes = counting_prefills(monkeypatch, served.model.context)
    long_ids, short_ids = [5 + i % 200 for i in range(limit - 8)], [7, 8, 9]
    reqs = [dataclasses.replace(parse(served, {"prompt": "a", "decoder": "ar"}), prompt_ids=ids, max_tokens=n)
            for ids, n in ((long_ids, 4), (short_ids, 24))]
    assert len(long_ids) + 24 > limit and len(short_ids) + 24 <= limit and len(long_ids) + 4 <= limit
    jobs = submitted_together(Scheduler(Towers.of(served.model), max_batch=4),
                                  [Job(r, TOK, []) for r in reqs])
    assert sizes == [1, 1]  # recorded before the references below prefill too
    for req, job in zip(reqs, jobs):
        want = Autoregressive().generate(served.model, torch.tensor([req.prompt_ids]), max_new_tokens=req.max_tokens)
        assert job.error is None and job.tokens == want.new_tokens[0].tolist()


def test_a_users_split_decoder_overlaps_on_a_mirror(served):
    """With a denoiser mirror and `overlap`, DraftVerify's `draft` runs on the denoiser's thread beside
    another batch's `advance`; outputs are unchanged."""
    from twotower.serving.scheduler import Scheduler

    towers = Towers.of(served.model)
    towers.denoiser_device = "cpu"
    bodies = [{"prompt": p, "max_tokens": 6 + 2 * i, "decoder": "test_dv"}
              for i, p in enumerate(["ab", "cd", "ef", "gh"])]
    sched = Scheduler(towers, max_batch=2, overlap=True)
    jobs = run_scheduler(sched, served, [parse(served, b) for b in bodies])
    assert sched.overlapped > 0
    for b, j in zip(bodies, jobs):
        assert j.error is None and j.text == served_alone(served, b, TOK), b


def test_an_old_style_decoder_generates_but_the_server_names_what_to_implement(served, model):
    import dataclasses

    from twotower.serving.requests import RequestError, ServeSettings
    from twotower.serving.scheduler import Scheduler
    from twotower.serving.stepper import Stepper

    out = OldStyle().generate(model, torch.tensor([[5, 6, 7]]), max_new_tokens=4)
    assert torch.equal(out.new_tokens, Autoregressive().generate(model, torch.tensor([[5, 6, 7]]),
                                                                 max_new_tokens=4).new_tokens)
    message = r"OldStyle implements only _decode; .*prefill\(state\) and advance\(state, drafted\)"
    with pytest.raises(TypeError, match=message):
        Stepper.key(OldStyle(), Towers.of(model))
    with pytest.raises(TypeError, match=message):
        OldStyle().start(model, torch.tensor([[5, 6]]), max_new_tokens=2)
    register_decoder("test_old_style", OldStyle)
    with pytest.raises(RequestError, match=r"decoder 'test_old_style' cannot be served: OldStyle .*prefill\(state\)"):
        parse(served, {"prompt": "ab", "decoder": "test_old_style"})  # a 400 naming what to implement
    with pytest.raises(ValueError, match="cannot be served"):
        ServeSettings(decoder="test_old_style").check(8)
    # A request whose decoder object is set directly (no name) fails at scheduling, naming it too.
    req = dataclasses.replace(parse(served, {"prompt": "ab", "max_tokens": 4}), decoder=OldStyle())
    job, = run_scheduler(Scheduler(Towers.of(served.model)), served, [req])
    assert job.error.startswith("cannot schedule this request") and "prefill(state)" in job.error


# ---- one registry ---------------------------------------------------------------------------------------


def test_every_name_that_worked_before_still_resolves():
    names = registered_decoders()
    for name, cls in [("speculative", Speculative), ("diffusion", MaskDiffusion), ("ar", Autoregressive),
                      ("mock_ar", MockAR), ("tolerant", TolerantSpeculative), ("mask_diffusion", MaskDiffusion),
                      ("autoregressive", Autoregressive), ("twotower.decoding.MaskDiffusion", MaskDiffusion)]:
        assert decoder_class(name) is cls and (name in names or "." in name)
    d = build_decoder("diffusion", threshold=0.7, block_size=8, steps_per_block=4)
    assert isinstance(d.sampler, ConfidenceThreshold) and d.sampler.threshold == 0.7
    lenient = build_decoder("ar", strict=False, threshold=0.5, block_size=8, temperature=0.5)
    assert type(lenient) is Autoregressive and lenient.temperature == 0.5


def test_unknown_names_and_clashes_are_refused_naming_the_fix():
    from twotower.serving.requests import RequestError, ServeSettings

    with pytest.raises(ValueError, match=r"unknown decoder 'beam'.*'ar'.*'speculative'.*register_decoder"):
        decoder_class("beam")
    with pytest.raises(ValueError, match="already registered for Autoregressive"):
        register_decoder("ar", Pairs)
    with pytest.raises(TypeError, match="needs a twotower.decoding.Decoder subclass"):
        register_decoder("x", int)
    with pytest.raises(ValueError, match="takes no setting"):
        build_decoder("ar", block_size=8)
    with pytest.raises(ValueError, match="unknown decoder 'beam'"):
        ServeSettings(decoder="beam").check(8)
    srv = SimpleNamespace(settings=ServeSettings())
    with pytest.raises(RequestError, match="unknown decoder 'twotower.decoding.Speculative'"):
        parse(srv, {"prompt": "a", "decoder": "twotower.decoding.Speculative"})  # no imports on a client's word


# ---- the contract the base class enforces -------------------------------------------------------------


def test_a_row_with_no_token_is_an_error(model):
    class Nothing(Pairs):
        def advance(self, state, drafted):
            state.count_forward()
            state.keep([])  # every row leaves without a token

    with pytest.raises(RuntimeError, match=r"Nothing generated no token for row\(s\) \[0, 1\]"):
        Nothing().generate(model, torch.tensor([[5, 6], [7, 8]]), max_new_tokens=3)


def test_num_generated_wider_than_new_tokens_is_an_error(model):
    class Narrow(OldStyle):
        def _decode(self, call):
            out = super()._decode(call)
            T = call.input_ids.shape[1]
            return GenerationOutput(out.sequences[:, : T + 2], out.new_tokens[:, :2], out.num_generated, out.nfe,
                                    out.tokens_per_nfe, out.seconds)

    with pytest.raises(RuntimeError, match=r"num_generated up to 5 but returned only 2 new token columns"):
        Narrow().generate(model, torch.tensor([[5, 6]]), max_new_tokens=5)


def test_a_step_callback_the_decoder_never_calls_is_an_error(model):
    class Silent(Pairs):
        def notify(self, state, logits, pair):
            pass

    ids = torch.tensor([[5, 6]])
    calls = []
    Pairs().generate(model, ids, max_new_tokens=4, step_callback=lambda *a: calls.append(a))
    assert len(calls) == 2
    with pytest.raises(RuntimeError, match="Silent was given a step_callback but step 0 ran a network forward"):
        Silent().generate(model, ids, max_new_tokens=4, step_callback=lambda *a: None)
    with pytest.raises(RuntimeError, match="OldStyle was given a step_callback and ran 4 network forward"):
        OldStyle().generate(model, ids, max_new_tokens=4, step_callback=lambda *a: None)
    Silent().generate(model, ids, max_new_tokens=4)  # no callback, nothing to call


# ---- a random-order sampler honours generate(generator=...) ----------------------------------------------


class RandomOrder(Sampler):
    """Commit two masked positions a step, chosen at random from the call's generator."""

    def select(self, confidence, candidates, masked, *, step, steps_per_block, logits=None, generator=None):
        score = torch.rand(masked.shape, generator=generator, device=masked.device)
        return commit_top_n(score, masked, 2)


class OldSampler(Sampler):
    """A sampler written before `select` took a generator."""

    def select(self, confidence, candidates, masked, *, step, steps_per_block, logits=None):
        return commit_top_n(confidence, masked, 1)


def test_a_random_order_sampler_is_seeded_by_the_call(model):
    decoder = MaskDiffusion(RandomOrder(), block_size=8, steps_per_block=8)
    ids, mask = left_pad(random_prompts([5, 3], seed=2))

    def run(seed):
        torch.manual_seed(1000 + seed)  # the global RNG differs on every run: only the generator may matter
        return decoder.generate(model, ids, mask, max_new_tokens=16, generator=torch.Generator().manual_seed(seed))

    a, b = run(0), run(0)
    assert torch.equal(a.new_tokens, b.new_tokens) and torch.equal(a.nfe, b.nfe)
    assert any(not torch.equal(a.new_tokens, run(s).new_tokens) for s in (1, 2, 3))
    assert not torch.any(a.new_tokens == MASK)
    old = MaskDiffusion(OldSampler(), block_size=4, steps_per_block=4)
    legacy = old.generate(model, ids, mask, max_new_tokens=8, generator=torch.Generator())
    assert legacy.num_generated.tolist() == [8, 8]


# ---- the released step callback's t at a block's start --------------------------------------------------


@pytest.mark.parametrize("shifted", [False, True])
def test_released_callback_t_at_block_start_is_the_masked_fraction(shifted):
    """An unshifted block starts all [MASK] (t = 1); a shifted model's position 0 is the context
    tower's own token, so n - 1 of n positions are masked: t = (n - 1) / n, the t the denoiser gets."""
    model = make_model(seed=3, block_size=4)
    model.shifted = shifted
    given = []
    real = model.denoiser.forward_block

    def spy(x, cache, t):
        given.append(float(t[0]))
        return real(x, cache, t)

    model.denoiser.forward_block = spy
    starts = []

    def cb(step, steps_per_block, xt, t=None, logits=None, block_idx=None):
        if logits is None:
            starts.append(t)

    model.generate_mask_diffusion(torch.tensor([[5, 6, 7]]), max_new_tokens=8, block_size=4, steps_per_block=4,
                                  step_callback=cb)
    want = 3 / 4 if shifted else 1.0
    assert starts == [want, want] and given[0] == want


def test_rows_of_one_generate_call_cannot_take_more_rows(model):
    """`TrackedRows` is one call's fixed-size tracker: joining is refused (naming the bookkeeping that
    supports it) and leaves the state as it was."""
    a = Autoregressive().start(model, torch.tensor([[5, 6, 7]]), max_new_tokens=3)
    b = Autoregressive().start(model, torch.tensor([[8, 9]]), max_new_tokens=3)
    with pytest.raises(TypeError, match="TrackedRows cannot take more rows.*JobRows"):
        a.join(b)
    assert len(a) == 1 and a.cache.batch_size == 1
    while not a.done:
        a.decoder.step(a)
    assert torch.equal(a.output().new_tokens, Autoregressive().generate(model, torch.tensor([[5, 6, 7]]),
                                                                        max_new_tokens=3).new_tokens)


def test_every_built_in_sampler_takes_the_generator():
    import inspect

    import twotower.samplers as samplers

    built_in = [c for c in vars(samplers).values()
                if inspect.isclass(c) and issubclass(c, Sampler) and not inspect.isabstract(c)]
    assert len(built_in) >= 5
    for cls in built_in:
        assert "generator" in inspect.signature(cls.select).parameters, cls.__name__
