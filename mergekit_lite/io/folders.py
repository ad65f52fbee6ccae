"""What may be written where: the rules that keep a merge from destroying anything.

:class:`~mergekit_lite.io.writer.OutputFolder` applies them; they live here so that each is written
once and tested on its own:

- **Inputs are sacred.** An output folder may not be, contain, or lie inside anything the merge
  reads (every input model's folder and weight files, adapters included), the plan file, or the
  Hugging Face cache (:func:`check_location`). No flag overrides this.
- **Only our own folders are replaced.** ``--overwrite`` replaces an existing folder only if a run
  of mergekit-lite wrote it: it carries the marker (written last, naming every file the run wrote)
  and holds nothing else besides those files (:func:`replace_refusal`). An empty folder may be
  replaced too. Anything else needs ``--force-overwrite``. The marker is the extended attribute
  :data:`MARKER_XATTR` (``user.mergekit-lite``, JSON) of the folder, so that the folder holds
  exactly the files mergekit writes (tools and tests compare the listings); on a file system
  without user extended attributes (or off Linux) it is the file :data:`MARKER`
  (``mergekit-lite.json``) instead. Copies made with ``cp -a`` or ``mv`` keep it; ``cp -r`` does
  not, and such a copy is not replaced without ``--force-overwrite``.
- **One run per output.** A run holds an exclusive ``flock`` on ``.OUT.lock`` next to OUT
  (:class:`OutputLock`) from before it looks at the temporaries until it has committed or cleaned
  up, so a second run into the same OUT is refused at once instead of racing the first. The kernel
  drops the lock when a process dies, so a killed run never blocks the next.
- **Temporaries.** A run writes into ``.OUT.tmp-PID`` next to OUT; a temporary folder always holds
  the resume journal (:mod:`.journal`) from its first moment, which is how a later run recognises
  it (:func:`stale_temporaries`): holding the lock, every such folder is from a dead run.
- **Faults are messages.** :func:`output_error` turns an ``OSError`` while writing into an
  :class:`~mergekit_lite.errors.OutputError` naming the folder, the bytes needed and the bytes
  available; :func:`check_free_space` refuses a run before anything is read when the plan's byte
  estimate does not fit, and :func:`reserve` allocates each shard's space before merging.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import json
import os
import re
import shutil
from typing import Iterable

from ..errors import OutputError, UnsafeOutput
from .reader import is_within
from .resolve import hf_cache_dirs
from .sizes import human_size

MARKER_XATTR = "user.mergekit-lite"  # on every folder a run wrote: who wrote it and which files
MARKER = "mergekit-lite.json"  # the same, as a file, where extended attributes are not available
JOURNAL = ".mergekit-lite-journal"  # in every temporary folder (see .journal)
WRITTEN_BY = "mergekit-lite"


def real(path: str) -> str:
    """Absolute path with every symlink of its existing part resolved."""
    return os.path.realpath(os.path.abspath(path))


# ------------------------------------------------------------------------------------------------
# where an output may go


Protected = list  # of (real path, what it is, whether an output may lie inside it)


def protected_paths(inputs: Iterable[str], plan_file: str | None) -> Protected:
    """Everything an output must keep away from: the inputs, the plan and the Hugging Face cache
    (an output may not be, contain or lie inside them), and the current folder, the home folder and
    the root (an output may lie inside them, but not be or contain them)."""
    out = [(real(p), f"the input {p}", False) for p in inputs]
    if plan_file and os.path.isfile(plan_file):
        out.append((real(plan_file), f"the plan {plan_file}", False))
    out.extend((real(d), f"the Hugging Face cache {d}", False) for d in hf_cache_dirs())
    out.extend((real(d), what, True) for d, what in ((os.getcwd(), "the current folder"),
                                                     (os.path.expanduser("~"), "the home folder"),
                                                     (os.path.abspath(os.sep), "the root folder")))
    return out


def check_location(out: str, protected: Protected, others: Iterable[str] = ()) -> None:
    """Refuse an output folder that is, contains or lies inside a protected path, or another output
    folder of the same run."""
    target = real(out)
    for path, what, inside_ok in protected:
        if target == path:
            raise UnsafeOutput(f"{out} is {what}; refusing to write an output there (it would be replaced)")
        if is_within(path, target):
            raise UnsafeOutput(f"{out} contains {what}; refusing to write an output there (replacing it would "
                               f"delete {what})")
        if is_within(target, path) and not inside_ok:
            raise UnsafeOutput(f"{out} lies inside {what}; refusing to write an output there (inputs are never "
                               "modified)")
    for other in others:
        o = real(other)
        if o == target or is_within(o, target) or is_within(target, o):
            raise UnsafeOutput(f"the output folders {out} and {other} overlap; give each output its own folder")


def replace_refusal(out: str, force: bool) -> str | None:
    """Why the existing `out` may not be replaced, or None when it may: it is empty, or a run of
    mergekit-lite wrote it (its marker lists every file in it), or `force`."""
    if force:
        return None
    if not os.path.isdir(out) or os.path.islink(out):
        return f"{out} exists and is not a folder mergekit-lite wrote"
    entries = set(os.listdir(out))
    if not entries:
        return None
    marker = read_marker(out)
    if marker is None:
        return f"{out} exists and was not written by mergekit-lite (it has no mergekit-lite marker)"
    extra = sorted(entries - marked_files(marker) - {MARKER})
    if extra:
        shown = ", ".join(extra[:3]) + (" ..." if len(extra) > 3 else "")
        return f"{out} holds files mergekit-lite did not write ({shown}); move them away first"
    return None


def read_marker(folder: str) -> dict | None:
    """The marker of a folder a run wrote (see :func:`write_marker`), or None (absent, unreadable,
    or not ours)."""
    try:
        raw = os.getxattr(folder, MARKER_XATTR)
    except (OSError, AttributeError):
        try:
            with open(os.path.join(folder, MARKER), "rb") as fh:
                raw = fh.read(1 << 20)
        except OSError:
            return None
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError):
        return None
    if (not isinstance(data, dict) or data.get("written_by") != WRITTEN_BY or not isinstance(data.get("files"), list)
            or not isinstance(data.get("shards", 0), int)):
        return None
    return data


def marked_files(marker: dict) -> set[str]:
    """The files a marker names: its ``files`` and its ``shards`` numbered shard files."""
    n = marker.get("shards", 0)
    return set(marker["files"]) | {f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)}


def write_marker(folder: str, info: dict) -> None:
    """Mark `folder` as written by mergekit-lite, naming every file in it (numbered shards by their
    count, to stay small): as the folder's extended attribute, else as a file."""
    names = sorted(f for f in os.listdir(folder) if f not in (MARKER, JOURNAL))
    shards = [n for n in names if _SHARD.match(n)]
    data = {"written_by": WRITTEN_BY, **info, "files": [n for n in names if n not in shards], "shards": len(shards)}
    raw = json.dumps(data, separators=(",", ":")).encode()
    try:
        os.setxattr(folder, MARKER_XATTR, raw)
    except (OSError, AttributeError):  # no user extended attributes here, or not Linux
        with open(os.path.join(folder, MARKER), "wb") as fh:
            fh.write(raw + b"\n")


