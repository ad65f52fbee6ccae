"""Streaming, atomic writing of sharded safetensors outputs.

The shard layout (which tensor goes in which file, at which offset) is fixed before any tensor is
computed, from the planned shapes and dtypes; each shard's header is written up front and tensors
(or row blocks of them) are written at their offsets as they arrive, in any order. Nothing is
buffered, and the kernel is asked to start writing each range to disk at once
(``sync_file_range``): otherwise dirty pages wait for the final fsync (a 1.3 GB output stays below
the usual 10% dirty-memory threshold), which would then take as long as the whole disk write, after
the merge instead of during it. Everything is written into a temporary folder next to the output,
which is renamed into place only when the whole merge succeeded.
"""

from __future__ import annotations

import ctypes
import json
import os
import re
import shutil
import sys
import threading
from dataclasses import dataclass

import torch

from ..dtypes import TORCH_TO_ST, element_size, numel
from ..errors import MergeError, OutputExists

_CHUNK = 1 << 22  # elements rounded per step when a float32 result is written in a narrower dtype
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
          "t": 10**12, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
          "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}


def parse_size(text: str | int) -> int:
    """'5GB' -> 5_000_000_000 (decimal units as Hugging Face uses), '2GiB' -> 2·2³⁰, 1000 -> 1000."""
    if isinstance(text, int):
        return text
    m = _SIZE.match(str(text))
    if not m or (m.group(2) or "").lower() not in _UNITS:
        raise ValueError(f"not a size: {text!r} (examples: 5GB, 500MB, 2GiB, 1000000)")
    return int(float(m.group(1)) * _UNITS[(m.group(2) or "").lower()])


_COUNT = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmbt]?)\s*$", re.IGNORECASE)
_COUNT_UNITS = {"": 1, "k": 10**3, "m": 10**6, "b": 10**9, "t": 10**12}


def parse_count(text: str | int) -> int:
    """mergekit's counts: '1B' -> 10⁹, '500M' -> 5·10⁸, '20k' -> 20 000, 1000 -> 1000."""
    if isinstance(text, int):
        return text
    m = _COUNT.match(str(text))
    if not m:
        raise ValueError(f"not a count: {text!r} (examples: 5B, 500M, 20k, 1000000)")
    return int(float(m.group(1)) * _COUNT_UNITS[m.group(2).lower()])


def human_size(n: float) -> str:
    """Bytes for people: GB from 0.1 GB up, else MB (decimal units, as parse_size reads them)."""
    return f"{n / 1e9:.3f} GB" if n >= 1e8 else f"{n / 1e6:.2f} MB"


@dataclass(frozen=True)
class PlannedTensor:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    bounded: bool = False  # the shape is an upper bound (a rank picked while merging): see ShardedWriter

    @property
    def nbytes(self) -> int:
        return numel(self.shape) * element_size(self.dtype)


@dataclass
class Shard:
    file: str
    tensors: list[PlannedTensor]
    header: bytes = b""
    data_size: int = 0


@dataclass(frozen=True)
class ShardLimit:
    """How much one shard may hold: `amount` bytes (Hugging Face's ``max_shard_size``), or
    `amount` parameters (mergekit's ``--out-shard-size``: 1B is 10⁹ parameters, 2 GB of bfloat16)."""

    amount: int
    unit: str = "bytes"  # or "parameters"

    def weigh(self, t: PlannedTensor) -> int:
        return t.nbytes if self.unit == "bytes" else numel(t.shape)


