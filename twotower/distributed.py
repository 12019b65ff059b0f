"""Distributed training pieces for `DenoiserFineTuning`: FSDP2 sharding, activation checkpointing,
per-sample noise seeds, rank-aware shuffling and reading sharded (DCP) checkpoints.

Why these live here and not in `training.py`: they depend on `torch.distributed` details (FSDP2's
`fully_shard`, DTensor, torch.distributed.checkpoint) that the single-process path never needs.

Sharding (`shard_towers`, called from `DenoiserFineTuning.configure_model` under Lightning's
`ModelParallelStrategy`): every denoiser block is one FSDP2 unit, then the denoiser root (embeddings,
time modules, final norm, LM head). The frozen context tower is either

    "replicate"  every rank holds all of it (no gradients, no optimizer state: it costs 1x its
                 weights per rank and no communication); the default, because the context runs
                 once per batch and all-gathering it layer by layer every step buys memory with
                 network traffic that nothing else needs;
    "shard"      its blocks and root are FSDP2 units too (1/N of its weights per rank, one
                 all-gather per block per step): for backbones that do not fit once per device.

The towers' training forwards call blocks through sub-methods, so FSDP2's module-call hooks are
attached through `towers.base.run_block`: each block gets a `twotower_run` method registered as
an FSDP2 forward method.
"""

from __future__ import annotations

import os
import pickle
import re
import warnings
from pathlib import Path
from types import MethodType

import torch
import torch.nn as nn
from torch.utils.data import DistributedSampler

from .objectives import PositionWeighting, TokenObjective
from .schedules import NoiseSchedule, TimeSampler
from .towers.adapters import DenoiserBuilder
from .towers.base import BLOCK_RUNNER

CONTEXT_SHARDING = ("replicate", "shard")


# ---- the block seam -----------------------------------------------------------------------------

def _plain_run(self, step, *args):
    return step(*args)


def _checkpointed_run(self, step, *args):
    # Non-reentrant: works with closures over tensors and with FSDP2's hooks around the call.
    if torch.is_grad_enabled():
        return torch.utils.checkpoint.checkpoint(step, *args, use_reentrant=False)
    return step(*args)


def _install(module: nn.Module, run) -> None:
    module.__dict__[BLOCK_RUNNER] = MethodType(run, module)


def blocks(tower: nn.Module) -> list[nn.Module]:
    """A tower's repeated blocks (`tower.backbone.layers`), the units of sharding and checkpointing."""
    layers = getattr(getattr(tower, "backbone", None), "layers", None)
    if layers is None:
        raise TypeError(f"{type(tower).__name__} has no backbone.layers; cannot shard or checkpoint it per block")
    return list(layers)


def apply_activation_checkpointing(tower: nn.Module) -> None:
    """Recompute each block's activations in backward instead of storing them (torch.utils.checkpoint):
    peak activation memory drops from every block's intermediates to one block's, for about a third
    more compute. State dict names are unchanged (no wrapper module)."""
    for blk in blocks(tower):
        _install(blk, _checkpointed_run)


# ---- FSDP2 ----------------------------------------------------------------------------------------

def shard_towers(context: nn.Module, denoiser: nn.Module, mesh, *, context_sharding: str = "replicate",
                 mp_policy=None) -> None:
    """Apply FSDP2 (`fully_shard`) to the denoiser block by block, then its root; the context tower
    is left replicated or sharded the same way (see the module docstring)."""
    # Deferred: only sharded runs need torch.distributed's FSDP2, a heavy import (absent from torch builds
    # without distributed support).
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    if context_sharding not in CONTEXT_SHARDING:
        raise ValueError(f"context_sharding must be one of {CONTEXT_SHARDING}, got {context_sharding!r}")
    kw = {"mesh": mesh} if mp_policy is None else {"mesh": mesh, "mp_policy": mp_policy}
    towers = [denoiser] if context_sharding == "replicate" else [denoiser, context]
    for tower in towers:
        for blk in blocks(tower):
            if BLOCK_RUNNER not in blk.__dict__:
                _install(blk, _plain_run)
            fully_shard(blk, **kw)
            register_fsdp_forward_method(blk, BLOCK_RUNNER)
        _install(tower, _plain_run)
        fully_shard(tower, **kw)
        register_fsdp_forward_method(tower, BLOCK_RUNNER)


def local_bytes(module: nn.Module) -> int:
    """Bytes of parameters and buffers this rank holds: a DTensor counts its local shard only."""
    # Deferred: only sharded runs need torch.distributed's DTensor, a heavy import (absent from torch builds
    # without distributed support).
    from torch.distributed.tensor import DTensor

    total = 0
    for t in list(module.parameters()) + list(module.buffers()):
        local = t.to_local() if isinstance(t, DTensor) else t
        total += local.numel() * local.element_size()
    return total


