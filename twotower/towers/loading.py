"""Checkpoint file IO: AR (any registered family) / two-tower checkpoint directories <-> flat state dicts.

Nothing here builds a model: every function works on ``dict[str, Tensor]`` so that the tower
classes, conversion tools and tests share one reader and one writer. What the keys are called
(backbone / released / per-expert names, AR prefixes) is `checkpoints.py`'s business; this
module reads the files (`saving.py` writes them).

Accepted on disk
----------------
* ``config.json`` of a registered tower family (its ``model_type`` is required); extra keys such as
  ``block_size`` are kept and the raw dict is returned as well;
* ``model.safetensors``, or shards listed by ``model.safetensors.index.json``, or a single
  ``*.safetensors`` file of any name;
* every key layout `checkpoints.py` maps (``backbone.`` / ``model.`` prefixes, fused or
  per-expert MoE weights, ``mtp.*`` ignored), in any floating dtype.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from transformers import PretrainedConfig

from .checkpoints import (
    TOWER_PREFIXES,
    ar_to_backbone_names,
    check_layer_counts,
    check_released_names,
)
from .lazy import SafetensorsFile, TensorRef, close_refs, load_ref
from ..validation import parse_dtype
from .registry import family_for, registered_families

__all__ = [
    "read_config",
    "read_safetensors",
    "safetensors_refs",
    "backbone_refs",
    "two_tower_refs",
    "materialize",
    "target_dtype",
    "load_backbone_state_dict",
    "load_two_tower_state_dict",
]

CONFIG_NAME = "config.json"
SINGLE_WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"


# transformers writes +-inf / nan in config.json as {"__float__": "Infinity"}; it decodes them
# only in from_pretrained, not in from_dict, so we do the same translation ourselves.
_FLOAT_TAG = "__float__"
_FLOAT_TAGS = {"Infinity": math.inf, "-Infinity": -math.inf, "NaN": math.nan}


# --------------------------------------------------------------------------------------------
# config


def _decode_floats(obj: Any) -> Any:
    if isinstance(obj, dict):
        if set(obj) == {_FLOAT_TAG} and obj[_FLOAT_TAG] in _FLOAT_TAGS:
            return _FLOAT_TAGS[obj[_FLOAT_TAG]]
        return {k: _decode_floats(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_decode_floats(v) for v in obj]
    return obj


def _encode_floats(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return {_FLOAT_TAG: "NaN" if math.isnan(obj) else ("Infinity" if obj > 0 else "-Infinity")}
    if isinstance(obj, dict):
        return {k: _encode_floats(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_encode_floats(v) for v in obj]
    return obj


def _checkpoint_dir(path: str | os.PathLike) -> Path:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint path does not exist: {path}")
    return path


def read_config(path: str | os.PathLike) -> tuple[PretrainedConfig, dict]:
    """Read ``<path>/config.json`` (or ``path`` itself if it is a JSON file).

    Returns ``(config, raw)``: the config of the registered tower family named by ``model_type``
    (extra keys such as ``block_size`` become attributes) and the raw JSON dict, with
    transformers' encoded infinities decoded. A file without ``model_type`` is refused: the
    family is never guessed.
    """
    path = _checkpoint_dir(path)
    file = path if path.is_file() else path / CONFIG_NAME
    if not file.is_file():
        raise FileNotFoundError(f"no {CONFIG_NAME} in checkpoint directory: expected {file}")
    try:
        raw = _decode_floats(json.loads(file.read_text(encoding="utf-8")))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{file} is not valid JSON: {e}") from e
    if not isinstance(raw, dict):
        raise ValueError(f"{file} must hold a JSON object, got {type(raw).__name__}")
    model_type = raw.get("model_type")
    if model_type is None:
        raise ValueError(f"{file} names no 'model_type', so its tower family is unknown; add the backbone's "
                         f'transformers model_type to it (e.g. "model_type": "nemotron_h"); registered: '
                         f"{sorted(registered_families())}")
    try:
        family = family_for(model_type)
    except ValueError as e:
        raise ValueError(f"{file}: {e}") from e
    try:
        family.check_raw_config(raw)
    except ValueError as e:
        raise ValueError(f"{file}: {e}") from e
    try:
        config = family.config_class.from_dict(dict(raw))
    except Exception as e:  # transformers' strict dataclass validation raises several types
        raise ValueError(f"{file} is not a valid {model_type} config: {e}") from e
    return config, raw


def _embed_key(config) -> str:
    return family_for(config).embed_key


# --------------------------------------------------------------------------------------------
# safetensors reading (lazy references: `lazy.py`)


def _read_index(index_file: Path) -> dict[str, str]:
    try:
        index = json.loads(index_file.read_text(encoding="utf-8"))
        weight_map = index["weight_map"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{index_file} is not a valid safetensors index (needs a 'weight_map'): {e}") from e
    if not isinstance(weight_map, dict) or not weight_map:
        raise ValueError(f"{index_file}: 'weight_map' must be a non-empty object of key -> shard file")
    return weight_map


def _sharded_refs(index_file: Path) -> dict[str, TensorRef]:
    weight_map = _read_index(index_file)
    root = index_file.parent
    shards = sorted(set(weight_map.values()))
    missing = [s for s in shards if not (root / s).is_file()]
    if missing:
        raise FileNotFoundError(
            f"shard(s) listed in {index_file} are missing: {', '.join(str(root / s) for s in missing)}"
        )
    refs: dict[str, TensorRef] = {}
    for shard in shards:
        refs.update(SafetensorsFile(root / shard).refs)
    absent = [k for k, s in weight_map.items() if k not in refs]
    if absent:
        raise ValueError(
            f"{len(absent)} key(s) listed in {index_file} are not in their shard: "
            + ", ".join(f"{k} ({weight_map[k]})" for k in absent[:10])
        )
    return refs


def safetensors_refs(path: str | os.PathLike) -> dict[str, TensorRef]:
    """Every tensor of a checkpoint directory (or of one ``.safetensors`` file) as a lazy
    `TensorRef`: headers read and checked, no data read (see `lazy.py`).

    Lookup order follows transformers: ``model.safetensors``, then
    ``model.safetensors.index.json``, then a lone ``*.safetensors`` file.
    """
    path = _checkpoint_dir(path)
    if path.is_file():
        return SafetensorsFile(path).refs
    if (path / SINGLE_WEIGHTS_NAME).is_file():
        return SafetensorsFile(path / SINGLE_WEIGHTS_NAME).refs
    if (path / INDEX_NAME).is_file():
        return _sharded_refs(path / INDEX_NAME)
    files = sorted(path.glob("*.safetensors"))
    if len(files) == 1:
        return SafetensorsFile(files[0]).refs
    if not files:
        raise FileNotFoundError(
            f"no weights in {path}: expected {SINGLE_WEIGHTS_NAME}, {INDEX_NAME} or one *.safetensors file"
        )
    raise FileNotFoundError(
        f"{path} holds {len(files)} *.safetensors files ({', '.join(f.name for f in files[:5])}, ...) "
        f"but no {INDEX_NAME} saying which keys live where"
    )


def _load_all(refs: Mapping, dtype: torch.dtype | None = None) -> dict[str, Tensor]:
    """Read every reference (cast as `target_dtype` says), then unmap the files."""
    try:
        return {k: load_ref(r, target_dtype(k, r, dtype)) for k, r in refs.items()}
    finally:
        close_refs(refs.values())


def read_safetensors(path: str | os.PathLike) -> dict[str, Tensor]:
    """All tensors of a checkpoint directory (or of one ``.safetensors`` file), on CPU, as stored."""
    return _load_all(safetensors_refs(path))


# --------------------------------------------------------------------------------------------
# dtype


def _as_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    return parse_dtype("dtype", dtype, allowed=None)


def target_dtype(key: str, t: Tensor, dtype: torch.dtype | None) -> torch.dtype:
    """The dtype tensor `key` is loaded in when `dtype` is asked for: floating tensors take it, except
    those a family keeps in float32 (`TowerFamily.float32_suffixes`: NemotronH's MoE routers); None
    and non-floating tensors keep their own."""
    if dtype is None or not t.is_floating_point():
        return t.dtype
    return torch.float32 if key.endswith(_float32_suffixes()) else dtype


def _float32_suffixes() -> tuple[str, ...]:
    # Every registered family's: the keys are not tied to a config here, and the names are distinct
    # enough ("mixer.gate.weight" is a NemotronH router, never a Llama-like "mlp.gate_proj.weight").
    return tuple(s for family in registered_families().values() for s in family.float32_suffixes)


# --------------------------------------------------------------------------------------------
# loading


def backbone_refs(path: str | os.PathLike) -> tuple[PretrainedConfig, dict[str, TensorRef]]:
    """AR checkpoint directory -> ``(config, backbone-named lazy references)``, nothing read yet.

    Keys are renamed by `checkpoints.ar_to_backbone_names` (prefix stripped, per-expert weights
    fused into `StackedRef`s, ``lm_head.weight`` present, tied to the embeddings' reference when
    the file has no head) and checked against the config's layer and expert counts.
    """
    config, _ = read_config(path)
    refs = ar_to_backbone_names(safetensors_refs(path), where=str(path), embed_key=_embed_key(config),
                                tie_word_embeddings=getattr(config, "tie_word_embeddings", False))
    check_layer_counts(refs, config, str(path))
    return config, refs


def load_backbone_state_dict(
    path: str | os.PathLike, *, dtype: torch.dtype | str | None = None
) -> tuple[PretrainedConfig, dict[str, Tensor]]:
    """AR checkpoint directory -> ``(config, backbone-named state dict)`` (see `backbone_refs`).

    ``dtype`` casts floating tensors, except the router weights and correction bias, which stay
    float32. Towers load through `backbone_refs` + `materialize` instead (no full state dict).
    """
    dtype = _as_dtype(dtype)
    config, refs = backbone_refs(path)
    return config, _load_all(refs, dtype)


def two_tower_refs(path: str | os.PathLike) -> tuple[PretrainedConfig, dict, dict[str, TensorRef]]:
    """Released-layout two-tower directory -> ``(config, raw config dict, lazy references)``.

    Keys keep the released names (``context_tower.*``, ``denoiser_tower.*``, heads, time
    modules), checked by `checkpoints.check_released_names`; experts are fused. An AR
    checkpoint is refused with a pointer to the conversion path.
    """
    config, raw = read_config(path)
    adaln = (raw.get("time_conditioning") or {}).get("class_path", "twotower.time_embedding.AdaLNSingle")
    refs = check_released_names(safetensors_refs(path), num_layers=_modulated_layers(config), where=str(path),
                                tie_word_embeddings=getattr(config, "tie_word_embeddings", False),
                                embed_key=_embed_key(config),
                                time_keys=adaln == "twotower.time_embedding.AdaLNSingle")
    for tower in TOWER_PREFIXES:
        check_layer_counts(refs, config, str(path), tower)
    return config, raw, refs


def load_two_tower_state_dict(
    path: str | os.PathLike, *, dtype: torch.dtype | str | None = None
) -> tuple[PretrainedConfig, dict, dict[str, Tensor]]:
    """`two_tower_refs`, read into a state dict (``dtype`` as in `load_backbone_state_dict`)."""
    dtype = _as_dtype(dtype)
    config, raw, refs = two_tower_refs(path)
    return config, raw, _load_all(refs, dtype)


def materialize(module: torch.nn.Module, state: Mapping, *, dtype: torch.dtype | str | None = None,
                device=None, keep: str = "stored", convert=None) -> None:
    """Fill `module` (built on the meta device, or real) from ``state``: state-dict names -> lazy
    references (or tensors), keys and shapes already checked.

    Each tensor is read once, straight into its final dtype and device, and adopted by the module
    (``load_state_dict(assign=True)``): no initialisation, no full-precision or second copy.
    dtype: floating tensors become it, routers stay float32 (`target_dtype`); None keeps
    ``keep="stored"`` the file's dtype or ``keep="module"`` the module's own (float32 by default).
    device: one device, or a callable key -> device (two towers on two devices).
    convert: None, or a callable (key, tensor just read) -> {state-dict name: tensor} for the module
    as it is now (e.g. `quantization.int8_converter`: a weight becomes its int8 values and scales,
    and the read tensor is dropped before the next one is read).
    """
    dtype = _as_dtype(dtype)
    own = module.state_dict()
    out: dict[str, Tensor] = {}
    try:
        for k, ref in state.items():
            mine = own.get(k)  # None: a key `convert` renames (the module holds its converted form)
            if dtype is not None:
                target = target_dtype(k, ref, dtype)
            else:
                target = mine.dtype if keep == "module" and mine is not None and ref.is_floating_point() else ref.dtype
            dev = device(k) if callable(device) else device
            if dev is None and mine is not None and not mine.is_meta:
                dev = mine.device
            t = load_ref(ref, target, dev)
            if convert is None:
                out[k] = t
            else:
                out.update(convert(k, t))
            del t
    finally:
        close_refs(state.values())
    module.load_state_dict(out, strict=True, assign=any(t.is_meta for t in own.values()))
    left = [n for n, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"{type(module).__name__}: {left[:5]} are not in the checkpoint and stayed on the meta "
                           "device; a family that keeps computed buffers must rebuild them after loading")


def _modulated_layers(config) -> int:
    """How many scale-shift tables the family's denoiser has (its `num_modulated`)."""
    return family_for(config).denoiser.modulated_layers(config)
