"""Checkpoint file IO: AR (any registered family) / two-tower checkpoint directories <-> flat state dicts.

Nothing here builds a model: every function works on ``dict[str, Tensor]`` so that the tower
classes, conversion tools and tests share one reader and one writer. What the keys are called
(backbone / released / per-expert names, AR prefixes) is `checkpoints.py`'s business; this
module reads and writes the files.

Accepted on disk
----------------
* ``config.json`` of a registered tower family (``model_type``; NemotronH files may instead
  just carry ``hybrid_override_pattern`` or ``layers_block_type``); extra keys such as
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
import re
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor
from transformers import PretrainedConfig

from .checkpoints import (
    TOWER_PREFIXES,
    ar_to_backbone_names,
    backbone_to_hf_names,
    check_layer_counts,
    check_released_names,
    fuse_experts,
    unfuse_experts,
)

__all__ = [
    "read_config",
    "read_safetensors",
    "load_backbone_state_dict",
    "load_two_tower_state_dict",
    "save_state_dict",
    "save_backbone_hf",
]

CONFIG_NAME = "config.json"
SINGLE_WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"

# transformers keeps these in float32 whatever the model dtype (router logits and the
# choose-only correction bias decide expert selection; bf16 would change which experts win).
_FP32_SUFFIXES = ("e_score_correction_bias", "mixer.gate.weight")

_SHARD_RE = re.compile(r"^model-\d{5}-of-\d{5}\.safetensors$")

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
    transformers' encoded infinities decoded. A file without ``model_type`` but with NemotronH's
    ``hybrid_override_pattern`` / ``layers_block_type`` is read as NemotronH (older files).
    """
    from .base import family_for

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
        if "hybrid_override_pattern" not in raw and "layers_block_type" not in raw:
            raise ValueError(
                f"{file} names no 'model_type' and is not a NemotronH config: it has neither "
                "'hybrid_override_pattern' nor 'layers_block_type'"
            )
        model_type = "nemotron_h"
    try:
        family = family_for(model_type)
    except ValueError as e:
        raise ValueError(f"{file}: {e}") from e
    if family.model_type == "nemotron_h" and "hybrid_override_pattern" not in raw and "layers_block_type" not in raw:
        raise ValueError(f"{file} is not a NemotronH config: it has neither 'hybrid_override_pattern' nor "
                         "'layers_block_type'")
    try:
        config = family.config_class.from_dict(dict(raw))
    except Exception as e:  # transformers' strict dataclass validation raises several types
        raise ValueError(f"{file} is not a valid {model_type} config: {e}") from e
    return config, raw


def _embed_key(config) -> str:
    from .base import family_for

    return family_for(config).embed_key


# --------------------------------------------------------------------------------------------
# safetensors reading


def _truncated(file: Path, why: str) -> ValueError:
    return ValueError(f"{file.name} is truncated or not a safetensors file: {file} ({why})")


def _check_safetensors_header(file: Path) -> None:
    """Validate the header against the file size before handing the file to safetensors.

    A copy cut short by a full disk or an interrupted download is the common failure; the
    header tells us exactly how many bytes the file must have, so we can say so plainly.
    """
    size = file.stat().st_size
    if size < 8:
        raise _truncated(file, f"{size} bytes, shorter than the 8-byte header length")
    with open(file, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if 8 + n > size:
            raise _truncated(file, f"header says {n} header bytes but the file has {size} bytes")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise _truncated(file, f"header is not JSON: {e}") from e
    if not isinstance(header, dict):
        raise _truncated(file, "header is not a JSON object")
    ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)]
    need = 8 + n + max(ends, default=0)
    if need > size:
        raise _truncated(file, f"expected {need} bytes, found {size}")


def _read_file(file: Path) -> dict[str, Tensor]:
    _check_safetensors_header(file)
    try:
        with safe_open(str(file), framework="pt", device="cpu") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own SafetensorError for corrupt data
        raise _truncated(file, str(e)) from e


