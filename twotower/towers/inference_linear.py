"""`InferenceLinear`: a weight (and bias) kept for inference only, optionally pre-packed for oneDNN.

The inference copies of `TwoTowerLM.merge_adapters` (a LoRA projection's merged weight, a fused
q/k/v or gate/up weight, the denoiser's head) are applied through this class. On a CPU in bfloat16,
`F.linear` hands the weight to oneDNN, which reorders it into its blocked layout on every call: at
batch 1 that reorder costs about as much as the product itself. `pack=True` reorders once
(`torch.ops.mkldnn._reorder_linear_weight`) and calls the packed product
(`torch.ops.mkldnn._linear_pointwise`): 1.5-1.8x faster per matmul at SmolLM2's shapes on this
CPU. Its results equal `F.linear` at a few rows but not at every row count, so only the denoiser's
draft uses it (the context tower's numerics must not move) unless asked (`pack_context`). In float32
`F.linear` runs MKL, and oneDNN packs float32 too: on an AVX2-only CPU its packed products were
1.5-3.6x faster than MKL's at 1 to 16 rows, within float32 rounding of them (not their bits), and the
same bits at every row count. Elsewhere (other dtypes and devices, a torch without the op, bf16 on a
CPU whose oneDNN has no bf16 path: one without AVX512-BW/VL/DQ or AVX-NE-CONVERT, such as an
AVX2-only one) `pack` falls back to `F.linear`.

`pack="int8"` instead quantizes W to int8 (one scale per output channel) and each input on the fly
(`torch.ops.quantized.linear_dynamic`, fbgemm's kernels): on an AVX2-only CPU at SmolLM2's shapes and
16 rows, 1.8-2.4x faster than float32 per projection and 5.8x on its 49152-wide head (measured with
`benchmarks/real_model_phases.py --kernels`). Its results are not `F.linear`'s (int8 rounding), so it is for
a speculative draft, whose tokens the context tower verifies in its own dtype: the output stays AR's.

It imports only `twotower.hardware`, itself a leaf.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import Tensor

from ..hardware import cpu_has_bf16_path, has_int8_linear, onednn_can_pack

__all__ = ["InferenceLinear", "VocabSubsetHead", "can_pack", "can_quantize", "context_pack_rows", "makes_copy",
           "HEAD_COPY", "INT8", "OUTSIDE_VOCAB", "PACKINGS"]

# Where `towers.adapters.merge_adapters` keeps a denoiser's packed head copy (a plain attribute).
HEAD_COPY = "_twotower_head"

# The draft's rows at batch 1 (one block): the layout oneDNN is asked to choose for.
PACK_ROWS = 16

# The most rows a packed context tower's products serve by default (`context_pack_rows`; larger inputs run the
# modules themselves). bf16: 16, the row counts where packed products had the unpacked tower's bits on an AMX CPU.
# float32: 128. There packed products are never the unpacked (MKL) bits, so the cap is only about speed. On an
# AVX2-only CPU at SmolLM2's shapes (`benchmarks/real_model_phases.py --kernels`) they were faster than MKL's up
# to 128 rows, mostly from the head, slower beyond for the projections, and each row's bits were the bits of
# that row alone at every count tested (1 to 512): a packed verify of a batch-8 block computes what packed AR
# steps compute.
CONTEXT_PACK_ROWS = {torch.bfloat16: PACK_ROWS, torch.float32: 128}

# The logit a `VocabSubsetHead` gives every token outside its vocabulary: finite, so that a softmax, an entropy
# (0 * log 0) or a division by a temperature stays finite, yet far enough below any real logit that its
# probability is exactly 0 in float32.
OUTSIDE_VOCAB = -1e9

# `pack` values: False (F.linear), True (oneDNN pre-packed where `can_pack`), INT8 (dynamic int8, `can_quantize`).
INT8 = "int8"
PACKINGS = (False, True, INT8)


def can_pack(weight: Tensor) -> bool:
    """Whether `weight` can be pre-packed: a CPU tensor, a torch built with oneDNN's ops, and either
    bfloat16 on a CPU where oneDNN has a bf16 path (`twotower.hardware.cpu_has_bf16_path`) or float32
    where oneDNN packs it (`twotower.hardware.onednn_can_pack`)."""
    if weight.device.type != "cpu":
        return False
    if weight.dtype == torch.bfloat16:
        return cpu_has_bf16_path()
    return weight.dtype == torch.float32 and onednn_can_pack(torch.float32)


def context_pack_rows(dtype: torch.dtype, pack_rows: int | None = None) -> int:
    """The most rows a packed context tower of `dtype` serves: `pack_rows` when given (a positive int), else the
    dtype's default (`CONTEXT_PACK_ROWS`; other dtypes do not pack, `PACK_ROWS` for them)."""
    if pack_rows is None:
        return CONTEXT_PACK_ROWS.get(dtype, PACK_ROWS)
    if isinstance(pack_rows, bool) or not isinstance(pack_rows, int) or pack_rows < 1:
        raise ValueError(f"pack_rows must be a positive int (the most rows a packed context product serves) "
                         f"or None for the dtype's default, got {pack_rows!r}")
    return pack_rows


