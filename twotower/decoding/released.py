"""The released model's generation methods, as drop-in aliases over the decoders.

`TwoTowerLM` inherits `ReleasedGenerationMixin`, so code written for NVIDIA's released model
runs unchanged: the same method names, positional arguments and defaults, returning the token
sequences (B, T + N). Our additions are keyword-only (`attention_mask`, `generator`,
`return_dict=True` for the full `GenerationOutput`).

The released step callback is called as `step_callback(step, steps_per_block, xt, t=..., logits=...,
block_idx=...)`: once per block before its first step (logits=None, xt the initial block), then
after every step with the block as it was *before* that step's commits. `t` is one float, the
mean fraction of the block still masked over the rows still running (equal to the per-row t at
batch 1). At a block's start that is 1.0 for an unshifted model and (n - 1) / n for a shifted one,
whose position 0 holds the context tower's own token (the t the denoiser is given). `released_step_callback` adapts such a function to the decoders' richer callback.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from ..samplers import ConfidenceThreshold
from ..tokenizers import DEFAULT_MASK_TOKEN_ID
from .autoregressive import Autoregressive
from .base import StepCallback
from .diffusion import MaskDiffusion
from .mock_ar import MockAR
from .speculative import Speculative
from .tracker import GenerationOutput

__all__ = ["ReleasedGenerationMixin", "released_step_callback"]


def released_step_callback(fn: Callable, mask_token_id: int, steps_per_block: int) -> StepCallback:
    """Wrap a released-signature callback as a decoder step callback."""

    def callback(block_index: int, step: int, before: Tensor | None, logits: Tensor, after: Tensor) -> None:
        # The released callback gets t as a Python float: a host sync per step, paid only with a callback.
        t = float((before == mask_token_id).float().mean())
        # The released loop reported the untouched block once (logits=None) before its first step.
        if step == 0:
            fn(0, steps_per_block, before, t=t, logits=None, block_idx=block_index)
        fn(step, steps_per_block, before, t=t, logits=logits, block_idx=block_index)

    return callback


class ReleasedGenerationMixin:
    """generate_mask_diffusion / generate_mock_ar / generate_ar (released signatures) and
    generate_speculative, for a class with `generate(input_ids, attention_mask, decoder, ...)`
    and a `mask_token_id`."""

    def generate_mask_diffusion(self, input_ids: Tensor, max_new_tokens: int = 128, block_size: int = 16,
                                steps_per_block: int = 16, mask_token_id: int = DEFAULT_MASK_TOKEN_ID,
                                temperature: float = 0.0, top_k: int | None = None, confidence_threshold: float = 0.9,
                                eos_token_id: int | Sequence[int] | None = None, step_callback: Callable | None = None,
                                *, attention_mask: Tensor | None = None, generator: torch.Generator | None = None,
                                top_p: float | None = None, return_dict: bool = False) -> Tensor | GenerationOutput:
        """Mask diffusion with the confidence-threshold sampler (threshold in (0, 1]).

        mask_token_id must be the model's own (3 in the released model): a denoiser only knows the
        [MASK] id it was trained with, so another id is refused rather than silently misread.
        """
        # The released signature takes the id as an argument; it can only agree with the model's.
        if mask_token_id != self.mask_token_id:
            raise ValueError(f"mask_token_id={mask_token_id!r} but this model's [MASK] id is {self.mask_token_id}; "
                             f"pass mask_token_id={self.mask_token_id}")
        decoder = MaskDiffusion(ConfidenceThreshold(confidence_threshold), block_size=block_size,
                                steps_per_block=steps_per_block, temperature=temperature, top_k=top_k, top_p=top_p)
        # The released callback signature differs from `StepCallback`; adapt it rather than change either.
        callback = None if step_callback is None else \
            released_step_callback(step_callback, self.mask_token_id, steps_per_block)
        out = self.generate(input_ids, attention_mask, decoder, max_new_tokens=max_new_tokens,
                            eos_token_id=eos_token_id, generator=generator, step_callback=callback)
        return out if return_dict else out.sequences

    def generate_mock_ar(self, input_ids: Tensor, max_new_tokens: int = 128, temperature: float = 0.0,
                         top_k: int | None = None, top_p: float | None = None,
                         eos_token_id: int | Sequence[int] | None = None, *, attention_mask: Tensor | None = None,
                         generator: torch.Generator | None = None,
                         return_dict: bool = False) -> Tensor | GenerationOutput:
        """The released mock-AR mode (`decoding.MockAR`): one clean token per denoiser forward."""
        out = self.generate(input_ids, attention_mask, MockAR(temperature, top_k, top_p),
                            max_new_tokens=max_new_tokens, eos_token_id=eos_token_id, generator=generator)
        return out if return_dict else out.sequences

    def generate_ar(self, input_ids: Tensor, max_new_tokens: int = 128, temperature: float = 0.0,
                    top_k: int | None = None, top_p: float | None = None,
                    eos_token_id: int | Sequence[int] | None = None, *, attention_mask: Tensor | None = None,
                    generator: torch.Generator | None = None, return_dict: bool = False) -> Tensor | GenerationOutput:
        """The AR baseline (`decoding.Autoregressive`): the context tower alone, one token per forward."""
        out = self.generate(input_ids, attention_mask, Autoregressive(temperature, top_k, top_p),
                            max_new_tokens=max_new_tokens, eos_token_id=eos_token_id, generator=generator)
        return out if return_dict else out.sequences

    def generate_speculative(self, input_ids: Tensor, max_new_tokens: int = 128, block_size: int | None = None,
                             draft_steps: int = 1, temperature: float = 0.0, top_k: int | None = None,
                             top_p: float | None = None, eos_token_id: int | Sequence[int] | None = None, *,
                             attention_mask: Tensor | None = None, generator: torch.Generator | None = None,
                             step_callback: StepCallback | None = None,
                             return_dict: bool = False) -> Tensor | GenerationOutput:
        """Lossless speculative decoding (`decoding.Speculative`): greedy output is the AR output."""
        decoder = Speculative(block_size=block_size, draft_steps=draft_steps, temperature=temperature, top_k=top_k,
                              top_p=top_p)
        out = self.generate(input_ids, attention_mask, decoder, max_new_tokens=max_new_tokens,
                            eos_token_id=eos_token_id, generator=generator, step_callback=step_callback)
        return out if return_dict else out.sequences
