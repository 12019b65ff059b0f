"""Checkpoint names: every mapping between the key names a two-tower weight can go by.

File IO (safetensors, shards, index json, config.json) lives in `loading.py`; this module only
renames, filters and checks the keys of ``dict[str, Tensor]`` (against a model: `check_keys`,
`check_shapes`; against a config: `check_layer_counts`). The `.ckpt` -> released export
(a renaming with a model in the middle) lives in `twotower/export.py`. The layouts (docs/design.md, section 1):

* Backbone names (canonical AR, in memory): ``embeddings.weight``, ``layers.{i}.norm.weight``,
  ``layers.{i}.mixer.*`` (transformers-5 NemotronH names), ``norm_f.weight``, ``lm_head.weight``.
  On disk an AR checkpoint wraps them in ``backbone.`` (NVIDIA remote code) or ``model.``
  (transformers >= 5); ``lm_head.weight`` is never wrapped. ``mtp.*`` heads are dropped.
* Tower module names (`ContextTower` / `DenoiserTower` state dicts): ``backbone.<backbone name>``
  and ``lm_head.weight``.
* Released two-tower layout <-> `TwoTowerLM` state-dict names:

      context_tower.X          <->  context.backbone.X
      context_lm_head.weight   <->  context.lm_head.weight
      denoiser_tower.X         <->  denoiser.backbone.X
      lm_head.weight           <->  denoiser.lm_head.weight
      t_embedder.* / t_block.* / scale_shift_tables.{i}  <->  denoiser.time.<same>

* MoE experts: fused in memory, ``P.experts.up_proj`` (E, I, H) and ``P.experts.down_proj``
  (E, H, I); per expert on disk where NVIDIA's code or transformers' ``save_pretrained`` wrote
  them, ``P.experts.{e}.up_proj.weight`` (I, H) and ``P.experts.{e}.down_proj.weight`` (H, I).
* Fine-tuning `.ckpt` (`training.DenoiserFineTuning`): Lightning's ``state_dict`` holds only
  ``denoiser.*`` (the frozen ``context.*`` is dropped on save and restored from its path on
  load), and ``ckpt["twotower"]`` records the context tower's path, block size, mask id, shift.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from torch import Tensor

from ..hub import model_reference

__all__ = [
    "CheckpointKeyError",
    "AR_PREFIXES",
    "TOWER_PREFIXES",
    "TIME_PREFIXES",
    "released_name",
    "module_name",
    "to_tower_names",
    "from_tower_names",
    "drop_mtp",
    "is_fused_expert",
    "fuse_experts",
    "unfuse_experts",
    "ar_to_backbone_names",
    "backbone_to_hf_names",
    "check_released_names",
    "check_keys",
    "check_shapes",
    "check_layer_counts",
    "CKPT_META_KEY",
    "training_checkpoint",
    "restore_frozen",
]

AR_PREFIXES = ("backbone.", "model.")
TOWER_PREFIXES = ("context_tower.", "denoiser_tower.")
TIME_PREFIXES = ("t_embedder.", "t_block.", "scale_shift_tables.")
HF_PREFIX = "model."
LM_HEAD = "lm_head.weight"

# (TwoTowerLM prefix, released prefix); the time modules keep their names under denoiser.time.
_RELEASED_PREFIXES = (("context.backbone.", "context_tower."), ("denoiser.backbone.", "denoiser_tower."),
                      ("denoiser.time.", ""))
_RELEASED_HEADS = {"context.lm_head.weight": "context_lm_head.weight", "denoiser.lm_head.weight": LM_HEAD}
_MODULE_HEADS = {v: k for k, v in _RELEASED_HEADS.items()}

_PER_EXPERT_RE = re.compile(r"^(?P<prefix>(?:.*\.)?experts)\.(?P<idx>\d+)\.(?P<proj>up_proj|down_proj)\.weight$")
_FUSED_RE = re.compile(r"^(?P<prefix>(?:.*\.)?experts)\.(?P<proj>up_proj|down_proj)$")
_LAYER_RE = re.compile(r"^layers\.(\d+)\.")

# The `.ckpt` entry DenoiserFineTuning writes and export_checkpoint reads.
CKPT_META_KEY = "twotower"
_FROZEN = "context."
TRAINABLE_PREFIX = "denoiser."  # what a `.ckpt` keeps (the denoiser side)


class CheckpointKeyError(KeyError, ValueError):
    """Missing / unexpected keys. A KeyError and a ValueError, so callers may catch either."""

    def __str__(self) -> str:  # KeyError's default str() would repr() the whole message
        return str(self.args[0]) if self.args else ""


# --------------------------------------------------------------------------------------------
# released layout <-> TwoTowerLM, backbone <-> tower modules


def released_name(module_name: str) -> str:
    """TwoTowerLM state-dict name -> released checkpoint name (KeyError for a name outside both)."""
    for ours, theirs in _RELEASED_PREFIXES:
        if module_name.startswith(ours):
            return theirs + module_name[len(ours):]
    if module_name in _RELEASED_HEADS:
        return _RELEASED_HEADS[module_name]
    raise KeyError(f"{module_name!r} has no released-layout name")


def module_name(released: str) -> str | None:
    """Released checkpoint name -> TwoTowerLM state-dict name (None for a name the model does not have)."""
    for ours, theirs in _RELEASED_PREFIXES[:2]:
        if released.startswith(theirs):
            return ours + released[len(theirs):]
    if released.startswith(TIME_PREFIXES):
        return "denoiser.time." + released
    return _MODULE_HEADS.get(released)


def to_tower_names(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Backbone names (+ ``lm_head.weight``) -> a tower's state-dict names (``backbone.`` added)."""
    return {k if k == LM_HEAD else "backbone." + k: v for k, v in state.items()}