_SHARD = re.compile(r"^model-\d{5}-of-\d{5}\.safetensors$")


# ------------------------------------------------------------------------------------------------
# temporaries and the lock


def temp_name(out: str, pid: int | None = None) -> str:
    return os.path.join(os.path.dirname(out), f".{os.path.basename(out)}.tmp-{pid or os.getpid()}")


def stale_temporaries(out: str) -> list[str]:
    """Temporary folders of earlier runs into `out` (``.OUT.tmp-PID``, and ``.OUT.tmp-PID.old``,
    the replaced OUT of a replacement cut short), newest first. A ``.tmp-PID`` folder is ours to
    remove only if it is empty or carries our journal or marker."""
    parent, base = os.path.dirname(out), os.path.basename(out)
    pattern = re.compile(r"^\." + re.escape(base) + r"\.tmp-\d+(\.old)?$")
    try:
        names = [n for n in os.listdir(parent) if pattern.match(n)]
    except OSError:
        return []
    found = []
    for name in names:
        path = os.path.join(parent, name)
        if os.path.isdir(path) and not os.path.islink(path) and (name.endswith(".old") or _ours(path)):
            found.append(path)
    return sorted(found, key=_mtime, reverse=True)


def _ours(path: str) -> bool:
    try:
        entries = os.listdir(path)
    except OSError:
        return False
    return not entries or JOURNAL in entries or read_marker(path) is not None


