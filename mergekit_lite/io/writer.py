"""Streaming, atomic writing of sharded safetensors outputs.

The shard layout (which tensor goes in which file, at which offset) is fixed before any tensor is
computed, from the planned shapes and dtypes; each shard's header is written up front and tensors
are written at their offsets as they arrive, in any order. Nothing is buffered: a tensor's bytes
go to disk as soon as it is computed. Everything is written into a temporary folder next to the
output, which is renamed into place only when the whole merge succeeded.
"""

from __future__ import annotations

import json
import os
import re
import shutil
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
    names them."""

    def __init__(self, tensors: list[PlannedTensor], max_shard_size: int | ShardLimit):
        limit = max_shard_size if isinstance(max_shard_size, ShardLimit) else ShardLimit(max_shard_size)
        groups: list[list[PlannedTensor]] = [[]]
        size = 0
        for t in tensors:
            if groups[-1] and size + limit.weigh(t) > limit.amount:
                groups.append([])
                size = 0
            groups[-1].append(t)
            size += limit.weigh(t)
        n = len(groups)
        names = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
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


class ShardedWriter:
    """Writes tensors of a :class:`ShardLayout` into `folder` at their planned offsets."""

    def __init__(self, folder: str, layout: ShardLayout):
        self.folder = folder
        self.layout = layout
        self._fds: dict[str, int] = {}
        self._written: set[str] = set()
        self._lock = threading.Lock()
        self._scratch: dict[torch.dtype, torch.Tensor] = {}  # rounding buffers (one writer thread)
        for shard in layout.shards:
            fd = os.open(os.path.join(folder, shard.file), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            _pwrite_all(fd, shard.header, 0)
            os.ftruncate(fd, len(shard.header) + shard.data_size)
            self._fds[shard.file] = fd

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Write `tensor` at its planned place. A tensor in another dtype than planned (a float32
        result) is rounded chunk by chunk through a small reused buffer, never copied whole."""
        shard, offset, planned = self.layout.where[name]
        if tuple(tensor.shape) != planned.shape or (tensor.dtype != planned.dtype and not (
                tensor.dtype.is_floating_point and planned.dtype.is_floating_point)):
            raise RuntimeError(f"tensor {name}: planned {planned.shape} {planned.dtype}, "
                               f"got {tuple(tensor.shape)} {tensor.dtype}")
        with self._lock:
            if name in self._written:
                raise RuntimeError(f"tensor {name} written twice")
            self._written.add(name)
        tensor = tensor.detach()
        if tensor.device.type != "cpu":
            tensor = tensor.to("cpu", dtype=planned.dtype)
        tensor = tensor.contiguous().reshape(-1)
        fd = self._fds[shard.file]
        if tensor.dtype == planned.dtype:
            if tensor.numel():
                _pwrite_all(fd, tensor.view(torch.uint8).numpy(), offset)
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

    def finish(self) -> dict:
        """Check every tensor was written, flush to disk, write the index; returns the index."""
        missing = [t.name for s in self.layout.shards for t in s.tensors if t.name not in self._written]
        if missing:
            raise RuntimeError(f"{len(missing)} planned tensors were never written, e.g. {missing[0]}")
        for fd in self._fds.values():
            os.fsync(fd)
        self.close()
        index = self.layout.index()
        if len(self.layout.shards) > 1:
            with open(os.path.join(self.folder, "model.safetensors.index.json"), "w", encoding="utf-8") as fh:
                json.dump(index, fh, indent=2)
                fh.write("\n")
        return index

    def close(self) -> None:
        for fd in self._fds.values():
            try:
                os.close(fd)
            except OSError:
                pass
        self._fds = {}


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
