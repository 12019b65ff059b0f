"""Lazy safetensors reading: tensor references that are read once, straight into their final
dtype and device.

A checkpoint directory becomes ``dict[name, TensorRef]`` (`open_refs`): the JSON header of each
file is parsed, no tensor data is touched. The key mappings of `checkpoints.py` (prefixes, tied
heads, per-expert -> fused experts) work on these references as they do on tensors; fusing
per-expert references gives a `StackedRef`. Only `load` / `load_into` read bytes.

Why not ``safe_open(...).get_tensor``: it copies each tensor out of the file mapping in the
stored dtype, and the mapped pages it touched stay resident until the file is closed, so a bf16
file loaded into a bf16 model peaks at twice the weights (three times when a cast follows).
Here `load_into(out)`:

* views the tensor's byte range of a private memory map of the file (``torch.frombuffer``, no
  copy; the file is mapped once and kept open until `close_refs`),
* copies it once into ``out``, already allocated in the target dtype on the target device (the
  cast, if any, happens inside that copy; fused experts are copied expert by expert into their
  slice), in pieces of 8 MiB,
* drops each piece's mapped pages again (``madvise(MADV_DONTNEED)``, Linux), so the process holds
  at most one piece of file pages beyond the weights it keeps.

Peak resident memory of a load is thus the loaded weights plus 8 MiB, whatever the shard and
tensor sizes. The header is validated against the file size first, so a truncated copy fails
with a message naming the file, before any mapping.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

__all__ = ["SafetensorsFile", "TensorRef", "StackedRef", "read_header", "close_refs", "load_ref"]

_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}
# The float8 dtypes only where this torch build has them: older builds can still read every other file.
for _name, _attr in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2")):
    if hasattr(torch, _attr):
        _DTYPES[_name] = getattr(torch, _attr)

_PAGE = mmap.PAGESIZE
_PIECE = 8 * 2**20  # bytes copied (and their file pages held) at a time
_CAN_DROP = hasattr(mmap, "MADV_DONTNEED")


def _truncated(file: Path, why: str) -> ValueError:
    return ValueError(f"{file.name} is truncated or not a safetensors file: {file} ({why})")


def read_header(file: Path) -> tuple[int, dict]:
    """(byte offset of the data section, header dict without ``__metadata__``), checked against the
    file size: a copy cut short by a full disk or an interrupted download says so plainly."""
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
    header.pop("__metadata__", None)
    end = 0
    for k, v in header.items():
        try:
            dtype, shape, (a, b) = _DTYPES[v["dtype"]], [int(s) for s in v["shape"]], v["data_offsets"]
        except (KeyError, TypeError, ValueError) as e:
            raise _truncated(file, f"bad header entry {k!r}: {v!r} ({e!r})") from e
        # Every entry checked here, at open: a bad offset would otherwise surface as garbage weights (or
        # a crash) only when that one tensor is read, possibly deep into a long load.
        if b - a != math.prod(shape) * dtype.itemsize or a < 0:
            raise _truncated(file, f"{k!r}: {b - a} bytes for shape {shape} of {v['dtype']}")
        end = max(end, b)
    if 8 + n + end > size:
        raise _truncated(file, f"expected {8 + n + end} bytes, found {size}")
    return 8 + n, header


class SafetensorsFile:
    """One .safetensors file: its entries as `TensorRef`s, and a private memory map opened on the
    first read (private: `frombuffer` wants a writable buffer; nothing is ever written)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._file = None
        self._map: mmap.mmap | None = None
        self.data_start, header = read_header(self.path)
        self.refs = {k: TensorRef(self, k, _DTYPES[v["dtype"]], torch.Size(v["shape"]),
                                  self.data_start + v["data_offsets"][0])
                     for k, v in header.items()}

    def _mapped(self) -> mmap.mmap:
        if self._map is None:
            self._file = open(self.path, "rb")
            self._map = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_COPY)
        return self._map

    def copy_into(self, ref: "TensorRef", out: Tensor) -> None:
        """out (ref.shape, any dtype / device, contiguous) <- the stored bytes, in pieces of at most
        `_PIECE` bytes, dropping each piece's mapped pages once copied."""
        n = ref.numel()
        if n == 0:
            return
        mm = self._mapped()
        flat = out.view(-1)
        step = max(1, _PIECE // ref.dtype.itemsize)
        for a in range(0, n, step):
            b = min(n, a + step)
            offset = ref.offset + a * ref.dtype.itemsize
            src = torch.frombuffer(mm, dtype=ref.dtype, count=b - a, offset=offset)
            flat[a:b].copy_(src)
            del src  # the view must go before its pages are dropped (and before the map may close)
            if _CAN_DROP:
                # madvise takes page-aligned ranges: round the start down to the page holding it. Dropping
                # the copied pages keeps resident memory at about one piece, however large the file.
                start = offset // _PAGE * _PAGE
                mm.madvise(mmap.MADV_DONTNEED, start, offset + (b - a) * ref.dtype.itemsize - start)

    def close(self) -> None:
        if self._map is not None:
            try:
                self._map.close()
            except BufferError:  # a tensor view still alive somewhere: the GC closes it later
                pass
            self._file.close()
            self._map = self._file = None

    def __del__(self):
        self.close()


class _TensorLike:
    """What the key mapping and the loaders ask of a not-yet-read tensor, given `shape`, `dtype`
    and `load_into(out)`: sizes, and a read into a fresh tensor of any dtype / device."""

    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel() * self.dtype.itemsize

    def is_floating_point(self) -> bool:
        return self.dtype.is_floating_point

    def dim(self) -> int:
        return len(self.shape)

    def load(self, dtype: torch.dtype | None = None, device=None) -> Tensor:
        out = torch.empty(self.shape, dtype=dtype or self.dtype, device=device)
        self.load_into(out)
        return out


@dataclass(frozen=True, eq=False)
class TensorRef(_TensorLike):
    """A tensor stored in `file` at byte `offset`: shape and dtype known, data not read yet."""

    file: SafetensorsFile
    name: str
    dtype: torch.dtype
    shape: torch.Size
    offset: int

    def load_into(self, out: Tensor) -> None:
        self.file.copy_into(self, out)

    def files(self) -> set[SafetensorsFile]:
        return {self.file}

    @staticmethod
    def stack(parts) -> "StackedRef":
        return StackedRef(tuple(parts))


@dataclass(frozen=True, eq=False)
class StackedRef(_TensorLike):
    """Equal-shaped references fused along a new dim 0 (per-expert MoE weights -> (E, ...))."""

    parts: tuple

    @property
    def dtype(self) -> torch.dtype:
        return self.parts[0].dtype

    @property
    def shape(self) -> torch.Size:
        return torch.Size((len(self.parts), *self.parts[0].shape))

    def load_into(self, out: Tensor) -> None:
        for i, part in enumerate(self.parts):
            part.load_into(out[i])

    def files(self) -> set[SafetensorsFile]:
        return set().union(*(p.files() for p in self.parts))

    @staticmethod
    def stack(parts) -> "StackedRef":
        return StackedRef(tuple(parts))


def load_ref(ref, dtype: torch.dtype | None = None, device=None) -> Tensor:
    """A reference's data as a tensor in `dtype` (None: as stored) on `device`; tensors pass
    through `.to` (the eager path's values)."""
    if isinstance(ref, Tensor):
        return ref.to(dtype=dtype or ref.dtype, device=device)
    return ref.load(dtype, device)


def close_refs(refs) -> None:
    """Unmap every file the references read from (call once a load is done)."""
    files: set[SafetensorsFile] = set()
    for r in refs:
        if not isinstance(r, Tensor):
            files |= r.files()
    for f in files:
        f.close()
