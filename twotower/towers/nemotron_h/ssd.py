"""Mamba-2 kernels: the chunked SSD scan and the depthwise causal conv, both with explicit states.

Two implementations of the scan with one meaning:

* `ssd_scan_reference` — pure PyTorch, float32, chunked ("state space duality" form). It takes an
  initial state and returns the final state and, on request, the state at the start of every
  chunk. With `chunk_size = S` those chunk-start states are exactly the block-boundary states that
  denoiser training needs (state after position kS - 1; the initial state for k = 0).
* mamba-ssm's `mamba_chunk_scan_combined` (CUDA), used by `ssd_scan` when it is installed and the
  tensors live on a GPU. It is imported inside the dispatcher, never at module top.

Short seeded scans (the dispatch rule, `scan_path`): the kernel is reported to go wrong when given
`initial_states` on a sequence shorter than its `chunk_size` (vLLM PR #21783), which is exactly a
denoiser block (16 tokens, chunk_size 128) or a short extend. Such scans take the reference's
single-chunk path unless the installed mamba-ssm version is in `VERIFIED_KERNEL_VERSIONS`, the
versions whose short seeded parity (`tests/test_ssd.py::test_mamba_ssm_kernel_matches_reference`,
run by `benchmarks/gpu_checks.sh`) has passed on a GPU. The list is empty until such a run; add a
version only with that run's log. `TWOTOWER_TRUST_SHORT_SEEDED_KERNEL=1` (or `trust_short_seeded`)
overrides the list, for that parity run and for tests. Long or unseeded scans use the kernel.

A tree verify (several candidate continuations in one forward, `towers/branching.py`) scans a tree of
positions instead of a chain: `ssd_tree_scan` and `tree_conv1d` give every position what a scan of its
own path alone gives, with the single-chunk form's math and the causal triangle replaced by the tree.

The recurrence, per head h (state (P, N)), for t = 0 .. L-1:
    state_t = exp(dt_t * A_h) * state_{t-1} + dt_t * x_t (outer) B_t
    y_t     = state_t @ C_t + D_h * x_t
`dt` arrives already processed (bias, softplus, the checkpoint's `time_step_limit` clamp and the
padding mask, all applied by the mixer: `layers.dt_limit`), so both implementations see the same
numbers and the kernel is called with no bias, no softplus and no limit of its own.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from importlib.metadata import version

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "ssd_scan",
    "ssd_scan_reference",
    "ssd_step",
    "causal_conv1d",
    "conv_boundary_states",
    "conv_state_at",
    "ssd_state_at",
    "ssd_tree_scan",
    "tree_conv1d",
    "ScanTree",
    "kernel_backend",
    "scan_path",
    "trust_short_seeded",
    "VERIFIED_KERNEL_VERSIONS",
]

# "auto" (default), "torch" or "mamba_ssm"; tests and benchmarks force one with `kernel_backend`.
_BACKEND = os.environ.get("TWOTOWER_SSD_BACKEND", "auto")


class kernel_backend:
    """Context manager (and setter) choosing the scan backend: "auto", "torch" or "mamba_ssm"."""

    def __init__(self, name: str):
        if name not in ("auto", "torch", "mamba_ssm"):
            raise ValueError(f"kernel backend must be 'auto', 'torch' or 'mamba_ssm', got {name!r}")
        global _BACKEND
        self._prev, _BACKEND = _BACKEND, name

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        global _BACKEND
        _BACKEND = self._prev


def _segsum(a: Tensor) -> Tensor:
    """(..., T) -> (..., T, T) with out[..., t, s] = sum_{s < r <= t} a[r] for s <= t, -inf above.

    Built from a masked cumulative sum rather than differences of one long cumsum, so a long
    strongly-decaying chunk does not lose precision to cancellation.
    """
    T = a.shape[-1]
    x = a[..., :, None].expand(*a.shape, T)  # x[..., r, s] = a[r]
    not_strict, not_keep = _tril_masks(T, a.device)
    x = x.masked_fill(not_strict, 0.0).cumsum(dim=-2)
    return x.masked_fill(not_keep, float("-inf"))


_MASKS: dict = {}


def _tril_masks(T: int, device) -> tuple[Tensor, Tensor]:
    """Cached complements of the strict and non-strict lower triangles (T, T)."""
    if torch.compiler.is_compiling():
        # Traced, the masks are built inside the graph: a module-level cache would be guarded on (its
        # length), and the compiled tower would recompile each time the cache gained a size.
        ones = torch.ones(T, T, dtype=torch.bool, device=device)
        return ~torch.tril(ones, diagonal=-1), ~torch.tril(ones)
    key = (T, str(device))
    if key not in _MASKS:
        # Built outside inference mode: a cached mask first made during generation must still be
        # usable by a training step later in the same process.
        with torch.inference_mode(False):
            ones = torch.ones(T, T, dtype=torch.bool, device=device)
            _MASKS[key] = (~torch.tril(ones, diagonal=-1), ~torch.tril(ones))
    return _MASKS[key]


def ssd_scan_reference(
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    *,
    chunk_size: int,
    D: Tensor | None = None,
    initial_state: Tensor | None = None,
    return_chunk_states: bool = False,
    final_state: bool = True,
):
    """Chunked SSD scan in float32.

    Args:
        x: (b, L, h, p) inputs.        dt: (b, L, h) step sizes (already softplus'd / clamped).
        A: (h,) negative decay rates.  B, C: (b, L, g, n) with g dividing h.
        D: (h,) skip, optional.        initial_state: (b, h, p, n), optional (zeros).
    Returns:
        y (b, L, h, p) float32, final_state (b, h, p, n) float32, and if `return_chunk_states`
        also (b, nchunks, h, p, n): the state entering each chunk (chunk c starts at c*chunk_size).
        With `final_state=False` a single-chunk scan skips the final state and returns None for it.
    """
    b, L, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    Q = max(1, min(chunk_size, L)) if not return_chunk_states else chunk_size
    f32 = torch.float32
    x, dt, B, C, A = x.to(f32), dt.to(f32), B.to(f32), C.to(f32), A.to(f32)
    if Q == L and not return_chunk_states:
        return _single_chunk(x, dt, A, B, C, D, initial_state, final_state=final_state)
    if g != h:
        B = B.repeat_interleave(h // g, dim=2)
        C = C.repeat_interleave(h // g, dim=2)
    pad = (-L) % Q
    if pad:
        # Zero dt on padding: no decay and no input, so the final state is the state at L - 1.
        x, dt, B, C = (F.pad(t, (0, 0) * (t.dim() - 2) + (0, pad)) for t in (x, dt, B, C))
    c = (L + pad) // Q
    xs = x.reshape(b, c, Q, h, p)
    Bs = B.reshape(b, c, Q, h, n)
    Cs = C.reshape(b, c, Q, h, n)
    dA = (dt * A).reshape(b, c, Q, h).permute(0, 3, 1, 2)  # (b, h, c, Q)
    xdt = xs * dt.reshape(b, c, Q, h, 1)
    cum = dA.cumsum(dim=-1)  # (b, h, c, Q)

    # Within a chunk: y_t += sum_{s <= t} exp(sum_{s<r<=t} dA_r) (C_t . B_s) dt_s x_s.
    decay = torch.exp(_segsum(dA))  # (b, h, c, Q_t, Q_s)
    scores = torch.einsum("bcthn,bcshn->bhcts", Cs, Bs) * decay
    y = torch.einsum("bhcts,bcshp->bcthp", scores, xdt)

    # What each chunk adds to the state at its end: sum_s exp(cum_last - cum_s) dt_s x_s B_s.
    to_end = torch.exp(cum[..., -1:] - cum)  # (b, h, c, Q)
    chunk_add = torch.einsum("bhcs,bcshn,bcshp->bchpn", to_end, Bs, xdt)

    # Across chunks: start[c+1] = exp(total_c) * start[c] + chunk_add[c], as one matrix product.
    if initial_state is None:
        init = torch.zeros(b, 1, h, p, n, dtype=f32, device=x.device)
    else:
        init = initial_state.to(f32)[:, None]
    states = torch.cat([init, chunk_add], dim=1)  # (b, c + 1, h, p, n)
    chunk_decay = torch.exp(_segsum(F.pad(cum[..., -1], (1, 0))))  # (b, h, c+1, c+1)
    starts = torch.einsum("bhzy,byhpn->bzhpn", chunk_decay, states)  # state entering chunk z
    entering, final_state = starts[:, :-1], starts[:, -1]

    # From the state entering the chunk: y_t += exp(cum_t) C_t . state.
    y = y + torch.einsum("bcthn,bchpn->bcthp", Cs, entering) * torch.exp(cum).permute(0, 2, 3, 1)[..., None]
    y = y.reshape(b, c * Q, h, p)[:, :L]
    if D is not None:
        y = y + x[:, :L] * D.to(f32)[:, None]
    if return_chunk_states:
        return y, final_state, entering
    return y, final_state


def _single_chunk(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None,
                  initial_state: Tensor | None, *, final_state: bool = True,
                  ancestors: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
    """The whole sequence is one chunk (decode blocks, short extends): the same math as the chunked
    form with the inter-chunk recurrence reduced to one decay, written as batched matmuls over
    (b, h) so a 16-token block costs a handful of kernels. Inputs float32; B / C per group
    (b, L, g, n): the C_t . B_s products are shared by a group's h / g heads, so they are computed
    once per group (the products the per-head form computes, bit for bit, h / g times fewer).

    ancestors (b, L, L) bool: the positions form a tree (`ssd_tree_scan`), not a chain; there is
    then no single final state."""
    b, L, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    r = h // g  # heads per group; head j reads group j // r (as repeat_interleave lays them out)
    xh = (x * dt[..., None]).permute(0, 2, 1, 3)  # (b, h, L, p): dt_s x_s
    Bg, Cg = B.permute(0, 2, 1, 3), C.permute(0, 2, 1, 3)  # (b, g, L, n)
    dA = (dt * A).permute(0, 2, 1)  # (b, h, L)
    if ancestors is None:
        cum, seg = dA.cumsum(-1), _segsum(dA)
    else:
        cum, seg = _tree_segsum(dA, ancestors)
    cb = (Cg @ Bg.transpose(-1, -2))[:, :, None]  # (b, g, 1, t, s)
    scores = (cb * torch.exp(seg).view(b, g, r, L, L)).view(b, h, L, L)  # (b, h, t, s)
    y = scores @ xh  # (b, h, L, p)
    final = None
    if final_state and ancestors is None:
        Bh = Bg[:, :, None].expand(b, g, r, L, n).reshape(b, h, L, n)
        to_end = torch.exp(cum[..., -1:] - cum)  # (b, h, L)
        final = ((Bh * to_end[..., None]).transpose(-1, -2) @ xh).transpose(-1, -2)  # (b, h, p, n)
    if initial_state is not None:
        init = initial_state.float()
        from_init = (Cg[:, :, None] @ init.view(b, g, r, p, n).transpose(-1, -2)).view(b, h, L, p)
        y = y + from_init * torch.exp(cum)[..., None]
        if final is not None:
            final = final + init * torch.exp(cum[..., -1])[..., None, None]
    y = y.permute(0, 2, 1, 3)
    if D is not None:
        y = y + x * D.float()[:, None]
    return y, final


def _tree_segsum(dA: Tensor, ancestors: Tensor) -> tuple[Tensor, Tensor]:
    """`_segsum` and the inclusive cumulative sum for positions that form a tree: dA (b, h, L),
    ancestors (b, L, L) bool (ancestors[:, t, s]: s lies on t's path from the root, t itself
    included). Returns cum (b, h, L), the sum of dA over t's path, and seg (b, h, t, s) =
    cum_t - cum_s, the decay from s to t along the path, where s is an ancestor of t, -inf elsewhere.

    Differences of path sums, not masked sums: the paths are a few dozen positions (a verify tree),
    and `ssd_state_at`'s rollback of the same slots already decays by such differences."""
    # (b, h, s) @ (b, s, t): dA summed over t's path, one batched product with no (b, h, L, L) temporary.
    cum = dA @ ancestors.transpose(-1, -2).to(dA.dtype)
    seg = (cum[..., :, None] - cum[..., None, :]).masked_fill(~ancestors[:, None], float("-inf"))
    return cum, seg


@dataclass
class ScanTree:
    """A block of positions that form a tree (a tree verify's main block and branches), for a Mamba
    layer: `ancestors` (b, L, L) bool, ancestors[:, t, s] = slot s lies on slot t's path (t itself
    included), and `conv_taps` (b, k, L) long, the inputs each slot's causal conv reads along its
    path (`tree_conv1d`). `towers/nemotron_h/branch.py` builds one per tree verify."""

    ancestors: Tensor
    conv_taps: Tensor


def ssd_tree_scan(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, *, D: Tensor | None,
                  initial_state: Tensor | None, ancestors: Tensor) -> Tensor:
    """y (b, L, h, p) float32 of a scan over positions that form a tree: each position sees the
    initial state and the positions on its own path (ancestors (b, L, L) bool, as `ScanTree`), as if
    its path alone had been scanned. Arguments as `ssd_scan_reference`'s. One quadratic pass: the
    single-chunk form with the causal triangle replaced by the tree, so K branches cost what a
    chain of as many positions costs."""
    f32 = torch.float32
    x, dt, B, C = x.to(f32), dt.to(f32), B.to(f32), C.to(f32)
    return _single_chunk(x, dt, A.to(f32), B, C, D, initial_state, final_state=False, ancestors=ancestors)[0]


def tree_conv1d(x: Tensor, weight: Tensor, bias: Tensor | None, *, initial_state: Tensor | None,
                taps: Tensor) -> Tensor:
    """`causal_conv1d` over positions that form a tree: y (b, L, c), where slot t's window is its
    own path's last k raw inputs. taps (b, k, L) long index [initial_state, x] along time
    (0 .. k-2: the state's inputs, k - 1 + t: slot t); taps[:, j] is what weight[:, j] multiplies
    (j = 0 the oldest), as `ScanTree.conv_taps`. The sum runs in `causal_conv1d`'s order, so a
    chain's slots get its numbers bit for bit."""
    b, L, c = x.shape
    k = weight.shape[-1]
    full, w = _conv_window(x, weight, initial_state)
    y = None
    for j in range(k):
        tap = full.gather(-1, taps[:, j, None, :].expand(b, c, L)) * w[:, j, None]
        y = tap if y is None else y + tap
    if bias is not None:
        y = y + bias.to(full.dtype)[:, None]
    return y.transpose(1, 2)


def ssd_step(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, *, D: Tensor | None, state: Tensor):
    """One recurrent step (autoregressive decoding): x (b, h, p), dt (b, h), B/C (b, g, n), state (b, h, p, n) fp32.

    Returns y (b, h, p) float32 and the new state. Same recurrence as the scan with L = 1.
    """
    h, g = x.shape[1], B.shape[1]
    B = B.float().repeat_interleave(h // g, dim=1)
    C = C.float().repeat_interleave(h // g, dim=1)
    dt = dt.float()
    xf = x.float()
    new_state = state * torch.exp(dt * A.float())[..., None, None] + (dt[..., None] * xf)[..., None] * B[:, :, None, :]
    y = (new_state @ C[..., None]).squeeze(-1)
    if D is not None:
        y = y + xf * D.float()[:, None]
    return y, new_state


def ssd_state_at(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, *, initial_state: Tensor | None,
                 last: Tensor) -> Tensor:
    """The SSM state right after position `last[b]` of a scanned segment, per row, in float32.

    x (b, L, h, p), dt (b, L, h), A (h,), B (b, L, g, n) as for the scan; initial_state (b, h, p, n)
    (zeros if None); last (b,) long in [-1, L - 1], where -1 means "before the segment" (the initial
    state). Closed form of the recurrence:
        state = exp(sum_{r <= last} dA_r) init + sum_{s <= last} exp(sum_{s < r <= last} dA_r) dt_s x_s B_s^T
    Used to roll a speculative extend back to the tokens that were accepted.
    """
    b, L, h, p = x.shape
    g = B.shape[2]
    f32 = torch.float32
    dA = dt.to(f32) * A.to(f32)  # (b, L, h)
    cum = F.pad(dA.cumsum(1), (0, 0, 1, 0))  # (b, L + 1, h); cum[:, i + 1] = sum_{r <= i} dA_r
    end = cum.gather(1, (last + 1).view(b, 1, 1).expand(b, 1, h))  # (b, 1, h)
    pos = torch.arange(L, device=x.device)
    diff = (end - cum[:, 1:]).masked_fill(pos.view(1, L, 1) > last.view(b, 1, 1), float("-inf"))
    w = diff.exp_().mul_(dt.to(f32))  # (b, L, h): exp(decay to `last`) dt_s, 0 after `last`
    Bh = B.to(f32)
    if g != h:
        Bh = Bh.repeat_interleave(h // g, dim=2)
    xw = (x.to(f32) * w[..., None]).permute(0, 2, 3, 1)  # (b, h, p, L)
    state = xw @ Bh.permute(0, 2, 1, 3)  # (b, h, p, n)
    if initial_state is not None:
        state = torch.addcmul(state, initial_state.to(f32), end.view(b, h, 1, 1).exp())
    return state


def conv_state_at(initial_state: Tensor, x: Tensor, keep: Tensor) -> Tensor:
    """The conv state after the first `keep[b]` positions of x, per row.

    initial_state (b, c, k - 1): the raw inputs before x; x (b, L, c) raw conv inputs; keep (b,) long
    in [0, L]. Returns (b, c, k - 1): the last k - 1 raw inputs of [initial_state, x[:keep]].
    """
    b, c, km1 = initial_state.shape
    full = torch.cat([initial_state, x.transpose(1, 2).to(initial_state.dtype)], dim=-1)  # (b, c, k - 1 + L)
    idx = keep.view(b, 1, 1) + torch.arange(km1, device=x.device).view(1, 1, km1)
    return full.gather(-1, idx.expand(b, c, km1))


def _use_mamba_ssm(x: Tensor) -> bool:
    if _BACKEND == "torch" or not x.is_cuda:
        if _BACKEND == "mamba_ssm" and not x.is_cuda:
            raise RuntimeError("kernel backend 'mamba_ssm' needs CUDA tensors")
        return False
    try:
        import mamba_ssm.ops.triton.ssd_combined  # noqa: F401
    except ImportError:
        if _BACKEND == "mamba_ssm":
            raise RuntimeError("kernel backend 'mamba_ssm' requested but mamba-ssm is not installed: pip install 'twotower[mamba]'")
        return False
    return True


# mamba-ssm versions whose seeded scans shorter than chunk_size matched the reference on a GPU
# (benchmarks/gpu_checks.sh). Empty: no version has been verified yet.
VERIFIED_KERNEL_VERSIONS: frozenset[str] = frozenset()

_TRUST_SHORT = os.environ.get("TWOTOWER_TRUST_SHORT_SEEDED_KERNEL", "") == "1"


class trust_short_seeded:
    """Context manager (and setter): True lets short seeded scans use the kernel whatever its
    version (the GPU parity run, tests); False restores the allow-list rule."""

    def __init__(self, value: bool = True):
        global _TRUST_SHORT
        self._prev, _TRUST_SHORT = _TRUST_SHORT, bool(value)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        global _TRUST_SHORT
        _TRUST_SHORT = self._prev


def _kernel_version() -> str | None:
    try:
        return version("mamba-ssm")
    except Exception:  # not installed as a distribution (e.g. a source checkout)
        try:
            import mamba_ssm

            return getattr(mamba_ssm, "__version__", None)
        except ImportError:
            return None


def scan_path(x: Tensor, *, chunk_size: int, initial_state: Tensor | None, return_chunk_states: bool = False) -> str:
    """Which implementation `ssd_scan` runs for these inputs: "reference" or "mamba_ssm".

    The rule: the reference for chunk-start states, off CUDA, or without mamba-ssm; the reference
    for a seeded scan shorter than `chunk_size` (x (b, L, h, p), L < chunk_size, initial_state
    given) unless the kernel is trusted for it (`VERIFIED_KERNEL_VERSIONS`, `trust_short_seeded`)
    or forced (`kernel_backend("mamba_ssm")`, which the parity test uses); else the kernel.
    """
    if return_chunk_states or not _use_mamba_ssm(x):
        return "reference"
    short_seeded = initial_state is not None and x.shape[1] < chunk_size
    if short_seeded and _BACKEND != "mamba_ssm" and not _TRUST_SHORT \
            and _kernel_version() not in VERIFIED_KERNEL_VERSIONS:
        return "reference"
    return "mamba_ssm"


def ssd_scan(x, dt, A, B, C, *, chunk_size, D=None, initial_state=None, return_chunk_states=False, final_state=True):
    """Dispatch the chunked scan (rule: `scan_path`): mamba-ssm's kernel on CUDA when installed and
    trusted for these inputs, else the reference.

    Chunk-start states (`return_chunk_states`) always come from the reference: the kernel's public
    entry point returns only the final state. `final_state=False` allows the reference's single-chunk
    path to skip the final state (returned as None then).
    """
    path = scan_path(x, chunk_size=chunk_size, initial_state=initial_state, return_chunk_states=return_chunk_states)
    if path == "reference":
        return ssd_scan_reference(
            x, dt, A, B, C, chunk_size=chunk_size, D=D, initial_state=initial_state,
            return_chunk_states=return_chunk_states, final_state=final_state,
        )
    from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined

    # dt is final here: the mixer already applied dt_bias, softplus, the checkpoint's
    # `time_step_limit` and the padding zeros (`Mamba2Mixer.forward`), so the kernel gets no bias,
    # no softplus and no limit. Passing the limit again would be idempotent on real positions
    # but a floor would lift a padded position's dt = 0 (no step) to the floor.
    y, final = mamba_chunk_scan_combined(
        x, dt.to(x.dtype) if dt.dtype != torch.float32 else dt, A.float(), B, C, chunk_size,
        D=None if D is None else D.float(), z=None, dt_bias=None,
        initial_states=None if initial_state is None else initial_state.float(),
        dt_softplus=False, dt_limit=(0.0, float("inf")), return_final_states=True,
    )
    return y.float(), final.float()


_SHIFT_CONV_MAX_LEN = 64


def _conv_window(x: Tensor, weight: Tensor, initial_state: Tensor | None) -> tuple[Tensor, Tensor]:
    """[initial_state, x] along time (b, c, k - 1 + L) (zeros for a missing state) and the weight, both
    in x's dtype: what a depthwise causal conv of x (b, L, c) with weight (c, k) reads."""
    xt = x.transpose(1, 2)
    if initial_state is None:
        initial_state = xt.new_zeros(xt.shape[0], xt.shape[1], weight.shape[-1] - 1)
    return torch.cat([initial_state.to(xt.dtype), xt], dim=-1), weight.to(xt.dtype)


def causal_conv1d(x: Tensor, weight: Tensor, bias: Tensor | None, *, initial_state: Tensor | None = None):
    """Depthwise causal conv over time with a carried state, followed by nothing (the caller applies SiLU).

    Args:
        x: (b, L, c) raw inputs.   weight: (c, k).   bias: (c,) or None.
        initial_state: (b, c, k - 1): the k - 1 raw inputs preceding x (zeros if None).
    Returns:
        y (b, L, c) and the new state (b, c, k - 1): the last k - 1 raw inputs of [state, x].
    """
    b, L, c = x.shape
    k = weight.shape[-1]
    full, w = _conv_window(x, weight, initial_state)
    if L <= _SHIFT_CONV_MAX_LEN:
        # k shifted multiply-adds: for short inputs (decode steps, one block) this avoids the
        # fixed cost of a convolution kernel launch, which dominates at these sizes.
        y = full[:, :, 0:L] * w[:, 0, None]
        for j in range(1, k):
            y = y + full[:, :, j:j + L] * w[:, j, None]
        if bias is not None:
            y = y + bias.to(full.dtype)[:, None]
    else:
        y = F.conv1d(full, w.unsqueeze(1), None if bias is None else bias.to(full.dtype), groups=c)
    return y.transpose(1, 2), full[:, :, full.shape[-1] - (k - 1):]


def conv_boundary_states(x: Tensor, kernel_size: int, block_size: int) -> Tensor:
    """Conv states at every block boundary of a clean sequence.

    x: (b, L, c) raw conv inputs, L a multiple of block_size. Returns (b, nB, c, k - 1): for block j
    the k - 1 raw inputs before position j * block_size (zeros before the sequence start).
    """
    b, L, c = x.shape
    km1 = kernel_size - 1
    padded = F.pad(x.transpose(1, 2), (km1, 0))  # (b, c, km1 + L); padded index i <-> position i - km1
    nB = L // block_size
    idx = torch.arange(nB, device=x.device)[:, None] * block_size + torch.arange(km1, device=x.device)
    return padded[:, :, idx].permute(0, 2, 1, 3)  # (b, nB, c, km1)
