"""A pool of reusable byte buffers, so that steady-state merging allocates nothing large.

Every block read and every block result needs a buffer of some megabytes. Allocated fresh, each
one is a new mapping whose pages fault in on first touch (about 0.1 s per 262 MB on the VMs we
measured) and are returned to the system when freed. The pool keeps released buffers by size class
(quarter powers of two) and hands them out again, for any request of up to the buffer's size and
at least half of it: after the first blocks, reads and results land in memory already paged in.

A buffer comes back to the pool by itself: the pool keeps one reference to each buffer it handed
out and takes it back when nothing else refers to its storage any more (no tensor, view or numpy
array). The executor never returns buffers explicitly, so a value that escapes (a tensor handed
to Python code) can never be reused under its holder. Idle buffers are capped at ``idle_limit``
bytes; beyond that they are freed.

With ``pinned`` (CUDA) the buffers are page-locked host memory, so host-to-device copies of reads
and device-to-host copies of results run asynchronously.
"""

from __future__ import annotations

import ctypes
import math
import sys
import threading

import torch

MIN_POOLED = 1 << 20  # smaller buffers are left to the allocator (malloc reuses them cheaply)


def size_class(nbytes: int) -> int:
    """The pooled size for a request of `nbytes`: the next quarter power of two, in 64 KiB units."""
    if nbytes <= MIN_POOLED:
        return nbytes
    k = math.ceil(4 * math.log2(nbytes))
    size = int(2 ** (k / 4))
    while size < nbytes:  # rounding of the power
        k += 1
        size = int(2 ** (k / 4))
    return -(-size // (1 << 16)) << 16


def _references(buf: torch.Tensor) -> int:
    """Tensors (and numpy arrays) referring to `buf`'s storage, `buf` included."""
    return torch._C._storage_Use_Count(buf.untyped_storage()._cdata) - 1


class BufferPool:
    """Byte buffers by size class; thread-safe."""

    def __init__(self, idle_limit: int, pinned: bool = False):
        self.idle_limit = idle_limit
        self.pinned = pinned
        self.free: dict[int, list[torch.Tensor]] = {}
        self.lent: list[torch.Tensor] = []
        self.idle = 0
        self.allocated = 0  # bytes of buffers created (a measure of the page-fault tax paid)
        self._lock = threading.Lock()
        self._track = hasattr(torch._C, "_storage_Use_Count")

    def take(self, nbytes: int) -> torch.Tensor:
        """A uint8 tensor of exactly `nbytes` (a view of a pooled buffer when large enough)."""
        size = size_class(nbytes)
        if nbytes <= MIN_POOLED or not self._track:
            return torch.empty(nbytes, dtype=torch.uint8, pin_memory=self.pinned and nbytes > 0)
        with self._lock:
            self._reclaim()
            fits = [s for s, bufs in self.free.items() if bufs and size <= s <= 2 * size]
            buf = self.free[min(fits)].pop() if fits else None
            if buf is not None:
                self.idle -= buf.numel()
            else:
                buf = torch.empty(size, dtype=torch.uint8, pin_memory=self.pinned)
                self.allocated += size
            self.lent.append(buf)
        return buf[:nbytes]

    def empty(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """An uninitialized tensor of `shape` and `dtype` in pooled memory."""
        n = 1
        for d in shape:
            n *= d
        itemsize = torch.empty((), dtype=dtype).element_size()
        return self.take(n * itemsize).view(dtype).view(shape)

    def _reclaim(self) -> None:
        """Buffers no longer referred to by anything but the pool go back to the free lists; beyond
        ``idle_limit`` idle bytes, the largest idle buffers are freed (a run's block sizes change
        from tensor to tensor: a few large idle buffers would otherwise sit in RSS)."""
        still = []
        for buf in self.lent:
            if _references(buf) > 1:
                still.append(buf)
                continue
            self.free.setdefault(buf.numel(), []).append(buf)
            self.idle += buf.numel()
        self.lent = still
        for size in sorted(self.free, reverse=True):
            while self.idle > self.idle_limit and self.free[size]:
                self.free[size].pop()
                self.idle -= size

    def clear(self) -> None:
        with self._lock:
            self.free.clear()
            self.lent.clear()
            self.idle = 0


def limit_allocator_caching() -> None:
    """Fix glibc's mmap threshold at 16 MiB, and trim its heaps beyond 32 MiB free.

    Tile temporaries (about 1 MiB each, :mod:`.tiles`) then come from the heap and are reused
    tile after tile, without a page fault; anything larger is mapped and unmapped with its tensor
    (block buffers live in the buffer pool, :mod:`.buffers`). Without a fixed threshold glibc raises
    it after the first large free and keeps later tensor-sized blocks in the heap, so RSS would
    grow with model size instead of block size.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 16 << 20)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, 32 << 20)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):  # not glibc
        pass
