"""The resume journal: which tensors of an interrupted run are already on disk.

Every temporary output folder holds ``.mergekit-lite-journal`` from the moment it is created. Its
first line is the run's key; then one line per tensor, appended by the writer thread right after the
tensor's last byte was written at its planned place in its shard. A run killed at any moment
(SIGKILL, the OOM killer, a crash) therefore leaves a journal that names only complete tensors; a
torn last line is ignored. ``--resume`` continues such a folder when its key equals the new run's.

The key (:func:`run_key`) is a hash of everything the bytes depend on: the plan's text, the options
that change results (seed, dtype, shard size, clamping), the output layout, every input file's path,
size, modification time and header, and the engine (version, a digest of its source, torch's
version and thread count, the device kind). Anything changed makes the journal stale, and the run
says so and starts over. The journal also records the boot it was written in: after the machine
restarted, bytes the journal names may never have reached the disk, so it is not trusted.
"""

from __future__ import annotations

import hashlib
import json
import os
from functools import lru_cache
from typing import Any, Iterable

from .folders import JOURNAL

_FORMAT = 1


def boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as fh:
            return fh.read().strip()
    except OSError:
        return ""


@lru_cache(maxsize=1)
def engine_digest() -> str:
    """sha256 over mergekit-lite's own source files: a change of code is a change of engine."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    h = hashlib.sha256()
    for folder, dirs, files in sorted(os.walk(root)):
        dirs.sort()
        for name in sorted(f for f in files if f.endswith(".py")):
            with open(os.path.join(folder, name), "rb") as fh:
                h.update(name.encode() + b"\0" + fh.read())
    return h.hexdigest()


def file_fingerprint(path: str) -> list[Any]:
    """Path, size, mtime and the sha256 of the header of one input file."""
    st = os.stat(path)
    with open(path, "rb") as fh:
        raw = fh.read(8)
        n = int.from_bytes(raw, "little") if len(raw) == 8 else 0
        header = fh.read(min(n, 100_000_000))
    return [os.path.realpath(path), st.st_size, st.st_mtime_ns, hashlib.sha256(header).hexdigest()]


def run_key(parts: dict[str, Any], files: Iterable[str]) -> str:
    """A hash of `parts` (JSON-able: plan text, options, layouts, engine) and the input `files`."""
    doc = {"format": _FORMAT, "parts": parts, "engine": engine_digest(),
           "files": [file_fingerprint(f) for f in sorted(set(files))]}
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()


class Journal:
    """Appends the names of written tensors to a folder's journal (thread-safe: one write each)."""

    def __init__(self, folder: str, key: str, *, fresh: bool = True):
        self.path = os.path.join(folder, JOURNAL)
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | (os.O_TRUNC if fresh else 0)
        self.fd: int | None = os.open(self.path, flags, 0o644)
        if fresh:
            self._append({"journal": _FORMAT, "key": key, "boot": boot_id()})
        elif not self._ends_a_line():
            os.write(self.fd, b"\n")  # after a killed run's torn last line: start a line of our own

    def _ends_a_line(self) -> bool:
        with open(self.path, "rb") as fh:
            end = fh.seek(0, os.SEEK_END)
            if end == 0:
                return True
            fh.seek(end - 1)
            return fh.read(1) == b"\n"

    def record(self, name: str, shape: tuple[int, ...] | None = None) -> None:
        """`name` is on disk (a bounded tensor: with the `shape` it was written in)."""
        self._append(name if shape is None else [name, list(shape)])

    def finishing(self) -> None:
        """The shards are about to be rewritten (compacted) and closed: a kill from here on leaves a
        folder that is started over, not continued."""
        self._append({"finishing": True})

    def _append(self, item: Any) -> None:
        if self.fd is not None:
            os.write(self.fd, (json.dumps(item) + "\n").encode())

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def remove(self) -> None:
        self.close()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


def read_journal(folder: str, key: str) -> tuple[dict[str, tuple[int, ...] | None] | None, str]:
    """({tensor written: its shape if written smaller than planned, else None}, "") when `folder`'s
    journal belongs to the run `key`, else (None, why it cannot be resumed)."""
    try:
        with open(os.path.join(folder, JOURNAL), "rb") as fh:
            lines = fh.read().split(b"\n")
    except OSError:
        return None, "it has no journal"
    try:
        head = json.loads(lines[0])
    except ValueError:
        return None, "its journal is unreadable"
    if not isinstance(head, dict) or head.get("journal") != _FORMAT:
        return None, "its journal is unreadable"
    if head.get("key") != key:
        return None, "the plan, the options, an input or mergekit-lite itself changed since it was written"
    if head.get("boot") != boot_id():
        return None, "the machine restarted since (its last writes may not have reached the disk)"
    done: dict[str, tuple[int, ...] | None] = {}
    for line in lines[1:]:
        try:
            item = json.loads(line)
        except ValueError:
            continue  # the torn last line of a killed run
        if isinstance(item, str):
            done[item] = None
        elif isinstance(item, list) and len(item) == 2 and isinstance(item[0], str) and isinstance(item[1], list):
            done[item[0]] = tuple(int(d) for d in item[1])
        elif isinstance(item, dict) and item.get("finishing"):
            return None, "it was killed while its shards were being finished"
    return done, ""
