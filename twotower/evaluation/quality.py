"""Quality measures of generated continuations, model-agnostic apart from the NLL judge.

Every function takes token ids, (B, N) tensors of one continuation per row (or one sequence for
`distinct_n`), so it applies to any decoder's `GenerationOutput.new_tokens`. None of them
decides what "good" means on its own: agreement needs a reference text, NLL needs a judge model
(which favours text like its own), distinct-n only flags degenerate repetition. Reported side by
side they keep each other honest: looping output can have a deceptively low NLL, and a small
model's agreement with held-out text is small and noisy.
"""

from __future__ import annotations

import statistics

import torch
from torch import Tensor

from ..validation import check_int

__all__ = ["AGREEMENT_TOKENS", "agreement", "distinct_n", "continuation_nll", "token_match", "score_continuations"]

AGREEMENT_TOKENS = 64  # agreement is scored over the first 64 generated tokens by default


def _check_2d(name: str, x) -> Tensor:
    if not isinstance(x, Tensor) or x.dim() != 2:
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"{name} must be a (batch, length) tensor of token ids, got {shape}")
    return x


def agreement(generated: Tensor, truth: Tensor, first: int = AGREEMENT_TOKENS) -> Tensor:
    """(B, N) generated, (B, N') reference -> (B,) float32: the fraction of the first
    min(first, N, N') positions where the two are equal.

    Only positions both have are scored, so a reference shorter than the generation (or the
    reverse) is compared over the overlap. Position-wise, not alignment-based: one inserted token
    shifts everything after it, which is the point for a "same continuation?" check.
    """
    _check_2d("generated", generated)
    _check_2d("truth", truth)
    if generated.shape[0] != truth.shape[0]:
        raise ValueError(f"generated has {generated.shape[0]} rows but truth has {truth.shape[0]}; pass one "
                         "reference continuation per generated row")
    n = min(first, generated.shape[1], truth.shape[1])
    if n < 1:
        raise ValueError(f"agreement needs at least one position to compare: first={first}, generated length "
                         f"{generated.shape[1]}, truth length {truth.shape[1]}")
    return (generated[:, :n] == truth[:, :n].to(generated.device)).float().mean(-1)


def distinct_n(tokens: list[int] | Tensor, n: int) -> float:
    """Distinct n-grams / all n-grams of ONE sequence (1.0 = no n-gram repeats; nan when the
    sequence is shorter than n, where the ratio is undefined rather than perfect)."""
    check_int("n", n)
    if isinstance(tokens, Tensor):
        if tokens.dim() != 1:
            raise ValueError(f"distinct_n scores one sequence, got a tensor of shape {tuple(tokens.shape)}; "
                             "call it per row")
        toks = tokens.tolist()
    else:
        toks = list(tokens)
    grams = [tuple(toks[i: i + n]) for i in range(len(toks) - n + 1)]
    return len(set(grams)) / len(grams) if grams else float("nan")


@torch.no_grad()
def continuation_nll(lm, prompts: Tensor, continuation: Tensor, *, attention_mask: Tensor | None = None,
                     batch_size: int = 8) -> Tensor:
    """Mean negative log-likelihood per token (nats) of `continuation` (B, N) after `prompts` (B, T)
    under the causal LM `lm` (a ContextTower, or any module mapping (b, L) ids [, mask] to (b, L, V)
    logits). Returns (B,) float64 on the CPU; lower means the judge finds the text more likely.

    Teacher-forced: one causal forward over prompt + continuation, in chunks of `batch_size` rows
    (bounds the (b, T + N, V) logits); position T - 1 + j predicts continuation token j, and only
    those N positions are scored. attention_mask (B, T): left padding of the prompts, if any.
    Scored in float64 so rows of different lengths or dtypes compare without rounding noise.
    """
    _check_2d("prompts", prompts)
    _check_2d("continuation", continuation)
    B, T = prompts.shape
    if continuation.shape[0] != B or continuation.shape[1] < 1 or T < 1:
        raise ValueError(f"prompts {tuple(prompts.shape)} and continuation {tuple(continuation.shape)} must have the "
                         "same number of rows, at least one prompt token and at least one continuation token")
    if attention_mask is not None and tuple(attention_mask.shape) != (B, T):
        raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, expected {(B, T)} like prompts")
    check_int("batch_size", batch_size)
    out = []
    for i in range(0, B, batch_size):
        p, c = prompts[i: i + batch_size], continuation[i: i + batch_size].to(prompts.device)
        ids = torch.cat([p, c], 1)
        if attention_mask is None:
            logits = lm(ids)
        else:
            m = attention_mask[i: i + batch_size].to(prompts.device)
            logits = lm(ids, torch.cat([m, torch.ones_like(c, dtype=m.dtype)], 1))
        logp = logits[:, T - 1: -1].double().log_softmax(-1)  # (b, N, V): the predictions of c
        out.append(-logp.gather(-1, c[..., None]).squeeze(-1).mean(-1).cpu())
    return torch.cat(out)


def token_match(generated: Tensor, reference: Tensor) -> float:
    """Fraction of all positions where (B, N) `generated` equals (B, N) `reference` (e.g. another
    decoder's output on the same prompts: 1.0 means identical output)."""
    _check_2d("generated", generated)
    _check_2d("reference", reference)
    if generated.shape != reference.shape:
        raise ValueError(f"generated {tuple(generated.shape)} and reference {tuple(reference.shape)} must have the "
                         "same shape")
    return (generated == reference.to(generated.device)).float().mean().item()


def score_continuations(lm, prompts: Tensor, generated: Tensor, truth: Tensor, *,
                        reference: Tensor | None = None, agreement_tokens: int = AGREEMENT_TOKENS) -> dict:
    """Every measure for one batch of continuations, as a JSON-ready dict.

    prompts (B, T) on the judge's device, generated (B, N), truth (B, N') held-out continuations,
    reference (B, N) another decoder's output or None. Keys: agreement, nll, distinct_2,
    distinct_4 (means over rows), agreement_per_prompt, nll_per_prompt, and match_reference
    when a reference is given.
    """
    agree = agreement(generated, truth, agreement_tokens)
    nll = continuation_nll(lm, prompts, generated.to(prompts.device))
    out = {"agreement": agree.mean().item(), "nll": nll.mean().item(),
           "distinct_2": statistics.fmean(distinct_n(r, 2) for r in generated),
           "distinct_4": statistics.fmean(distinct_n(r, 4) for r in generated),
           "agreement_per_prompt": agree.tolist(), "nll_per_prompt": nll.tolist()}
    if reference is not None:
        out["match_reference"] = token_match(generated, reference)
    return out
