"""Lazy reading of safetensors models.

At plan time only headers are read (8-byte length + JSON, the safetensors format): names, shapes,
dtypes and where each tensor's bytes are. Tensor bytes are read one tensor at a time when the
executor asks for them, so a model is never held in memory whole.

Bytes are read on the reading thread, overlapping the merge of the previous block, not through
``safetensors.safe_open``: safe_open maps the whole file, and every page a merge touches then
stays mapped, and counted in the process's resident memory, until the file is closed, so peak RSS
grows with the model size (measured: +2.9 GB of file-backed RSS merging three 1 GB models). Here
each read is released with its tensor, in one of two ways:

- :meth:`TensorReader.map` maps just the tensor's (or row block's) bytes, copy-on-write, and
  faults them in on the reading thread (one fault per 64 KB with the kernel's fault-around): no
  copy at all, where a positioned read copies every byte out of the page cache (on the VMs we
  measured that copy cost 0.9 s of CPU per 1.3 GB, the mapping 0.2 s). Writing to such a tensor
  never reaches the file. The executor maps large reads on the CPU;
- :meth:`TensorReader.read` copies them with positioned reads (``pread``) into a buffer: small
  reads, and reads into page-locked buffers for a GPU.

The tests check every read against safe_open.
"""

from __future__ import annotations

import json
import mmap
import os
import stat
import struct
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import torch

from ..arch import config_problem
from ..dtypes import ST_TO_TORCH, element_size, numel
from ..errors import MalformedFile, ModelNotFound
from .resolve import hf_cache_dirs

FAULT_AROUND = 1 << 16  # the kernel's default fault-around for file mappings (fault_around_bytes)
INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


