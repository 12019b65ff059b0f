"""Decoders as plug-ins: the contract every `Decoder` subclass in the package honours, the released
mock-AR mode against an independent slow computation, the drop-in method signatures and callback,
top-k / top-p processors, `TwoTowerLM.generate` with a decoder, and the embedded default's greedy
tokens against those recorded before decoders existed (tests/data/decoder_golden.json)."""

from __future__ import annotations

import importlib
import inspect
import json
import pkgutil
from pathlib import Path

import pytest
import torch
from conftest import MASK, PAD, left_pad, make_model, random_prompts, run_decoder

import twotower.decoding as decoding
from twotower.decoding import (Autoregressive, Decoder, GenerationOutput, MaskDiffusion, MockAR, Speculative,
                               StopStrings, TokenChooser, TopK, TopP, Towers)
from twotower.model import TwoTowerLM
from twotower.samplers import ConfidenceThreshold, TopKCommit
from twotower.samplers import MockAR as MockARSampler

GOLDEN = Path(__file__).parent / "data" / "decoder_golden.json"


def all_decoders() -> list[type[Decoder]]:
    """Every concrete Decoder subclass defined in twotower.decoding (a new one is picked up here)."""
    for info in pkgutil.iter_modules(decoding.__path__):
        importlib.import_module(f"twotower.decoding.{info.name}")
    found, todo = set(), [Decoder]
    while todo:
        for sub in todo.pop().__subclasses__():
            todo.append(sub)
            if not inspect.isabstract(sub) and sub.__module__.startswith("twotower.decoding"):
                found.add(sub)
    return sorted(found, key=lambda c: c.__name__)


DECODERS = all_decoders()


def test_every_built_in_decoder_is_found():
    assert {c.__name__ for c in DECODERS} >= {"MaskDiffusion", "Speculative", "MockAR", "Autoregressive"}


@pytest.fixture(scope="module")
def model() -> TwoTowerLM:
    return make_model(seed=3, block_size=4)


# ---- the contract, for every decoder ------------------------------------------------------------


@pytest.mark.parametrize("cls", DECODERS, ids=lambda c: c.__name__)
def test_decoder_contract(cls, model):
    decoder = cls()  # every decoder has usable defaults (a recipe may give just the class_path)
    ids, mask = left_pad(random_prompts([5, 2, 7], seed=11))
    out = decoder.generate(model, ids, mask, max_new_tokens=10)
    assert isinstance(out, GenerationOutput)
    assert torch.equal(out.sequences[:, : ids.shape[1]], ids)  # the prompt comes back as given
    assert out.new_tokens.shape == (3, 10) and out.num_generated.tolist() == [10, 10, 10]
    assert torch.all(out.nfe >= 1) and torch.allclose(out.tokens_per_nfe, 10 / out.nfe.float())
    if decoder.uses_denoiser:
        assert not torch.any(out.new_tokens == MASK)
    # Rows do not depend on the batch they are in.
    for r, p in enumerate(random_prompts([5, 2, 7], seed=11)):
        alone = decoder.generate(model, p[None], max_new_tokens=10)
        assert torch.equal(alone.new_tokens[0], out.new_tokens[r]), f"row {r}"
    # An EOS id ends a row: its count stops at the EOS and pad follows.
    eos = int(out.new_tokens[0, 2])
    cut = decoder.generate(model, ids, mask, max_new_tokens=10, eos_token_id=eos)
    n0 = int(cut.num_generated[0])
    assert n0 <= 3 and int(cut.new_tokens[0, n0 - 1]) == eos and torch.all(cut.new_tokens[0, n0:] == PAD)
    for r in range(3):
        n = int(cut.num_generated[r])
        assert torch.equal(cut.new_tokens[r, :n], out.new_tokens[r, :n])
    # A stop string ends its row early, also when it spans two blocks (positions 3-4, blocks of 4);
    # the text before it is unchanged, and rows without it are untouched.
    decode = lambda ids: "".join(f"<{i}>" for i in ids)  # noqa: E731
    stopper = StopStrings(decode, [decode(out.new_tokens[0, 3:5].tolist())])
    st = decoder.generate(model, ids, mask, max_new_tokens=10, stop=stopper)
    for r in range(3):
        full, text = decode(out.new_tokens[r].tolist()), decode(st.new_tokens[r, : st.num_generated[r]].tolist())
        if stopper.strings[0] in full:
            assert stopper.strings[0] in text and stopper.truncate(text) == stopper.truncate(full), r
        else:
            assert text == full, r
    assert int(st.num_generated[0]) < 10
    # The step callback fires once per forward that `nfe` counts (batch 1, no EOS).
    calls = []
    one = decoder.generate(model, ids[2:], max_new_tokens=7, step_callback=lambda *a: calls.append(a))
    assert len(calls) == int(one.nfe[0])
    # Seeded sampling repeats; another seed differs; top_k=1 sampling is greedy.
    hot = cls(temperature=1.5)
    a, b, c = (hot.generate(model, ids, mask, max_new_tokens=10, generator=torch.Generator().manual_seed(s))
               for s in (0, 0, 1))
    assert torch.equal(a.new_tokens, b.new_tokens) and not torch.equal(a.new_tokens, c.new_tokens)
    k1 = cls(temperature=1.5, top_k=1).generate(model, ids, mask, max_new_tokens=10,
                                                generator=torch.Generator().manual_seed(0))
    assert torch.equal(k1.new_tokens, out.new_tokens)
    # Bad arguments are refused by the base class, naming the value.
    with pytest.raises(ValueError, match="max_new_tokens must be an int >= 1, got 0"):
        decoder.generate(model, ids, mask, max_new_tokens=0)
    with pytest.raises(ValueError, match="left padding"):
        decoder.generate(model, ids, mask.flip(1), max_new_tokens=3)
    with pytest.raises(ValueError, match="temperature must be >= 0"):
        cls(temperature=-1)
    with pytest.raises(ValueError, match="top_p must be a number in"):
        cls(top_p=0.0)


