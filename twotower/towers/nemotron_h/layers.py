"""The NemotronH layer stack: one module per block type, with transformers' parameter names.

Block types (config.layers_block_type): "linear_attention" (Mamba-2), "full_attention" (GQA, no
rotary embedding), "mlp" (relu^2), "moe" (sigmoid router + routed experts + shared expert).
Every block is `x + mixer(norm(x))`; with time conditioning (denoiser) the block is
`x + gate * mixer(h)` where `h = norm(modulate(x))` for Mamba / attention and `h = modulate(norm(x))`
for MLP / MoE (docs/design.md, section 1.3). The mixers here hold weights and do the per-layer math; the
towers (context.py, denoiser.py) decide what each layer attends to and which states it carries.

Parameter names equal transformers' `NemotronHForCausalLM` names below `model.`, so state dicts
move across without renaming (MoE experts in the fused 3-D layout).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ..common import RMSNorm
from .ssd import ScanTree, causal_conv1d, ssd_scan, ssd_step, ssd_tree_scan, tree_conv1d

MAMBA, ATTENTION, MLP, MOE = "linear_attention", "full_attention", "mlp", "moe"
BLOCK_TYPES = (MAMBA, ATTENTION, MLP, MOE)


def _activation(name: str):
    if name == "relu2":
        return lambda x: torch.square(F.relu(x))
    # Deferred: transformers' modeling utilities take about a second to import, and only
    # building a layer needs them.
    from transformers.activations import ACT2FN

    return ACT2FN[name]


class GatedRMSNorm(nn.Module):
    """Mamba-2's output norm: RMSNorm(y * silu(z)) over groups of `group_size` channels."""

    def __init__(self, hidden_size: int, group_size: int, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.group_size = group_size
        self.eps = eps

    def forward(self, y: Tensor, z: Tensor) -> Tensor:
        dtype = y.dtype
        y = y.float() * F.silu(z.float())
        g = y.view(*y.shape[:-1], -1, self.group_size)
        g = g * torch.rsqrt(g.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * g.view(y.shape).to(dtype)


NO_DT_LIMIT = (0.0, math.inf)


def dt_limit(config) -> tuple[float, float]:
    """(lo, hi): the clamp on every Mamba-2 time step, dt = clamp(softplus(dt_raw + dt_bias), lo, hi).

    Read from `config.time_step_limit` exactly as transformers' NemotronH (>= 5.25) and mamba-ssm's
    chunked-scan kernels (`dt_limit`) read it; NemotronHConfig's default, (0.0, inf), clamps nothing.
    `time_step_min` / `time_step_max` only set the range dt_bias is initialised in, never a clamp:
    trained heads may go below time_step_min, and a floor there changes the model (docs/design.md,
    section 1.1). A checkpoint trained with a floor records it here, e.g. [0.001, Infinity].

    The same clamp applies on every path (prefill, extend of one token or many, the denoiser's
    block scan, `accept`'s rollback, training), so that extend(1 token) equals the full forward.
    transformers' and mamba-ssm's one-token recurrent step (`selective_state_update`) apply no
    limit; with a non-default limit, their cached decoding therefore differs from their own full
    forward, and we follow the full forward.
    """
    raw = getattr(config, "time_step_limit", NO_DT_LIMIT)
    if not (isinstance(raw, (list, tuple)) and len(raw) == 2
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in raw)):
        raise ValueError(
            f"time_step_limit must be [min, max], two numbers, got {raw!r}; in config.json write e.g. "
            '[0.0, {"__float__": "Infinity"}] (transformers\' spelling of [0, inf]: no limit)')
    lo, hi = float(raw[0]), float(raw[1])
    if not 0.0 <= lo <= hi:  # also rejects NaN
        raise ValueError(
            f"time_step_limit must satisfy 0 <= min <= max (dt is a softplus, never negative), got {raw!r}; "
            "use [0.0, inf] for no limit or [floor, inf] for a floor")
    return lo, hi


@dataclass
class MambaOut:
    """Result of a Mamba-2 mixer call. States: conv (b, conv_dim, k-1), ssm (b, h, p, n) float32."""

    y: Tensor
    conv_state: Tensor
    ssm_state: Tensor
    xbc: Tensor | None = None  # raw conv inputs (b, L, conv_dim), when asked for (boundary conv states)
    ssm_chunk_states: Tensor | None = None  # (b, nchunks, h, p, n), when asked for
    # (x (b, L, h, p), dt (b, L, h) float32, B (b, L, g, n)) as the scan saw them, when asked for:
    # enough to recompute the state after any position (`ssd_state_at`).
    scan_inputs: tuple[Tensor, Tensor, Tensor] | None = None


class Mamba2Mixer(nn.Module):
    """Mamba-2 mixer: in_proj -> [z | xBC | dt]; causal conv + SiLU on xBC; SSD scan; gated norm; out_proj."""

    def __init__(self, config):
        super().__init__()
        self.num_heads = config.mamba_num_heads
        self.head_dim = config.mamba_head_dim
        self.state_size = config.ssm_state_size
        self.n_groups = config.n_groups
        self.kernel_size = config.conv_kernel
        self.chunk_size = config.chunk_size
        self.intermediate = self.num_heads * self.head_dim
        self.conv_dim = self.intermediate + 2 * self.n_groups * self.state_size
        # dt = softplus(dt_raw + dt_bias) is clamped to the checkpoint's `time_step_limit` (`dt_limit`).
        self.dt_limit = dt_limit(config)
        self.in_proj = nn.Linear(config.hidden_size, self.intermediate + self.conv_dim + self.num_heads, bias=config.use_bias)
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, self.kernel_size, groups=self.conv_dim,
                                padding=self.kernel_size - 1, bias=config.use_conv_bias)
        self.dt_bias = nn.Parameter(torch.ones(self.num_heads))
        self.A_log = nn.Parameter(torch.log(torch.arange(1, self.num_heads + 1, dtype=torch.float32)))
        self.D = nn.Parameter(torch.ones(self.num_heads))
        self.norm = GatedRMSNorm(self.intermediate, self.intermediate // self.n_groups, eps=config.layer_norm_epsilon)
        self.out_proj = nn.Linear(self.intermediate, config.hidden_size, bias=config.use_bias)

    def forward(
        self,
        h: Tensor,
        *,
        conv_state: Tensor | None = None,
        ssm_state: Tensor | None = None,
        pad_mask: Tensor | None = None,
        chunk_size: int | None = None,
        return_xbc: bool = False,
        return_chunk_states: bool = False,
        need_final_state: bool = True,
        return_scan_inputs: bool = False,
        tree: ScanTree | None = None,
    ) -> MambaOut:
        """h: (b, L, H). pad_mask: (b, L) bool, True for real tokens; padded positions leave every state unchanged.

        conv_state / ssm_state seed the layer (zeros if None). With `return_chunk_states` the scan
        uses `chunk_size` exactly and also returns the state entering every chunk.
        `need_final_state=False` lets a single-chunk scan skip the final SSM state (it may come back None):
        the denoiser reads its cache and never writes it. `return_scan_inputs` also returns the
        scan's inputs (and, with `return_xbc`, the raw conv inputs), from which the states after any
        position can be rebuilt (a speculative extend that is then cut back).
        `tree`: the L positions form a tree, not a chain (a tree verify, `towers/nemotron_h/branch.py`):
        each reads the states and its own path only. A tree has no end, so no state comes back
        (conv_state and ssm_state are None).
        """
        b, L, _ = h.shape
        z, xbc, dt = self.in_proj(h).split([self.intermediate, self.conv_dim, self.num_heads], dim=-1)
        if pad_mask is not None:
            # A padded position feeds zeros to the conv (as an empty prefix would) and has dt = 0,
            # i.e. no decay and no input: each row computes what it computes alone.
            xbc = xbc * pad_mask[..., None].to(xbc.dtype)
        if tree is None:
            conv_out, new_conv = causal_conv1d(xbc, self.conv1d.weight.squeeze(1), self.conv1d.bias,
                                               initial_state=conv_state)
        else:
            conv_out, new_conv = tree_conv1d(xbc, self.conv1d.weight.squeeze(1), self.conv1d.bias,
                                             initial_state=conv_state, taps=tree.conv_taps), None
        conv_out = F.silu(conv_out)
        x, B, C = conv_out.split([self.intermediate, self.n_groups * self.state_size, self.n_groups * self.state_size], dim=-1)
        dt = F.softplus(dt.float() + self.dt_bias.float())
        if self.dt_limit != NO_DT_LIMIT:  # softplus is already >= 0: the default limit is a no-op
            dt = dt.clamp(min=self.dt_limit[0], max=self.dt_limit[1])
        # Every consumer (scan, step, the recorded `scan_inputs` that `accept` rolls back from) gets
        # this one dt. The padding zeros come after the clamp, so a floor cannot lift them.
        if pad_mask is not None:
            dt = dt * pad_mask[..., None].to(dt.dtype)
        A = self.decay_rates()
        x = x.view(b, L, self.num_heads, self.head_dim)
        B = B.view(b, L, self.n_groups, self.state_size)
        C = C.view(b, L, self.n_groups, self.state_size)
        chunk_states = None
        if tree is not None:
            y, final = ssd_tree_scan(x, dt, A, B, C, D=self.D, initial_state=ssm_state, ancestors=tree.ancestors), None
        elif L == 1 and ssm_state is not None and not return_chunk_states:
            y, final = ssd_step(x[:, 0], dt[:, 0], A, B[:, 0], C[:, 0], D=self.D, state=ssm_state.float())
            y = y[:, None]
        else:
            out = ssd_scan(x, dt, A, B, C, chunk_size=chunk_size or self.chunk_size, D=self.D,
                           initial_state=ssm_state, return_chunk_states=return_chunk_states,
                           final_state=need_final_state)
            y, final = out[0], out[1]
            if return_chunk_states:
                chunk_states = out[2]
        y = self.norm(y.reshape(b, L, self.intermediate).to(h.dtype), z)
        return MambaOut(self.out_proj(y), new_conv, final, xbc if return_xbc else None, chunk_states,
                        (x, dt, B) if return_scan_inputs else None)

    def decay_rates(self) -> Tensor:
        """A (h,) float32: the negative per-head decay rates the scan uses."""
        return -torch.exp(self.A_log.float())

    def empty_states(self, batch: int, *, device=None, dtype=None) -> tuple[Tensor, Tensor]:
        """Zero conv state (b, conv_dim, k-1) in `dtype` and SSM state (b, h, p, n) in float32."""
        conv = torch.zeros(batch, self.conv_dim, self.kernel_size - 1, device=device, dtype=dtype)
        ssm = torch.zeros(batch, self.num_heads, self.head_dim, self.state_size, device=device, dtype=torch.float32)
        return conv, ssm


class Attention(nn.Module):
    """Grouped-query attention without positional encoding (NemotronH attention layers)."""

    def __init__(self, config):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.num_heads
        H = config.hidden_size
        self.q_proj = nn.Linear(H, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(H, self.num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(H, self.num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, H, bias=False)

    def qkv(self, h: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """h (b, T, H) -> q (b, heads, T, d), k and v (b, kv_heads, T, d)."""
        b, T, _ = h.shape
        q = self.q_proj(h).view(b, T, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(h).view(b, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(h).view(b, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        return q, k, v

    def attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
        """Softmax attention; mask is bool, True = may attend, broadcastable to (b, 1, Tq, Tk)."""
        o = F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), attn_mask=mask,
                                           enable_gqa=self.num_kv_heads != self.num_heads)
        b, _, T, _ = o.shape
        return self.o_proj(o.transpose(1, 2).reshape(b, T, self.num_heads * self.head_dim))


class DenseMLP(nn.Module):
    """down_proj(act(up_proj(x))), act = relu^2 in NemotronH."""

    def __init__(self, config, intermediate_size: int | None = None):
        super().__init__()
        inter = intermediate_size or config.intermediate_size
        self.up_proj = nn.Linear(config.hidden_size, inter, bias=config.mlp_bias)
        self.down_proj = nn.Linear(inter, config.hidden_size, bias=config.mlp_bias)
        self.act = _activation(config.mlp_hidden_act)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(self.act(self.up_proj(x)))


class TopkRouter(nn.Module):
    """Sigmoid router; the correction bias only chooses experts, weights come from the raw scores."""

    def __init__(self, config):
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.num_experts = config.n_routed_experts
        self.n_group = config.n_group
        self.topk_group = config.topk_group
        self.norm_topk_prob = config.norm_topk_prob
        self.scaling = config.routed_scaling_factor
        self.weight = nn.Parameter(torch.zeros(self.num_experts, config.hidden_size, dtype=torch.float32))
        self.register_buffer("e_score_correction_bias", torch.zeros(self.num_experts, dtype=torch.float32))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x (N, H) -> (weights (N, k) float32, indices (N, k))."""
        scores = F.linear(x.float(), self.weight.float()).sigmoid()
        choice = scores + self.e_score_correction_bias.float()
        if self.n_group > 1:
            # Group-limited routing: keep the topk_group groups whose two best experts score highest.
            grouped = choice.view(-1, self.n_group, self.num_experts // self.n_group)
            group_score = grouped.topk(2, dim=-1).values.sum(-1)
            keep = torch.zeros_like(group_score, dtype=torch.bool)
            keep.scatter_(1, group_score.topk(self.topk_group, dim=-1).indices, True)
            choice = choice.masked_fill(~keep.repeat_interleave(self.num_experts // self.n_group, dim=1), float("-inf"))
        idx = choice.topk(self.top_k, dim=-1).indices
        w = scores.gather(1, idx)
        if self.norm_topk_prob:
            w = w / (w.sum(-1, keepdim=True) + 1e-20)
        return w * self.scaling, idx


class Experts(nn.Module):
    """Routed experts as fused 3-D weights: up_proj (E, I, H_in), down_proj (E, H_in, I)."""

    def __init__(self, config):
        super().__init__()
        d_in = config.moe_latent_size or config.hidden_size
        E, inter = config.n_routed_experts, config.moe_intermediate_size
        self.up_proj = nn.Parameter(torch.randn(E, inter, d_in) * config.initializer_range)
        self.down_proj = nn.Parameter(torch.randn(E, d_in, inter) * config.initializer_range)
        self.act = _activation(config.mlp_hidden_act)

    def expert_weights(self, dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor]:
        """(up (E, I, d), down (E, d, I)) as the forward uses them; a quantized subclass
        (`twotower.quantization`) dequantizes here to `dtype` (the activations'), once per forward."""
        return self.up_proj, self.down_proj

    def forward(self, x: Tensor, weights: Tensor, idx: Tensor) -> Tensor:
        """x (N, d), weights/idx (N, k) -> (N, d): sum_j weights[:, j] * expert_{idx[:, j]}(x)."""
        up, down = self.expert_weights(x.dtype)
        E, k = up.shape[0], idx.shape[1]
        # Dense when every token would use at least half of the experts anyway (tiny E): it wastes at
        # most as many expert evaluations as it uses and needs no sorting (E = 4, k = 2: 46 us vs 71 us).
        # Past DENSE_MAX_TOKENS tokens the wasted evaluations cost more than the sort, so the grouped
        # GEMM takes over where it can run (embedded default, CPU, 1 thread: 128 tokens, 731 us dense
        # vs 519 us grouped; 16 tokens, 153 vs 155; benchmarks/spec_cost.py).
        if E <= 2 * k and (x.shape[0] <= DENSE_MAX_TOKENS or not _grouped_mm_ok(x, up)):
            return self._dense(x, weights, idx, up, down)
        if _grouped_mm_ok(x, up):
            return self._grouped(x, weights, idx, up, down)
        return self._loop(x, weights, idx, up, down)

    def _dense(self, x: Tensor, weights: Tensor, idx: Tensor, up: Tensor | None = None,
               down: Tensor | None = None) -> Tensor:
        """Every expert on every token, combined with zero weight for the unchosen ones."""
        if up is None:
            up, down = self.expert_weights(x.dtype)
        E = up.shape[0]
        gate = torch.zeros(x.shape[0], E, dtype=weights.dtype, device=x.device).scatter_add_(1, idx, weights)
        hidden = self.act(torch.einsum("nd,eid->eni", x, up))
        y = torch.einsum("eni,edi->end", hidden, down)
        return torch.einsum("end,ne->nd", y.to(gate.dtype), gate).to(x.dtype)

    @staticmethod
    def _sort(idx: Tensor, weights: Tensor, num_experts: int) -> tuple[Tensor, Tensor, Tensor]:
        """The N k (token, expert) slots sorted by expert: (token (Nk,), weight (Nk,), counts (E,))."""
        flat = idx.reshape(-1)
        order = flat.argsort(stable=True)
        counts = torch.bincount(flat, minlength=num_experts)
        return order // idx.shape[1], weights.reshape(-1)[order], counts

    def _grouped(self, x: Tensor, weights: Tensor, idx: Tensor, up: Tensor | None = None,
                 down: Tensor | None = None) -> Tensor:
        """Grouped GEMM: slots sorted by expert, each projection one `torch._grouped_mm` over the
        experts' row ranges (offsets = cumulative counts, experts with no slot get an empty range).

        Nothing is read back to the host (no per-expert `.item()` / `.tolist()`), so a decode step
        stays asynchronous on a GPU, and the work is N k expert rows, not the dense path's N E.
        """
        if up is None:
            up, down = self.expert_weights(x.dtype)
        token, w, counts = self._sort(idx, weights, up.shape[0])
        offs = counts.cumsum(0).to(torch.int32)
        xs = x[token]  # (Nk, d), grouped by expert
        h = self.act(torch._grouped_mm(xs, up.transpose(1, 2), offs=offs))  # (Nk, I)
        y = torch._grouped_mm(h, down.transpose(1, 2), offs=offs)  # (Nk, d)
        out = torch.zeros(x.shape, dtype=weights.dtype, device=x.device)
        return out.index_add_(0, token, y.to(w.dtype) * w[:, None]).to(x.dtype)

    def _loop(self, x: Tensor, weights: Tensor, idx: Tensor, up: Tensor | None = None,
              down: Tensor | None = None) -> Tensor:
        """The plain path: slots sorted once, one matmul pair per expert that received tokens.

        One host read of the counts per call (not per expert); used where the grouped kernel is
        missing or cannot differentiate (training on CPU: its backward is not implemented there).
        """
        if up is None:
            up, down = self.expert_weights(x.dtype)
        token, w, counts = self._sort(idx, weights, up.shape[0])
        out = torch.zeros(x.shape, dtype=weights.dtype, device=x.device)
        start = 0
        for e, n in enumerate(counts.tolist()):
            if n == 0:
                continue
            tok = token[start:start + n]
            y = F.linear(self.act(F.linear(x[tok], up[e])), down[e])
            out.index_add_(0, tok, (y * w[start:start + n, None]).to(out.dtype))
            start += n
        return out.to(x.dtype)


# Override for tests and benchmarks: None = automatic, False = never use torch._grouped_mm.
USE_GROUPED_MM: bool | None = None

# The most tokens for which experts with E <= 2 k run dense (every expert on every token), see
# `Experts.forward`; a decode step or a one-row block stays dense, a batch of blocks goes grouped.
DENSE_MAX_TOKENS = 24


def _grouped_mm_ok(x: Tensor, w: Tensor) -> bool:
    """Whether `torch._grouped_mm` can run these experts: present in this torch, no gradient needed
    (its CPU backward fails), and a dtype the device's kernel takes (CPU: float32 / bf16, checked
    against the loop in tests; CUDA, and anything compiled: bf16 only)."""
    if USE_GROUPED_MM is False or not hasattr(torch, "_grouped_mm"):
        return False
    if torch.is_grad_enabled() and (x.requires_grad or w.requires_grad):
        return False
    # Under torch.compile the operator's shape function (its meta kernel) takes bf16 only, even where
    # the CPU kernel runs float32: a compiled float32 tower would fail to trace, so it takes another path.
    cpu_eager = x.device.type == "cpu" and not torch.compiler.is_compiling()
    ok = (torch.float32, torch.bfloat16) if cpu_eager else (torch.bfloat16,)
    return x.dtype == w.dtype and x.dtype in ok


class MoELayer(nn.Module):
    """Routed experts (optionally in a latent space) plus a shared expert on the raw input."""

    def __init__(self, config):
        super().__init__()
        self.gate = TopkRouter(config)
        self.experts = Experts(config)
        self.shared_experts = DenseMLP(config, intermediate_size=config.moe_shared_expert_intermediate_size)
        if config.moe_latent_size is not None:
            self.fc1_latent_proj = nn.Linear(config.hidden_size, config.moe_latent_size, bias=config.mlp_bias)
            self.fc2_latent_proj = nn.Linear(config.moe_latent_size, config.hidden_size, bias=config.mlp_bias)
        else:
            self.fc1_latent_proj = self.fc2_latent_proj = None

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        w, idx = self.gate(flat)
        routed_in = flat if self.fc1_latent_proj is None else self.fc1_latent_proj(flat)
        routed = self.experts(routed_in, w, idx)
        if self.fc2_latent_proj is not None:
            routed = self.fc2_latent_proj(routed)
        return routed.view(shape) + self.shared_experts(x)


class HybridBlock(nn.Module):
    """Pre-norm residual block around one mixer, with optional adaLN modulation (denoiser)."""

    def __init__(self, config, layer_idx: int):
        super().__init__()
        self.block_type = config.layers_block_type[layer_idx]
        self.layer_idx = layer_idx
        self.norm = RMSNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        mixer_cls = {MAMBA: Mamba2Mixer, ATTENTION: Attention, MLP: DenseMLP, MOE: MoELayer}
        if self.block_type not in mixer_cls:
            raise ValueError(f"layer {layer_idx}: unknown block type {self.block_type!r}; expected one of {BLOCK_TYPES}")
        self.mixer = mixer_cls[self.block_type](config)

    @property
    def modulate_before_norm(self) -> bool:
        return self.block_type in (MAMBA, ATTENTION)

    def pre(self, x: Tensor, mod: tuple[Tensor, Tensor, Tensor] | None = None) -> Tensor:
        """The mixer's input: norm(x), norm(modulate(x)) or modulate(norm(x)).

        mod = (shift, 1 + scale, gate), as `AdaLNSingle.modulations` gives it; modulate(x) = x (1 + scale) + shift.
        """
        if mod is None:
            return self.norm(x)
        shift, scale1, _ = mod
        if self.modulate_before_norm:
            return self.norm(torch.addcmul(shift, x, scale1))
        return torch.addcmul(shift, self.norm(x), scale1)

    @staticmethod
    def post(x: Tensor, y: Tensor, mod: tuple[Tensor, Tensor, Tensor] | None = None) -> Tensor:
        return x + y if mod is None else torch.addcmul(x, mod[2], y)


class HybridBackbone(nn.Module):
    """Embeddings, the block stack and the final norm (transformers' `NemotronHModel` names)."""

    def __init__(self, config):
        super().__init__()
        for i, t in enumerate(config.layers_block_type):
            if t not in BLOCK_TYPES:
                raise ValueError(f"layer {i}: unknown block type {t!r}; expected one of {BLOCK_TYPES}")
        self.config = config
        self.embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(HybridBlock(config, i) for i in range(len(config.layers_block_type)))
        self.norm_f = RMSNorm(config.hidden_size, eps=config.layer_norm_epsilon)

    @property
    def block_types(self) -> list[str]:
        return [blk.block_type for blk in self.layers]
