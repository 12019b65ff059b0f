"""The Llama layer stack (transformers' `LlamaConfig`): RoPE, grouped-query attention, SwiGLU MLP, RMSNorm.

Every decoder layer is two pre-norm residual sub-blocks, attention then MLP:
    x = x + attn(input_layernorm(x));  x = x + mlp(post_attention_layernorm(x)).
With time conditioning (denoiser) each sub-block takes its own modulation (shift, 1 + scale, gate),
the attention one modulating *before* its pre-norm and the MLP one *after* it, as the NemotronH
attention and MLP layers do (docs/design.md, section 1.3): sub-block 2i is layer i's attention,
2i + 1 its MLP, and the residual is gated.

RoPE: keys are rotated before they are cached, at each token's *logical* position (the number of
real tokens before it in its row), so left padding, speculative holes and compaction never change
what a row computes. Inverse frequencies come from transformers' `ROPE_INIT_FUNCTIONS` for the
scaled variants (linear, llama3, yarn) and are computed here for the default; the variants whose
frequencies depend on the running length (dynamic, longrope) are refused.

Parameter names equal transformers' `LlamaForCausalLM` names below `model.` (`embed_tokens`,
`layers.{i}.self_attn.q_proj`, ..., `norm`). Llama's `config.attention_bias` puts a bias on all four
attention projections (q, k, v and o), as transformers' Llama does. The Llama-like families change
only what `LlamaBackbone`'s class methods say: which projections have biases
(`attention_biases`: Qwen2 has q/k/v biases and none on o_proj) and the sliding attention window
(`attention_window`: Mistral, Qwen2), see `twotower/towers/qwen2`, `twotower/towers/mistral`.

Sliding window attention: a query at position p sees keys at positions > p - W. While every
position is below W that is exactly causal attention, so the towers run any length <= W as
transformers does and refuse longer ones (`LlamaBackbone.check_window`), rather than keep a
per-row window over logical positions.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ..common import RMSNorm
from ..inference_linear import InferenceLinear

Modulation = tuple[Tensor, Tensor, Tensor]

_LENGTH_DEPENDENT_ROPE = ("dynamic", "longrope")


def rope_parameters(config) -> dict:
    """The config's RoPE settings as one dict with at least `rope_type` and `rope_theta`."""
    params = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    params.setdefault("rope_type", params.get("type", "default"))
    params.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    return params


