"""Streaming, atomic writing of sharded safetensors outputs.

The shard layout (which tensor goes in which file, at which offset) is fixed before any tensor is
computed, from the planned shapes and dtypes; each shard's header is written up front and tensors
(or row blocks of them) are written at their offsets as they arrive, in any order. Nothing is
buffered, and the kernel is asked to start writing each range to disk at once
(``sync_file_range``): otherwise dirty pages wait for the final fsync (a 1.3 GB output stays below
the usual 10% dirty-memory threshold), which would then take as long as the whole disk write, after
the merge instead of during it. Everything is written into a temporary folder next to the output,
which is renamed into place only when the whole merge succeeded.

:class:`OutputFolder` is where it is decided what may be replaced and how a folder's life goes
(checks, lock, temporaries of dead runs, resume, commit); the rules themselves are in
:mod:`.folders`, the resume journal in :mod:`.journal`. Every value is checked after rounding to
the output dtype (:func:`~mergekit_lite.dtypes.check_rounded`).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import sys
import threading
from dataclasses import dataclass
from typing import Mapping

import torch

from ..dtypes import TORCH_TO_ST, check_rounded, element_size, numel
from ..errors import MergeError, OutputExists, UnsafeOutput
from ..interrupts import critical
from .folders import (OutputLock, check_location, output_error, read_marker, remove_tree, replace_refusal,
                      reserve, stale_temporaries, temp_name, write_marker)
from .journal import Journal, read_journal

_CHUNK = 1 << 22  # elements rounded per step when a float32 result is written in a narrower dtype
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
    :meth:`finish` rewrites the shards that hold such tensors without the unused space.

    Every value is checked as written (:func:`~mergekit_lite.dtypes.check_rounded`: no inf/NaN,
    none made by rounding, unless `clamp`). With a `journal`, each tensor's name (and a bounded
    tensor's actual shape) is recorded once its bytes are written; `done` are tensors an interrupted
    run already wrote into the shards found in `folder` (which must then match the layout), with
    their actual shapes where smaller. `label` names the output in messages."""

    def __init__(self, folder: str, layout: ShardLayout, *, clamp: bool = False, journal: Journal | None = None,
                 done: Mapping[str, tuple[int, ...] | None] | None = None, label: str | None = None):
        self.folder = folder
        self.layout = layout
        self.clamp = clamp
        self.journal = journal
        self.label = label or folder
        self._fds: dict[str, int] = {}
        self._written: dict[str, int] = {}  # tensor -> rows written
        self._blocks: set[tuple[str, int]] = set()
        self._done = {n: shape for n, shape in (done or {}).items() if n in layout.where}
        # bounded tensors written smaller than planned
        self._actual: dict[str, tuple[int, ...]] = {n: shape for n, shape in self._done.items() if shape}
        self._lock = threading.Lock()
        self._scratch: dict[torch.dtype, torch.Tensor] = {}  # rounding buffers (one writer thread)
        with self._os_errors():
            for shard in layout.shards:
                self._fds[shard.file] = self._open_shard(shard)

    def _open_shard(self, shard: Shard) -> int:
        path = os.path.join(self.folder, shard.file)
        size = len(shard.header) + shard.data_size
        if self._done:  # continuing: the shard must be the one this layout wrote
            fd = os.open(path, os.O_RDWR)
            if os.fstat(fd).st_size != size or os.pread(fd, len(shard.header), 0) != shard.header:
                os.close(fd)
                raise MergeError(f"cannot resume {self.label}: {shard.file} does not match the plan; "
                                 "run again without --resume")
            return fd
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            reserve(fd, size)
            _pwrite_all(fd, shard.header, 0)
            os.ftruncate(fd, size)
        except OSError:
            os.close(fd)
            raise
        return fd

    @contextlib.contextmanager
    def _os_errors(self):
        try:
            yield
        except OSError as exc:
            need = self.layout.total_size + sum(len(s.header) for s in self.layout.shards)
            raise output_error(exc, self.label, need) from None

    def _rows(self, name: str, tensor: torch.Tensor, first_row: int, planned: PlannedTensor) -> bool:
        """Check `tensor`'s place (the whole tensor, a bounded one smaller than planned, or a row
        block from `first_row`) and count its rows; True when they complete the tensor."""
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
            return self._written[name] == _planned_rows(planned)

    def write(self, name: str, tensor: torch.Tensor, first_row: int = 0) -> None:
        """Write `tensor` (or rows of it from `first_row`) at its planned place. A tensor in another
        dtype than planned (a float32 result) is rounded chunk by chunk through a small reused
        buffer, never copied whole."""
        shard, offset, planned = self.layout.where[name]
        complete = self._rows(name, tensor, first_row, planned)
        offset += first_row * (planned.nbytes // max(1, planned.shape[0])) if len(planned.shape) >= 2 else 0
        tensor = tensor.detach()
        if tensor.device.type != "cpu":  # round where it is, checked like any rounding, then copy
            rounded = tensor.to(planned.dtype)
            check_rounded(tensor, rounded, name, self.clamp)
            tensor = rounded.to("cpu")
        tensor = tensor.contiguous().reshape(-1)
        with self._os_errors():
            self._write_bytes(name, self._fds[shard.file], offset, planned.dtype, tensor)
            if self.journal is not None and complete:  # a tensor's last row block journals it
                self.journal.record(name, self._actual.get(name))

    def _write_bytes(self, name: str, fd: int, offset: int, dtype: torch.dtype, tensor: torch.Tensor) -> None:
        if tensor.dtype == dtype:
            check_rounded(tensor, tensor, name)
            if tensor.numel():
                _pwrite_all(fd, tensor.view(torch.uint8).numpy(), offset)
                self._writeback(fd, offset, tensor.numel() * tensor.element_size())
            return
        scratch = self._scratch.get(dtype)
        if scratch is None:
            scratch = self._scratch[dtype] = torch.empty(_CHUNK, dtype=dtype)
        itemsize = scratch.element_size()
        for start in range(0, tensor.numel(), _CHUNK):
            chunk = tensor[start:start + _CHUNK]
            out = scratch[:chunk.numel()]
            out.copy_(chunk)
            check_rounded(chunk, out, name, self.clamp)
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
                   if t.name not in self._done and self._written.get(t.name, 0) < _planned_rows(t)]
        if missing:
            raise RuntimeError(f"{len(missing)} planned tensors were never written, e.g. {missing[0]}")
        with self._os_errors():
            if self.journal is not None:
                self.journal.finishing()  # from here on the shards change: not resumable
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

    ``with OutputFolder(out, overwrite) as folder: ...write into folder.tmp...; folder.commit()``;
    on any error (or a signal) the temporary folder is removed and `out` is left as it was.
    Constructing one only checks (nothing is written): `out` must keep away from the `protected`
    paths (:func:`~.folders.check_location`), and an existing `out` is replaced only with
    `overwrite` and only if mergekit-lite wrote it, or with `force` (:func:`~.folders.replace_refusal`).
    Entering takes the output's lock, removes temporaries of dead runs, and creates the temporary
    folder with its journal; with `resume`, the temporary folder of an interrupted run with the same
    `key` is continued instead (:attr:`done` names its tensors already written).
    """

    def __init__(self, out: str, overwrite: bool = False, *, force: bool = False,
                 protected: list[tuple[str, str, bool]] | None = None, others: tuple[str, ...] = (),
                 key: str | None = None, resume: bool = False):
        self.out = os.path.abspath(out)
        self.overwrite = overwrite or force
        self.force = force
        self.key = key
        self.resume = resume
        check_location(self.out, protected or [], [os.path.abspath(o) for o in others])
        if os.path.lexists(self.out):
            if not self.overwrite and not (resume and self.complete()):
                raise OutputExists(f"{out} already exists; choose another output folder or pass --overwrite")
            why = replace_refusal(self.out, force)
            if why:
                raise UnsafeOutput(f"{why}; --overwrite only replaces a folder a run of mergekit-lite wrote; "
                                   "pass --force-overwrite to replace it anyway")
        self.tmp = temp_name(self.out)
        self.lock = OutputLock(self.out)
        self.journal: Journal | None = None
        self.done: dict[str, tuple[int, ...] | None] = {}  # tensors already written -> actual shape if smaller
        self.notes: list[str] = []
        self.committed = False

    def complete(self) -> bool:
        """Whether `out` already holds this very run's result (its marker has our key)."""
        marker = read_marker(self.out) if self.key else None
        return bool(marker) and marker.get("run_key") == self.key

    def __enter__(self) -> "OutputFolder":
        try:
            with critical():
                self._make_parent()
                self.lock.acquire()
                self._take_temporaries()
        except BaseException:
            self._clean()
            raise
        return self

    def _make_parent(self) -> None:
        parent = os.path.dirname(self.out)
        try:
            os.makedirs(parent, exist_ok=True)
        except OSError as exc:
            raise output_error(exc, parent) from None

    def _take_temporaries(self) -> None:
        """Continue the newest resumable temporary folder (with `resume`), remove the others."""
        adopted = None
        for old in stale_temporaries(self.out):
            if self.resume and self.key and adopted is None and not old.endswith(".old"):
                done, why = read_journal(old, self.key)
                if done is not None:
                    os.rename(old, self.tmp)
                    adopted, self.done = old, done
                    continue
                self.notes.append(f"not resuming {old}: {why}; starting over")
            remove_tree(old)
        try:
            if adopted is None:
                os.mkdir(self.tmp)
            if self.key:
                self.journal = Journal(self.tmp, self.key, fresh=adopted is None)
        except OSError as exc:
            raise output_error(exc, self.out) from None
        if self.resume and adopted is None and not self.notes:
            self.notes.append(f"nothing to resume for {self.out}; starting from the beginning")

    def commit(self, marker: dict | None = None) -> None:
        """Move the finished temporary folder into place (writing the marker first, if given)."""
        with critical():
            try:
                if self.journal is not None:
                    self.journal.remove()
                if marker is not None:
                    write_marker(self.tmp, marker)
                self._replace()
            except OSError as exc:
                raise output_error(exc, self.out) from None

    def _replace(self) -> None:
        old = None
        if os.path.lexists(self.out):
            if not self.overwrite and not (self.resume and self.complete()):
                raise OutputExists(f"{self.out} appeared while merging; not replacing it without --overwrite")
            why = replace_refusal(self.out, self.force)
            if why:
                raise UnsafeOutput(f"{why} (it changed while merging); not replacing it")
            old = self.tmp + ".old"
            os.rename(self.out, old)
        os.rename(self.tmp, self.out)
        self.committed = True
        if old:
            remove_tree(old)

    def __exit__(self, *exc) -> None:
        with critical():
            self._clean()

    def _clean(self) -> None:
        if self.journal is not None:
            self.journal.close()
        if not self.committed:
            remove_tree(self.tmp)
        self.lock.release()
