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

The plan (`quantization_targets`) reads module types only, so it applies to a model on the meta
device: `from_pretrained(quantize="int8")` swaps the int8 modules in before any weight is read and
rounds each projection as it is read (`int8_converter`), so a device never holds the full-precision
model; `model.shape_only_model` stops before reading and gives the exact stored bytes of any config
(benchmarks/quantization_shapes.py).

A quantized model is for inference: `save_pretrained` refuses it (quantize when loading instead).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .towers.adapters import is_adapter
from .towers.nemotron_h.layers import Experts

QUANTIZE_MODES = ("int8",)


def check_quantize(quantize) -> str | None:
    """None or a supported mode; anything else is refused naming the choices."""
    if quantize is None or quantize in QUANTIZE_MODES:
        return quantize
    raise ValueError(f"quantize must be one of {list(QUANTIZE_MODES)} or None (full precision), got {quantize!r}")


QUANT_CHUNK = 1 << 22  # elements rounded at once: bounds the float32 temporaries (~50 MB), not the result


def quantize_int8(weight: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric per-output-channel int8: weight (..., out, in) -> (int8 values, float32 scales (..., out, 1)).

    An all-zero row gets scale 1 (its values are all 0 either way). Rows are rounded a chunk at a
    time, so the float32 temporaries stay small whatever the tensor (a 128-expert stack is 0.6 G
    elements); on the meta device nothing is computed and the results have the right shapes.
    """
    # An expert stack (E, out, in) flattens to E * out rows: one scale per expert and output channel, as for a Linear.
    rows = weight.detach().reshape(-1, weight.shape[-1])
    q = torch.empty(rows.shape, dtype=torch.int8, device=weight.device)
    scale = torch.empty(rows.shape[0], 1, dtype=torch.float32, device=weight.device)
    step = max(1, QUANT_CHUNK // max(1, rows.shape[1]))  # whole rows, so each row's max sees all of the row
    for start in range(0, rows.shape[0], step) if not weight.is_meta else ():
        w = rows[start:start + step].float()  # float32 whatever the load dtype: no bf16 rounding in the scale or w / s
        s = w.abs().amax(dim=-1, keepdim=True) / 127.0
        s = torch.where(s > 0, s, torch.ones_like(s))  # a zero row would give 0 / 0 = NaN; any scale maps it to 0
        q[start:start + step] = torch.round(w / s).clamp_(-127, 127)
        scale[start:start + step] = s
    return q.view(weight.shape), scale.view(*weight.shape[:-1], 1)


def dequantize(q: Tensor, scale: Tensor, dtype: torch.dtype) -> Tensor:
    # The product in float32, then one rounding to the activations' dtype.
    return (q.to(torch.float32) * scale).to(dtype)


class Int8Linear(nn.Module):
    """A Linear with int8 weights (per-output-channel scales); the bias stays as it was."""

    QUANTIZED = ("weight",)  # the original's tensors stored as <name>_int8 + <name>_scale

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        q, scale = quantize_int8(linear.weight)
        # Buffers, not Parameters: int8 cannot require grad; still in the state dict, where the loader fills them.
        self.register_buffer("weight_int8", q)
        self.register_buffer("weight_scale", scale)
        self.bias = linear.bias

    def forward(self, x: Tensor) -> Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        # Dequantized per call: only the int8 copy stays resident (this saves memory, not FLOPs).
        return F.linear(x, dequantize(self.weight_int8, self.weight_scale, x.dtype), bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, int8"


class Int8Experts(Experts):
    """Fused routed experts with int8 weights, scaled per expert and output channel; the forward
    (dense or sparse) is `Experts`' own, on weights dequantized once per call."""

    QUANTIZED = ("up_proj", "down_proj")

    def __init__(self, experts: Experts):
        nn.Module.__init__(self)  # not Experts.__init__: it would allocate full-precision (E, I, d) stacks
        self.act = experts.act
        self.dtype = experts.up_proj.dtype  # no Parameter is left to ask: `expert_weights`' dtype when none is given
        for name in self.QUANTIZED:
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


def quantization_targets(model) -> list[tuple[str, nn.Module, str]]:
    """The plan: (qualified name, parent, attribute) of every projection to quantize, i.e. the Linears
    and fused experts inside the two towers' layer stacks (routers are not Linears; heads,
    embeddings and time modules lie outside the stacks). Reads only module types, so it is the
    same on a model built on the meta device (`model.shape_only_model`) as on a loaded one."""
    found = []
    for tower_name, tower in (("context", model.context), ("denoiser", model.denoiser)):
        for parent_name, parent in tower.backbone.layers.named_modules(prefix=f"{tower_name}.backbone.layers"):
            for name, child in parent.named_children():
                # An Int8Experts is an Experts (an Int8Linear is no nn.Linear): a quantized one is not planned again.
                if isinstance(child, nn.Linear) or (isinstance(child, Experts) and not isinstance(child, Int8Experts)):
                    found.append((f"{parent_name}.{name}", parent, name))
    return found


@torch.no_grad()
def quantize_model(model, mode: str = "int8"):
    """Quantize `model`'s (a TwoTowerLM's) projection weights in place, as `quantization_targets`
    plans; returns the model. Each original is released as soon as it is replaced, so the peak is
    the model plus one projection's int8 copy (and a small rounding buffer)."""
    if check_quantize(mode) is None:
        return model
    if is_adapter(model.denoiser):
        # The context's projections would become int8 while the adapter denoiser kept calling the
        # full-precision originals it borrows: two different weights and no memory saved.
        raise ValueError("this model's denoiser is an adapter that borrows the context tower's weights; int8 "
                         "would replace the weights it borrows. Quantize a full-copy model, or none")
    for _, parent, name in quantization_targets(model):
        child = getattr(parent, name)
        setattr(parent, name, Int8Linear(child) if isinstance(child, nn.Linear) else Int8Experts(child))
        del child  # the last reference: the original weight is freed before the next projection is rounded
    model.quantization = mode
    return model


def int8_converter(model):
    """For `towers.loading.materialize` into a model `quantize_model` already planned on the meta
    device: a weight just read whose module is now `Int8Linear` / `Int8Experts` becomes that
    module's int8 values and scales (`quantize_int8`, as `quantize_model` would round it); every
    other tensor passes through. The full-precision copy is dropped right away."""
    owners = {name: m for name, m in model.named_modules() if isinstance(m, (Int8Linear, Int8Experts))}

    def convert(key: str, t: Tensor) -> dict[str, Tensor]:
        owner, _, attr = key.rpartition(".")
        m = owners.get(owner)
        if m is None or attr not in m.QUANTIZED:
            return {key: t}
        if isinstance(m, Int8Experts):  # planned on meta with the skeleton's dtype; `t` was read in the load dtype
            m.dtype = t.dtype
        q, scale = quantize_int8(t)
        return {f"{key}_int8": q, f"{key}_scale": scale}

    return convert


def stored_bytes(module: nn.Module) -> int:
    """Bytes of every parameter and buffer as stored (tensors shared between modules counted once;
    on the meta device, where nothing has an address, each tensor object once)."""
    seen, total = set(), 0
    for t in list(module.parameters()) + list(module.buffers()):
        key = id(t) if t.is_meta else (t.device, t.data_ptr())
        if key in seen:
            continue
        seen.add(key)
        total += t.numel() * t.element_size()
    return total


PARTS = ("projections", "MoE experts", "int8 scales", "embeddings + LM heads", "time conditioning", "other")


def bytes_by_part(model) -> dict[str, int]:
    """`stored_bytes` of a TwoTowerLM (quantized or not) split into `PARTS`: the layer stacks'
    Linear projections and fused routed experts (int8 values once quantized), their float32
    scales, the token embeddings and both LM heads, the denoiser's time conditioning, and the
    rest (norms, MoE routers, Mamba convolutions and SSM parameters, biases)."""
    parts = dict.fromkeys(PARTS, 0)
    seen = set()
    for mname, mod in model.named_modules():
        for tname, t in [*mod.named_parameters(recurse=False), *mod.named_buffers(recurse=False)]:
            key = id(t) if t.is_meta else (t.device, t.data_ptr())
            if key in seen:
                continue
            seen.add(key)
            in_stack = ".backbone.layers." in f"{mname}."
            # Scales first: an Int8Experts is also an Experts, whose test below would count them as experts.
            if tname.endswith("_scale") and isinstance(mod, (Int8Linear, Int8Experts)):
                part = "int8 scales"
            elif in_stack and isinstance(mod, Experts):
                part = "MoE experts"
            elif in_stack and ((isinstance(mod, nn.Linear) and tname == "weight")
                               or (isinstance(mod, Int8Linear) and tname == "weight_int8")):
                part = "projections"
            elif isinstance(mod, nn.Embedding) or mname.endswith("lm_head"):  # any family's embedding name
                part = "embeddings + LM heads"
            elif mname.startswith("denoiser.time"):
                part = "time conditioning"
            else:
                part = "other"
            parts[part] += t.numel() * t.element_size()
    return parts
