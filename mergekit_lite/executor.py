"""Runs a compiled graph: streaming, group by group, under a memory budget.

Three parts, each with one job:

- :class:`Scheduler` admits groups in order. Admitting a group reserves its planned peak from the
  budget and starts its nodes (loads submit their reads to background threads), so the groups
  ahead are read while the current one computes, and what is alive never exceeds the budget.
- :class:`GroupRun` runs one group's nodes in order, driving the memory ledger (:mod:`.ledger`)
  that planned its peak: the ledger says which values are dead after each node, and the run frees
  them. It is also what nodes see while they run (device, reads, hand-offs, emitted results).
- Sinks own their hand-off: a Write passes its tensor to the writer thread, an Emit to the caller
  of :meth:`Executor.run`. Once a group has run its reservation shrinks to what its pending
  hand-offs hold; the last hand-off returns the rest.

The executor knows nothing of a node's kind or a method's math: it calls the members every node
kind declares (:mod:`.nodes`).
"""

from __future__ import annotations

import contextlib
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Iterator

import torch

from . import tiles
from .buffers import MIN_POOLED, BufferPool, limit_allocator_caching
from .device import DeviceLink, pick_device  # noqa: F401  (pick_device re-exported)
from .errors import BudgetExceeded
from .graph import Compiled
from .io.reader import TensorReader
from .io.sizes import human_size
from .ledger import Budget, Ledger, Meter, group_view
from .run_stats import GroupPeak, Progress, Stats