def test_the_base_class_enforces_the_output_contract(model):
    class Broken(Decoder):
        uses_denoiser = False

        def _decode(self, call):
            out = Autoregressive()._decode(call)
            out.num_generated += 100  # claims more tokens than were asked for
            return out

    with pytest.raises(RuntimeError, match="Broken generated between"):
        Broken().generate(model, torch.tensor([[5, 6]]), max_new_tokens=3)

    class NotAnOutput(Decoder):
        def _decode(self, call):
            return call.input_ids

    with pytest.raises(RuntimeError, match="must return a GenerationOutput"):
        NotAnOutput().generate(model, torch.tensor([[5, 6]]), max_new_tokens=3)


def test_a_users_decoder_subclass_runs_everywhere_a_decoder_does(model):
    class GreedyTwice(Decoder):
        """Each step: the context tower's greedy token, written twice (a toy, but a real loop)."""

        uses_denoiser = False

        def _decode(self, call):
            logits, cache = call.context.prefill(call.input_ids, call.valid, logits="last")
            tracker = call.tracker(spare=2)
            for _ in range((call.max_new_tokens + 1) // 2):
                tok = self.chooser(logits[:, -1], call.generator)[:, None]
                tracker.count_forward(None)
                pair = tok.repeat(1, 2)
                tracker.commit(pair, torch.full((pair.shape[0],), 2))
                logits = call.context.extend(cache, pair, logits="last")
            return tracker.output(call.input_ids, blocks=0)

    out = model.generate(torch.tensor([[5, 6, 7]]), decoder=GreedyTwice(), max_new_tokens=5)
    assert out.num_generated.tolist() == [5] and out.new_tokens[0, 0] == out.new_tokens[0, 1]
    assert out.nfe.tolist() == [3]


# ---- the released mock-AR mode ------------------------------------------------------------------


def slow_mock_ar(context, denoiser, prompt: torch.Tensor, n: int) -> torch.Tensor:
    """An independent computation of mock-AR: every step recomputes everything from scratch with
    the all-blocks training forward at block size 1 (each position attends to the context tower's
    K,V of the positions before it and to itself; its Mamba layers start from the context states
    after the previous position) with no time conditioning, and takes the last position's argmax."""
    seq = prompt.clone()
    for _ in range(n):
        with torch.no_grad():
            _, states = context.forward_train(seq, block_size=1)
            logits = denoiser.forward_train(seq, states, None)
        seq = torch.cat([seq, logits[:, -1].argmax(-1, keepdim=True)], 1)
    return seq[:, prompt.shape[1]:]


def test_mock_ar_equals_an_independent_slow_computation():
    # A denoiser that is NOT the AR model (time modules unused).
    model = make_model(seed=21, block_size=16, denoiser_seed=22)
    prompts = random_prompts([6, 1, 9], seed=21)  # a one-token prompt: the empty-cache start
    ids, mask = left_pad(prompts)
    out = model.generate(ids, mask, MockAR(), max_new_tokens=12)
    ar = model.generate(ids, mask, Autoregressive(), max_new_tokens=12)
    assert not torch.equal(out.new_tokens, ar.new_tokens)  # the denoiser's weights decide
    for r, p in enumerate(prompts):
        assert torch.equal(out.new_tokens[r], slow_mock_ar(model.context, model.denoiser, p[None], 12)[0]), r
    assert out.nfe.tolist() == [12, 12, 12]


def test_mock_ar_ignores_time_conditioning(monkeypatch):
    model = make_model(seed=23, block_size=4)
    seen = []
    real = model.denoiser.forward_block
    monkeypatch.setattr(model.denoiser, "forward_block", lambda x, cache, t=None, **kw: (
        seen.append((x.shape[1], t, cache.length)), real(x, cache, t, **kw))[1])
    model.generate(torch.tensor([[5, 6, 7, 8]]), decoder=MockAR(), max_new_tokens=3)
    # One clean token per forward, no t, over a cache that trails it by one position.
    assert seen == [(1, None, 3), (1, None, 4), (1, None, 5)]


def test_identity_initialised_mock_ar_is_ar():
    # Random time modules: t is not used by mock-AR, so this changes nothing.
    model = make_model(seed=24, block_size=16, time_seed=25, time_scale=0.2)
    ids, mask = left_pad(random_prompts([3, 8, 1], seed=24))
    mock = model.generate_mock_ar(ids, 16, attention_mask=mask, return_dict=True)
    ar = model.generate_ar(ids, 16, attention_mask=mask, return_dict=True)
    assert torch.equal(mock.sequences, ar.sequences)


def test_mock_ar_two_device_mirror_path_equals_shared_cache():
    model = make_model(seed=26)
    ids, mask = left_pad(random_prompts([4, 7], seed=26))
    free = model.generate(ids, mask, MockAR(), max_new_tokens=9)
    eos = int(free.new_tokens[0, 3])
    for e in (None, eos):
        shared = model.generate(ids, mask, MockAR(), max_new_tokens=9, eos_token_id=e)
        towers = Towers(model.context, model.denoiser, mask_token_id=MASK, denoiser_device="cpu")
        mirrored = MockAR().generate(towers, ids, mask, max_new_tokens=9, eos_token_id=e)
        assert torch.equal(shared.sequences, mirrored.sequences)


# ---- the drop-in methods ------------------------------------------------------------------------


def _signature(fn) -> list[tuple[str, object]]:
    return [(p.name, p.default) for p in inspect.signature(fn).parameters.values()
            if p.kind in (p.POSITIONAL_OR_KEYWORD,)]


def test_released_method_signatures():
    E = inspect.Parameter.empty
    assert _signature(TwoTowerLM.generate_mask_diffusion) == [
        ("self", E), ("input_ids", E), ("max_new_tokens", 128), ("block_size", 16), ("steps_per_block", 16),
        ("mask_token_id", 3), ("temperature", 0.0), ("top_k", None), ("confidence_threshold", 0.9),
        ("eos_token_id", None), ("step_callback", None)]
    released_ar = [("self", E), ("input_ids", E), ("max_new_tokens", 128), ("temperature", 0.0), ("top_k", None),
                   ("top_p", None), ("eos_token_id", None)]
    assert _signature(TwoTowerLM.generate_mock_ar) == released_ar
    assert _signature(TwoTowerLM.generate_ar) == released_ar


def test_drop_in_methods_are_the_decoders(model):
    ids, mask = left_pad(random_prompts([6, 3], seed=7))
    seq = model.generate_mask_diffusion(ids, 12, 4, 4, 3, 0.0, None, 0.5, attention_mask=mask)
    ref = model.generate(ids, mask, MaskDiffusion(ConfidenceThreshold(0.5), block_size=4, steps_per_block=4),
                         max_new_tokens=12)
    assert torch.equal(seq, ref.sequences)
    assert torch.equal(model.generate_mock_ar(ids, 12, attention_mask=mask),
                       model.generate(ids, mask, MockAR(), max_new_tokens=12).sequences)
    assert torch.equal(model.generate_ar(ids, 12, attention_mask=mask),
                       model.generate(ids, mask, Autoregressive(), max_new_tokens=12).sequences)
    spec = model.generate_speculative(ids, 12, attention_mask=mask, return_dict=True)
    assert torch.equal(spec.sequences, model.generate_ar(ids, 12, attention_mask=mask))
    # The shorthands build a MaskDiffusion; TopKCommit really changes the policy.
    topk = model.generate(ids, mask, sampler=TopKCommit(4), block_size=4, steps_per_block=4, max_new_tokens=12)
    assert topk.nfe.tolist() == [3, 3]


def test_released_step_callback_protocol(model):
    ids = torch.tensor([[5, 6, 7, 9, 11]])
    events = []

    def cb(step, steps_per_block, xt, t=None, logits=None, block_idx=None):
        events.append((block_idx, step, steps_per_block, xt.clone(), t, None if logits is None else logits.shape))

    out = model.generate_mask_diffusion(ids, max_new_tokens=8, block_size=4, steps_per_block=4,
                                        confidence_threshold=0.5, step_callback=cb, return_dict=True)
    per_block = {}
    for e in events:
        per_block.setdefault(e[0], []).append(e)
    assert sorted(per_block) == [0, 1] and len(events) == int(out.nfe[0]) + 2
    for b, evs in per_block.items():
        first = evs[0]
        assert first[1] == 0 and first[5] is None and first[4] == 1.0 and torch.all(first[3] == MASK)
        assert all(e[5] == (1, 4, 64) and e[2] == 4 for e in evs[1:])
        assert torch.equal(evs[1][3], first[3])  # the first step sees the block before its commits
        for e in evs[1:]:
            assert e[4] == pytest.approx(float((e[3] == MASK).float().mean()))
        masked = [int((e[3] == MASK).sum()) for e in evs[1:]]
        assert masked == sorted(masked, reverse=True) and masked[0] == 4


def test_drop_in_errors(model):
    x = torch.tensor([[5, 6, 9]])
    with pytest.raises(ValueError, match="mask_token_id=9 but this model's \\[MASK\\] id is 3"):
        model.generate_mask_diffusion(x, mask_token_id=9)
    with pytest.raises(ValueError, match=r"threshold must be in \(0, 1\]"):
        model.generate_mask_diffusion(x, confidence_threshold=1.5)
    with pytest.raises(ValueError, match=r"contains the \[MASK\] token id 3"):
        model.generate_mask_diffusion(torch.tensor([[5, MASK, 6]]))
    with pytest.raises(ValueError, match="block_size must be an int >= 1, got 0"):
        model.generate(x, block_size=0)
    with pytest.raises(ValueError, match="are MaskDiffusion settings"):
        model.generate(x, decoder=Speculative(), sampler=TopKCommit(2))
    with pytest.raises(ValueError, match="decoder must be a twotower.decoding.Decoder"):
        model.generate(x, decoder="speculative")
    with pytest.raises(ValueError, match="exceeds the model's max_position_embeddings = 512"):
        model.generate_ar(x, max_new_tokens=510)
    with pytest.raises(ValueError, match="speculative decoding needs block_size >= 2"):
        Speculative(block_size=1)
    with pytest.raises(ValueError, match="needs the denoiser tower"):
        MaskDiffusion().generate(Towers(model.context), x, max_new_tokens=2)


# ---- logits processors --------------------------------------------------------------------------


def test_stop_strings_truncate_at_the_earliest():
    stop = StopStrings(lambda ids: "".join(map(chr, ids)), ["\n\n", "def ", ""])
    assert stop.strings == ("\n\n", "def ")
    assert stop.truncate("x = 1\ndef f\n\n") == "x = 1\n" and stop.truncate("abc") == "abc"
    assert stop(torch.tensor([[100, 101, 102, 32, 0], [10, 10, 0, 0, 0]]), torch.tensor([3, 2])).tolist() == [False, True]
    assert stop(torch.tensor([[100, 101, 102, 32, 0]]), torch.tensor([4])).tolist() == [True]
    with pytest.raises(ValueError, match="stop strings must be str"):
        StopStrings(chr, ["a", 3])


def test_top_k_and_top_p_filters():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, 3.0]])
    assert torch.isfinite(TopK(2)(logits)).tolist() == [[True, False, False, False, True]]
    probs = logits.softmax(-1)[0]  # 0.64, 0.087, 0.032, 0.012, 0.236 (index 4 is the largest)
    keep = torch.isfinite(TopP(0.8)(logits))[0].tolist()
    # Ranked: 4 (0.64), 0 (0.236), ... 0.64 < 0.8, so token 0 is needed; 0.64 + 0.236 >= 0.8 stops.
    assert keep == [True, False, False, False, True] and float(probs[4] + probs[0]) >= 0.8
    assert torch.isfinite(TopP(0.5)(logits))[0].tolist() == [False, False, False, False, True]
    assert torch.equal(TopP(1.0)(logits), logits) and torch.equal(TopK(9)(logits), logits)


