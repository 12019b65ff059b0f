"""How a denoiser tower is made from the context tower: a full copy, or low-rank adapters over it.

A `DenoiserBuilder` turns a (frozen) context tower into a trainable denoiser tower; training
(`DenoiserFineTuning(denoiser=...)`), export and loading choose one by `class_path`:

* `FullCopy` (the default, and the released design): the denoiser owns a copy of every weight
  (`DenoiserTowerBase.from_context`). Two towers cost 2x the backbone's bytes.
* `LoRA`: the denoiser *borrows* the context tower's modules (embeddings, norms, LM head and every
  projection) and owns only a low-rank update ``B A`` on chosen projections plus the time
  conditioning. The pair costs the backbone plus a few percent, and an adapter checkpoint is a few
  MB that loads over a named or given backbone (`TwoTowerLM.save_pretrained` of a LoRA model
  writes one: `TwoTowerLM.save_adapter`).

Borrowing, not copying, is what saves the memory: a `Borrowed` module calls the context's module
but is not registered, so it is absent from the denoiser's parameters, state dict and `.to()`.
A module that holds tensors of its own *and* a target projection (a Mamba mixer: A_log, D and
dt_bias beside in_proj / out_proj) is split: its projections are adapted or borrowed one by one and its own
parameters are the context's, held as plain attributes.
The two towers therefore must live on one device (`TwoTowerLM.place_towers_on_devices` refuses
otherwise). With B = 0 at initialisation (and the identity time init) a fresh LoRA denoiser
computes exactly the AR layers, as a fresh full copy does.
"""

from __future__ import annotations

import abc
import importlib
import math
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ..time_embedding import build_time_conditioning
from .base import ContextTowerBase, DenoiserTowerBase, family_for
from .inference_linear import HEAD_COPY, INT8, InferenceLinear, VocabSubsetHead, can_quantize, makes_copy
from ..validation import check_draft_vocab, check_int, check_positive, check_skip_layers

__all__ = ["DenoiserBuilder", "FullCopy", "LoRA", "LoRALinear", "Borrowed", "builder_from_spec", "is_adapter",
           "merge_adapters", "unmerge_adapters", "fuse_projections", "dense_state_dict"]

# Every projection of the Llama family's layers; NemotronH's Mamba / attention / MLP projections
# share these names where they exist (in_proj, out_proj, ...: add them to `targets`).
LLAMA_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class Borrowed(nn.Module):
    """Calls a module that another tower owns, without owning it.

    The target is kept out of `_modules` on purpose: its weights then appear once (in the owner's
    state dict), are moved once (by the owner's `.to()`), and receive no gradient from this side.
    Attribute reads that this wrapper lacks (`weight`, `eps`, ...) fall through to the target.
    """

    def __init__(self, target: nn.Module):
        super().__init__()
        self.__dict__["target"] = target  # not a registered submodule: see the class docstring

    def forward(self, *args, **kwargs):
        return self.__dict__["target"](*args, **kwargs)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.__dict__["target"], name)

    def extra_repr(self) -> str:
        return f"borrows {type(self.__dict__['target']).__name__}"


_MERGED = "_twotower_merged"  # LoRALinear's inference copy of W + s B A (a plain attribute, not state)


