"""Checkpoint writing: flat state dicts -> config.json + safetensors (sharded or not), and the
transformers AR layout (`save_backbone_hf`).

The readers live in `loading.py`; the names on disk are `checkpoints.py`'s.
Writers materialise one shard at a time, so saving holds at most one shard beyond the model.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor
from transformers import PretrainedConfig

from .checkpoints import backbone_to_hf_names, fuse_experts, unfuse_experts
from ..validation import check_positive
from .loading import (
    CONFIG_NAME,
    INDEX_NAME,
    SINGLE_WEIGHTS_NAME,
    _as_dtype,
    _encode_floats,
    target_dtype,
)
from .registry import family_for

__all__ = ["save_state_dict", "save_backbone_hf"]

_SHARD_RE = re.compile(r"^model-\d{5}-of-\d{5}\.safetensors$")



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
    if max_shard_size is not None:
        check_positive("max_shard_size", max_shard_size, unit="bytes")
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
    floats = [(target_dtype(k, v, dtype), v.numel()) for k, v in state.items() if v.is_floating_point()]
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
    # _encode_floats: JSON has no inf / NaN (e.g. NemotronH's time_step_limit); they are written as tagged objects.
    _write_atomic_json(root / CONFIG_NAME, _encode_floats(cfg))

    sizes = [(k, v.numel() * target_dtype(k, v, dtype).itemsize) for k, v in state.items()]
    shards = _plan_shards(sizes, max_shard_size)
    names = (
        [SINGLE_WEIGHTS_NAME]
        if len(shards) == 1
        else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    )
    for keys, name in zip(shards, names):
        tensors = _materialize([(k, state[k].to(target_dtype(k, state[k], dtype))) for k in keys])
        tmp = root / (name + ".tmp")
        # format=pt: older transformers versions refuse safetensors files without it.
        save_file(tensors, str(tmp), metadata={"format": "pt"})
        os.replace(tmp, root / name)  # atomic: a crash never leaves a half-written file under the real name
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

    The family comes from the config's ``model_type`` (a config without one is refused). Keyword
    arguments go to :func:`save_state_dict`.
    """
    cfg = _config_dict(config, None)
    if not cfg.get("model_type"):
        raise ValueError("save_backbone_hf: the config names no model_type, so the transformers architecture to "
                         "write is unknown; pass a transformers config object or add 'model_type' (e.g. 'llama')")
    family = family_for(cfg["model_type"])
    out = backbone_to_hf_names(state, tie_word_embeddings=cfg.get("tie_word_embeddings", False))
    extra = {"architectures": [family.hf_architecture], "model_type": family.model_type}
    extra.update(kw.pop("extra_config", None) or {})
    save_state_dict(out, path, config=cfg, extra_config=extra, **kw)