def test_top_p_sampling_draws_only_from_the_nucleus_in_proportion():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    chooser = TokenChooser(temperature=1.0, top_p=0.75)
    draws = chooser(logits.expand(20000, 4), torch.Generator().manual_seed(0))
    counts = torch.bincount(draws, minlength=4).float() / 20000
    assert counts[2] == 0 and counts[3] == 0  # 0.5 + 0.3 reaches 0.75: the nucleus is {0, 1}
    assert abs(float(counts[0]) - 0.5 / 0.8) < 0.02 and abs(float(counts[1]) - 0.3 / 0.8) < 0.02


def test_user_logits_processor_composes(model):
    class Forbid(decoding.LogitsProcessor):
        def __init__(self, token):
            self.token = token

        def __call__(self, logits):
            return logits.index_fill(-1, torch.tensor([self.token]), float("-inf"))

    ids = torch.tensor([[5, 6, 7]])
    greedy = model.generate(ids, decoder=Autoregressive(), max_new_tokens=6).new_tokens
    banned = int(greedy[0, 0])
    out = model.generate(ids, decoder=Autoregressive(temperature=0.5, logits_processors=[Forbid(banned)]),
                         max_new_tokens=6, generator=torch.Generator().manual_seed(0)).new_tokens
    assert not torch.any(out == banned)
    with pytest.raises(ValueError, match="LogitsProcessor instances"):
        Autoregressive(logits_processors=[lambda x: x])