def can_quantize(weight: Tensor) -> bool:
    """Whether `weight` can be held as dynamic int8 (`pack=INT8`): a floating-point CPU tensor and a torch
    with the quantized linear kernels (`twotower.hardware.has_int8_linear`)."""
    return weight.device.type == "cpu" and weight.is_floating_point() and has_int8_linear()


def makes_copy(weight: Tensor, pack) -> bool:
    """Whether `pack` would change how `weight` is applied here (else a copy of a module's own weight
    would only cost memory): True where `can_pack`, INT8 where `can_quantize`."""
    check_pack(pack)
    return can_quantize(weight) if pack == INT8 else bool(pack) and can_pack(weight)


def check_pack(pack) -> None:
    if not any(pack is p or (isinstance(p, str) and pack == p) for p in PACKINGS):
        raise ValueError(f"pack={pack!r}: expected False (plain F.linear), True (pre-packed for oneDNN where it packs "
                         f"the dtype) or {INT8!r} (dynamic int8, for a speculative draft)")


def _int8_packed(weight: Tensor, bias: Tensor | None):
    """fbgemm's packed int8 weight: symmetric, one float scale per output channel."""
    w = weight.detach().float()
    scale = (w.abs().amax(1) / 127).clamp_min(1e-12)  # an all-zero row would divide by zero
    zeros = torch.zeros(w.shape[0], dtype=torch.long)
    with warnings.catch_warnings():  # torch marks quantized tensor creation deprecated; the kernels remain
        warnings.simplefilter("ignore")
        q = torch.quantize_per_channel(w, scale.double(), zeros, 0, torch.qint8)
        return torch.ops.quantized.linear_prepack(q, None if bias is None else bias.detach().float())


