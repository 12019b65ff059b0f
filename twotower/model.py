"""TwoTowerLM: the context tower + the denoiser tower as one model, with loading, saving and generation.

    model = TwoTowerLM.from_backbone("path/to/nemotron-h-ar")     # AR checkpoint -> two towers
    model = TwoTowerLM.from_pretrained("path/to/two-tower")        # released two-tower layout
    out = model.generate(input_ids, sampler=ConfidenceThreshold(0.8), max_new_tokens=128)

Module names vs released checkpoint names (docs/design.md, section 1; mapped in towers/checkpoints.py):

    context.backbone.X        <->  context_tower.X
    context.lm_head.weight    <->  context_lm_head.weight
    denoiser.backbone.X       <->  denoiser_tower.X
    denoiser.lm_head.weight   <->  lm_head.weight
    denoiser.time.Y           <->  Y      (AdaLNSingle: t_embedder.*, t_block.*, scale_shift_tables.*)
    denoiser.time.Y           <->  time.Y (any other TimeConditioning: `released_prefix`)

The context tower is frozen (requires_grad False): it is the AR model the denoiser reads from.
The decoding loops live in `twotower.decoding` (one `Decoder` per strategy); `generate` runs one, and
the released model's method names (`generate_mask_diffusion`, `generate_mock_ar`, `generate_ar`) and
`generate_speculative` are thin aliases over them (`decoding/released.py`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file
from torch import Tensor

from .decoding import (Decoder, GenerationOutput, MaskDiffusion, ReleasedGenerationMixin, StepCallback, TowerPair,
                       Towers)
from .decoding.base import length_limit
from .hardware import warn_if_slow_bf16
from .hub import model_reference, resolve_model
from .prompting import Prompt, encode_prompt
from .quantization import check_quantize, int8_converter, quantize_model
from .samplers import Sampler
from .tokenizers import DEFAULT_MASK_TOKEN_ID, Tokenizer, find_tokenizer, save_tokenizer
from .towers.adapters import (DenoiserBuilder, builder_from_spec, fuse_projections, is_adapter, merge_adapters,
                              unmerge_adapters)
from .towers.base import ContextTowerBase, DenoiserTowerBase, family_for
from .towers.inference_linear import INT8, context_pack_rows
from .towers.checkpoints import check_keys, check_shapes, module_name, released_name
from .towers.lazy import close_refs
from .towers.loading import materialize, target_dtype, two_tower_refs
from .towers.saving import save_state_dict
from .validation import check_int, check_token, device_of, parse_dtype

__all__ = ["TwoTowerLM", "shape_only_model"]

DEFAULT_BLOCK_SIZE = 16
# The time conditioning's place in the model's state dict (its released names: `_released_name`).
TIME_MODULE = "denoiser.time."
# An adapter checkpoint's weights: the denoiser's own parameters only (adapters + time conditioning).
ADAPTER_FILE = "adapter.safetensors"


def _has_config(name_or_path) -> bool:
    """Whether a model path or built-in name leads to a folder with config.json (False, not an error,
    when it leads nowhere: the caller names what is missing)."""
    try:
        return (resolve_model(name_or_path) / "config.json").is_file()
    except FileNotFoundError:
        return False


def _check_block_size(block_size) -> int:
    return check_int("block_size", block_size)


class TwoTowerLM(ReleasedGenerationMixin, TowerPair, nn.Module):
    """Two-tower block-diffusion LM. `config` is the transformers config shared by both towers; its
    `model_type` picks the tower family (`towers.base.family_for`: NemotronH, Llama, ...).

    Args:
        block_size: default S for generation (the released model uses 16).
        mask_token_id: the [MASK] token id (3 in the released model).
        time_init: "identity" (the denoiser starts as its AR layers) or "pixart" (AdaLNSingle's init).
        time: the time conditioning {"class_path", "init_args"} (None: AdaLNSingle(init=time_init));
            stored in config.json as "time_conditioning".
        context / denoiser: prebuilt towers to use instead of fresh ones (both or neither).
        shifted: the denoiser output at block position i predicts position i + 1 and each block's
            first token is the context tower's next-token prediction (see
            `decoding.MaskDiffusion`); stored in config.json. False = the layout of docs/design.md, section 2.1.
    """

    def __init__(self, config, *, block_size: int = DEFAULT_BLOCK_SIZE, mask_token_id: int = DEFAULT_MASK_TOKEN_ID,
                 time_init: str = "identity", context: ContextTowerBase | None = None,
                 denoiser: DenoiserTowerBase | None = None, shifted: bool = False, time: dict | None = None):
        super().__init__()
        if not isinstance(shifted, bool):
            raise ValueError(f"shifted must be a bool, got {shifted!r}")
        self.shifted = shifted
        self.config = config
        self.block_size = _check_block_size(block_size)
        self.mask_token_id = check_token("mask_token_id", mask_token_id, config.vocab_size)
        if (context is None) != (denoiser is None):
            raise ValueError("pass both towers (context and denoiser) or neither")
        family = family_for(config)
        self.context = context if context is not None else family.context(config)
        self.denoiser = denoiser if denoiser is not None else family.denoiser(config, time_init=time_init, time=time)
        self.context.requires_grad_(False)
        self.quantization: str | None = None  # set by `twotower.quantization.quantize_model`
        # The checkpoint's own tokenizer (`tokenizers.find_tokenizer`), set by the loaders; None when
        # the checkpoint has none. save_pretrained writes it beside the weights.
        self.tokenizer: Tokenizer | None = None
        # Where the context tower was read from (a path or a built-in name), set by the loaders: an
        # adapter checkpoint records it, since it holds no context weights of its own.
        self.backbone_source: str | None = None
        # How the denoiser was made from the context tower (`towers.adapters`); FullCopy unless a
        # loader or `from_backbone(denoiser=...)` says otherwise.
        self.denoiser_builder: DenoiserBuilder = builder_from_spec(None)

    def towers(self) -> Towers:
        """The towers and decoding facts (mask id, `shifted`, block size) the decoders run on."""
        return Towers(self.context, self.denoiser, mask_token_id=self.mask_token_id, shifted=self.shifted,
                      block_size=self.block_size)

    @property
    def max_position_embeddings(self) -> int | None:
        return getattr(self.config, "max_position_embeddings", None)

    @property
    def max_length(self) -> int | None:
        """The most positions a prompt and its continuation may take: the context tower's `max_length`
        (max_position_embeddings, or a shorter sliding window); None: no limit."""
        return length_limit(self.context)[0]

    def extra_repr(self) -> str:
        return f"block_size={self.block_size}, mask_token_id={self.mask_token_id}, shifted={self.shifted}"

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    def from_backbone(cls, path_or_tower: str | os.PathLike | ContextTowerBase, *,
                      block_size: int = DEFAULT_BLOCK_SIZE, mask_token_id: int = DEFAULT_MASK_TOKEN_ID,
                      time_init: str = "identity", dtype: torch.dtype | None = None, shifted: bool = False,
                      time: dict | None = None, device=None, denoiser_device=None,
                      denoiser: DenoiserBuilder | dict | None = None) -> "TwoTowerLM":
        """Two towers from an AR checkpoint directory of any registered family, a built-in model name
        (`twotower.hub.resolve_model`: "embedded-backbone", ...), or a context tower.

        The denoiser and its head are copies of the AR model (docs/design.md, section 3), or, with
        `denoiser=LoRA(...)` (`twotower.towers.adapters`), low-rank adapters over the context tower's
        own weights; with time_init="identity" a fresh model's denoiser computes exactly the AR layers.
        The context tower is read straight onto `device` and the denoiser copied straight onto
        `denoiser_device` (default: `device`), each weight once: peak memory is both towers plus
        one tensor, with no move afterwards.
        """
        if isinstance(path_or_tower, ContextTowerBase):
            context = path_or_tower
            if dtype is not None:
                context.to(dtype)
                context.restore_precision()
            if device is not None:
                context.to(device)
        else:
            context = ContextTowerBase.from_pretrained(path_or_tower, dtype=dtype, device=device)
        builder = builder_from_spec(denoiser)
        den = builder.build(context, time_init=time_init, time=time,
                            device=denoiser_device if denoiser_device is not None else device)
        if not is_adapter(den):  # an adapter borrows the context's routers as they are
            den.match_precision(context)
        model = cls(context.config, block_size=block_size, mask_token_id=mask_token_id,
                    context=context, denoiser=den, shifted=shifted)
        model.denoiser_builder = builder
        if not isinstance(path_or_tower, ContextTowerBase):
            model.tokenizer = find_tokenizer(resolve_model(path_or_tower))
            model.backbone_source = model_reference(path_or_tower)  # what an adapter checkpoint records
        return model

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *, dtype: torch.dtype | str | None = None,
                        device=None, denoiser_device=None, quantize: str | None = None) -> "TwoTowerLM":
        """Load a released-layout two-tower directory (config.json + safetensors, sharded or not,
        fused or per-expert MoE weights), or a built-in model by name (`twotower.hub.resolve_model`:
        "embedded" is the embedded default), from any working directory.

        `block_size` and `mask_token_id` come from config.json when present (else DEFAULT_BLOCK_SIZE and DEFAULT_MASK_TOKEN_ID).
        dtype=None keeps the stored dtypes; otherwise floating weights are cast (routers stay float32).
        The model is built on the meta device and each weight is read once from the memory-mapped
        files straight into its dtype on its tower's device: the context tower on `device`, the
        denoiser (and time modules) on `denoiser_device` (default: `device`).
        quantize="int8": weight-only int8 for both towers' projection weights (embeddings, heads, time
        modules and routers stay in `dtype`); see `twotower.quantization`. Inference only. Each
        projection is quantized as it is read, so the devices never hold the full-precision model:
        the peak is the int8 model plus one tensor in `dtype`.
        """
        check_quantize(quantize)
        if isinstance(dtype, str):
            dtype = parse_dtype("dtype", dtype, allowed=None)
        path = resolve_model(path, kind="two-tower checkpoint")
        if (path / ADAPTER_FILE).is_file():
            if quantize is not None:
                raise ValueError(f"{path} is an adapter over a shared backbone; int8 would replace the weights it "
                                 "borrows. Load it without quantize=")
            return cls.from_adapter(path, dtype=dtype, device=device, denoiser_device=denoiser_device)
        config, raw, refs = two_tower_refs(path)
        try:
            kwargs = dict(block_size=raw.get("block_size", DEFAULT_BLOCK_SIZE),
                          mask_token_id=raw.get("mask_token_id", DEFAULT_MASK_TOKEN_ID),
                          shifted=bool(raw.get("shifted", False)), time=raw.get("time_conditioning"))
            with torch.device("meta"):
                model = cls(config, **kwargs)
            model.load_released_state_dict(refs, where=str(path), dtype=dtype, device=device,
                                           denoiser_device=denoiser_device, quantize=quantize)
        finally:
            close_refs(refs.values())
        spec = raw.get("denoiser")
        # Read only for a shallow tower: a full copy made by a plug-in builder loads without its package, as before.
        if isinstance(spec, dict) and spec.get("init_args", {}).get("skip_layers"):
            model.denoiser_builder = builder_from_spec(spec)
            model.denoiser.set_skip_layers(model.denoiser_builder.skip_layers)
        model.context.requires_grad_(False)
        model.tokenizer = find_tokenizer(path)
        warn_if_slow_bf16(dtype, device, f"loading {path.name} in bfloat16")
        return model

    @classmethod
    def from_adapter(cls, path: str | os.PathLike, *, backbone: str | os.PathLike | None = None,
                     dtype: torch.dtype | str | None = None, device=None, denoiser_device=None) -> "TwoTowerLM":
        """Load an adapter checkpoint (`save_pretrained` of a LoRA model: config.json + adapter.safetensors)
        over its backbone: the one it records, or `backbone` (a path or a built-in name) instead.

        The context tower is read from the backbone; the denoiser is rebuilt by the recorded builder
        over it and only the adapter weights are read from `path` (cast to `dtype` when given).
        """
        path = Path(resolve_model(path))
        raw = json.loads((path / "config.json").read_text())
        source = backbone if backbone is not None else raw.get("backbone")
        if source is None:
            raise ValueError(f"{path / 'config.json'} records no \"backbone\"; pass backbone=PATH_OR_NAME")
        if not _has_config(source):
            where = "given" if backbone is not None else f"recorded in {path / 'config.json'}"
            raise FileNotFoundError(f"{path} is an adapter over the backbone {source} ({where}), which is missing "
                                    "(no config.json there); pass backbone=PATH_OR_NAME where it is now")
        if isinstance(dtype, str):
            dtype = parse_dtype("dtype", dtype, allowed=None)
        model = cls.from_backbone(source, block_size=raw.get("block_size", DEFAULT_BLOCK_SIZE),
                                  mask_token_id=raw.get("mask_token_id", DEFAULT_MASK_TOKEN_ID),
                                  shifted=bool(raw.get("shifted", False)), time=raw.get("time_conditioning"),
                                  dtype=dtype, device=device, denoiser_device=denoiser_device,
                                  denoiser=raw.get("denoiser"))
        state = load_file(str(path / ADAPTER_FILE))
        own = model.denoiser.state_dict()
        check_keys(state, own.keys(), where=str(path / ADAPTER_FILE))
        check_shapes(state, own, where=str(path / ADAPTER_FILE))
        with torch.no_grad():
            for k, v in own.items():
                v.copy_(state[k])
        model.tokenizer = find_tokenizer(path) or model.tokenizer
        return model

    def denoiser_record(self) -> dict:
        """The denoiser builder's spec as config.json records it, with the layers the denoiser skips now
        (`set_skip_layers` may have been called after the build)."""
        spec = self.denoiser_builder.spec()
        args = {k: v for k, v in spec["init_args"].items() if k != "skip_layers"}
        if self.denoiser.skip_layers:
            args["skip_layers"] = sorted(self.denoiser.skip_layers)
        return {**spec, "init_args": args}

    def save_adapter(self, path: str | os.PathLike, *, backbone: str | None = None,
                     tokenizer: Tokenizer | None = None) -> None:
        """Write an adapter checkpoint: config.json (the backbone's config, the generation settings,
        the denoiser builder and the backbone reference) and adapter.safetensors (the denoiser's own
        parameters). `backbone` overrides the recorded reference (a path or a built-in name).
        `tokenizer` is written beside them when given (else loading uses the backbone's)."""
        if not is_adapter(self.denoiser):
            raise ValueError("this model's denoiser is a full copy; save it with save_pretrained")
        source = backbone if backbone is not None else self.backbone_source
        if source is None:
            raise ValueError("the model does not know where its backbone came from; pass backbone=PATH_OR_NAME")
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        raw = self.config.to_dict()
        raw.update({"block_size": self.block_size, "mask_token_id": self.mask_token_id, "shifted": self.shifted,
                    "architectures": ["TwoTowerLM"], "time_conditioning": self.denoiser.time.spec(),
                    "denoiser": self.denoiser_record(), "backbone": str(source)})
        raw.update(save_tokenizer(tokenizer, path))
        (path / "config.json").write_text(json.dumps(raw, indent=2) + "\n")
        state = {k: v.detach().contiguous() for k, v in self.denoiser.state_dict().items()}
        save_file(state, str(path / ADAPTER_FILE), metadata={"format": "pt"})

    # ---- released layout ----------------------------------------------------------------------
    def released_state_dict(self) -> dict[str, Tensor]:
        """The weights under released checkpoint names (MoE experts fused), sharing storage with the model."""
        return {self._released_name(k): v for k, v in self.state_dict().items()}

    def _released_name(self, name: str) -> str:
        """One state-dict name -> its released name: the time conditioning's under the namespace its
        class declares (`TimeConditioning.released_prefix`), the rest by `towers.checkpoints.released_name`."""
        if name.startswith(TIME_MODULE):
            return self.denoiser.time.released_prefix + name[len(TIME_MODULE):]
        return released_name(name)

    def _module_names(self, released: Iterable[str]) -> dict[str, str]:
        """Released names (already checked against this model's) -> state-dict names, inverting
        `_released_name` over the model's own names: whatever names a time conditioning gives its
        parameters, each maps back (a fixed prefix table would not know them)."""
        inverse = {self._released_name(k): k for k in self.state_dict()}
        return {k: inverse.get(k) or module_name(k) for k in released}

    def _upgrade_time_names(self, state: Mapping[str, Tensor], own: Iterable[str]) -> Mapping[str, Tensor]:
        """`state` with a time conditioning's bare parameter names (how checkpoints written before
        `TimeConditioning.released_prefix` saved a module other than AdaLNSingle, which then failed to
        load) moved under the module's prefix; `state` itself when there are none."""
        prefix, own = self.denoiser.time.released_prefix, set(own)
        old = {k for k in state if prefix and k not in own and prefix + k in own}
        if not old:
            return state
        return {(prefix + k if k in old else k): v for k, v in state.items()}

    def load_released_state_dict(self, state: Mapping[str, Tensor], *, where: str = "state dict",
                                 dtype: torch.dtype | str | None = None, device=None, denoiser_device=None,
                                 quantize: str | None = None) -> None:
        """Load weights given under released names (tensors or lazy references), after checking keys
        and shapes (errors name `where`).

        A model built on the meta device adopts the tensors, read into `dtype` (None: as given; routers
        stay float32) on `device` (context) / `denoiser_device` (denoiser, default `device`).
        quantize: see `from_pretrained`; on a meta model the plan is applied first and each
        projection quantized as it is read (`quantization.int8_converter`), else after loading.
        """
        check_quantize(quantize)
        own = self.released_state_dict()
        state = self._upgrade_time_names(state, own.keys())
        check_keys(state, own.keys(), where=where)
        check_shapes(state, own, where=where)
        del own
        names = self._module_names(state.keys())  # before int8 renames any module's weights
        den_device = device if denoiser_device is None else denoiser_device
        convert = None
        if quantize is not None and all(t.is_meta for t in self.state_dict().values()):
            quantize_model(self, quantize)  # on meta: swaps in the int8 modules, allocates nothing
            convert = int8_converter(self)
        materialize(self, {names[k]: v for k, v in state.items()}, dtype=dtype,
                    device=lambda k: den_device if k.startswith("denoiser.") else device, convert=convert)
        if quantize is not None and convert is None:
            quantize_model(self, quantize)

    def save_pretrained(self, path: str | os.PathLike, *, max_shard_size: int | None = None,
                        expert_layout: str = "fused", tokenizer: Tokenizer | None = None) -> None:
        """Write the released layout: config.json (the family's config + block_size, mask_token_id,
        architectures) and safetensors weights (sharded above `max_shard_size` bytes), and the
        tokenizer (`tokenizer`, default the model's own) beside them (`tokenizers.save_tokenizer`:
        HF files, or ``"tokenizer": "byte"`` in config.json). An adapter model (`denoiser=LoRA(...)`)
        writes an adapter folder instead (`save_adapter`: the backbone is referenced, not copied)."""
        if is_adapter(self.denoiser):  # no context weights of its own to write: the backbone is referenced
            return self.save_adapter(path, tokenizer=tokenizer)
        if self.quantization is not None:
            raise ValueError(f"this model is quantized ({self.quantization}) for inference and cannot be saved; "
                             "save the full-precision model and pass quantize= when loading it")
        extra = {"block_size": self.block_size, "mask_token_id": self.mask_token_id, "shifted": self.shifted,
                 "architectures": ["TwoTowerLM"], "time_conditioning": self.denoiser.time.spec()}
        if self.denoiser.skip_layers:  # a shallow draft; a full-depth file stays as it was before the option
            extra["denoiser"] = self.denoiser_record()
        extra.update(save_tokenizer(tokenizer if tokenizer is not None else self.tokenizer, path))
        save_state_dict(self.released_state_dict(), path, config=self.config, max_shard_size=max_shard_size,
                        expert_layout=expert_layout, extra_config=extra)

    # ---- compilation --------------------------------------------------------------------------
    def compile_towers(self, **compile_kwargs) -> "TwoTowerLM":
        """Opt in to `torch.compile` for the generation hot paths: the context tower's layer stack
        (prefill, extend: every mode, AR included) and the denoiser's `forward_block`.

        At these model sizes a forward is a few hundred small kernels, so fusing them pays most on
        CPU (benchmarks/README.md has figures). The first calls compile (tens of seconds per new
        shape family; shapes are dynamic by default, so growing caches do not recompile). Outputs
        can differ from eager in the last float bits. Keyword arguments go to `torch.compile`
        (default `dynamic=True`). Returns self; calling it again does nothing.
        """
        if self.compiled:
            return self
        compile_kwargs.setdefault("dynamic", True)
        # Instance attributes shadow the methods; the eager ones stay reachable through the class.
        self.context.compile_forward(**compile_kwargs)
        self.denoiser.forward_block = torch.compile(self.denoiser.forward_block, **compile_kwargs)
        return self

    # ---- inference copies: merged adapters, fused projections ---------------------------------
    def merge_adapters(self, *, fuse: bool = True, pack: bool = True, fuse_context: bool = False,
                       pack_context: bool = False, int8_draft: bool = False, pack_rows: int | None = None,
                       draft_vocab: Sequence[int] | Tensor | None = None) -> int:
        """Make a speculative iteration cheaper at inference; returns the bytes of the copies made.

        The denoiser: every LoRA adapter applies one merged weight W + s B A instead of its base and
        two low-rank matmuls, and with `fuse` (Llama-like families) q/k/v and gate/up are one matmul
        each (`towers.adapters.merge_adapters`): about one more backbone without its embeddings (212 MB
        for SmolLM2-135M in bf16). With `pack` (on a CPU, bf16 where oneDNN has a bf16 path, float32
        wherever it packs) the copies and a copy of the head (+57 MB in bf16) are pre-packed for oneDNN,
        which then skips reordering every weight on every call (`towers.inference_linear`). The draft
        moves by rounding only; speculative output stays AR's, the context tower being untouched.

        fuse_context: fuse the context tower's q/k/v and gate/up too (+140 MB for SmolLM2 in bf16):
        every mode's steps get cheaper, AR's included, with the same dot products (bit-identical in
        bf16 on the AMX CPU, equal to float32 rounding: the summation order is the BLAS library's).

        pack_context: fuse the context tower and pre-pack all its products, head included, on a CPU as
        `pack` (+ one more context tower, 270 MB for SmolLM2 in bf16, 540 MB in float32), for inputs of
        at most `pack_rows` rows (None: the dtype's default, `towers.inference_linear.context_pack_rows`:
        16 in bf16, 128 in float32); larger ones run the modules. Every step, AR's too, gets cheaper
        (bf16 on an AMX CPU: about 1.5x per matmul, bit-identical to the unpacked tower at up to 16 rows;
        float32 on an AVX2-only CPU: AR 1.27x, within float32 rounding of it).

        int8_draft: the denoiser's copies, its output projections and its head held as int8, each input
        quantized on the fly (`towers.inference_linear`, fbgemm's dynamic int8 kernels, in place of
        `pack`): a draft forward about 3x cheaper in float32 on a CPU. The draft is rounded to int8,
        so its tokens, and tokens per iteration, may move; speculative output stays AR's, since the
        context tower verifies in its own dtype. Where torch lacks the kernels (or off the CPU) the
        copies stay in the model's dtype.

        draft_vocab: token ids (`tokenizers.frequent_tokens` picks them): the draft's head computes and
        proposes those only (`towers.inference_linear.VocabSubsetHead`); speculative output stays AR's.

        Inference only: parameters, state dict, checkpoints and training are unchanged; `.train()`,
        moving or casting the model, and `unmerge_adapters` drop the copies (call this again after
        `.to(...)`).
        """
        if self.quantization is not None:
            raise ValueError(f"this model's projections are quantized ({self.quantization}); merged or fused copies "
                             "would be full precision. Load it without quantize= to merge adapters")
        rows = context_pack_rows(self.context.lm_head.weight.dtype, pack_rows) if pack_context else None  # checked first
        made = merge_adapters(self.denoiser, fuse=fuse, pack=INT8 if int8_draft else pack, draft_vocab=draft_vocab)
        if fuse_context or pack_context:
            made += fuse_projections(self.context, pack=pack_context, max_rows=rows)
        return made

    def unmerge_adapters(self) -> None:
        """Drop every inference copy `merge_adapters` made (both towers)."""
        unmerge_adapters(self.denoiser)
        fuse_projections(self.context, fuse=False)

    @property
    def compiled(self) -> bool:
        """Whether `compile_towers` has been called."""
        return self.context.forward_compiled

    # ---- devices ------------------------------------------------------------------------------
    def place_towers_on_devices(self, ctx_device, den_device) -> "TwoTowerLM":
        """Context tower (+ its head) on `ctx_device`; denoiser tower, its head and the time modules on
        `den_device`. Generation then mirrors the context cache to the denoiser incrementally."""
        if is_adapter(self.denoiser) and torch.device(ctx_device) != torch.device(den_device):
            raise ValueError(f"this model's denoiser borrows the context tower's weights (an adapter), so both "
                             f"towers must share one device; got {ctx_device} and {den_device}")
        self.context.to(ctx_device)
        self.denoiser.to(den_device)
        return self

    @property
    def devices(self) -> tuple[torch.device, torch.device]:
        """(context device, denoiser device), read from the weights."""
        return device_of(self.context), device_of(self.denoiser)

    @property
    def context_device(self) -> torch.device:
        """Where the context tower lives: inputs go here, outputs come back here."""
        return self.devices[0]

    @property
    def denoiser_device(self) -> torch.device:
        return self.devices[1]

    # ---- prompts ------------------------------------------------------------------------------
    def encode(self, prompt: Prompt) -> Tensor:
        """A prompt (text, or chat messages [{"role", "content"}, ...]) -> ids (1, T) on the context
        tower's device, ready for `generate`; encoded with the model's own tokenizer by the rule
        `predict`, `serve` and the eval harness share (`prompting.encode_prompt`: BOS as the tokenizer
        does it, chat messages through its template)."""
        if self.tokenizer is None:
            raise ValueError("this model has no tokenizer (its folder had neither tokenizer files nor \"tokenizer\": "
                             "\"byte\" in config.json); set model.tokenizer, e.g. to twotower.HFTokenizer(DIR) or "
                             "twotower.ByteTokenizer()")
        return torch.tensor([encode_prompt(self.tokenizer, prompt)], dtype=torch.long, device=self.context_device)

    # ---- generation ---------------------------------------------------------------------------
    def generate(self, input_ids: Tensor, attention_mask: Tensor | None = None, decoder: Decoder | None = None, *,
                 max_new_tokens: int = 64, eos_token_id: int | Sequence[int] | None = None,
                 generator: torch.Generator | None = None, step_callback: StepCallback | None = None,
                 sampler: Sampler | None = None, block_size: int | None = None, steps_per_block: int | None = None,
                 temperature: float | None = None, stop=None) -> GenerationOutput:
        """Generate with `decoder` (any `twotower.decoding.Decoder`). input_ids / attention_mask: (B, T),
        left padding; outputs come back on the context tower's device.

        Without a decoder this is mask diffusion, `MaskDiffusion(sampler, block_size, steps_per_block,
        temperature)` (default sampler ConfidenceThreshold(0.8), the model's block size, 16 steps,
        greedy); those four shorthands are refused next to an explicit decoder, which carries its own.
        `stop`: a stop criterion such as `decoding.StopStrings` (see `Decoder.generate`).
        """
        shorthands = {"sampler": sampler, "block_size": block_size, "steps_per_block": steps_per_block,
                      "temperature": temperature}
        given = sorted(k for k, v in shorthands.items() if v is not None)
        if decoder is None:
            decoder = MaskDiffusion(**{k: v for k, v in shorthands.items() if v is not None})
        elif not isinstance(decoder, Decoder):
            raise ValueError(f"decoder must be a twotower.decoding.Decoder, got {decoder!r}")
        elif given:
            raise ValueError(f"{given} are MaskDiffusion settings; with decoder={decoder!r} set them on the decoder")
        return decoder.generate(self, input_ids, attention_mask, max_new_tokens=max_new_tokens,
                                eos_token_id=eos_token_id, generator=generator, step_callback=step_callback,
                                stop=stop)


def shape_only_model(config, *, dtype: torch.dtype = torch.bfloat16, quantize: str | None = None, **model_kwargs):
    """A TwoTowerLM of `config` on the meta device (no weight memory), every tensor in the dtype
    `from_pretrained(dtype=dtype)` would load it in (`towers.loading.target_dtype`: routers stay
    float32), then quantized by `quantize_model`: the same plan and modules as
    `from_pretrained(..., dtype=dtype, quantize=quantize)`, so `stored_bytes` / `bytes_by_part`
    of it are that model's, for any size (a 2 x 30 B model takes a second on a CPU)."""
    check_quantize(quantize)
    with torch.device("meta"):
        model = TwoTowerLM(config, **model_kwargs)
        model.load_state_dict({k: t.to(target_dtype(k, t, dtype)) for k, t in model.state_dict().items()},
                              strict=True, assign=True)
    if quantize is not None:
        quantize_model(model, quantize)
    return model