class LoRALinear(nn.Module):
    """y = base(x) + (alpha / rank) * x A^T B^T, with `base` borrowed (frozen, not owned).

    A (rank, in) starts Kaiming-uniform and B (out, rank) at zero, so the layer starts equal to
    `base` (the usual LoRA initialisation: training moves B first).
    """

    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        super().__init__()
        self.__dict__["base"] = base  # borrowed, see `Borrowed`
        w = base.weight
        self.rank, self.scaling = rank, alpha / rank
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, device=w.device, dtype=w.dtype))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=w.device, dtype=w.dtype))
        with torch.no_grad():
            # Seeded on the CPU, then moved: the same init on every device (as the time modules are).
            a = torch.empty(rank, base.in_features)
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
            self.lora_A.copy_(a)

    @property
    def weight(self) -> Tensor:
        """The base weight (read by code that asks a projection for its dtype or device)."""
        return self.__dict__["base"].weight

    @property
    def bias(self) -> Tensor | None:
        return self.__dict__["base"].bias

    def merged_weight(self) -> Tensor:
        """W + (alpha / rank) B A in the base weight's dtype (summed in float32, rounded once), no grad."""
        base = self.__dict__["base"].weight
        with torch.no_grad():
            # float32 product and sum, then one cast: in bf16, B A would be rounded before the add and again after it.
            update = self.lora_B.float() @ self.lora_A.float()
            return torch.add(base.float(), update, alpha=self.scaling).to(base.dtype)

    def merge(self, *, pack: bool | str = False) -> None:
        """Inference: keep `merged_weight()` and apply it with one matmul instead of base + two low-rank
        ones (pack: pre-packed for oneDNN where it applies, `towers.inference_linear.InferenceLinear`).
        Costs one more weight of this projection's size; the parameters, the state dict and
        training are unchanged (the merged copy is a plain attribute, used only while no gradient is
        recorded, and dropped by `.train()`, `.to()` and `unmerge`)."""
        self.__dict__[_MERGED] = InferenceLinear(self.merged_weight(), self.bias, pack=pack)

    def unmerge(self) -> None:
        """Drop the merged copy: base + update again."""
        self.__dict__.pop(_MERGED, None)

    @property
    def merged(self) -> bool:
        """Whether `merge` holds a merged copy."""
        return _MERGED in self.__dict__

    def forward(self, x: Tensor) -> Tensor:
        merged = self.__dict__.get(_MERGED)
        # The merged copy is detached: while a gradient is recorded the adapter path runs, so lora_A / lora_B get one.
        if merged is not None and not torch.is_grad_enabled():
            # The base is the context's: moving or casting the context alone skips our `_apply`; refuse a stale copy.
            merged.check(x, "merged LoRA weight")
            return merged(x)
        update = F.linear(F.linear(x, self.lora_A.to(x.dtype)), self.lora_B.to(x.dtype))
        return torch.add(self.__dict__["base"](x), update, alpha=self.scaling)

    def train(self, mode: bool = True):
        if mode:  # a merged copy would not follow the adapter's training steps
            self.unmerge()
        return super().train(mode)

    def _apply(self, fn, recurse=True):
        self.unmerge()  # moved or cast: the merged copy would be stale
        return super()._apply(fn, recurse)

    def extra_repr(self) -> str:
        base = self.__dict__["base"]
        return f"in={base.in_features}, out={base.out_features}, rank={self.rank}, scaling={self.scaling:g}"


class DenoiserBuilder(abc.ABC):
    """Makes a denoiser tower from a context tower. Subclasses are chosen by `class_path`
    (`DenoiserFineTuning(denoiser=...)`, config.json's "denoiser" entry), implement `make` and must
    round-trip through `spec()` / `builder_from_spec`.

    Args:
        skip_layers: layer indices the denoiser does not run (`DenoiserTowerBase.set_skip_layers`): a
            shallower draft that costs less per forward. Every builder takes it, so that training,
            export and loading rebuild the same shallow tower from config.json.
    """

    def __init__(self, *, skip_layers=()):
        self.skip_layers = tuple(sorted(check_skip_layers(skip_layers)))

    def build(self, context: ContextTowerBase, *, time_init: str = "identity", time: dict | None = None,
              device=None) -> DenoiserTowerBase:
        """A fresh denoiser over `context` (on `device`, None: the context's), skipping `skip_layers`."""
        den = self.make(context, time_init=time_init, time=time, device=device)
        if self.skip_layers:  # checked against the tower's depth here, where it is known
            den.set_skip_layers(self.skip_layers)
        return den

    @abc.abstractmethod
    def make(self, context: ContextTowerBase, *, time_init: str = "identity", time: dict | None = None,
             device=None) -> DenoiserTowerBase:
        """The subclass's denoiser over `context`, every layer run (`build` applies `skip_layers`)."""

    def init_args(self) -> dict:
        """The constructor arguments that rebuild this builder (JSON-serialisable). `skip_layers`
        appears only when set, so a full-depth builder's record is what it was before the option."""
        return {"skip_layers": list(self.skip_layers)} if self.skip_layers else {}

    def spec(self) -> dict:
        """{"class_path", "init_args"}: what config.json and checkpoints record."""
        cls = type(self)
        return {"class_path": f"{cls.__module__}.{cls.__qualname__}", "init_args": self.init_args()}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.init_args().items())
        return f"{type(self).__name__}({args})"