class Rotary(nn.Module):
    """positions (b, n) -> (cos, sin), each (b, 1, n, head_dim) float32, scaled by the variant's factor.

    The inverse frequencies live on the CPU as a plain attribute (not a buffer): the towers may be
    built on the meta device and loaded with `assign`, and a buffer would stay meta.
    """

    def __init__(self, config, head_dim: int):
        super().__init__()
        params = rope_parameters(config)
        rope_type = params["rope_type"]
        if rope_type in _LENGTH_DEPENDENT_ROPE:
            raise ValueError(f"rope_type {rope_type!r} changes its frequencies with the running length, which a "
                             "cached two-tower model cannot follow; use default, linear, llama3 or yarn")
        cpu = torch.device("cpu")
        if rope_type not in ("default", *_rope_functions()):
            raise ValueError(f"unknown rope_type {rope_type!r}; transformers knows {sorted(_rope_functions())}")
        # Computed tables, not weights: real (CPU) even when the tower is built on the meta device.
        with cpu:
            if rope_type == "default":
                exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
                inv_freq, scaling = 1.0 / (float(params["rope_theta"]) ** exponents), 1.0
            else:
                inv_freq, scaling = _rope_functions()[rope_type](config, cpu)
        self.rope_type = rope_type
        self.inv_freq = inv_freq.float()
        self.scaling = float(scaling)

    def forward(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        inv = self.inv_freq.to(positions.device)
        angles = positions[..., None].float() * inv  # (b, n, d/2)
        emb = torch.cat([angles, angles], dim=-1)[:, None]  # (b, 1, n, d)
        return emb.cos() * self.scaling, emb.sin() * self.scaling


def _rope_functions() -> dict:
    # Deferred: transformers' modeling utilities take about a second to import, and only
    # building a layer needs them.
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    return ROPE_INIT_FUNCTIONS


def rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Apply RoPE to x (b, heads, n, d): x cos + rot(x) sin, rot(x) = [-x2, x1] over the two halves."""
    half = x.shape[-1] // 2
    rot = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos.to(x.dtype) + rot * sin.to(x.dtype)


# ---- fused projections (inference) -------------------------------------------------------------
# A layer's q/k/v (and gate/up) projections read the same input, so one matmul over their
# concatenated weights does the work of three (two) with one weight read and fewer per-op costs,
# which is what dominates a batch-1 forward on a CPU. The fused weight is an inference copy held as
# a plain attribute: the parameters, the state dict, the checkpoint format and training are those
# of the separate projections. It is used only where no gradient is recorded (the decoders run under
# `torch.inference_mode`), dropped by `.train()` and by anything that moves or casts the module.
# Each output column is the same dot product either way. Whether it is summed in the same order is
# the BLAS library's choice: on this CPU bf16 (oneDNN) gave bit-identical outputs at every width
# tried, float32 (MKL) at SmolLM2's widths but not at every tiny one (tests/test_fused.py).
_FUSED = "_twotower_fused"
_PACKED_OUT = "_twotower_packed_out"


def applied_weights(proj: nn.Module) -> tuple[Tensor, Tensor | None]:
    """(weight, bias) that a projection applies: an nn.Linear's own, or, for a LoRA adapter
    (`towers.adapters.LoRALinear`, anything with `merged_weight()`), its base weight plus its update."""
    merged = getattr(proj, "merged_weight", None)
    weight = merged() if callable(merged) else proj.weight
    return weight.detach(), None if proj.bias is None else proj.bias.detach()


def concat_projections(projections, *, pack: bool | str = False, max_rows: int | None = None) -> InferenceLinear:
    """One projection that computes all of `projections` side by side (pack, max_rows: `InferenceLinear`)."""
    parts = [applied_weights(p) for p in projections]
    has_bias = [b is not None for _, b in parts]
    if any(has_bias) and not all(has_bias):
        raise ValueError(f"cannot fuse projections of which only some have a bias ({has_bias}); leave them unfused")
    bias = torch.cat([b for _, b in parts]) if all(has_bias) else None
    weight = torch.cat([w for w, _ in parts]) if len(parts) > 1 else parts[0][0]
    return InferenceLinear(weight, bias, pack=pack, max_rows=max_rows)


def fused_projection(module: nn.Module, x: Tensor, key: str = _FUSED) -> InferenceLinear | None:
    """The inference copy `key` of `module` (a `Fusable`: its fused projection, or its packed output
    projection) to apply to x, or None: none made, not for x's row count, or a gradient is being
    recorded (training and autograd must see the separate projections)."""
    copy = module.__dict__.get(key)
    if copy is None or torch.is_grad_enabled() or not copy.applies(x):
        return None
    copy.check(x, f"{key.removeprefix('_twotower_')} copy of {type(module).__name__}")
    return copy


def output_projection(module: nn.Module, x: Tensor) -> Tensor:
    """The module's `OUTPUT_PROJECTION` applied to x: through its packed copy where one serves x."""
    copy = fused_projection(module, x, _PACKED_OUT)
    return getattr(module, module.OUTPUT_PROJECTION)(x) if copy is None else copy(x)


class Fusable:
    """Mixin of a module whose projections `FUSED_PROJECTIONS` read one input: `fuse()` keeps their
    concatenated applied weights (an inference copy, see the section comment) for the module's
    forward to use through `fused_projection`; `unfuse()` drops it, as do `.train()` and moving or casting."""

    FUSED_NAME: str = ""
    FUSED_PROJECTIONS: tuple[str, ...] = ()
    OUTPUT_PROJECTION: str = ""  # the projection after them (o_proj, down_proj), packed by `pack_output`

    def fuse(self, *, pack: bool | str = False, max_rows: int | None = None) -> None:
        """Keep the fused copy (pack, max_rows: `InferenceLinear`)."""
        self.__dict__[_FUSED] = concat_projections([getattr(self, n) for n in self.FUSED_PROJECTIONS], pack=pack,
                                                   max_rows=max_rows)

    def pack_output(self, *, pack: bool | str = True, max_rows: int | None = None) -> None:
        """Keep a packed (or int8) copy of the output projection too, for a tower whose every product is."""
        self.__dict__[_PACKED_OUT] = concat_projections([getattr(self, self.OUTPUT_PROJECTION)], pack=pack,
                                                        max_rows=max_rows)

    def unfuse(self) -> None:
        self.__dict__.pop(_FUSED, None)
        self.__dict__.pop(_PACKED_OUT, None)

    @property
    def fused_nbytes(self) -> int:
        """Bytes of the inference copies (0 when none)."""
        return sum(self.__dict__[k].nbytes for k in (_FUSED, _PACKED_OUT) if k in self.__dict__)

    def train(self, mode: bool = True):
        if mode:  # fused weights are inference copies: training must reach the projections themselves
            self.unfuse()
        return super().train(mode)

    def _apply(self, fn, recurse=True):
        self.unfuse()  # moved or cast (`.to`, `.half`, ...): the fused copy would be stale
        return super()._apply(fn, recurse)


class LlamaAttention(Fusable, nn.Module):
    """Grouped-query attention with RoPE applied to queries and keys (`fuse`: one q/k/v matmul)."""

    FUSED_NAME, FUSED_PROJECTIONS, OUTPUT_PROJECTION = "qkv", ("q_proj", "k_proj", "v_proj"), "o_proj"

    def __init__(self, config, *, qkv_bias: bool, o_bias: bool):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.num_heads
        H = config.hidden_size
        self.q_proj = nn.Linear(H, self.num_heads * self.head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(H, self.num_kv_heads * self.head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(H, self.num_kv_heads * self.head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, H, bias=o_bias)

    def qkv(self, h: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """h (b, n, H) -> q (b, heads, n, d), k and v (b, kv_heads, n, d); q and k rotated."""
        b, n, _ = h.shape
        fused = fused_projection(self, h)
        if fused is None:
            q, k, v = self.q_proj(h), self.k_proj(h), self.v_proj(h)
        else:  # one matmul; the split outputs are column slices of it (views, no copy)
            q, k, v = fused(h).split(self.qkv_sizes, dim=-1)
        q = q.view(b, n, self.num_heads, self.head_dim).transpose(1, 2)
        k = k.view(b, n, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(b, n, self.num_kv_heads, self.head_dim).transpose(1, 2)
        return rotate(q, cos, sin), rotate(k, cos, sin), v

    @property
    def qkv_sizes(self) -> tuple[int, int, int]:
        """Output widths of q_proj, k_proj and v_proj (how a fused projection splits)."""
        return self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim, self.num_kv_heads * self.head_dim

    def attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
        """Softmax attention; mask bool (True = may attend), broadcastable to (b, 1, n, keys)."""
        o = F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), attn_mask=mask,
                                           enable_gqa=self.num_kv_heads != self.num_heads)
        b, _, n, _ = o.shape
        return output_projection(self, o.transpose(1, 2).reshape(b, n, self.num_heads * self.head_dim))


class LlamaMLP(Fusable, nn.Module):
    """SwiGLU: down_proj(act(gate_proj(x)) * up_proj(x)), act = config.hidden_act (silu) (`fuse`: one
    gate/up matmul)."""

    FUSED_NAME, FUSED_PROJECTIONS, OUTPUT_PROJECTION = "gate_up", ("gate_proj", "up_proj"), "down_proj"

    def __init__(self, config):
        super().__init__()
        # Deferred: transformers' modeling utilities take about a second to import, and only
        # building a layer needs them.
        from transformers.activations import ACT2FN

        H, inter, bias = config.hidden_size, config.intermediate_size, bool(getattr(config, "mlp_bias", False))
        self.gate_proj = nn.Linear(H, inter, bias=bias)
        self.up_proj = nn.Linear(H, inter, bias=bias)
        self.down_proj = nn.Linear(inter, H, bias=bias)
        self.act = ACT2FN[config.hidden_act]

    def forward(self, x: Tensor) -> Tensor:
        fused = fused_projection(self, x)
        if fused is None:
            return output_projection(self, self.act(self.gate_proj(x)) * self.up_proj(x))
        gate, up = fused(x).chunk(2, dim=-1)  # one matmul for both
        return output_projection(self, self.act(gate) * up)



class LlamaBlock(nn.Module):
    """One decoder layer: attention and MLP sub-blocks, each optionally modulated (denoiser)."""

    def __init__(self, config, layer_idx: int, *, qkv_bias: bool = False, o_bias: bool = False):
        super().__init__()
        self.layer_idx = layer_idx
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.self_attn = LlamaAttention(config, qkv_bias=qkv_bias, o_bias=o_bias)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.mlp = LlamaMLP(config)

    def attn_input(self, x: Tensor, mod: Modulation | None = None) -> Tensor:
        """input_layernorm(x), or input_layernorm(x (1 + scale) + shift) with a modulation."""
        return self.input_layernorm(x if mod is None else torch.addcmul(mod[0], x, mod[1]))

    def mlp_out(self, x: Tensor, mod: Modulation | None = None) -> Tensor:
        """The whole MLP sub-block: x + mlp(norm(x)), or x + gate * mlp(norm(x) (1 + scale) + shift)."""
        h = self.post_attention_layernorm(x)
        if mod is None:
            return x + self.mlp(h)
        return torch.addcmul(x, mod[2], self.mlp(torch.addcmul(mod[0], h, mod[1])))

    @staticmethod
    def residual(x: Tensor, y: Tensor, mod: Modulation | None = None) -> Tensor:
        """x + y, or x + gate * y with a modulation."""
        return x + y if mod is None else torch.addcmul(x, mod[2], y)


class LlamaBackbone(nn.Module):
    """Embeddings, the decoder layers, the final norm and the rotary tables (`LlamaModel` names).

    A Llama-like family subclasses it and overrides `attention_biases` / `attention_window`.
    """

    def __init__(self, config):
        super().__init__()
        self.config = config
        qkv_bias, o_bias = self.attention_biases(config)
        self.window = self.attention_window(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(LlamaBlock(config, i, qkv_bias=qkv_bias, o_bias=o_bias)
                                    for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary = Rotary(config, self.layers[0].self_attn.head_dim if len(self.layers) else
                             (getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads))

    @property
    def kv_shape(self) -> tuple[int, int]:
        """(kv_heads, head_dim) of every layer's cache."""
        attn = self.layers[0].self_attn
        return attn.num_kv_heads, attn.head_dim

    @staticmethod
    def attention_biases(config) -> tuple[bool, bool]:
        """(q/k/v projections have biases, o_proj has one): Llama's `attention_bias` sets both."""
        bias = bool(getattr(config, "attention_bias", False))
        return bias, bias

    @staticmethod
    def attention_window(config) -> int | None:
        """The sliding attention window W (keys at positions > p - W), or None: Llama has none."""
        return None

    def check_window(self, length: int) -> None:
        """Refuse to run `length` positions (one row's slots, an upper bound on its positions) past
        the sliding window, where transformers' attention would start dropping the oldest keys."""
        if self.window is not None and length > self.window:
            raise ValueError(f"{length} cache positions (left padding and holes included) exceed the config's "
                             f"sliding_window = {self.window}: past it "
                             "transformers' sliding-window attention drops the oldest keys, which these towers do "
                             f"not implement; keep prompt + generated tokens within {self.window}, or use a "
                             "config with sliding_window = null")
