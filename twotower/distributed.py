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
import tempfile
from pathlib import Path
from types import MethodType

import torch
import torch.nn as nn
from torch.utils.data import DistributedSampler

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
    """

    def __init__(self, n: int, *, seed: int = 0, shuffle: bool = True, shard_rows: int | None = None) -> None:
        # DistributedSampler.__init__ would query the process group now; it may not exist yet.
        self.n, self.seed, self.shuffle, self.shard_rows, self.epoch = n, seed, shuffle, shard_rows, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

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
        order = self._order()
        return iter(order[: len(order) // world * world][rank::world].tolist())

    def __len__(self) -> int:
        return self.n // _rank_world()[1]


# ---- sharded checkpoints ---------------------------------------------------------------------------

def read_checkpoint(path: str | os.PathLike) -> dict:
    """A Lightning checkpoint as one dict: a `.ckpt` file, or the folder `ModelParallelStrategy`
    writes (torch.distributed.checkpoint shards + `meta.pt`), merged into full tensors on CPU
    without a process group (`dcp_to_torch_save`)."""
    path = Path(path)
    if path.is_file():
        return torch.load(path, map_location="cpu", weights_only=False)
    if path.is_dir() and (path / ".metadata").is_file():
        from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

        with tempfile.TemporaryDirectory() as tmp:
            dcp_to_torch_save(path, Path(tmp) / "full.pt")
            state = torch.load(Path(tmp) / "full.pt", map_location="cpu", weights_only=False)
        meta = path / "meta.pt"
        if meta.is_file():
            state.update(torch.load(meta, map_location="cpu", weights_only=False))
        return state
    if path.is_dir():
        raise FileNotFoundError(f"{path} is a folder but not a distributed checkpoint (no .metadata file); "
                                "give a .ckpt file or the checkpoint folder ModelParallelStrategy wrote")
    raise FileNotFoundError(f"checkpoint not found: {path}")