class FullCopy(DenoiserBuilder):
    """The released design: the denoiser owns a copy of every context weight (+ time conditioning)."""

    def make(self, context, *, time_init="identity", time=None, device=None):
        return family_for(context.config).denoiser.from_context(context, time_init=time_init, time=time, device=device)


class LoRA(DenoiserBuilder):
    """Low-rank adapters on the context tower's own projections; everything else is borrowed.

    Args:
        rank: r of each update B A (r x in and out x r parameters per projection).
        alpha: the update is scaled by alpha / rank (so a change of rank keeps the step size).
        targets: the projection names (last component of the module path) that get an adapter.
        skip_layers: layers the denoiser does not run (`DenoiserBuilder`); their adapters are still
            made, so that a full-depth adapter checkpoint loads into a shallow denoiser as it is.
    """

    def __init__(self, rank: int = 32, alpha: float = 32.0, targets: list[str] | tuple[str, ...] = LLAMA_PROJECTIONS,
                 *, skip_layers=()):
        super().__init__(skip_layers=skip_layers)
        check_int("LoRA rank", rank)
        check_positive("LoRA alpha", alpha)
        if isinstance(targets, str) or not targets or not all(isinstance(t, str) for t in targets):
            raise ValueError(f"LoRA targets must be a non-empty list of projection names, got {targets!r}")
        self.rank, self.alpha, self.targets = rank, float(alpha), tuple(targets)

    def init_args(self) -> dict:
        return {"rank": self.rank, "alpha": self.alpha, "targets": list(self.targets), **super().init_args()}

    def make(self, context, *, time_init="identity", time=None, device=None):
        p = next(context.parameters())
        if device is not None and torch.device(device) != p.device:
            raise ValueError(f"a LoRA denoiser borrows the context tower's weights, which are on {p.device}; "
                             f"it cannot be built on {device} (use FullCopy for two devices)")
        cls = family_for(context.config).denoiser
        with torch.device("meta"):  # the skeleton: every weight is replaced below, none is allocated
            den = cls(context.config, time_init=time_init, time=time)
        # The time modules are the denoiser's own trained weights: real (not meta), on the context's device and dtype.
        den.time = build_time_conditioning(time, context.config.hidden_size, den.num_modulated,
                                           time_init=time_init).to(device=p.device, dtype=p.dtype)
        adapted = self._adapt(den.backbone, context.backbone)
        if not adapted:
            raise ValueError(f"LoRA targets {list(self.targets)} match no linear layer of {type(context).__name__}; "
                             f"its projections are named e.g. {sorted(_linear_names(context.backbone))[:8]}")
        den.lm_head = Borrowed(context.lm_head)  # outside the backbone `_adapt` walks: borrowed whole, never adapted
        # A module this walk missed would keep meta weights and surface only at the first forward: refuse it here.
        left = [n for n, t in den.named_parameters() if t.is_meta]
        if left:
            raise RuntimeError(f"LoRA skeleton of {cls.__name__} kept meta weights {left[:5]}: a module of this "
                               "family is neither borrowed nor adapted")
        return den

    def _adapt(self, skeleton: nn.Module, owner: nn.Module) -> int:
        """Replace every child of `skeleton` by a LoRA wrapper (a target linear), a `Borrowed` owner
        module (anything else holding weights and no target), or keep it and recurse (a module with
        a target below it: its own direct tensors, e.g. a Mamba mixer's A_log, are the owner's,
        attached unregistered by `_borrow_tensors`). Returns how many adapters were made."""
        count = 0
        for name, child in list(skeleton.named_children()):
            theirs = getattr(owner, name)  # one config built both, so the children pair up by name
            if isinstance(theirs, nn.Linear) and name in self.targets:
                setattr(skeleton, name, LoRALinear(theirs, self.rank, self.alpha))
                count += 1
            elif not any(True for _ in child.parameters()) and not any(True for _ in child.buffers()):
                continue  # holds no tensors (an activation, the rotary tables): the skeleton's own serves
            elif not self._has_target(theirs):
                setattr(skeleton, name, Borrowed(theirs))
            else:
                _borrow_tensors(child, theirs)
                count += self._adapt(child, theirs)
        return count

    def _has_target(self, module: nn.Module) -> bool:
        return any(isinstance(m, nn.Linear) and n.rsplit(".", 1)[-1] in self.targets
                   for n, m in module.named_modules() if n)