def from_tower_names(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """A tower's state-dict names -> backbone names (+ ``lm_head.weight``); the inverse of `to_tower_names`."""
    return {k.removeprefix("backbone."): v for k, v in state.items()}


def drop_mtp(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Remove multi-token-prediction heads (``mtp.*``, bare or AR-wrapped): some NVIDIA
    checkpoints carry them and neither tower uses them."""
    def is_mtp(key: str) -> bool:
        parts = key.split(".", 2)
        return parts[0] == "mtp" or (parts[0] + "." in AR_PREFIXES and parts[1:2] == ["mtp"])

    return {k: v for k, v in state.items() if not is_mtp(k)}


# --------------------------------------------------------------------------------------------
# expert layout


def is_fused_expert(key: str) -> bool:
    """True for a fused expert key, ``P.experts.up_proj`` or ``P.experts.down_proj``."""
    return _FUSED_RE.match(key) is not None


def fuse_experts(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Per-expert MoE weights -> fused 3-D tensors, under any prefix.

    ``P.experts.{e}.up_proj.weight`` (I, H) for e = 0..E-1 -> ``P.experts.up_proj`` (E, I, H);
    likewise ``down_proj`` (H, I) -> (E, H, I). Other keys pass through; the fused tensor takes
    the place of the first expert in key order.
    """
    groups: dict[tuple[str, str], dict[int, Tensor]] = {}
    for k, v in state.items():
        m = _PER_EXPERT_RE.match(k)
        if m:
            groups.setdefault((m["prefix"], m["proj"]), {})[int(m["idx"])] = v
    if not groups:
        return dict(state)

    counts: dict[str, dict[str, int]] = {}
    for (prefix, proj), experts in groups.items():
        fused_key = f"{prefix}.{proj}"
        if fused_key in state:
            raise ValueError(f"{prefix}: both per-expert '{proj}' weights and fused '{fused_key}' are present")
        n = max(experts) + 1
        missing = sorted(set(range(n)) - set(experts))
        if missing:
            raise ValueError(f"{prefix}: {proj} of expert(s) {missing} missing (found {len(experts)} of {n})")
        counts.setdefault(prefix, {})[proj] = n
    for prefix, per_proj in counts.items():
        if len(set(per_proj.values())) > 1:
            raise ValueError(f"{prefix}: expert counts differ between projections: {per_proj}")

    out: dict[str, Tensor] = {}
    for k, v in state.items():
        m = _PER_EXPERT_RE.match(k)
        if not m:
            out[k] = v
            continue
        fused_key = f"{m['prefix']}.{m['proj']}"
        if fused_key not in out:
            experts = groups[(m["prefix"], m["proj"])]
            shapes = {tuple(t.shape) for t in experts.values()}
            if len(shapes) > 1:
                raise ValueError(f"{m['prefix']}: {m['proj']} experts have different shapes: {sorted(shapes)}")
            parts = [experts[e] for e in range(len(experts))]
            # Lazy references (`lazy.py`) fuse into a reference read expert by expert into place.
            out[fused_key] = torch.stack(parts) if isinstance(parts[0], Tensor) else parts[0].stack(parts)
    return out


def unfuse_experts(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Fused 3-D MoE weights -> one 2-D tensor per expert (views, no copy).

    ``P.experts.up_proj`` (E, I, H) -> ``P.experts.{e}.up_proj.weight`` (I, H), the layout of
    NVIDIA's remote code and of transformers' ``save_pretrained``.
    """
    out: dict[str, Tensor] = {}
    for k, v in state.items():
        m = _FUSED_RE.match(k)
        if not m:
            out[k] = v
            continue
        if v.dim() != 3:
            raise ValueError(f"{k}: a fused expert tensor must be 3-D (E, out, in), got shape {tuple(v.shape)}")
        for e in range(v.shape[0]):
            out[f"{m['prefix']}.{e}.{m['proj']}.weight"] = v[e]
    return out


# --------------------------------------------------------------------------------------------
# on-disk names -> canonical names (and back, for the HF writer)


def ar_to_backbone_names(state: Mapping[str, Tensor], *, tie_word_embeddings: bool, where: str,
                         embed_key: str = "embeddings.weight") -> dict[str, Tensor]:
    """An AR checkpoint's keys -> backbone names with fused experts and an ``lm_head.weight``.

    Drops ``mtp.*``, strips the one AR prefix (``backbone.`` or ``model.``), and when the head is
    absent and the embeddings are tied uses ``embed_key`` (the family's embedding name, e.g.
    ``embeddings.weight`` or ``embed_tokens.weight``) as ``lm_head.weight``. A
    two-tower checkpoint is refused, since reading its context tower as the AR model would
    silently drop the denoiser. ``where`` (the path) goes into every error.
    """
    state = drop_mtp(state)
    heads = {k.split(".", 1)[0] for k in state if k != LM_HEAD}
    if any(p.rstrip(".") in heads for p in TOWER_PREFIXES):
        raise ValueError(
            f"{where} is a two-tower checkpoint (it has context_tower./denoiser_tower. keys); "
            "load it with load_two_tower_state_dict or TwoTowerLM.from_pretrained"
        )
    wrappers = sorted(heads & {p.rstrip(".") for p in AR_PREFIXES})
    if len(wrappers) > 1:
        raise ValueError(f"{where}: keys mix the prefixes {wrappers}; expected only one of backbone. / model.")
    prefix = f"{wrappers[0]}." if wrappers else ""
    state = {k.removeprefix(prefix) if k != LM_HEAD else k: v for k, v in state.items()}
    if LM_HEAD not in state:
        if not tie_word_embeddings:
            raise CheckpointKeyError(
                f"{where}: no lm_head.weight and config.tie_word_embeddings is false, so there is no output head"
            )
        if embed_key not in state:
            raise CheckpointKeyError(f"{where}: no {embed_key} (nor lm_head.weight) in the checkpoint")
        state[LM_HEAD] = state[embed_key]
    return fuse_experts(state)


def backbone_to_hf_names(state: Mapping[str, Tensor], *, tie_word_embeddings: bool) -> dict[str, Tensor]:
    """Backbone names (+ ``lm_head.weight``) -> transformers' ``<Family>ForCausalLM`` names
    (``model.`` prefix, head unwrapped). Refuses keys that already carry a prefix."""
    wrapped = [k for k in state if k.startswith(AR_PREFIXES + TOWER_PREFIXES)]
    if wrapped:
        raise ValueError(
            f"save_backbone_hf expects bare backbone names (embeddings.weight, layers.*, norm_f.weight, "
            f"lm_head.weight); got prefixed keys such as {wrapped[0]!r}"
        )
    if LM_HEAD not in state and not tie_word_embeddings:
        raise CheckpointKeyError("save_backbone_hf: no lm_head.weight and the config does not tie embeddings")
    return {k if k == LM_HEAD else HF_PREFIX + k: v for k, v in state.items()}


def check_released_names(state: Mapping[str, Tensor], *, num_layers: int, tie_word_embeddings: bool,
                         where: str, embed_key: str = "embeddings.weight", time_keys: bool = True) -> dict[str, Tensor]:
    """A released two-tower checkpoint's keys, checked and completed: ``mtp.*`` dropped, tied
    heads filled from their tower's embeddings, experts fused.

    Refuses an AR checkpoint (pointing at the conversion path, since building a two-tower model
    from it here would skip the denoiser's initialisation), a checkpoint with one tower only, and
    one missing a head, the time modules or any of the ``num_layers`` scale-shift tables (those
    two only with ``time_keys``, i.e. adaLN-single time conditioning).
    """
    state = drop_mtp(state)
    present = [p for p in TOWER_PREFIXES if any(k.startswith(p) for k in state)]
    if not present:
        raise ValueError(
            f"{where} holds an AR checkpoint (no context_tower./denoiser_tower. keys); build a two-tower "
            "model from it with TwoTowerLM.from_backbone(path) or convert it with "
            "`python -m twotower.cli convert`"
        )
    if len(present) == 1:
        missing = next(p for p in TOWER_PREFIXES if p not in present)
        raise ValueError(f"{where} has '{present[0]}' keys but no '{missing}' keys; the checkpoint is incomplete")
    for head, tower in (("context_lm_head.weight", "context_tower."), (LM_HEAD, "denoiser_tower.")):
        if head not in state and tie_word_embeddings and f"{tower}{embed_key}" in state:
            state[head] = state[f"{tower}{embed_key}"]
    required = ["context_lm_head.weight", LM_HEAD]
    if time_keys:
        required += ["t_embedder.mlp.0.weight", "t_block.1.weight"]
        required += [f"scale_shift_tables.{i}" for i in range(num_layers)]
    missing = [k for k in required if k not in state]
    if missing:
        raise CheckpointKeyError(f"{where}: two-tower checkpoint lacks {len(missing)} key(s): {', '.join(missing[:10])}")
    return fuse_experts(state)


# --------------------------------------------------------------------------------------------
# validation against a model or a config


def _listing(keys: list[str], limit: int = 10) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... (+{len(keys) - limit} more)" if len(keys) > limit else "")


def check_keys(state: Mapping[str, Tensor], expected: Iterable[str], *, where: str) -> None:
    """Raise :class:`CheckpointKeyError` (a KeyError and a ValueError) unless the keys of
    ``state`` are exactly ``expected``; the message lists the first missing / unexpected keys
    with their counts and names ``where`` (the checkpoint path)."""
    expected = set(expected)
    missing = sorted(expected - set(state))
    unexpected = sorted(set(state) - expected)
    if not missing and not unexpected:
        return
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing key(s): {_listing(missing)}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected key(s): {_listing(unexpected)}")
    raise CheckpointKeyError(f"checkpoint {where} does not match the model: " + "; ".join(parts))


def check_shapes(state: Mapping[str, Tensor], reference: Mapping[str, Tensor], *, where: str) -> None:
    """Raise ValueError naming every key present in both dicts whose shapes differ."""
    bad = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(ref.shape)}"
        for k, ref in reference.items()
        if k in state and tuple(state[k].shape) != tuple(ref.shape)
    ]
    if bad:
        raise ValueError(f"checkpoint {where}: {len(bad)} shape mismatch(es):\n  " + "\n  ".join(bad))


def check_layer_counts(state: Mapping[str, Tensor], config, where: str, prefix: str = "") -> None:
    """Cheap structural check on the names under ``prefix``: as many ``layers.{i}`` as
    ``config.num_hidden_layers`` and, where the weights hold fused experts, as many as
    ``config.n_routed_experts`` (MoE families). A mismatch means the config and the weights come from different models."""
    layers = {int(m[1]) for k in state if k.startswith(prefix) and (m := _LAYER_RE.match(k[len(prefix):]))}
    if layers and max(layers) + 1 != config.num_hidden_layers:
        raise ValueError(
            f"{where}: config.json describes {config.num_hidden_layers} layers but the weights under "
            f"'{prefix}' have {max(layers) + 1}; the config and the weights belong to different models"
        )
    for k, v in state.items():
        if k.startswith(prefix) and is_fused_expert(k) and v.shape[0] != config.n_routed_experts:
            raise ValueError(
                f"{where}: {k} holds {v.shape[0]} experts but config.n_routed_experts = {config.n_routed_experts}"
            )


# --------------------------------------------------------------------------------------------
# fine-tuning .ckpt


def training_checkpoint(state_dict: Mapping[str, Tensor], *, context_source: str | os.PathLike, block_size: int,
                        mask_token_id: int, shifted: bool, time_conditioning: dict | None = None,
                        denoiser: dict | None = None, tokenizer: dict | None = None) -> tuple[dict[str, Tensor], dict]:
    """What a DenoiserFineTuning `.ckpt` stores: ``(state_dict, meta)``.

    The LightningModule's ``context.*`` weights are dropped (frozen, and as large as the denoiser);
    ``meta`` goes under ``ckpt[CKPT_META_KEY]`` and names the directory they are reloaded from (a
    built-in name stays a name, `hub.model_reference`), and
    the tokenizer the model was trained with (`tokenizers.tokenizer_spec`; None when unknown), which
    `export_checkpoint` writes beside the weights.
    """
    trainable = {k: v for k, v in state_dict.items() if not k.startswith(_FROZEN)}
    meta = {"context_source": model_reference(context_source), "block_size": block_size,
            "mask_token_id": mask_token_id, "shifted": shifted, "time_conditioning": time_conditioning,
            "denoiser": denoiser, "tokenizer": tokenizer}
    return trainable, meta


def restore_frozen(state_dict: dict[str, Tensor], context_state: Mapping[str, Tensor]) -> None:
    """Put the frozen tower's weights (a ContextTower state dict) back under ``context.*``, in place,
    so Lightning's strict load of a `training_checkpoint` state dict succeeds."""
    for k, v in context_state.items():
        state_dict.setdefault(_FROZEN + k, v)