# ---- data order and noise that do not depend on the number of ranks ------------------------------

def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The noise seed of one training sample: a function of (seed, epoch, dataset index) only, so a
    sample draws the same times and masks whichever rank, batch or world size it lands in."""
    return (seed * 1_000_003 + epoch * 7_919 + index * 2_654_435_761) % (2**63 - 1)


def _rank_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class EpochShuffle(DistributedSampler):
    """A seeded per-epoch order of a dataset's indices, split across ranks by interleaving.

    Rank r of W takes positions r, r + W, ... of the epoch's order, so W ranks with batch b see
    exactly the samples one process with batch W b sees, batch for batch (the tail that does not
    divide by W is dropped). With `shard_rows`, the order is shard-major (a random order of shards
    of `shard_rows` consecutive indices, shuffled within each): an on-demand dataset then
    touches one shard at a time. Rank and world size are read when iterating (Lightning sets up
    the process group before it asks for loaders); a subclass of `DistributedSampler` so that
    Lightning neither replaces nor re-splits it, and calls `set_epoch`.

    `start_at(epoch, position)` makes the pass over `epoch` begin at `position` of its order: after
    k batches on every rank, the first k b W positions are exactly the samples trained on, so a
    resumed run (`twotower.data.sampling.ResumableLoader`) goes on with the same samples.
    """

    def __init__(self, n: int, *, seed: int = 0, shuffle: bool = True, shard_rows: int | None = None) -> None:
        # DistributedSampler.__init__ would query the process group now; it may not exist yet.
        self.n, self.seed, self.shuffle, self.shard_rows, self.epoch = n, seed, shuffle, shard_rows, 0
        self._start: tuple[int, int] | None = None  # (epoch, position) set by start_at

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def start_at(self, epoch: int, position: int) -> None:
        """Begin the pass over `epoch` at `position` of its order (samples of all ranks together)."""
        self.set_epoch(epoch)
        self._start = (epoch, position)

    def start(self) -> int:
        """Where the current epoch's pass begins in its order: 0 unless `start_at` named this epoch."""
        return self._start[1] if self._start is not None and self._start[0] == self.epoch else 0

    def samples_per_batch(self, batch_size: int) -> int:
        """How far one batch on every rank moves the epoch's position."""
        return batch_size * _rank_world()[1]

    def _order(self) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(self.n)
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        if not self.shard_rows:
            return torch.randperm(self.n, generator=g)
        s = self.shard_rows
        starts = torch.randperm((self.n + s - 1) // s, generator=g) * s
        return torch.cat([st + torch.randperm(min(s, self.n - int(st)), generator=g) for st in starts])

    def __iter__(self):
        rank, world = _rank_world()
        order = self._order()[self.start():]
        return iter(order[: len(order) // world * world][rank::world].tolist())

    def __len__(self) -> int:
        # The whole epoch even when it starts later: Lightning counts the batches a resumed run skips.
        return self.n // _rank_world()[1]


# ---- checkpoints: read without running the file's code ------------------------------------------
#
# A `.ckpt` is a pickle, and unpickling can call any function the file names: `torch.load(...,
# weights_only=False)` on a crafted file runs its code before anything is checked. Every read here
# goes through an allow-list instead: torch's weights-only unpickler for `.ckpt` / `meta.pt`, and a
# restricted `pickle.Unpickler` for a sharded folder's `.metadata` (torch's own reader would
# `pickle.load` it).

_WEIGHTS = "state_dict."  # the model weights' prefix in a sharded checkpoint's flattened keys


def checkpoint_globals() -> list[type]:
    """The classes, besides tensors and plain containers, that a twotower training checkpoint holds.

    A module built in Python keeps its plug-in objects (noise schedule, time sampler, objective,
    position weighting, denoiser builder) in `hyper_parameters`; the CLI stores them as class_path dicts instead and
    needs none of these. Only twotower's own subclasses are listed: their constructors only check
    and store numbers, so rebuilding one from a file runs nothing the file chooses.
    """
    found, todo = [], [NoiseSchedule, TimeSampler, TokenObjective, PositionWeighting, DenoiserBuilder]
    while todo:
        cls = todo.pop()
        todo += cls.__subclasses__()
        if cls.__module__.startswith("twotower.") and cls not in found:
            found.append(cls)
    return found


def _refusal(path: Path, detail: str) -> ValueError:
    return ValueError(f"{path}: refused to load: {detail}. A twotower checkpoint holds tensors, plain "
                      "values and twotower's own plug-in objects only; anything else could run code while "
                      "it is read. If you wrote this file yourself and trust it, allow the class with "
                      "torch.serialization.add_safe_globals([...]) and call twotower.cli.export from Python")


def load_trusted(path: Path) -> dict:
    """`torch.load` of a checkpoint file with `weights_only=True`, allowing `checkpoint_globals()`
    for this call only; a file naming any other global is refused with a ValueError naming it."""
    with torch.serialization.safe_globals(checkpoint_globals()):
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            found = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
            raise _refusal(path, f"it needs {found[1]}" if found else str(e).splitlines()[0]) from None


# What torch.distributed.checkpoint's `.metadata` pickle names (torch dtypes besides).
_METADATA_GLOBALS = {
    "torch.distributed.checkpoint.metadata": {"Metadata", "BytesStorageMetadata", "ChunkStorageMetadata",
                                              "MetadataIndex", "StorageMeta", "TensorProperties",
                                              "TensorStorageMetadata", "_MEM_FORMAT_ENCODING"},
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},  # a layout by name
    "torch": {"Size"},
    "pathlib": {"Path", "PosixPath", "WindowsPath"},
    "collections": {"OrderedDict"},
}


class _MetadataUnpickler(pickle.Unpickler):
    """Builds only what a sharded checkpoint's `.metadata` holds and refuses every other global (the
    restricted unpickler of the `pickle` documentation, "Restricting Globals")."""

    def find_class(self, module: str, name: str):
        if name in _METADATA_GLOBALS.get(module, ()) or (
                module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"it needs {module}.{name}")


def _sharded_reader(folder: Path):
    """torch's `FileSystemReader` for `folder`, reading `.metadata` through `_MetadataUnpickler`."""
    # Deferred: only sharded runs need torch.distributed's checkpoint reader, a heavy import (absent from torch builds
    # without distributed support).
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

    class SafeMetadataReader(FileSystemReader):
        """`FileSystemReader` whose `read_metadata` unpickles with an allow-list (the stock one does
        not)."""

        def read_metadata(self, *args, **kwargs) -> Metadata:
            with open(folder / ".metadata", "rb") as f:
                try:
                    metadata = _MetadataUnpickler(f).load()
                except pickle.UnpicklingError as e:
                    raise _refusal(folder / ".metadata", str(e)) from None
            if not isinstance(metadata, Metadata):
                raise _refusal(folder / ".metadata", f"it holds a {type(metadata).__name__}, not checkpoint metadata")
            outside = [i.relative_path for i in (metadata.storage_data or {}).values()
                       if Path(i.relative_path).name != i.relative_path]
            if outside:  # shard files are plain names in the folder; a path could read any file
                raise _refusal(folder / ".metadata", f"it names shard files outside the folder: {outside[:3]}")
            if metadata.storage_meta is None:  # as the stock reader does
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return SafeMetadataReader(folder)


def _read_sharded_weights(folder: Path) -> dict[str, torch.Tensor]:
    """The model weights (`state_dict`) of the folder `ModelParallelStrategy` writes, as full CPU tensors.

    Only tensors are read: the optimizer state is not needed to export, and torch's loader would
    unpickle its non-tensor entries without an allow-list.
    """
    # Deferred: only sharded runs need torch.distributed's checkpoint loader, a heavy import (absent from torch builds
    # without distributed support).
    from torch.distributed.checkpoint import load
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    reader = _sharded_reader(folder)
    weights = {key.removeprefix(_WEIGHTS): torch.empty(entry.size, dtype=entry.properties.dtype)
               for key, entry in reader.read_metadata().state_dict_metadata.items()
               if key.startswith(_WEIGHTS) and isinstance(entry, TensorStorageMetadata)}
    with warnings.catch_warnings():  # one process on purpose (no_dist); torch warns about it all the same
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        load({"state_dict": weights}, storage_reader=reader, no_dist=True)
    return weights


def read_checkpoint(path: str | os.PathLike) -> dict:
    """A Lightning checkpoint as one dict, read without running code from the file: a `.ckpt` file,
    or the folder `ModelParallelStrategy` writes (torch.distributed.checkpoint shards + `meta.pt`),
    whose weights are merged into full tensors on CPU without a process group (its optimizer state is
    left out). A file that needs anything but tensors, plain values and `checkpoint_globals()` is
    refused with a ValueError naming what it needs."""
    path = Path(path)
    if path.is_file():
        return load_trusted(path)
    if path.is_dir() and (path / ".metadata").is_file():
        state = {"state_dict": _read_sharded_weights(path)}
        meta = path / "meta.pt"
        if meta.is_file():
            state.update(load_trusted(meta))
        return state
    if path.is_dir():
        raise FileNotFoundError(f"{path} is a folder but not a distributed checkpoint (no .metadata file); "
                                "give a .ckpt file or the checkpoint folder ModelParallelStrategy wrote")
    raise FileNotFoundError(f"checkpoint not found: {path}")