def _borrow_tensors(skeleton: nn.Module, owner: nn.Module) -> None:
    """Give `skeleton` the owner's direct parameters as plain (unregistered) attributes, the same
    Parameter objects: read by the module's own code, absent from the skeleton's state dict.

    The owner's `.to()` keeps its Parameter objects (it swaps their data), so the skeleton follows;
    a buffer would be replaced by `.to()`, so a module with direct buffers cannot be split."""
    if any(True for _ in owner.buffers(recurse=False)):
        raise ValueError(f"a LoRA target lies inside {type(owner).__name__}, which holds buffers of its own; "
                         "it cannot be shared partly: leave its projections out of `targets`")
    for name, param in list(owner.named_parameters(recurse=False)):
        # Moved into __dict__, not setattr: nn.Module.__setattr__ would register the Parameter again (state dict).
        del skeleton._parameters[name]
        skeleton.__dict__[name] = param


def _linear_names(module: nn.Module) -> set[str]:
    return {n.rsplit(".", 1)[-1] for n, m in module.named_modules() if isinstance(m, nn.Linear)}


def builder_from_spec(spec: dict | DenoiserBuilder | None) -> DenoiserBuilder:
    """A builder from its {"class_path", "init_args"} record (None: `FullCopy`)."""
    if spec is None:
        return FullCopy()
    if isinstance(spec, DenoiserBuilder):
        return spec
    path = spec.get("class_path", "") if isinstance(spec, dict) else ""
    module, _, name = path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError) as e:
        raise ValueError(f"denoiser builder {path!r} cannot be imported ({e}); expected e.g. "
                         "twotower.towers.adapters.LoRA") from None
    if not (isinstance(cls, type) and issubclass(cls, DenoiserBuilder)):
        raise ValueError(f"denoiser builder {path!r} is not a twotower.towers.adapters.DenoiserBuilder")
    return cls(**spec.get("init_args", {}))


def is_adapter(denoiser: nn.Module) -> bool:
    """Whether `denoiser` borrows weights from its context tower (a LoRA denoiser)."""
    return any(isinstance(m, (Borrowed, LoRALinear)) for m in denoiser.modules())


