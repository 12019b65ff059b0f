"""Decoding strategies as plug-ins: how a prompt batch becomes tokens with one or both towers.

    from twotower.decoding import MaskDiffusion, Speculative, MockAR, Autoregressive
    out = Speculative(block_size=16).generate(model, input_ids, attention_mask, max_new_tokens=64)

| decoder | what it does |
|---|---|
| `MaskDiffusion` | block mask diffusion: the denoiser fills each block over a few steps, a `Sampler` commits |
| `Speculative` | lossless: the denoiser drafts a block, the context tower keeps what it agrees with |
| `TwoBranchSpeculative` | lossless `Speculative` that also verifies the draft's runner-up at its likeliest rejection point, in the same forward (tree mask) |
| `TolerantSpeculative` | `Speculative` that also keeps drafted tokens the context tower finds nearly as likely as its own (not lossless) |
| `NgramLookup` | not a decoder: `Speculative(lookup=...)`'s free drafts, the continuation of an earlier occurrence of the row's last n tokens |
| `MockAR` | the released mock-AR mode: one clean token per denoiser forward, no time conditioning |
| `Autoregressive` | the context tower alone, one token per forward (the baseline) |

A recipe picks one by `class_path` (`decoder: {class_path: twotower.decoding.Speculative}`) or by
a registered name (`register_decoder`: "speculative", "diffusion", "ar", "mock_ar", "tolerant", "two_branch", ...;
predict, serve and eval share the one registry). A decoder of your own subclasses `Decoder` and
implements the state machine `prefill` / `advance` (see `base.py`): `generate` and the server both
drive it. Nothing here imports Lightning. Layout: `base.py` (the interface and its checks),
`state.py` (`DecodeState`, the working batch rows join and leave), `registry.py` (names),
`tracker.py` (per-row bookkeeping, `GenerationOutput`), `logits.py` (temperature, top-k / top-p, processors), one file
per decoder, `released.py` (the released model's method names and callback).
"""

from .autoregressive import Autoregressive
from .base import DecodeCall, Decoder, StepCallback, TowerPair, Towers
from .state import DecodeState, Rows, TrackedRows
from .diffusion import MaskDiffusion, denoise_block
from .logits import LogitsProcessor, TokenChooser, TopK, TopP
from .lookup import NgramLookup, RowIndex
from .mock_ar import MockAR
from .registry import build_decoder, decoder_class, register_decoder, registered_decoders
from .released import ReleasedGenerationMixin, released_step_callback
from .speculative import Speculative, draft_one_step
from .stopping import StopCriterion, StopStrings
from .tolerant import TolerantSpeculative
from .tracker import GenerationOutput, RowTracker
from .two_branch import TwoBranchSpeculative

__all__ = [
    "Decoder", "DecodeCall", "DecodeState", "Rows", "TrackedRows", "Towers", "TowerPair", "StepCallback",
    "GenerationOutput",
    "RowTracker",
    "MaskDiffusion", "Speculative", "TolerantSpeculative", "TwoBranchSpeculative", "MockAR", "Autoregressive", "denoise_block",
    "draft_one_step", "NgramLookup", "RowIndex",
    "LogitsProcessor", "TokenChooser", "TopK", "TopP",
    "register_decoder", "decoder_class", "build_decoder", "registered_decoders",
    "ReleasedGenerationMixin", "released_step_callback", "StopStrings", "StopCriterion",
]
