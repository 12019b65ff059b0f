"""`twotower.testing`: the contract checks a user runs on a plug-in, run here on every built-in.

* `check_family` over every registered family, `check_decoder` over every registered decoder (greedy,
  and sampling where the decoder samples), `check_sampler` over every built-in sampler,
  `check_time_conditioning` over the built-in time conditionings;
* deliberately broken families, decoders, samplers and a time conditioning, defined here, fail with
  an AssertionError that names what broke (the plug-in package of test_plugins.py runs the same
  checks and passes).
"""

from __future__ import annotations

import inspect

import pytest
import torch
from transformers import LlamaConfig

import twotower.samplers as samplers
from twotower.decoding import Decoder, registered_decoders
from twotower.time_embedding import TimeConditioning
from twotower.testing import (MASK, check_decoder, check_family, check_sampler, check_time_conditioning,
                              tiny_config, tiny_model)
from twotower.towers.base import TowerFamily, registered_families
from twotower.towers.llama import LlamaContextTower, LlamaDenoiserTower


def _decoder_classes() -> list[type[Decoder]]:
    """Every class registered by name, once."""
    return sorted(set(registered_decoders().values()), key=lambda c: c.__name__)


def _takes(cls, arg: str) -> bool:
    return arg in inspect.signature(cls.__init__).parameters


@pytest.fixture(scope="module")
def model():
    """One tiny model for the decoder checks (what `check_decoder` builds when given none)."""
    return tiny_model("llama", block_size=4)


# ---- the built-ins pass -----------------------------------------------------------------------------


@pytest.mark.parametrize("model_type", sorted(registered_families()))
def test_every_registered_family_passes_check_family(model_type):
    check_family(model_type)


@pytest.mark.parametrize("cls", _decoder_classes(), ids=lambda c: c.__name__)
def test_every_registered_decoder_passes_check_decoder(cls, model):
    check_decoder(cls(), model)
    if _takes(cls, "temperature"):
        check_decoder(cls(temperature=0.8), model, seed=3)


def test_check_decoder_builds_its_own_tiny_model():
    from twotower.decoding import Speculative

    check_decoder(Speculative(block_size=3))


@pytest.mark.parametrize("cls", [c for c in vars(samplers).values() if inspect.isclass(c)
                                 and issubclass(c, samplers.Sampler) and not inspect.isabstract(c)],
                         ids=lambda c: c.__name__)
def test_every_built_in_sampler_passes_check_sampler(cls):
    check_sampler(cls())


@pytest.mark.parametrize("path", ["twotower.time_embedding.AdaLNSingle", "twotower.time_embedding.NoTimeConditioning"])
def test_built_in_time_conditionings_pass(path):
    check_time_conditioning({"class_path": path})


def test_tiny_config_names_what_to_pass_for_a_config_it_cannot_build():
    class Picky(LlamaConfig):
        """A config that takes none of the tiny keyword arguments."""
        model_type = "picky"

        def __init__(self, *, only_this: int):
            super().__init__()

    family = TowerFamily(model_type="picky", config_class=Picky, context=LlamaContextTower,
                         denoiser=LlamaDenoiserTower, embed_key="embed_tokens.weight", hf_architecture="none")
    with pytest.raises(ValueError, match=r"tiny Picky for 'picky'.*pass config="):
        tiny_config(family)


# ---- broken families fail, naming what broke --------------------------------------------------------


class BrokenConfig(LlamaConfig):
    """Llama's config under a model_type of its own (never registered: the checks take the family)."""
    model_type = "broken_llama"


class LateBlocks(LlamaContextTower):
    """A context tower whose multi-token extends after the prompt drift (a wrong position offset)."""

    def _forward_cached(self, ids, valid, padded, cache, offset, provisional=False):
        hidden = super()._forward_cached(ids, valid, padded, cache, offset, provisional)
        return hidden * 1.01 if offset > 0 and ids.shape[1] > 1 else hidden


class KeepsOne(LlamaContextTower):
    """A context tower whose `accept` keeps one token of every row, whatever it is told."""

    def accept(self, cache, keep):
        super().accept(cache, keep.clamp(max=1))


def _broken(context) -> TowerFamily:
    return TowerFamily(model_type="broken_llama", config_class=BrokenConfig, context=context,
                       denoiser=LlamaDenoiserTower, embed_key="embed_tokens.weight", hf_architecture="LlamaForCausalLM")


def test_a_family_with_wrong_extends_fails_naming_the_extend():
    with pytest.raises(AssertionError, match=r"broken_llama: extend of 6 token\(s\) at 7 vs the full forward: "
                                             r"max abs error"):
        check_family(_broken(LateBlocks))


def test_a_family_with_a_wrong_accept_fails_naming_the_row():
    with pytest.raises(AssertionError, match=r"broken_llama: row 1 after accept\(keep=4\) vs the kept tokens alone"):
        check_family(_broken(KeepsOne))


# ---- broken decoders fail, naming what broke --------------------------------------------------------


