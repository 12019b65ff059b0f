"""Evaluation tools: how good generated text is, apart from how fast it came.

Two parts:
* `harness.py`: an lm-evaluation-harness model (`--model twotower`, run through `twotower-eval`;
  needs the `[eval]` extra, so it is imported only when used): exact log-likelihoods from the
  context tower, generation with any decoder.
* `quality.py`: the quality measures the benchmark (`benchmarks/bench.py`) reports for every
  decoding mode:

    from twotower.evaluation import agreement, distinct_n, continuation_nll, score_continuations

| measure | what it says |
|---|---|
| `agreement` | fraction of generated positions equal to a reference continuation (held-out text) |
| `distinct_n` | distinct n-grams / n-grams of one sequence: low means looping, repetitive output |
| `continuation_nll` | mean NLL per token of a continuation under a causal LM (the context tower) |
| `token_match` | fraction of tokens equal to another mode's output (e.g. "= AR") |
| `score_continuations` | all of the above for a batch, as one JSON-ready dict |
"""

from .quality import AGREEMENT_TOKENS, agreement, continuation_nll, distinct_n, score_continuations, token_match

__all__ = ["AGREEMENT_TOKENS", "agreement", "distinct_n", "continuation_nll", "token_match", "score_continuations"]
