"""`InferenceLinear`: a weight (and bias) kept for inference only, optionally pre-packed for oneDNN.

The inference copies of `TwoTowerLM.merge_adapters` (a LoRA projection's merged weight, a fused
q/k/v or gate/up weight, the denoiser's head) are applied through this class. On a CPU in bfloat16,
`F.linear` hands the weight to oneDNN, which reorders it into its blocked layout on every call: at
batch 1 that reorder costs about as much as the product itself. `pack=True` reorders once
(`torch.ops.mkldnn._reorder_linear_weight`) and calls the packed product
(`torch.ops.mkldnn._linear_pointwise`): 1.5-1.8x faster per matmul at SmolLM2's shapes on this
CPU. Its results equal `F.linear` at a few rows but not at every row count, so only the denoiser's
draft uses it (the context tower's numerics must not move); elsewhere (float32, other devices, a
torch without the op, a CPU whose oneDNN has no bf16 path: one without AVX512-BW/VL/DQ or
AVX-NE-CONVERT, such as an AVX2-only one) `pack` falls back to `F.linear`.

It imports only `twotower.hardware`, itself a leaf.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..hardware import cpu_has_bf16_path

__all__ = ["InferenceLinear", "can_pack", "HEAD_COPY"]

# Where `towers.adapters.merge_adapters` keeps a denoiser's packed head copy (a plain attribute).
HEAD_COPY = "_twotower_head"

# The draft's rows at batch 1 (one block): the layout oneDNN is asked to choose for.
PACK_ROWS = 16


def can_pack(weight: Tensor) -> bool:
    """Whether `weight` can be pre-packed: a bfloat16 CPU tensor, a torch built with oneDNN's ops, and a
    CPU on which oneDNN has a bf16 path (`twotower.hardware.cpu_has_bf16_path`)."""
    return weight.device.type == "cpu" and weight.dtype == torch.bfloat16 and cpu_has_bf16_path()


class InferenceLinear:
    """y = x W^T + b with W (out, in) and b (out,) or None, held outside any module's parameters.

    pack: pre-pack W for oneDNN where `can_pack` allows (see the module docstring); else plain
    `F.linear`. max_rows: the copy `applies` only to inputs of at most that many rows (None: any);
    the caller runs its own module otherwise. `nbytes` is what the copy holds.
    """

    def __init__(self, weight: Tensor, bias: Tensor | None = None, *, pack: bool = False,
                 max_rows: int | None = None):
        self.dtype, self.device = weight.dtype, weight.device
        self.max_rows = max_rows
        self.bias = None if bias is None else bias.detach()
        self.packed = pack and can_pack(weight)
        weight = weight.detach()
        self.weight = torch.ops.mkldnn._reorder_linear_weight(weight, PACK_ROWS) if self.packed else weight

    @property
    def nbytes(self) -> int:
        return self.weight.nbytes + (0 if self.bias is None else self.bias.nbytes)

    def applies(self, x: Tensor) -> bool:
        """Whether this copy serves x (its rows within `max_rows`)."""
        return self.max_rows is None or x.numel() <= self.max_rows * x.shape[-1]

    def check(self, x: Tensor, what: str) -> None:
        """Refuse an input this copy was not made for (the model was moved or cast after merging)."""
        if x.device != self.device or x.dtype != self.dtype:
            raise RuntimeError(f"the {what} is {self.dtype} on {self.device} but its input is {x.dtype} on "
                               f"{x.device}; call TwoTowerLM.merge_adapters() again after moving or casting the model")

    def __getstate__(self):
        if self.packed:  # oneDNN's packed layout is opaque: torch can neither copy nor pickle it
            raise TypeError("a model with packed inference copies cannot be pickled or deep-copied; call "
                            "TwoTowerLM.unmerge_adapters() first and merge_adapters() again on the copy")
        return self.__dict__

    def __call__(self, x: Tensor) -> Tensor:
        if self.packed:
            return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)