class ShardLayout:
    """Which tensor goes in which shard, in order, each shard at most `max_shard_size` (bytes, or a
    :class:`ShardLimit`; a tensor larger than that gets a shard of its own), named as Hugging Face
    names them (`basename` ``adapter_model`` for PEFT adapters); `groups` gives the shards' tensors
    directly."""

    def __init__(self, tensors: list[PlannedTensor], max_shard_size: int | ShardLimit, basename: str = "model",
                 groups: list[list[PlannedTensor]] | None = None):
        self.basename = basename
        if groups is None:
            limit = max_shard_size if isinstance(max_shard_size, ShardLimit) else ShardLimit(max_shard_size)
            groups = [[]]
            size = 0
            for t in tensors:
                if groups[-1] and size + limit.weigh(t) > limit.amount:
                    groups.append([])
                    size = 0
                groups[-1].append(t)
                size += limit.weigh(t)
        n = len(groups)
        names = ([f"{basename}.safetensors"] if n == 1 else
                 [f"{basename}-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)])
        self.shards = [Shard(name, group) for name, group in zip(names, groups)]
        # name -> (shard, absolute offset in the shard file, planned tensor)
        self.where: dict[str, tuple[Shard, int, PlannedTensor]] = {}
        for shard in self.shards:
            header: dict[str, object] = {"__metadata__": {"format": "pt"}}
            offsets = []
            offset = 0
            for t in shard.tensors:
                header[t.name] = {"dtype": TORCH_TO_ST[t.dtype], "shape": list(t.shape),
                                  "data_offsets": [offset, offset + t.nbytes]}
                offsets.append(offset)
                offset += t.nbytes
            raw = json.dumps(header, separators=(",", ":")).encode()
            raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned
            shard.header = len(raw).to_bytes(8, "little") + raw
            shard.data_size = offset
            for t, off in zip(shard.tensors, offsets):
                self.where[t.name] = (shard, len(shard.header) + off, t)

    @property
    def total_size(self) -> int:
        return sum(s.data_size for s in self.shards)

    def index(self) -> dict:
        return {"metadata": {"total_size": self.total_size},
                "weight_map": {t.name: s.file for s in self.shards for t in s.tensors}}


def _start_writeback() -> object:
    """``sync_file_range(fd, offset, n, SYNC_FILE_RANGE_WRITE)`` where the C library has it."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
    return fn


_WRITEBACK = _start_writeback()


class ShardedWriter:
    """Writes tensors of a :class:`ShardLayout` into `folder` at their planned offsets.

    A tensor planned with a ``bounded`` shape (the rank of a factor chosen by an error target while
    merging) may arrive smaller; its bytes go to the start of the space planned for it, and
    :meth:`finish` rewrites the shards that hold such tensors without the unused space."""

    def __init__(self, folder: str, layout: ShardLayout):
        self.folder = folder
        self.layout = layout
        self._fds: dict[str, int] = {}
        self._written: dict[str, int] = {}  # tensor -> rows written
        self._blocks: set[tuple[str, int]] = set()
        self._actual: dict[str, tuple[int, ...]] = {}  # bounded tensors written smaller than planned
        self._lock = threading.Lock()
        self._scratch: dict[torch.dtype, torch.Tensor] = {}  # rounding buffers (one writer thread)
        for shard in layout.shards:
            fd = os.open(os.path.join(folder, shard.file), os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
            _pwrite_all(fd, shard.header, 0)
            os.ftruncate(fd, len(shard.header) + shard.data_size)
            self._fds[shard.file] = fd

    def _rows(self, name: str, tensor: torch.Tensor, first_row: int, planned: PlannedTensor) -> None:
        """Check `tensor`'s place (the whole tensor, a bounded one smaller than planned, or a row
        block from `first_row`) and count the rows it completes."""
        shape = tuple(tensor.shape)
        smaller = planned.bounded and first_row == 0 and len(shape) == len(planned.shape) and all(
            a <= b for a, b in zip(shape, planned.shape))
        whole = first_row == 0 and (shape == planned.shape or smaller)
        fits = (len(planned.shape) >= 2 and shape[1:] == planned.shape[1:]
                and first_row + shape[0] <= planned.shape[0])
        if not (whole or fits) or (tensor.dtype != planned.dtype and not (
                tensor.dtype.is_floating_point and planned.dtype.is_floating_point)):
            raise RuntimeError(f"tensor {name}: planned {planned.shape} {planned.dtype}, "
                               f"got {shape} {tensor.dtype} at row {first_row}")
        rows = _planned_rows(planned) if whole else shape[0]
        with self._lock:
            if (name, first_row) in self._blocks:
                raise RuntimeError(f"tensor {name} written twice")
            self._blocks.add((name, first_row))
            self._written[name] = self._written.get(name, 0) + rows
            if whole and shape != planned.shape:
                self._actual[name] = shape

    def write(self, name: str, tensor: torch.Tensor, first_row: int = 0) -> None:
        """Write `tensor` (or rows of it from `first_row`) at its planned place. A tensor in another
        dtype than planned (a float32 result) is rounded chunk by chunk through a small reused
        buffer, never copied whole."""
        shard, offset, planned = self.layout.where[name]
        self._rows(name, tensor, first_row, planned)
        offset += first_row * (planned.nbytes // max(1, planned.shape[0])) if len(planned.shape) >= 2 else 0
        tensor = tensor.detach()
        if tensor.device.type != "cpu":
            tensor = tensor.to("cpu", dtype=planned.dtype)
        tensor = tensor.contiguous().reshape(-1)
        fd = self._fds[shard.file]
        if tensor.dtype == planned.dtype:
            if tensor.numel():
                _pwrite_all(fd, tensor.view(torch.uint8).numpy(), offset)
                self._writeback(fd, offset, tensor.numel() * tensor.element_size())
            return
        scratch = self._scratch.get(planned.dtype)
        if scratch is None:
            scratch = self._scratch[planned.dtype] = torch.empty(_CHUNK, dtype=planned.dtype)
        itemsize = scratch.element_size()
        for start in range(0, tensor.numel(), _CHUNK):
            chunk = tensor[start:start + _CHUNK]
            out = scratch[:chunk.numel()]
            out.copy_(chunk)
            _pwrite_all(fd, out.view(torch.uint8).numpy(), offset + start * itemsize)
        self._writeback(fd, offset, tensor.numel() * itemsize)

    @staticmethod
    def _writeback(fd: int, offset: int, nbytes: int) -> None:
        """Start writing this range to disk now (asynchronously); the final fsync waits for it."""
        if _WRITEBACK is not None and nbytes >= (1 << 20):
            _WRITEBACK(fd, offset, nbytes, 2)  # SYNC_FILE_RANGE_WRITE

    def finish(self) -> dict:
        """Check every tensor was written, flush to disk, write the index; returns the index."""
        missing = [t.name for s in self.layout.shards for t in s.tensors
                   if self._written.get(t.name, 0) < _planned_rows(t)]
        if missing:
            raise RuntimeError(f"{len(missing)} planned tensors were never written, e.g. {missing[0]}")
        if self._actual:
            self._compact()
        for fd in self._fds.values():
            os.fsync(fd)
        self.close()
        index = self.layout.index()
        if len(self.layout.shards) > 1:
            with open(os.path.join(self.folder, "model.safetensors.index.json"), "w", encoding="utf-8") as fh:
                json.dump(index, fh, indent=2)
                fh.write("\n")
        return index

    def _compact(self) -> None:
        """Rewrite the shards holding tensors written smaller than planned: the layout of the actual
        shapes, each tensor's bytes copied from the start of the space planned for it."""
        old = self.layout
        groups = [[PlannedTensor(t.name, self._actual.get(t.name, t.shape), t.dtype) for t in s.tensors]
                  for s in old.shards]
        self.layout = ShardLayout([], 0, old.basename, groups=groups)
        for shard in self.layout.shards:
            if not any(t.name in self._actual for t in shard.tensors):
                continue
            tmp = os.path.join(self.folder, shard.file + ".compact")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            _pwrite_all(fd, shard.header, 0)
            src = self._fds[shard.file]
            for t in shard.tensors:
                data = os.pread(src, t.nbytes, old.where[t.name][1])
                _pwrite_all(fd, data, self.layout.where[t.name][1])
            os.close(src)
            os.replace(tmp, os.path.join(self.folder, shard.file))
            self._fds[shard.file] = fd

    def close(self) -> None:
        for fd in self._fds.values():
            try:
                os.close(fd)
            except OSError:
                pass
        self._fds = {}


def _planned_rows(planned: PlannedTensor) -> int:
    """Rows a tensor is written in (a tensor of fewer than two dimensions is one piece)."""
    return planned.shape[0] if len(planned.shape) >= 2 else 1


def _pwrite_all(fd: int, data, offset: int) -> None:
    view = memoryview(data).cast("B") if not isinstance(data, bytes) else memoryview(data)
    while len(view):
        n = os.pwrite(fd, view, offset)
        view = view[n:]
        offset += n


class OutputFolder:
    """A temporary folder next to `out` that becomes `out` only on :meth:`commit`.

    ``with OutputFolder(out, overwrite) as tmp: ...; commit()``; on any error the temporary
    folder is removed and `out` is left as it was.
    """

    def __init__(self, out: str, overwrite: bool = False):
        self.out = os.path.abspath(out)
        self.overwrite = overwrite
        if os.path.exists(self.out) and not overwrite:
            raise OutputExists(f"{out} already exists; choose another output folder or pass --overwrite")
        parent = os.path.dirname(self.out)
        try:
            os.makedirs(parent, exist_ok=True)
        except OSError as exc:
            raise MergeError(f"{out}: cannot create the parent folder {parent}: {exc}") from None
        self.tmp = os.path.join(parent, f".{os.path.basename(self.out)}.tmp-{os.getpid()}")
        self.committed = False

    def __enter__(self) -> "OutputFolder":
        shutil.rmtree(self.tmp, ignore_errors=True)
        os.makedirs(self.tmp)
        return self

    def commit(self) -> None:
        old = None
        if os.path.exists(self.out):
            if not self.overwrite:
                raise OutputExists(f"{self.out} appeared while merging; not replacing it without --overwrite")
            old = self.tmp + ".old"
            os.rename(self.out, old)
        os.rename(self.tmp, self.out)
        self.committed = True
        if old:
            shutil.rmtree(old, ignore_errors=True)

    def __exit__(self, *exc) -> None:
        if not self.committed:
            shutil.rmtree(self.tmp, ignore_errors=True)