def _read_index(index_file: Path) -> dict[str, str]:
    try:
        index = json.loads(index_file.read_text(encoding="utf-8"))
        weight_map = index["weight_map"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{index_file} is not a valid safetensors index (needs a 'weight_map'): {e}") from e
    if not isinstance(weight_map, dict) or not weight_map:
        raise ValueError(f"{index_file}: 'weight_map' must be a non-empty object of key -> shard file")
    return weight_map


def _read_sharded(index_file: Path) -> dict[str, Tensor]:
    weight_map = _read_index(index_file)
    root = index_file.parent
    shards = sorted(set(weight_map.values()))
    missing = [s for s in shards if not (root / s).is_file()]
    if missing:
        raise FileNotFoundError(
            f"shard(s) listed in {index_file} are missing: {', '.join(str(root / s) for s in missing)}"
        )
    state: dict[str, Tensor] = {}
    for shard in shards:
        state.update(_read_file(root / shard))
    absent = [k for k, s in weight_map.items() if k not in state]
    if absent:
        raise ValueError(
            f"{len(absent)} key(s) listed in {index_file} are not in their shard: "
            + ", ".join(f"{k} ({weight_map[k]})" for k in absent[:10])
        )
    return state


def read_safetensors(path: str | os.PathLike) -> dict[str, Tensor]:
    """All tensors of a checkpoint directory (or of one ``.safetensors`` file), on CPU.

    Lookup order follows transformers: ``model.safetensors``, then
    ``model.safetensors.index.json``, then a lone ``*.safetensors`` file.
    """
    path = _checkpoint_dir(path)
    if path.is_file():
        return _read_file(path)
    if (path / SINGLE_WEIGHTS_NAME).is_file():
        return _read_file(path / SINGLE_WEIGHTS_NAME)
    if (path / INDEX_NAME).is_file():
        return _read_sharded(path / INDEX_NAME)
    files = sorted(path.glob("*.safetensors"))
    if len(files) == 1:
        return _read_file(files[0])
    if not files:
        raise FileNotFoundError(
            f"no weights in {path}: expected {SINGLE_WEIGHTS_NAME}, {INDEX_NAME} or one *.safetensors file"
        )
    raise FileNotFoundError(
        f"{path} holds {len(files)} *.safetensors files ({', '.join(f.name for f in files[:5])}, ...) "
        f"but no {INDEX_NAME} saying which keys live where"
    )


# --------------------------------------------------------------------------------------------
# dtype


def _as_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    name = str(dtype).removeprefix("torch.")
    resolved = getattr(torch, name, None)
    if not isinstance(resolved, torch.dtype) or not resolved.is_floating_point:
        raise ValueError(f"dtype must be a floating torch dtype such as 'bfloat16' or 'float32', got {dtype!r}")
    return resolved


def _target_dtype(key: str, t: Tensor, dtype: torch.dtype | None) -> torch.dtype:
    if dtype is None or not t.is_floating_point():
        return t.dtype
    return torch.float32 if key.endswith(_FP32_SUFFIXES) else dtype


def _cast(state: dict[str, Tensor], dtype: torch.dtype | str | None) -> dict[str, Tensor]:
    dtype = _as_dtype(dtype)
    if dtype is None:
        return state
    return {k: v.to(_target_dtype(k, v, dtype)) for k, v in state.items()}


# --------------------------------------------------------------------------------------------
# loading


def load_backbone_state_dict(
    path: str | os.PathLike, *, dtype: torch.dtype | str | None = None
) -> tuple[PretrainedConfig, dict[str, Tensor]]:
    """AR NemotronH checkpoint directory -> ``(config, backbone-named state dict)``.

    Keys are renamed by `checkpoints.ar_to_backbone_names` (prefix stripped, experts fused,
    ``lm_head.weight`` present). ``dtype`` casts floating tensors, except the router weights and
    correction bias, which stay float32.
    """
    config, _ = read_config(path)
    state = ar_to_backbone_names(read_safetensors(path), where=str(path), embed_key=_embed_key(config),
                                 tie_word_embeddings=getattr(config, "tie_word_embeddings", False))
    check_layer_counts(state, config, str(path))
    return config, _cast(state, dtype)


def load_two_tower_state_dict(
    path: str | os.PathLike, *, dtype: torch.dtype | str | None = None
) -> tuple[PretrainedConfig, dict, dict[str, Tensor]]:
    """Released-layout two-tower directory -> ``(config, raw config dict, state dict)``.

    Keys keep the released names (``context_tower.*``, ``denoiser_tower.*``, heads, time
    modules), checked by `checkpoints.check_released_names`; experts are fused. An AR
    checkpoint is refused with a pointer to the conversion path.
    """
    config, raw = read_config(path)
    adaln = (raw.get("time_conditioning") or {}).get("class_path", "twotower.time_embedding.AdaLNSingle")
    state = check_released_names(read_safetensors(path), num_layers=_modulated_layers(config), where=str(path),
                                 tie_word_embeddings=getattr(config, "tie_word_embeddings", False),
                                 embed_key=_embed_key(config),
                                 time_keys=adaln == "twotower.time_embedding.AdaLNSingle")
    for tower in TOWER_PREFIXES:
        check_layer_counts(state, config, str(path), tower)
    return config, raw, _cast(state, dtype)


def _modulated_layers(config) -> int:
    """How many scale-shift tables the family's denoiser has (its `num_modulated`)."""
    from .base import family_for

    return getattr(family_for(config).denoiser, "modulated_layers", lambda c: c.num_hidden_layers)(config)


# --------------------------------------------------------------------------------------------
# saving


def _config_dict(config: PretrainedConfig | Mapping, extra: Mapping | None) -> dict:
    cfg = config.to_dict() if isinstance(config, PretrainedConfig) else dict(config)
    cfg.update(extra or {})
    return cfg


def _plan_shards(sizes: list[tuple[str, int]], max_bytes: int | None) -> list[list[str]]:
    """Greedy packing in key order, which keeps a layer's tensors together; a tensor larger
    than the limit gets a shard of its own rather than an error."""
    total = sum(s for _, s in sizes)
    if max_bytes is None or total <= max_bytes:
        return [[k for k, _ in sizes]]
    shards: list[list[str]] = [[]]
    used = 0
    for k, s in sizes:
        if shards[-1] and used + s > max_bytes:
            shards.append([])
            used = 0
        shards[-1].append(k)
        used += s
    return shards


def _materialize(items: list[tuple[str, Tensor]]) -> dict[str, Tensor]:
    """CPU, contiguous, no two tensors sharing storage: what safetensors can write.

    Tied weights and views (unfused experts are views of the fused tensor) share storage;
    safetensors refuses that, so such tensors are cloned. Only one shard is materialized at a
    time, which bounds the extra memory.
    """
    out: dict[str, Tensor] = {}
    seen: set[int] = set()
    for k, t in items:
        t = t.detach().to("cpu").contiguous()
        storage = t.untyped_storage()
        if storage.data_ptr() in seen or storage.nbytes() != t.numel() * t.element_size():
            t = t.clone()
        seen.add(t.untyped_storage().data_ptr())
        out[k] = t
    return out


def _write_atomic_json(file: Path, obj: Any) -> None:
    tmp = file.with_name(file.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, file)


def save_state_dict(
    state: Mapping[str, Tensor],
    path: str | os.PathLike,
    *,
    config: PretrainedConfig | Mapping,
    max_shard_size: int | None = None,
    expert_layout: str = "fused",
    extra_config: Mapping | None = None,
    dtype: torch.dtype | str | None = None,
) -> None:
    """Write ``config.json`` and the weights of ``state`` (keys as given) into directory ``path``.

    One ``model.safetensors``, or ``model-0000k-of-0000N.safetensors`` shards plus
    ``model.safetensors.index.json`` when the total exceeds ``max_shard_size`` bytes.
    ``expert_layout="per_expert"`` writes one tensor per expert. Stale weight files of either
    layout are removed first, since a leftover index would otherwise shadow a new single file.
    """
    if expert_layout not in ("fused", "per_expert"):
        raise ValueError(f"expert_layout must be 'fused' or 'per_expert', got {expert_layout!r}")
    if max_shard_size is not None and max_shard_size <= 0:
        raise ValueError(f"max_shard_size must be a positive number of bytes, got {max_shard_size}")
    dtype = _as_dtype(dtype)
    for k, v in state.items():
        if not isinstance(v, Tensor):
            raise TypeError(f"state[{k!r}] is a {type(v).__name__}, not a tensor")
        if v.is_meta:
            raise ValueError(f"state[{k!r}] is on the meta device and has no data to save")
    state = fuse_experts(state)  # normalise mixed input before choosing the output layout
    if expert_layout == "per_expert":
        state = unfuse_experts(state)

    cfg = _config_dict(config, extra_config)
    floats = [(_target_dtype(k, v, dtype), v.numel()) for k, v in state.items() if v.is_floating_point()]
    if floats:
        # transformers' dtype="auto" reads this; name the dtype that holds most parameters.
        by_dtype: dict[torch.dtype, int] = {}
        for dt, n in floats:
            by_dtype[dt] = by_dtype.get(dt, 0) + n
        cfg["dtype"] = str(max(by_dtype, key=by_dtype.get)).removeprefix("torch.")

    root = Path(path)
    root.mkdir(parents=True, exist_ok=True)
    for f in root.iterdir():
        if f.name in (SINGLE_WEIGHTS_NAME, INDEX_NAME) or _SHARD_RE.match(f.name):
            f.unlink()
    _write_atomic_json(root / CONFIG_NAME, _encode_floats(cfg))

    sizes = [(k, v.numel() * _target_dtype(k, v, dtype).itemsize) for k, v in state.items()]
    shards = _plan_shards(sizes, max_shard_size)
    names = (
        [SINGLE_WEIGHTS_NAME]
        if len(shards) == 1
        else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    )
    for keys, name in zip(shards, names):
        tensors = _materialize([(k, state[k].to(_target_dtype(k, state[k], dtype))) for k in keys])
        tmp = root / (name + ".tmp")
        # format=pt: older transformers versions refuse safetensors files without it.
        save_file(tensors, str(tmp), metadata={"format": "pt"})
        os.replace(tmp, root / name)
    if len(shards) > 1:
        index = {
            "metadata": {"total_size": sum(s for _, s in sizes)},
            "weight_map": {k: name for keys, name in zip(shards, names) for k in keys},
        }
        _write_atomic_json(root / INDEX_NAME, index)


def save_backbone_hf(
    state: Mapping[str, Tensor], path: str | os.PathLike, *, config: PretrainedConfig | Mapping, **kw: Any
) -> None:
    """Write backbone names (+ ``lm_head.weight``) as a transformers ``<Family>ForCausalLM``
    checkpoint (``model.`` prefix), loadable with ``from_pretrained(path)``.

    The family comes from the config's ``model_type`` (NemotronH when absent). Keyword arguments
    go to :func:`save_state_dict`.
    """
    from .base import family_for

    cfg = _config_dict(config, None)
    family = family_for(cfg.get("model_type") or "nemotron_h")
    out = backbone_to_hf_names(state, tie_word_embeddings=cfg.get("tie_word_embeddings", False))
    extra = {"architectures": [family.hf_architecture], "model_type": family.model_type}
    extra.update(kw.pop("extra_config", None) or {})
    save_state_dict(out, path, config=cfg, extra_config=extra, **kw)