@dataclass(frozen=True)
class TensorMeta:
    """Where a tensor is and what it is, from the file header (no bytes read)."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    file: str
    offset: int  # of its first byte in the file

    @property
    def numel(self) -> int:
        return numel(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * element_size(self.dtype)


MAX_HEADER = 100_000_000  # bytes; safetensors' own limit


def read_header(file: str) -> tuple[dict[str, TensorMeta], dict[str, str]]:
    """Parse a safetensors header: ({name: TensorMeta}, metadata). Reads only the header bytes.

    The header is validated as the safetensors library validates it (see :func:`parse_header`), so
    a file that library refuses is refused here too, naming the file and the tensor."""
    try:
        fd = os.open(file, os.O_RDONLY | os.O_NONBLOCK)  # a FIFO must not block us
    except OSError as exc:
        raise MalformedFile(f"{file}: not a readable safetensors file ({exc.strerror or exc})") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise _Bad("not a regular file")
        raw = os.pread(fd, 8, 0)
        if len(raw) != 8:
            raise _Bad("file is shorter than a safetensors header")
        (n,) = struct.unpack("<Q", raw)
        if n > MAX_HEADER or 8 + n > info.st_size:
            raise _Bad(f"header length {n} is not plausible for a file of {info.st_size} bytes")
        text = _pread_all(fd, n, 8)
        return parse_header(text, info.st_size - 8 - n, file, data_start=8 + n)
    except _Bad as exc:
        raise MalformedFile(f"{file}: not a readable safetensors file ({exc})") from None
    except OSError as exc:
        raise MalformedFile(f"{file}: not a readable safetensors file ({exc.strerror or exc})") from None
    finally:
        os.close(fd)


class _Bad(Exception):
    """What is wrong with a header (the caller adds the file)."""


def _pread_all(fd: int, n: int, offset: int) -> bytes:
    parts = []
    while n > 0:
        got = os.pread(fd, min(n, 1 << 24), offset)
        if not got:
            raise _Bad("file ends inside its header")
        parts.append(got)
        n -= len(got)
        offset += len(got)
    return b"".join(parts)


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = {}
    for key, value in pairs:
        if key in out:
            raise _Bad(f"the header names {key!r} twice")
        out[key] = value
    return out


def parse_header(raw: bytes, data_size: int, file: str, data_start: int = 0
                 ) -> tuple[dict[str, TensorMeta], dict[str, str]]:
    """Validate a header's JSON as safetensors does: an object; ``__metadata__`` maps strings to
    strings; every tensor has a known dtype, a shape of non-negative integers and two integer
    data offsets whose span is exactly its size; spans in order, without gaps or overlaps, and
    covering the `data_size` bytes after the header exactly. Raises _Bad."""
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except (ValueError, UnicodeDecodeError) as exc:
        raise _Bad(f"header is not JSON: {exc}") from None
    except RecursionError:
        raise _Bad("header is nested too deeply") from None
    if not isinstance(header, dict):
        raise _Bad(f"header is a JSON {type(header).__name__}, not an object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise _Bad("__metadata__ must map strings to strings")
    tensors = {name: _tensor_meta(name, info, file, data_start) for name, info in header.items()}
    _check_spans(tensors, data_start, data_size)
    return tensors, metadata


def _is_count(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _tensor_meta(name: str, info: Any, file: str, data_start: int) -> TensorMeta:
    if not isinstance(info, dict):
        raise _Bad(f"tensor {name!r}: expected an object with dtype, shape and data_offsets, got {info!r:.60}")
    code = info.get("dtype")
    if not isinstance(code, str) or code not in ST_TO_TORCH:
        raise _Bad(f"tensor {name!r} has dtype {code!r:.40}, which mergekit-lite cannot read")
    shape = info.get("shape")
    if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
        raise _Bad(f"tensor {name!r}: shape must be a list of non-negative integers, got {shape!r:.60}")
    offsets = info.get("data_offsets")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(o) for o in offsets)):
        raise _Bad(f"tensor {name!r}: data_offsets must be two non-negative integers, got {offsets!r:.60}")
    begin, end = offsets
    meta = TensorMeta(name, tuple(shape), ST_TO_TORCH[code], file, data_start + begin)
    if end < begin or end - begin != meta.nbytes:
        raise _Bad(f"tensor {name!r} spans bytes [{begin}, {end}) but its shape {shape} and dtype {code} "
                   f"need {meta.nbytes}; the file is corrupt")
    return meta


def _check_spans(tensors: dict[str, TensorMeta], data_start: int, data_size: int) -> None:
    """Spans follow each other with no gap and no overlap, and end exactly where the file ends."""
    at = 0
    for meta in sorted(tensors.values(), key=lambda m: (m.offset, m.nbytes)):
        begin = meta.offset - data_start
        if begin != at:
            what = "overlaps the tensor before it" if begin < at else f"leaves a gap of {begin - at} bytes before it"
            raise _Bad(f"tensor {meta.name!r} starts at byte {begin} and {what} (the data of one tensor "
                       "must not be another's)")
        at = begin + meta.nbytes
    if at != data_size:
        raise _Bad(f"the tensors cover {at} bytes of data but the file holds {data_size} after the header")


@dataclass
class ModelFiles:
    """A model on local disk: its tensors (from headers), config.json and other files."""

    path: str  # folder, or the single .safetensors file
    tensors: dict[str, TensorMeta]
    config: dict[str, Any]
    folder: str  # where config.json / tokenizer files live
    hub: Any = None  # where it came from on the Hub (io.resolve.HubRef); None for a local model
    _read: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def files(self) -> list[str]:
        return sorted({m.file for m in self.tensors.values()})

    def vocab(self) -> Any:
        """Its vocabulary (io.vocab.Vocab), read from its tokenizer files when first asked; None without one."""
        if "vocab" not in self._read:
            from .vocab import read_vocab

            self._read["vocab"] = read_vocab(self.folder)
        return self._read["vocab"]

    def card_license(self) -> tuple[tuple[str, str], ...] | None:
        """The license keys of its model card (README.md front matter), read when first asked."""
        if "license" not in self._read:
            from .card import read_license

            self._read["license"] = read_license(self.folder)
        return self._read["license"]


def open_model(path: str) -> ModelFiles:
    """Index a local model folder (sharded with an index, or single-file) or a lone .safetensors file.

    Every weight file must lie inside the model folder once symlinks are resolved, or in the Hugging
    Face cache (whose snapshots are symlinks to its blobs): an index or a link never leads the
    reader elsewhere on the disk."""
    if os.path.isfile(path):
        if not path.endswith(".safetensors"):
            raise ModelNotFound(f"{path}: not a .safetensors file (mergekit-lite reads safetensors weights only)")
        tensors, _ = read_header(path)
        folder = os.path.dirname(os.path.abspath(path))
        return ModelFiles(path, tensors, _read_config(folder), folder)
    if not os.path.isdir(path):
        raise ModelNotFound(f"{path}: no such file or folder")
    index_file = os.path.join(path, INDEX_NAME)
    if os.path.exists(index_file):
        tensors = _indexed_tensors(path, read_index(index_file))
    else:
        tensors = _listed_tensors(path)
    return ModelFiles(path, tensors, _read_config(path), path)


def read_index(index_file: str) -> dict[str, str]:
    """The weight map of a ``model.safetensors.index.json``: tensor -> shard file name, validated:
    an object whose ``weight_map`` maps names to relative file names that stay in the folder."""
    data = _read_json(index_file, "safetensors index")
    weight_map = data.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise MalformedFile(f"{index_file}: not a valid safetensors index (weight_map must be a non-empty "
                            f"object of tensor name -> shard file, got {weight_map!r:.60})")
    for name, shard in weight_map.items():
        if not isinstance(shard, str):
            raise MalformedFile(f"{index_file}: tensor {name!r} maps to {shard!r:.60}, not a shard file name")
        parts = shard.replace("\\", "/").split("/")
        if not shard or "\0" in shard or os.path.isabs(shard) or shard.startswith("\\") or ".." in parts:
            raise MalformedFile(f"{index_file}: tensor {name!r} names the shard {shard!r}, which is not a "
                                "file name inside the model folder")
    return weight_map


def _indexed_tensors(path: str, weight_map: dict[str, str]) -> dict[str, TensorMeta]:
    tensors: dict[str, TensorMeta] = {}
    for shard in sorted(set(weight_map.values())):
        shard_file = os.path.join(path, shard)
        if not os.path.exists(shard_file):
            raise ModelNotFound(f"{path}: the index names shard {shard}, which is missing")
        check_inside(shard_file, path)
        found, _ = read_header(shard_file)
        for name, meta in found.items():
            if weight_map.get(name) == shard:
                tensors[name] = meta
    missing = [n for n in weight_map if n not in tensors]
    if missing:
        raise ModelNotFound(f"{path}: the index lists tensors its shards lack, e.g. {missing[0]}")
    return tensors


def _listed_tensors(path: str) -> dict[str, TensorMeta]:
    files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    if not files:
        bins = [f for f in os.listdir(path) if f.endswith(".bin") or f.endswith(".pt")]
        hint = (" It has pickle weights (" + ", ".join(bins[:3]) + "), which mergekit-lite does not load because "
                "unpickling can run code; convert them to safetensors first.") if bins else ""
        raise ModelNotFound(f"{path}: no .safetensors weights found.{hint}")
    tensors: dict[str, TensorMeta] = {}
    for f in files:
        check_inside(os.path.join(path, f), path)
        found, _ = read_header(os.path.join(path, f))
        for name, meta in found.items():
            if name in tensors:
                raise ModelNotFound(f"{path}: tensor {name} is in both {os.path.basename(tensors[name].file)} and {f}")
            tensors[name] = meta
    return tensors


def check_inside(file: str, folder: str) -> None:
    """Refuse `file` unless, symlinks resolved, it lies inside `folder` or the Hugging Face cache."""
    real = os.path.realpath(file)
    roots = [os.path.realpath(folder)] + [os.path.realpath(d) for d in hf_cache_dirs()]
    if not any(is_within(real, root) for root in roots):
        raise MalformedFile(f"{file}: leads to {real}, outside the model folder {folder}; mergekit-lite only "
                            "reads files inside a model's folder (or the Hugging Face cache)")


def is_within(path: str, root: str) -> bool:
    """Whether `path` is `root` or lies inside it (both absolute, normalised)."""
    try:
        return os.path.commonpath([path, root]) == root
    except ValueError:  # different drives
        return False


def _read_json(file: str, what: str) -> dict[str, Any]:
    try:
        with open(file, encoding="utf-8") as fh:
            data = json.load(fh)
    except (OSError, ValueError) as exc:
        raise MalformedFile(f"{file}: not a valid {what} ({exc})") from None
    except RecursionError:
        raise MalformedFile(f"{file}: not a valid {what} (nested too deeply)") from None
    if not isinstance(data, dict):
        raise MalformedFile(f"{file}: not a valid {what} (a JSON {type(data).__name__}, expected an object)")
    return data


def _read_config(folder: str) -> dict[str, Any]:
    cfg = os.path.join(folder, "config.json")
    if not os.path.exists(cfg):
        return {}
    check_inside(cfg, folder)
    config = _read_json(cfg, "config.json")
    problem = config_problem(config)
    if problem:
        raise MalformedFile(f"{cfg}: not a valid config.json ({problem})")
    return config


class TensorReader:
    """Reads tensors with positioned reads, keeping a few files open. Thread-safe."""

    def __init__(self, max_open: int = 64):
        self._fds: OrderedDict[str, int] = OrderedDict()
        self._lock = threading.Lock()
        self._max_open = max_open

    def _fd(self, file: str) -> int:
        with self._lock:
            if file in self._fds:
                self._fds.move_to_end(file)
                return self._fds[file]
            fd = os.open(file, os.O_RDONLY)
            self._fds[file] = fd
            while len(self._fds) > self._max_open:
                os.close(self._fds.popitem(last=False)[1])
            return fd

    def read(self, file: str, offset: int, shape: tuple[int, ...], dtype: torch.dtype,
             into: torch.Tensor | None = None) -> torch.Tensor:
        """The tensor of `shape` and `dtype` whose bytes start at `offset` in `file`, read into the
        uint8 buffer `into` when given (a pooled buffer of exactly the tensor's bytes)."""
        nbytes = numel(shape) * element_size(dtype)
        buf = torch.empty(nbytes, dtype=torch.uint8) if into is None else into
        if nbytes:
            view = memoryview(buf.numpy())
            fd = self._fd(file)
            done = 0
            while done < nbytes:
                got = os.preadv(fd, [view[done:]], offset + done)
                if got <= 0:
                    raise ModelNotFound(f"{file}: ends before the bytes its header promises (truncated file?)")
                done += got
        return buf.view(dtype).reshape(shape)

    def map(self, file: str, offset: int, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """The tensor of `shape` and `dtype` at `offset` in `file`, mapped copy-on-write from the
        page cache and faulted in now; the mapping lives as long as the tensor (and its views)."""
        nbytes = numel(shape) * element_size(dtype)
        if nbytes == 0:
            return torch.empty(shape, dtype=dtype)
        fd = self._fd(file)
        if os.fstat(fd).st_size < offset + nbytes:
            raise ModelNotFound(f"{file}: ends before the bytes its header promises (truncated file?)")
        start = offset - offset % mmap.ALLOCATIONGRANULARITY
        mapping = mmap.mmap(fd, offset - start + nbytes, access=mmap.ACCESS_COPY, offset=start)
        touch = memoryview(mapping)[::FAULT_AROUND]  # one byte per 64 KB: the kernel maps the rest
        bytes(touch)
        touch.release()
        flat = torch.frombuffer(mapping, dtype=torch.uint8, count=nbytes, offset=offset - start)
        return flat.view(dtype).reshape(shape)

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()