class FirstRowPairs(Decoder):
    """Two tokens per context forward, every row taking row 0's choice: rows depend on their batch."""

    uses_denoiser = False

    def prefill(self, state):
        logits, state.cache = state.call.context.prefill(state.call.input_ids, state.call.valid, logits="last")
        state.carry["logits"] = logits[:, -1]

    def advance(self, state, drafted):
        logits = state.carry["logits"]
        pair = self.pick(state, logits)[:, None].repeat(1, 2)
        state.count_forward()
        if state.step_callback is not None:
            state.step_callback(state.iterations, 0, None, logits[:, None], pair)
        state.commit(pair)
        pair, = state.drop_finished(pair)
        if not state.done:
            state.carry["logits"] = state.call.context.extend(state.cache, pair, logits="last")[:, -1]

    def pick(self, state, logits):
        return state.choose(logits)[:1].expand(logits.shape[0])


class Pairs(FirstRowPairs):
    """FirstRowPairs done right: each row its own choice."""

    def pick(self, state, logits):
        return state.choose(logits)


class SilentPairs(Pairs):
    """Counts its forwards but never calls the step callback."""

    def advance(self, state, drafted):
        callback, state.step_callback = state.step_callback, None
        try:
            super().advance(state, drafted)
        finally:
            state.step_callback = callback


class LastOnSelf(Decoder):
    """Keeps a per-row tensor on the decoder instead of `state.carry`: right in `generate` (one
    state), wrong once the server joins rows started apart."""

    uses_denoiser = False

    def prefill(self, state):
        _, state.cache = state.call.context.prefill(state.call.input_ids, state.call.valid, logits="none")
        self.last = state.call.input_ids[:, -1:]

    def advance(self, state, drafted):
        state.commit(self.last.expand(len(state), 2))  # finished rows stay until state.done


def test_pairs_done_right_passes(model):
    check_decoder(Pairs(), model)


def test_a_decoder_whose_rows_depend_on_the_batch_fails(model):
    with pytest.raises(AssertionError, match=r"FirstRowPairs: row 1 made \d+ tokens in the batch, \d+ alone"):
        check_decoder(FirstRowPairs(), model)


def test_a_decoder_that_never_calls_the_step_callback_fails(model):
    with pytest.raises(AssertionError, match=r"SilentPairs.generate\(.*\) raised RuntimeError: SilentPairs was given "
                                             r"a step_callback but step 0 ran a network forward"):
        check_decoder(SilentPairs(), model)


def test_a_decoder_that_keeps_rows_on_itself_fails_in_the_server(model):
    with pytest.raises(AssertionError, match=r"LastOnSelf: request 0 served in a batch made \[.*\], alone \["):
        check_decoder(LastOnSelf(), model)


def test_a_decoder_that_emits_mask_fails():
    class Masks(Pairs):
        def pick(self, state, logits):
            return torch.full((logits.shape[0],), MASK)

    with pytest.raises(AssertionError, match=r"Masks emitted \[MASK\] \(id 3\)"):
        check_decoder(Masks())


class NoCache(Decoder):
    """The prompt's last token twice per step, with no cache: fine in `generate`, but the server joins
    rows by their caches."""

    uses_denoiser = False

    def prefill(self, state):
        state.carry["last"] = state.call.input_ids[:, -1:]

    def advance(self, state, drafted):
        state.commit(state.carry["last"].repeat(1, 2))
        state.drop_finished()


def test_a_decoder_without_a_cache_fails_naming_the_fix(model):
    with pytest.raises(AssertionError, match=r"NoCache.prefill left state.cache None: the server joins rows by "
                                             r"their caches; set state.cache in prefill"):
        check_decoder(NoCache(), model)


# ---- a broken sampler and time conditioning fail, naming what broke --------------------------------


class GlobalRandom(samplers.Sampler):
    """Commits two random masked positions a step, drawn from the global RNG instead of `generator`."""

    def select(self, confidence, candidates, masked, *, step, steps_per_block, logits=None, generator=None):
        return samplers.commit_top_n(torch.rand(masked.shape), masked, 2)


class Everything(samplers.Sampler):
    """Commits every position, masked or not."""

    def select(self, confidence, candidates, masked, *, step, steps_per_block, logits=None, generator=None):
        return torch.ones_like(masked)


def test_a_sampler_drawing_from_the_global_rng_fails():
    with pytest.raises(AssertionError, match=r"GlobalRandom: commits of a block of 3 steps, seed 0, again: row"):
        check_sampler(GlobalRandom())


def test_a_sampler_committing_unmasked_positions_fails():
    with pytest.raises(AssertionError, match=r"Everything.select at step 0 committed positions that are not masked: "
                                             r"\[\[2, 5\]"):
        check_sampler(Everything())


class TooFew(TimeConditioning):
    """One modulation short of the denoiser's sub-blocks."""

    def forward(self, t):
        t = t[None] if t.dim() == 0 else t
        one = torch.ones(*t.shape, 1, self.hidden_size)
        return [(one * 0, one, one)] * (self.num_layers - 1)


def test_a_time_conditioning_with_too_few_modulations_fails():
    with pytest.raises(AssertionError, match=r"test_testing.TooFew: 5 modulations for the denoiser's 6 modulated"):
        check_time_conditioning(TooFew)