def _mtime(path: str) -> float:
    try:
        return os.stat(path).st_mtime
    except OSError:
        return 0.0


def remove_tree(path: str) -> None:
    """Remove a folder (or a file, or a link) if it is there; cleanup never raises."""
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        try:
            os.unlink(path)
        except OSError:
            pass


class OutputLock:
    """An exclusive lock on ``.OUT.lock`` next to `out` (flock: released by the kernel when the
    process dies). The lock file is removed on release."""

    def __init__(self, out: str):
        self.out = out
        self.path = os.path.join(os.path.dirname(out), f".{os.path.basename(out)}.lock")
        self.fd: int | None = None

    def acquire(self) -> None:
        import fcntl

        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as exc:
                raise output_error(exc, self.out) from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "?"
                os.close(fd)
                raise OutputError(f"another mergekit-lite run (pid {holder}) is writing {self.out}; wait for it to "
                                  "finish, or choose another output folder") from None
            except OSError:  # a file system without locks: go on unlocked
                pass
            if self._same_file(fd):
                os.ftruncate(fd, 0)
                os.pwrite(fd, str(os.getpid()).encode(), 0)
                self.fd = fd
                return
            os.close(fd)  # the file was replaced while we waited for it: lock the new one

    def _same_file(self, fd: int) -> bool:
        try:
            return os.fstat(fd).st_ino == os.stat(self.path).st_ino
        except FileNotFoundError:
            return False

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            os.unlink(self.path)
        except OSError:
            pass
        os.close(self.fd)
        self.fd = None


# ------------------------------------------------------------------------------------------------
# space and OS errors


def free_bytes(folder: str) -> int | None:
    """Bytes available to us on the file system of `folder` (or its nearest existing parent)."""
    path = os.path.abspath(folder)
    while not os.path.exists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


def _device(folder: str) -> int | None:
    path = os.path.abspath(folder)
    while not os.path.exists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    try:
        return os.stat(path).st_dev
    except OSError:
        return None


def check_free_space(needs: dict[str, int]) -> None:
    """Refuse a run whose outputs (folder -> bytes it will write) do not fit where they go; outputs
    on one file system are added up."""

    by_device: dict[int | None, list[str]] = {}
    for folder in needs:
        by_device.setdefault(_device(folder), []).append(folder)
    for folders in by_device.values():
        need = sum(needs[f] for f in folders)
        free = free_bytes(folders[0])
        if free is not None and need > free:
            where = folders[0] if len(folders) == 1 else f"{folders[0]} (and {len(folders) - 1} more outputs)"
            raise OutputError(f"not enough free space for {where}: the merge writes {human_size(need)} ({need} bytes) "
                              f"there, and {human_size(free)} ({free} bytes) is available")


def reserve(fd: int, size: int) -> None:
    """Allocate a shard's blocks before anything is computed (Linux ``fallocate``), so that a disk
    too small, or filled by another process since the free-space check, fails the run at once and
    not after hours of merging. Where the file system cannot (or the platform has no fallocate),
    the file stays sparse, as before; glibc's slow zero-writing emulation is never used."""
    libc = _libc()
    if libc is None or size <= 0:
        return
    if libc.fallocate(fd, 0, ctypes.c_int64(0), ctypes.c_int64(size)) != 0:
        err = ctypes.get_errno()
        if err not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            raise OSError(err, os.strerror(err))


@functools.lru_cache(maxsize=1)
def _libc():
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
        return libc
    except (OSError, AttributeError):
        return None


def output_error(exc: OSError, folder: str, need: int | None = None) -> OutputError:
    """An OSError met while writing `folder`, as a message for people."""

    reason = exc.strerror or str(exc)
    if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        free = free_bytes(folder)
        parts = [f"cannot write {folder}: {reason}"]
        if need is not None:
            parts.append(f"the merge writes {human_size(need)} ({need} bytes) there")
        if free is not None:
            parts.append(f"{human_size(free)} ({free} bytes) is available")
        return OutputError("; ".join(parts))
    if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return OutputError(f"cannot write {folder}: {reason} (a read-only file system, or no permission to "
                           "write there); choose another output folder")
    return OutputError(f"cannot write {folder}: {reason}")