class InferenceLinear:
    """y = x W^T + b with W (out, in) and b (out,) or None, held outside any module's parameters.

    pack: True pre-packs W for oneDNN where `can_pack` allows; INT8 holds W as int8 and quantizes each
    input on the fly where `can_quantize` allows (see the module docstring); else, or with False,
    plain `F.linear`. max_rows: the copy `applies` only to inputs of at most that many rows (None:
    any); the caller runs its own module otherwise. `nbytes` is what the copy holds, `weight_nbytes`
    its weight's share (an int8 copy's bias and scales included: they are packed with it).
    """

    def __init__(self, weight: Tensor, bias: Tensor | None = None, *, pack: bool | str = False,
                 max_rows: int | None = None):
        check_pack(pack)
        self.dtype, self.device = weight.dtype, weight.device
        self.max_rows = max_rows
        self.int8 = pack == INT8 and can_quantize(weight)
        self.packed = pack is True and can_pack(weight)
        weight = weight.detach()
        bias = None if bias is None else bias.detach()
        if self.int8:  # the bias lives inside the packed weight
            self.weight, self.bias = _int8_packed(weight, bias), None
            self.weight_nbytes = weight.numel() + 4 * weight.shape[0] * (1 if bias is None else 2)
            return
        self.bias = bias
        self.weight = torch.ops.mkldnn._reorder_linear_weight(weight, PACK_ROWS) if self.packed else weight
        self.weight_nbytes = self.weight.nbytes

    @property
    def nbytes(self) -> int:
        return self.weight_nbytes + (0 if self.bias is None else self.bias.nbytes)

    def applies(self, x: Tensor) -> bool:
        """Whether this copy serves x (its rows within `max_rows`)."""
        return self.max_rows is None or x.numel() <= self.max_rows * x.shape[-1]

    def check(self, x: Tensor, what: str) -> None:
        """Refuse an input this copy was not made for (the model was moved or cast after merging)."""
        if x.device != self.device or x.dtype != self.dtype:
            raise RuntimeError(f"the {what} is {self.dtype} on {self.device} but its input is {x.dtype} on "
                               f"{x.device}; call TwoTowerLM.merge_adapters() again after moving or casting the model")

    def __getstate__(self):
        if self.packed or self.int8:  # a packed layout is opaque: torch can neither copy nor pickle it
            raise TypeError("a model with packed inference copies cannot be pickled or deep-copied; call "
                            "TwoTowerLM.unmerge_adapters() first and merge_adapters() again on the copy")
        return self.__dict__

    def __call__(self, x: Tensor) -> Tensor:
        if self.int8:
            # reduce_range: 7-bit inputs. Without VNNI (AVX2), fbgemm sums pairs of u8 x s8 products in
            # 16 bits with saturation; full 8-bit inputs overflowed there (7x the error at SmolLM2's shapes).
            y = torch.ops.quantized.linear_dynamic(x.reshape(-1, x.shape[-1]).float(), self.weight, True)
            return y.reshape(*x.shape[:-1], y.shape[-1]).to(x.dtype)
        if self.packed:
            return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)


class VocabSubsetHead:
    """A draft's LM head over part of the vocabulary: the rows of `vocab` only, scattered back to full width.

    The head is the largest single product of a draft (49152 x 576 for SmolLM2: a fifth of its weights).
    Drafting from the tokens a model actually writes (a frequency-ranked subset, as FR-Spec, Zhao et al.
    2025, does for EAGLE's heads) reads a fraction of it. Tokens outside `vocab` get the logit
    `OUTSIDE_VOCAB`, so the draft never proposes them, and its probabilities stay a distribution over the
    full vocabulary: a sampled draft's acceptance test still sees the proposal it drew from. The context
    tower verifies every token over the full vocabulary, so speculative output is unchanged; only how
    many tokens a draft gets right can move (a token outside `vocab` is always a rejection).

    Args:
        weight, bias: the full head, (V, H) and (V,) or None.
        vocab: sorted, distinct token ids in [0, V) (`TwoTowerLM.merge_adapters` checks them).
        pack: as `InferenceLinear`'s, for the subset's rows.
    """

    def __init__(self, weight: Tensor, bias: Tensor | None, vocab: Tensor, *, pack: bool | str = False):
        self.size = weight.shape[0]
        self.vocab = vocab.to(weight.device)
        rows = weight.detach().index_select(0, self.vocab)
        self.inner = InferenceLinear(rows, None if bias is None else bias.detach().index_select(0, self.vocab),
                                     pack=pack)

    @property
    def nbytes(self) -> int:
        return self.inner.nbytes + self.vocab.nbytes

    def check(self, x: Tensor, what: str) -> None:
        """As `InferenceLinear.check`."""
        self.inner.check(x, what)

    def __call__(self, x: Tensor) -> Tensor:
        sub = self.inner(x)
        out = sub.new_full((*sub.shape[:-1], self.size), OUTSIDE_VOCAB)
        return out.index_copy_(-1, self.vocab, sub)
