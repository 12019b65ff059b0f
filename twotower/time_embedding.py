"""Time conditioning for the denoiser tower: the interface, adaLN-single (released) and none.

`TimeConditioning` maps t (the masked fraction of a block) to one modulation per modulated
sub-block, or None where the sub-block runs plain. Which class a model uses is recorded in
config.json as {"class_path": ..., "init_args": {...}} (`time_spec` / `build_time_conditioning`).

Checkpoint names: in a released-layout checkpoint the module's state dict sits under its
`released_prefix` ("time." for every TimeConditioning: "time.<its own parameter name>", whatever
those names are), so a new conditioning needs no change to the loaders. AdaLNSingle keeps the
released model's bare names (t_embedder.*, t_block.*, scale_shift_tables.*), which the shipped
checkpoints and the original release use.

adaLN-single (PixArt-alpha style), the released design:

t in [0, 1] is, per sequence (or per training block), the fraction of the block still masked.
    e      = t_embedder(t)    : sinusoidal features of 1000 t (256, [cos | sin], periods up to
                                10000) -> Linear(256, H) -> SiLU -> Linear(H, H)
    c      = t_block(e)       : SiLU -> Linear(H, 3H), shared by every layer (the "single")
    (shift, scale, gate)_i = scale_shift_tables[i] (3, H) + c.view(3, H)
Block i then computes x + gate * mixer(h) with h = norm(x (1 + scale) + shift) for Mamba /
attention and h = norm(x) (1 + scale) + shift for MLP / MoE (see towers/layers.py).

Identity init (default): t_block's last Linear is zero and the tables are (shift 0, scale 0,
gate 1), so a fresh denoiser computes exactly the AR layers it was copied from. "pixart" init
draws the tables from N(0, 1) / sqrt(H) as in PixArt-alpha (the denoiser then starts perturbed).
"""

from __future__ import annotations

import abc
import importlib
import math

import torch
import torch.nn as nn
from torch import Tensor


def sinusoidal_features(t: Tensor, dim: int = 256, max_period: float = 10000.0, scale: float = 1000.0) -> Tensor:
    """t (...,) -> (..., dim) float32: [cos(s t f_j) | sin(s t f_j)], f_j = max_period^(-j / half)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    # float32 whatever the model's dtype: 1000 t reaches 1000, where bf16's spacing (4) would garble cos and sin.
    # The 1000 puts t on the 0..1000 timestep range of DiT / PixArt-alpha embedders, which the checkpoints expect.
    args = (t.float() * scale)[..., None] * freqs
    feats = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # [cos | sin]: the layout mlp.0's weights expect
    if dim % 2:  # one zero feature, so the width is dim whatever its parity (as DiT's embedder pads)
        feats = torch.cat([feats, torch.zeros_like(feats[..., :1])], dim=-1)
    return feats


class TimestepEmbedder(nn.Module):
    """Sinusoidal features -> Linear(F, H) -> SiLU -> Linear(H, H). Names: mlp.0, mlp.2."""

    def __init__(self, hidden_size: int, frequency_size: int = 256):
        super().__init__()
        self.frequency_size = frequency_size
        self.mlp = nn.Sequential(nn.Linear(frequency_size, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))

    def forward(self, t: Tensor) -> Tensor:
        feats = sinusoidal_features(t, self.frequency_size)
        return self.mlp(feats.to(self.mlp[0].weight.dtype))  # float32 math above; cast to the MLP's dtype only here


Modulation = tuple[Tensor, Tensor, Tensor]  # (shift, 1 + scale, gate), each (..., 1, H)


class TimeConditioning(nn.Module, abc.ABC):
    """t -> per-sub-block modulation. Built as cls(hidden_size, num_layers, **init_args), where
    num_layers is the number of modulated sub-blocks the denoiser has.

    A sub-block with modulation (shift, scale1, gate) computes x + gate * f(h) with
    h = norm(x * scale1 + shift) or h = norm(x) * scale1 + shift (the family decides where);
    with None it is the plain AR sub-block x + f(norm(x)).

    Saved and loaded as "<released_prefix><state-dict name>" in a released-layout checkpoint (and as
    "time.<state-dict name>" in the denoiser's own state dict): a subclass names its parameters as it likes.
    """

    # The namespace the module owns in a released-layout checkpoint (model.py's name mapping).
    released_prefix: str = "time."

    def __init__(self, hidden_size: int, num_layers: int):
        super().__init__()
        self.hidden_size, self.num_layers = hidden_size, num_layers

    def init_args(self) -> dict:
        """The constructor's keyword arguments, as config.json records them (override when any)."""
        return {}

    def spec(self) -> dict:
        """{"class_path", "init_args"} rebuilding this module's structure (`build_time_conditioning`)."""
        return time_spec(self, **self.init_args())

    @abc.abstractmethod
    def forward(self, t: Tensor) -> list[Modulation] | None:
        """t (...,) in [0, 1] -> num_layers modulations, each part (..., 1, H) (broadcast over the
        block's tokens), or None when t changes nothing."""


class NoTimeConditioning(TimeConditioning):
    """A time-agnostic denoiser (as in MDLM's): t is ignored and every sub-block runs plain.

    No parameters. The masked tokens themselves tell the network how noisy the block is.
    """

    def forward(self, t: Tensor) -> None:
        return None


def time_spec(cls_or_module, **init_args) -> dict:
    """{"class_path": "module.Class", "init_args": {...}}: how config.json records the choice."""
    cls = cls_or_module if isinstance(cls_or_module, type) else type(cls_or_module)
    return {"class_path": f"{cls.__module__}.{cls.__qualname__}", "init_args": dict(init_args)}


def build_time_conditioning(spec: dict | None, hidden_size: int, num_layers: int, *,
                            time_init: str = "identity") -> TimeConditioning:
    """Instantiate `spec` ({"class_path", "init_args"}; None = AdaLNSingle(init=time_init))."""
    if spec is None:
        return AdaLNSingle(hidden_size, num_layers, init=time_init)
    if not isinstance(spec, dict) or "class_path" not in spec or set(spec) - {"class_path", "init_args"}:
        raise ValueError(f"time conditioning must be {{'class_path': ..., 'init_args': {{...}}}}, got {spec!r}")
    path = spec["class_path"]
    module, _, name = path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name) if module else None
    except ImportError as e:
        raise ValueError(f"time conditioning class_path {path!r}: cannot import {module!r} ({e})") from e
    if not (isinstance(cls, type) and issubclass(cls, TimeConditioning)):
        raise ValueError(f"time conditioning class_path {path!r} is not a twotower.time_embedding.TimeConditioning "
                         "subclass (e.g. twotower.time_embedding.AdaLNSingle or NoTimeConditioning)")
    return cls(hidden_size, num_layers, **dict(spec.get("init_args") or {}))