def dense_state_dict(denoiser: nn.Module) -> dict[str, Tensor]:
    """The state dict a `FullCopy` denoiser would hold to compute what `denoiser` computes: every LoRA
    projection as its merged weight (`LoRALinear.merged_weight`), every borrowed module's and borrowed
    tensor's values under the borrowing path, the denoiser's own parameters and buffers as they are.

    For a full denoiser this is its own state dict. It lets a full fine-tune start from an adapter
    checkpoint (`DenoiserFineTuning(init_from=...)` with the default `FullCopy` builder): the copy
    starts as the adapter model's function, then every weight trains. Values are detached copies.
    """
    out: dict[str, Tensor] = {}

    def walk(module: nn.Module, prefix: str) -> None:
        if isinstance(module, LoRALinear):
            out[prefix + "weight"] = module.merged_weight()
            if module.bias is not None:
                out[prefix + "bias"] = module.bias
            return
        if isinstance(module, Borrowed):
            out.update({prefix + k: v for k, v in module.__dict__["target"].state_dict().items()})
            return
        # Own tensors, and those `_borrow_tensors` attached unregistered (a split Mamba mixer's A_log, D, ...).
        own = dict(module.named_parameters(recurse=False))
        own.update((k, v) for k, v in module.named_buffers(recurse=False)
                   if k not in module._non_persistent_buffers_set)  # as state_dict: persistent buffers only
        own.update((k, v) for k, v in module.__dict__.items() if isinstance(v, nn.Parameter))
        out.update({prefix + k: v for k, v in own.items()})
        for name, child in module.named_children():
            walk(child, prefix + name + ".")

    walk(denoiser, "")
    return {k: v.detach().clone() for k, v in out.items()}


def merge_adapters(denoiser: nn.Module, *, fuse: bool = True, pack: bool | str = True,
                   draft_vocab=None) -> int:
    """Inference speed for a denoiser: every LoRA adapter applies one merged weight (W + s B A, see
    `LoRALinear.merge`) instead of its base and two low-rank matmuls; with `fuse`, projections that
    read one input become one matmul (`fuse_projections`: Llama's q/k/v and gate/up), over their
    merged weights, and those adapters keep no merged copy of their own. With `pack`, every copy is
    pre-packed for oneDNN where that applies (on a CPU, bf16 or float32: `towers.inference_linear`), and so
    is a copy of the output head (`lm_head`), which the family's `head` then uses. pack="int8": every
    copy, the output projections and the head held as dynamic int8 instead (a cheaper, rounded draft).
    draft_vocab (token ids, `validation.check_draft_vocab`): the head copy covers those tokens only
    (`VocabSubsetHead`), made whatever `pack` says.

    Returns the bytes of the copies made: for a LoRA denoiser every projection once, about one more
    backbone without its embeddings, plus the head when packed; for a full copy only the fused ones
    (and the head). Parameters, state dict, checkpoints and training are unchanged (every copy is
    dropped by `.train()` and by moving or casting); the draft's numerics change by rounding only
    (the update is added to W once, in float32, then rounded to W's dtype; a packed product may sum
    in another order).
    """
    head = getattr(denoiser, "lm_head", None)
    if draft_vocab is not None and head is not None:  # checked before any copy is dropped or made
        draft_vocab = check_draft_vocab(draft_vocab, head.weight.shape[0])
    unmerge_adapters(denoiser)  # copies of an earlier call (another fuse / pack choice) must not outlive this one
    if pack == INT8 and head is not None and not can_quantize(head.weight):  # asked for, and nothing would be int8
        warnings.warn(f"int8_draft=True: the draft's copies stay {head.weight.dtype}, since dynamic int8 runs on a "
                      f"CPU with torch's quantized kernels only (this denoiser is on {head.weight.device}; "
                      f"twotower.hardware.has_int8_linear() says whether this torch has them)", stacklevel=3)
    # Layers the denoiser skips (a shallow draft) get no copies: they never run. A layer run again later
    # computes through its plain modules, which stay exact.
    skipped = {id(m) for i in getattr(denoiser, "skip_layers", ()) for m in denoiser.backbone.layers[i].modules()}
    covered: set[int] = set(skipped)
    made = 0
    if fuse:
        for m in _fusable(denoiser):
            if id(m) in skipped:
                continue
            m.fuse(pack=pack)
            # The fused copy is built from these adapters' merged weights (`applied_weights`): no copy of their own.
            covered.update(id(getattr(m, n)) for n in m.FUSED_PROJECTIONS)
            out = getattr(m, m.OUTPUT_PROJECTION)
            if not isinstance(out, LoRALinear) and makes_copy(out.weight, pack):
                m.pack_output(pack=pack)  # a full copy's o_proj / down_proj (an adapter packs its merged weight)
            made += m.fused_nbytes
    for m in denoiser.modules():
        if isinstance(m, LoRALinear) and id(m) not in covered:
            m.merge(pack=pack)
            made += m.__dict__[_MERGED].weight_nbytes  # its bias is the base's own, not copied
    if head is not None and draft_vocab is not None:
        denoiser.__dict__[HEAD_COPY] = VocabSubsetHead(head.weight, head.bias, draft_vocab, pack=pack)
        made += denoiser.__dict__[HEAD_COPY].nbytes
    elif head is not None and makes_copy(head.weight, pack):
        # A head copy only pays where it is packed; it is the largest single product of a draft.
        denoiser.__dict__[HEAD_COPY] = InferenceLinear(head.weight, head.bias, pack=pack)
        made += denoiser.__dict__[HEAD_COPY].nbytes
    return made