# ---- parity with the code before decoders existed -----------------------------------------------


def embedded_default_outputs(golden: dict) -> dict:
    """{"outputs": ..., "sampled": ...} of the embedded default on the golden file's prompts: what the
    golden test compares, and what `python tests/test_decoders.py --record` writes when the shipped
    model changes on purpose."""
    from twotower.tokenizers import ByteTokenizer

    model = TwoTowerLM.from_pretrained(Path(__file__).parents[1] / "twotower" / "assets" / "twotower").eval()
    tok = ByteTokenizer()
    enc = [tok.encode(p, add_bos=True) for p in golden["prompts"]]
    ids, mask = left_pad([torch.tensor(e) for e in enc])
    eos, n = golden["eos_token_id"], golden["max_new_tokens"]
    row0 = torch.tensor([enc[0]])
    cases = {
        "ar": (Autoregressive(), ids, mask, eos),
        "diffusion_t0.8_b16": (MaskDiffusion(ConfidenceThreshold(0.8)), ids, mask, eos),
        "diffusion_t0.9_b8_s8": (MaskDiffusion(ConfidenceThreshold(0.9), block_size=8, steps_per_block=8),
                                 ids, mask, eos),
        "diffusion_topk2_b16": (MaskDiffusion(TopKCommit(2)), ids, mask, eos),
        "diffusion_noeos_t0.8": (MaskDiffusion(ConfidenceThreshold(0.8)), ids, mask, None),
        "speculative_b16": (Speculative(), ids, mask, eos),
        "speculative_b8_d2": (Speculative(block_size=8, draft_steps=2), ids, mask, eos),
        "mock_ar_sampler_b16": (MaskDiffusion(MockARSampler()), ids, mask, eos),  # the sampler, unchanged
        "ar_row0": (Autoregressive(), row0, None, eos),
        "diffusion_row0": (MaskDiffusion(), row0, None, eos),
    }
    outputs, sampled = {}, {}
    for name, (decoder, i, m, e) in cases.items():
        out = model.generate(i, m, decoder, max_new_tokens=n, eos_token_id=e)
        outputs[name] = [out.new_tokens[r, : out.num_generated[r]].tolist() for r in range(i.shape[0])]
    for name, decoder in {"ar_t0.7": Autoregressive(0.7), "diffusion_t0.8_temp0.7": MaskDiffusion(temperature=0.7),
                          "speculative_temp0.7": Speculative(temperature=0.7)}.items():
        out = model.generate(ids, mask, decoder, max_new_tokens=n, eos_token_id=eos,
                             generator=torch.Generator().manual_seed(123))
        sampled[name] = [out.new_tokens[r, : out.num_generated[r]].tolist() for r in range(4)]
    return {"outputs": outputs, "sampled": sampled}


