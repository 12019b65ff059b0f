"""Weight-only int8 quantization of both towers: `TwoTowerLM.from_pretrained(path, quantize="int8")`.

What is quantized: the layer stacks' projection weights, the bulk of the parameters: attention
q/k/v/o, Mamba in/out projections, dense MLP and shared-expert up/down, MoE latent projections and
the fused routed experts. Each output channel gets one symmetric scale, max|w| / 127, stored in
float32; the weights are stored as int8 and dequantized to the activation dtype inside the
forward, so the matmuls themselves run as before (this saves memory, not FLOPs).

What stays in the load dtype, and why: the token embeddings and both LM heads (the vocabulary
projections decide the argmax directly, and they are few per model), the denoiser's
time-conditioning MLPs and adaLN tables (`denoiser.time.*`: small, and their outputs scale every
layer), MoE routers (float32 already: a quantized router flips expert choices), norms, Mamba
convolutions and SSM parameters.

Why not torchao: torchao 0.18 runs on this CPU build for `nn.Linear`, but its `quantize_` does not
touch the fused 3-D routed-expert weights (`Experts.up_proj` / `down_proj` are Parameters, not
Linears), which hold about 40 % of the default model's projection weights; this module treats
both kinds with one scheme and needs no extra dependency.

A quantized model is for inference: `save_pretrained` refuses it (quantize when loading instead).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .towers.layers import Experts

QUANTIZE_MODES = ("int8",)


def check_quantize(quantize) -> str | None:
    """None or a supported mode; anything else is refused naming the choices."""
    if quantize is None or quantize in QUANTIZE_MODES:
        return quantize
    raise ValueError(f"quantize must be one of {list(QUANTIZE_MODES)} or None (full precision), got {quantize!r}")


def quantize_int8(weight: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric per-output-channel int8: weight (..., out, in) -> (int8 values, float32 scales (..., out, 1)).

    An all-zero row gets scale 1 (its values are all 0 either way).
    """
    w = weight.detach().float()
    scale = w.abs().amax(dim=-1, keepdim=True) / 127.0
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(w / scale).clamp_(-127, 127).to(torch.int8)
    return q, scale


def dequantize(q: Tensor, scale: Tensor, dtype: torch.dtype) -> Tensor:
    return (q.to(torch.float32) * scale).to(dtype)


class Int8Linear(nn.Module):
    """A Linear with int8 weights (per-output-channel scales); the bias stays as it was."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        q, scale = quantize_int8(linear.weight)
        self.register_buffer("weight_int8", q)
        self.register_buffer("weight_scale", scale)
        self.bias = linear.bias

    def forward(self, x: Tensor) -> Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, dequantize(self.weight_int8, self.weight_scale, x.dtype), bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, int8"


class Int8Experts(Experts):
    """Fused routed experts with int8 weights, scaled per expert and output channel; the forward
    (dense or sparse) is `Experts`' own, on weights dequantized once per call."""

    def __init__(self, experts: Experts):
        nn.Module.__init__(self)
        self.act = experts.act
        self.dtype = experts.up_proj.dtype
        for name in ("up_proj", "down_proj"):
            q, scale = quantize_int8(getattr(experts, name))
            self.register_buffer(f"{name}_int8", q)
            self.register_buffer(f"{name}_scale", scale)

    def expert_weights(self, dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor]:
        dtype = dtype or self.dtype
        return (dequantize(self.up_proj_int8, self.up_proj_scale, dtype),
                dequantize(self.down_proj_int8, self.down_proj_scale, dtype))

    def extra_repr(self) -> str:
        E, inter, d = self.up_proj_int8.shape
        return f"experts={E}, intermediate={inter}, hidden={d}, int8"


def _targets(model) -> list[tuple[nn.Module, str, nn.Module]]:
    """(parent, attribute, module) for every projection to quantize: Linears and fused experts inside
    the two towers' layer stacks (routers are not Linears; heads, embeddings and time modules lie
    outside the stacks)."""
    found = []
    for tower in (model.context, model.denoiser):
        for parent in tower.backbone.layers.modules():
            for name, child in parent.named_children():
                if isinstance(child, nn.Linear) or (isinstance(child, Experts) and not isinstance(child, Int8Experts)):
                    found.append((parent, name, child))
    return found


@torch.no_grad()
def quantize_model(model, mode: str = "int8"):
    """Quantize `model`'s (a TwoTowerLM's) projection weights in place; returns the model."""
    if check_quantize(mode) is None:
        return model
    for parent, name, child in _targets(model):
        setattr(parent, name, Int8Linear(child) if isinstance(child, nn.Linear) else Int8Experts(child))
    model.quantization = mode
    return model


def stored_bytes(module: nn.Module) -> int:
    """Bytes of every parameter and buffer as stored (tensors shared between modules counted once)."""
    seen, total = set(), 0
    for t in list(module.parameters()) + list(module.buffers()):
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total
