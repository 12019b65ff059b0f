"""The repository's contract checks as plain functions, for families, decoders, samplers and time
conditionings written outside it (a plug-in package, a notebook).

    from twotower.testing import check_family, check_decoder, check_sampler, check_time_conditioning
    check_family("myllama")             # a registered model_type (or a TowerFamily); tiny random model
    check_decoder(RepeatLast())         # on a tiny random Llama two-tower model (or pass model=)
    check_sampler(MySampler())
    check_time_conditioning({"class_path": "mypkg.GateOnly", "init_args": {"width": 6}})

Each check builds what it needs in memory (tiny random models, no download, float32 on CPU, a
few seconds) and raises AssertionError naming what broke and the values; it returns None when all
holds. Nothing here imports pytest: call the checks from any test runner, or from a script.

What `check_family` checks is the contract the decoders and the training module rely on (see
`twotower.towers.base`): prefill + 1-token and multi-token extends == the full forward, left-padded
rows == rows alone, a provisional extend settled by `accept` == extending only the kept tokens, the
cache's concat / select / mirror / clone, the denoiser's `forward_block` (shape, dtype, cache read
only), training forward == per-block inference, Speculative == Autoregressive through the library's
decoders and, against the transformers model of `TowerFamily.hf_architecture` (or `reference=`),
logits parity and greedy decoding == its `generate`.

What `check_decoder` checks: the output contract, rows independent of their batch, the step-wise
path (`start` / `step`) == `generate`, the server's path (`serving.Stepper`: requests joining and
leaving a working batch between steps) == each request's `generate` alone, seeded sampling repeats
(temperature > 0), and a step callback that is called with well-formed tensors and changes nothing.

Layout: `builders.py` (tiny configs and models, prompts, comparisons), `family.py` (`check_family`),
`decoding.py` (`check_decoder` and its parts such as `check_rows_independent`, `check_sampler`, `check_time_conditioning`).
"""

from .builders import (MASK, PAD, TINY_CONFIGS, assert_close, assert_equal, left_pad, never_predict_mask_,
                       random_prompts, randomize_, randomize_time_, tiny_config, tiny_model, tiny_towers)
from .decoding import check_decoder, check_rows_independent, check_sampler, check_time_conditioning
from .family import check_family

__all__ = ["check_family", "check_decoder", "check_rows_independent", "check_sampler", "check_time_conditioning", "tiny_config",
           "tiny_towers", "tiny_model", "randomize_", "randomize_time_", "never_predict_mask_", "left_pad",
           "random_prompts", "assert_close", "assert_equal", "MASK", "PAD", "TINY_CONFIGS"]