def unmerge_adapters(denoiser: nn.Module) -> None:
    """Undo `merge_adapters`: drop every merged, fused and packed copy below `denoiser`."""
    for m in denoiser.modules():
        if isinstance(m, LoRALinear):
            m.unmerge()
    denoiser.__dict__.pop(HEAD_COPY, None)
    fuse_projections(denoiser, fuse=False)


def fuse_projections(tower: nn.Module, *, fuse: bool = True, pack: bool | str = False,
                     max_rows: int | None = None) -> int:
    """Fuse (or, fuse=False, drop every inference copy of) the projections that read one input in every
    module of `tower` that can (a `towers.llama.layers.Fusable`: Llama-like attention's q/k/v, MLP's
    gate/up; other families have none and nothing changes). Returns the bytes of the copies: for a
    context tower one more set of those weights (about 65% of a Llama backbone without its embeddings).

    The outputs are the same dot products, summed in whatever order the BLAS library picks for the
    wider matrix: bit-identical in bf16 on this CPU, equal to float32 rounding (tests/test_fused.py).
    pack: pre-pack those copies, the output projections (o_proj, down_proj) and the head as well
    (on a CPU, `towers.inference_linear`); max_rows: use them only for inputs of at most that
    many rows (the rest run the modules themselves). A packed product is another oneDNN call than
    `F.linear`: in bf16 on an AMX CPU it gave the same bits at the row counts tested (1 to 16 at
    SmolLM2's shapes), not at every row count, which is why a context tower packs only with `max_rows`
    (`TwoTowerLM.merge_adapters` picks it per dtype: `inference_linear.context_pack_rows`).
    """
    made = 0
    for m in _fusable(tower):
        if not fuse:
            m.unfuse()
            continue
        m.fuse(pack=pack, max_rows=max_rows)
        if makes_copy(getattr(m, m.OUTPUT_PROJECTION).weight, pack):  # else a copy would buy nothing
            m.pack_output(pack=pack, max_rows=max_rows)
        made += m.fused_nbytes
    if not fuse:
        tower.__dict__.pop(HEAD_COPY, None)
    head = getattr(tower, "lm_head", None)
    if fuse and head is not None and makes_copy(head.weight, pack):
        tower.__dict__[HEAD_COPY] = InferenceLinear(head.weight, head.bias, pack=pack, max_rows=max_rows)
        made += tower.__dict__[HEAD_COPY].nbytes
    return made


def _fusable(module: nn.Module) -> list[nn.Module]:
    """Modules below `module` with projections to fuse (`FUSED_PROJECTIONS`, `fuse`, `unfuse`, `fused_nbytes`)."""
    return [m for m in module.modules()
            if getattr(type(m), "FUSED_PROJECTIONS", None) and callable(getattr(m, "fuse", None))]