def auto_budget(compiled: Compiled) -> int:
    """Default budget: the largest group's need plus room to read ahead (half the largest
    float32 tensor, at least 64 MiB)."""
    return compiled.max_need + max(64 << 20, compiled.largest_input_f32 // 2)


def check_budget(compiled: Compiled, budget: int) -> None:
    need = compiled.max_need
    if need > budget:
        worst = compiled.groups[compiled.needs.index(need)][0]
        raise BudgetExceeded(f"--max-memory {human_size(budget)} is too small: merging tensor {worst} alone needs "
                             f"{human_size(need)} (its inputs, the method's float32 workspace and the result); "
                             f"raise --max-memory to at least {human_size(need)}")


def tensor_bytes(value: Any) -> int:
    """Bytes of a node's value: a tensor, a tuple of tensors, or None."""
    if isinstance(value, torch.Tensor):
        return value.nbytes
    if isinstance(value, tuple):
        return sum(tensor_bytes(v) for v in value)
    return 0


class Resources:
    """What every group shares: device, threads, reader, writers, budget, measured bytes, stats,
    the buffer pool, and the values carried from one group to later ones (statistics)."""

    def __init__(self, device: torch.device, budget: Budget, writers: dict[str, Any], stats: Stats,
                 read_threads: int, measure: bool, on_written: Callable[[Any], None], link: DeviceLink | None = None):
        self.device = device
        self.link = link  # CUDA: uploads on a side stream, pinned downloads, the device budget
        self.budget = budget
        self.writers = writers
        self.stats = stats
        self.measure = measure
        self.on_written = on_written
        self.meter = Meter()
        self.reader = TensorReader()
        self.pool = BufferPool(idle_limit=budget.limit, pinned=device.type == "cuda")
        self.carried: dict[Any, Any] = {}
        self.readers = ThreadPoolExecutor(max_workers=read_threads, thread_name_prefix="mkl-read")
        self.writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mkl-write")
        self.compute = ThreadPoolExecutor(max_workers=tiles.THREADS, thread_name_prefix="mkl-tile",
                                          initializer=torch.set_num_threads, initargs=(1,))
        self.writes: list[Future] = []

    def raise_write_errors(self, wait: bool = False) -> None:
        for f in self.writes:
            if wait or f.done():
                f.result()
        self.writes = [f for f in self.writes if not f.done()]

    def close(self, failed: bool) -> None:
        self.readers.shutdown(wait=True, cancel_futures=True)
        self.writer.shutdown(wait=True, cancel_futures=failed)
        self.compute.shutdown(wait=True, cancel_futures=True)
        self.reader.close()
        self.carried.clear()
        self.pool.clear()


class GroupRun:
    """One admitted group: its reads in flight, its ledger, its values; what its nodes see."""

    def __init__(self, res: Resources, compiled: Compiled, index: int):
        self.res = res
        self.device = res.device
        self.writers = res.writers
        self.name, self.nodes = compiled.groups[index]
        self.need = compiled.needs[index]
        self.view = group_view(compiled.graph, self.nodes, compiled.order)
        self.ledger = Ledger(self.view.consumers, self.view.carried_out)
        self.meter = Meter()
        self.futures: dict[Any, Future] = {}
        self.uploads: dict[int, tuple] = {}  # id(host tensor) -> (device copy, its event): CUDA only
        self.downloads: list[Any] = []  # events of results being copied back: CUDA only
        self.values: dict[Any, Any] = {}
        self.emitted: list[tuple[Any, str, torch.Tensor, int]] = []
        self.moved: set[Any] = set()  # inputs whose bytes a sink's hold counts now (see _hold)
        # the reservation is returned as the group ends and its hand-offs complete (see _settle)
        self.pending = sum(1 for n in self.nodes if n.holds) + 1
        self.holding = 0  # bytes held by hand-offs not completed yet
        self.reserved = self.need  # of the budget, until the group has run (see _settle)
        self.ran, self.carried_bytes = False, 0
        self._lock = threading.Lock()
        self.ledger.open(self.nodes, self.view.carried_in)
        for node in self.nodes:
            node.start(self)

    # -- what nodes call ---------------------------------------------------------------------
    @property
    def measure(self) -> bool:
        return self.res.measure

    @property
    def compute(self) -> ThreadPoolExecutor:
        """Threads that run tiles (one torch thread each)."""
        return self.res.compute

    def read(self, file: str, offset: int, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """A tensor's bytes: mapped from the page cache when large and merged on the CPU (no copy),
        else read into a pooled buffer (page-locked for a GPU)."""
        n = 1
        for d in shape:
            n *= d
        if self.res.link is None and n * dtype.itemsize > MIN_POOLED:
            tensor = self.res.reader.map(file, offset, shape, dtype)
        else:
            tensor = self.res.reader.read(file, offset, shape, dtype, into=self.res.pool.take(n * dtype.itemsize))
        self._alive(tensor.nbytes)
        self.res.stats.count(read=tensor.nbytes)
        return tensor

    def empty(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """A result buffer (pooled host memory)."""
        return self.res.pool.empty(shape, dtype)

    def to_host(self, tensor: torch.Tensor) -> torch.Tensor:
        """A result computed on the device, copied back asynchronously into pinned host memory
        (sinks wait for the copy before handing the bytes on)."""
        if self.res.link is None:
            return tensor.to("cpu")
        host = self.res.pool.empty(tuple(tensor.shape), tensor.dtype)
        self.downloads.append(self.res.link.download(tensor, host))
        return host

    def on_device(self, tensor: torch.Tensor) -> torch.Tensor:
        """A value on the compute device: its upload when the read started one, else a copy now."""
        upload = self.uploads.pop(id(tensor), None) if self.res.link is not None else None
        if upload is not None:
            return self.res.link.use(*upload)
        return tensor.to(self.device, non_blocking=True)

    def prefetch(self, node: Any, fn: Callable[[], Any]) -> None:
        if self.res.link is None:
            self.futures[node] = self.res.readers.submit(fn)
            return

        def read_and_upload() -> Any:
            host = fn()
            self.uploads[id(host)] = self.res.link.upload(host)
            return host

        self.futures[node] = self.res.readers.submit(read_and_upload)

    def fetched(self, node: Any) -> Any:
        return self.futures.pop(node).result()

    def measuring(self) -> contextlib.AbstractContextManager:
        """Run a node's computation; when the run measures, its temporaries count as measured."""
        if not self.res.measure:
            return contextlib.nullcontext()
        return _Measured(self, list(self.values.values()))

    def hand_off(self, sink: Any, send: Callable[[], None]) -> None:
        held = self._hold(sink)
        downloads = list(self.downloads)

        def write() -> None:
            for event in downloads:  # results copied back from the device are complete
                event.synchronize()
            try:
                send()
            except BaseException as exc:
                self.res.budget.break_(exc)
                raise
            self._done(sink, held)

        self.res.writes.append(self.res.writer.submit(write))

    def emit(self, sink: Any, name: str, value: torch.Tensor) -> None:
        for event in self.downloads:
            event.synchronize()
        self.emitted.append((sink, name, value, self._hold(sink, value)))

    # -- running -----------------------------------------------------------------------------
    def execute(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Run the nodes in order; yields emitted results."""
        for node in self.nodes:
            self.ledger.before(node)
            value = node.run(self, [self.values[d] if d in self.values else self.res.carried[d] for d in node.args])
            if value is not None:
                self.values[node] = value
                if not node.prefetched:
                    self._alive(tensor_bytes(value))
            for dep in self.ledger.after(node):
                gone = self.values.pop(dep) if dep in self.values else self.res.carried.pop(dep, None)
                if dep not in self.moved:  # a sink's hold already counts it
                    self._alive(-tensor_bytes(gone))
            while self.emitted:
                sink, name, value, held = self.emitted.pop(0)
                yield name, value
                del value
                self._done(sink, held)
        for node in self.view.carried_out:  # values later groups consume stay alive
            if node in self.values:
                self.res.carried[node] = self.values[node]
        self.values.clear()
        self.uploads.clear()
        if self.res.link is not None:  # merged: its results are (on their way) to the host
            self.res.link.budget.release(self.need)
        self.res.stats.groups.append(GroupPeak(self.name, self.need, self.ledger.peak, self.meter.peak))
        carried = sum(tensor_bytes(self.res.carried.get(n)) for n in self.view.carried_out)
        self._settle(keep=carried)

    def cancel(self) -> None:
        for f in self.futures.values():
            f.cancel()

    def _alive(self, n: int) -> None:
        self.meter.add(n)
        self.res.meter.add(n)

    def _hold(self, sink: Any, own: Any = None) -> int:
        """A sink keeps its inputs (and its own value) alive until its hand-off completes. An input
        whose last consumer is this sink moves into the hold (the group stops counting it when the
        ledger drops it), so a tensor read and written unchanged is never counted twice."""
        held = sum(tensor_bytes(self.values.get(d)) for d in sink.args) + tensor_bytes(own if sink.outputs else None)
        with self._lock:
            self.holding += held
        moved = [d for d in sink.args if self.ledger.remaining.get(d) == 1]
        self.moved.update(moved)
        self._alive(held - sum(tensor_bytes(self.values.get(d)) for d in moved))
        return held

    def _done(self, sink: Any, held: int) -> None:
        self._alive(-held)
        self.res.stats.count(written=sink.nbytes, tensors=int(sink.last))
        self.res.on_written(sink)
        self._settle(held=held)

    def _settle(self, held: int = 0, keep: int | None = None) -> None:
        """One hand-off completed (`held`: its bytes), or the group ran (`keep`: bytes of its values
        later groups consume). Once the group has run, its reservation shrinks to what pending
        hand-offs still hold and the carried values, so a slow writer does not hold back the next
        groups by the whole planned peak; the last hand-off returns the rest."""
        with self._lock:
            self.pending -= 1
            self.holding -= held
            if keep is not None:
                self.ran, self.carried_bytes = True, keep
            target = self.reserved if not self.ran else min(self.reserved, self.holding + self.carried_bytes)
            target = 0 if self.pending == 0 else target
            freed, self.reserved = self.reserved - target, target
        if freed > 0:
            self.res.budget.release(freed)


class _Measured:
    """Context of a measured computation: its new tensors' peak is reported as transient bytes."""

    def __init__(self, run: GroupRun, existing: list[Any]):
        from .probe import AllocationProbe

        self.run = run
        self.probe = AllocationProbe(t for v in existing for t in (v if isinstance(v, tuple) else (v,)))

    def __enter__(self) -> None:
        self.probe.__enter__()

    def __exit__(self, *exc: Any) -> None:
        self.probe.__exit__(*exc)
        self.run.meter.transient(self.probe.peak)
        self.run.res.meter.transient(self.probe.peak)


class Scheduler:
    """Admits groups in order: the next one needed (waiting for the budget), then as many more as
    the budget allows without waiting, at most `lookahead` ahead."""

    def __init__(self, compiled: Compiled, res: Resources, lookahead: int):
        self.compiled = compiled
        self.res = res
        self.lookahead = lookahead
        self.admitted: dict[int, GroupRun] = {}
        self.next = 0

    def take(self, i: int) -> GroupRun:
        """Group `i`, admitted (groups after it are admitted while the budget allows)."""
        while self.next <= i:
            self._admit(block=True)
        n = len(self.compiled.groups)
        while self.next < n and self.next - i < self.lookahead and self._admit(block=False):
            pass
        return self.admitted.pop(i)

    def _admit(self, block: bool) -> bool:
        need = self.compiled.needs[self.next]
        if not self.res.budget.acquire(need, block=block):
            return False
        link = self.res.link
        if link is not None and not link.budget.acquire(need, block=block):  # the device's own budget
            self.res.budget.release(need)
            return False
        self.admitted[self.next] = GroupRun(self.res, self.compiled, self.next)
        self.next += 1
        return True

    def cancel(self) -> None:
        for run in self.admitted.values():
            run.cancel()


class Executor:
    """Executes `compiled` on `device` within `budget` bytes.

    `writers` maps an output key (``""`` for the main output, a folder for a step's ``save:``) to
    an object with ``write(name, tensor)``. :meth:`run` yields ``(name, tensor)`` for Emit sinks.
    With ``measure=True`` every merge runs under an allocation probe (slow; for tests), so that
    ``stats.groups[i].measured`` includes the methods' temporaries. On CUDA, `device_budget` caps
    the device memory in use (:mod:`.device`; default 90% of what is free).
    """

    def __init__(self, compiled: Compiled, *, device: str | torch.device | None = "auto", budget: int | None = None,
                 writers: dict[str, Any] | None = None, progress: bool = False, read_threads: int = 2,
                 lookahead: int = 64, measure: bool = False, device_budget: int | None = None):
        self.compiled = compiled
        self.device = device if isinstance(device, torch.device) else pick_device(device)
        self.budget = Budget(budget if budget is not None else auto_budget(compiled))
        check_budget(compiled, self.budget.limit)
        self.device_budget = device_budget
        self.writers = writers or {}
        self.progress = progress
        self.read_threads = read_threads
        self.lookahead = lookahead
        self.measure = measure
        self.stats = Stats(budget=self.budget.limit, device=str(self.device))

    def run(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Run everything; yields Emit results, in output order."""
        limit_allocator_caching()
        threads = torch.get_num_threads()
        torch.set_num_threads(threads)  # this thread keeps its count when the compute threads set theirs to 1
        bar = Progress(self.compiled) if self.progress else None
        link = DeviceLink(self.device, self.device_budget, self.compiled.max_need) if self.device.type == "cuda" else None
        res = Resources(self.device, self.budget, self.writers, self.stats, self.read_threads, self.measure,
                        bar.advance if bar else (lambda sink: None), link)
        scheduler = Scheduler(self.compiled, res, self.lookahead)
        start = time.perf_counter()
        failed = True
        run = None
        try:
            for i in range(len(self.compiled.groups)):
                run = scheduler.take(i)
                res.raise_write_errors()
                yield from run.execute()
            res.raise_write_errors(wait=True)
            failed = False
        finally:
            if run is not None:
                run.cancel()
            scheduler.cancel()
            res.close(failed)
            torch.set_num_threads(threads)  # for threads started after this run
            if bar is not None:
                bar.close()
            self.stats.seconds = time.perf_counter() - start
            self.stats.peak_reserved_bytes = self.budget.peak
            self.stats.peak_live_bytes = res.meter.peak
            self.stats.peak_device_bytes = link.peak if link is not None else 0

    def execute(self) -> Stats:
        """Run to completion (for graphs whose sinks are all Writes)."""
        for _ in self.run():
            pass
        return self.stats