class AdaLNSingle(TimeConditioning):
    """t -> per-layer (shift, scale, gate), each broadcastable against (b, T, H).

    Attribute names match the released checkpoint: t_embedder, t_block, scale_shift_tables, saved
    there without a prefix (the released model's layout, which the shipped checkpoints use).
    """

    released_prefix = ""

    def __init__(self, hidden_size: int, num_layers: int, *, init: str = "identity", frequency_size: int = 256):
        super().__init__(hidden_size, num_layers)
        if init not in ("identity", "pixart"):
            raise ValueError(f"time-conditioning init must be 'identity' or 'pixart', got {init!r}")
        self.init, self.frequency_size = init, frequency_size
        self.t_embedder = TimestepEmbedder(hidden_size, frequency_size)
        self.t_block = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 3 * hidden_size))
        self.scale_shift_tables = nn.ParameterList(nn.Parameter(torch.zeros(3, hidden_size)) for _ in range(num_layers))
        self.reset_parameters(init)

    @torch.no_grad()
    def reset_parameters(self, init: str = "identity") -> None:
        # t_block's last Linear is zero in both inits: t changes nothing until training moves it. t_embedder keeps
        # its random init: were it zero too, SiLU(0) = 0 would feed t_block's weight no gradient.
        nn.init.zeros_(self.t_block[1].weight)
        nn.init.zeros_(self.t_block[1].bias)
        for table in self.scale_shift_tables:
            if init == "identity":
                table.zero_()  # shift 0 and scale 0 (the forward adds the 1): x passes the modulation unchanged
                table[2].fill_(1.0)  # gate = 1: the layer output passes unchanged
            else:
                table.copy_(torch.randn_like(table) / math.sqrt(self.hidden_size))

    def init_args(self) -> dict:
        return {"init": self.init, "frequency_size": self.frequency_size}

    def forward(self, t: Tensor) -> list[Modulation]:
        """t (...,) -> every layer's (shift, 1 + scale, gate), each (..., 1, H)."""
        shared = self.shared(t)
        return self.modulations(shared.unsqueeze(-3))  # a token axis: each part (..., 1, H) broadcasts over the block

    def shared(self, t: Tensor) -> Tensor:
        """t (...,) -> the shared conditioning (..., 3, H)."""
        if t.dim() == 0:
            t = t[None]
        c = self.t_block(self.t_embedder(t))
        return c.view(*t.shape, 3, self.hidden_size)

    def modulations(self, shared: Tensor) -> list[tuple[Tensor, Tensor, Tensor]]:
        """Every layer's (shift, 1 + scale, gate), each (..., H), from `shared` (..., 3, H).

        One stacked add for all layers instead of one per layer; the scale comes with the 1 added,
        ready for `addcmul` (see `HybridBlock.pre`).
        """
        tables = torch.stack(tuple(self.scale_shift_tables)).to(shared.dtype)  # (nL, 3, H)
        m = tables.view(tables.shape[0], *([1] * (shared.dim() - 2)), 3, -1) + shared
        m[..., 1, :] += 1
        return [(mi[..., 0, :], mi[..., 1, :], mi[..., 2, :]) for mi in m.unbind(0)]

    def layer(self, shared: Tensor, i: int) -> tuple[Tensor, Tensor, Tensor]:
        """(shift, scale, gate) for layer i, each (..., H), from `shared` (..., 3, H)."""
        # The raw scale (no 1 added, unlike `modulations`): the per-layer form tests check the stacked add against.
        m = self.scale_shift_tables[i].to(shared.dtype) + shared
        return m[..., 0, :], m[..., 1, :], m[..., 2, :]