def test_embedded_default_tokens_equal_the_recorded_ones():
    golden = json.loads(GOLDEN.read_text())
    got = embedded_default_outputs(golden)
    assert set(got["outputs"]) == set(golden["outputs"]) and set(got["sampled"]) == set(golden["sampled"])
    for kind in ("outputs", "sampled"):
        for name, rows in got[kind].items():
            assert rows == golden[kind][name], name
    # Whatever the denoiser, greedy speculative decoding is AR's output token for token.
    assert got["outputs"]["speculative_b16"] == got["outputs"]["ar"] == golden["outputs"]["ar"]


def test_run_decoder_helper_matches_the_model_path(model):
    # The bare-towers helper the other test files use gives what the model gives.
    ids, mask = left_pad(random_prompts([4, 6], seed=30))
    a = run_decoder(MaskDiffusion(block_size=4), model.context, model.denoiser, ids, mask, max_new_tokens=9)
    b = model.generate(ids, mask, MaskDiffusion(), max_new_tokens=9)  # the model's block size is 4
    assert torch.equal(a.sequences, b.sequences)


def test_decoding_imports_no_lightning():
    import subprocess
    import sys

    code = ("import sys, twotower.decoding, twotower.model; "
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('lightning', 'pytorch_lightning')); "
            "print(bad); sys.exit(1 if bad else 0)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


if __name__ == "__main__":  # re-record the golden file after a deliberate change of the shipped model
    import subprocess
    import sys

    if sys.argv[1:] != ["--record"]:
        raise SystemExit("usage: python tests/test_decoders.py --record   (rewrites tests/data/decoder_golden.json)")
    golden = json.loads(GOLDEN.read_text())
    golden.update(embedded_default_outputs(golden))
    golden["recorded_at_commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                                  text=True, cwd=Path(__file__).parent).stdout.strip()
    GOLDEN.write_text(json.dumps(golden))
    print(f"wrote {GOLDEN}")
