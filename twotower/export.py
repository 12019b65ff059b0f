"""Export: a fine-tuning checkpoint (`DenoiserFineTuning` `.ckpt`, denoiser side only) -> the released
two-tower layout. It builds a `TwoTowerLM`, so it lives here and not under `towers/`, whose modules
never import the model; the key names it relies on are `towers/checkpoints.py`'s.
"""

from __future__ import annotations

import os
from pathlib import Path

from .distributed import read_checkpoint  # a .ckpt file or a sharded (DCP) checkpoint folder
from .hub import resolve_model
from .model import TwoTowerLM
from .tokenizers import tokenizer_from_spec
from .towers.checkpoints import CKPT_META_KEY, TRAINABLE_PREFIX

__all__ = ["export_checkpoint"]


def export_checkpoint(ckpt_path: str | os.PathLike, out_dir: str | os.PathLike, *, backbone: str | None = None,
                      max_shard_size: int | None = None, expert_layout: str = "fused") -> Path:
    """Fine-tuning checkpoint (.ckpt file, or the distributed checkpoint folder ModelParallelStrategy
    writes; denoiser side only) -> released two-tower directory.

    The frozen context tower is rebuilt from the path recorded in the checkpoint (or from
    ``backbone``, a folder or built-in name, when it moved since training); the ``denoiser.*``
    weights are loaded over its copy and the pair is written with `TwoTowerLM.save_pretrained`,
    with the tokenizer the run was trained with (recorded in the checkpoint; else the backbone's
    own). Returns ``Path(out_dir)``.
    """
    path = Path(ckpt_path)
    ckpt = read_checkpoint(path)
    meta = ckpt.get(CKPT_META_KEY)
    if meta is None:
        raise ValueError(f"{path} is not a DenoiserFineTuning checkpoint (no '{CKPT_META_KEY}' entry)")
    reference = backbone or meta["context_source"]
    try:
        source = resolve_model(reference, kind="backbone checkpoint")
    except FileNotFoundError as e:
        raise FileNotFoundError(f"the frozen context tower is missing ({e}); pass --backbone DIR (a folder or a "
                                "built-in name)") from None
    if not (source / "config.json").exists():
        raise FileNotFoundError(f"the frozen context tower this checkpoint references is missing: {source}; "
                                "pass --backbone DIR")
    # By reference, not by resolved path: an adapter export then records the built-in name.
    model = TwoTowerLM.from_backbone(reference, block_size=meta["block_size"], mask_token_id=meta["mask_token_id"],
                                     shifted=bool(meta.get("shifted", False)), time=meta.get("time_conditioning"),
                                     denoiser=meta.get("denoiser"))
    den = {k.removeprefix(TRAINABLE_PREFIX): v for k, v in ckpt["state_dict"].items() if k.startswith(TRAINABLE_PREFIX)}
    missing, unexpected = model.denoiser.load_state_dict(den, strict=False)
    if missing or unexpected:
        raise ValueError(f"{path}: denoiser weights do not fit the backbone {source}: "
                         f"missing {missing[:5]}, unexpected {unexpected[:5]}")
    # Checkpoints written before the tokenizer was recorded have no entry: the backbone's own is kept.
    model.save_pretrained(out_dir, max_shard_size=max_shard_size, expert_layout=expert_layout,
                          tokenizer=tokenizer_from_spec(meta.get("tokenizer")))
    return Path(out_dir)
