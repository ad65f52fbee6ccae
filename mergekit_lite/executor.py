"""Runs a compiled graph: streaming, tensor by tensor, under a memory budget.

Groups (one per output tensor) run in order. Before a group's tensors are read, the bytes it can
need at its peak (its loads, intermediate results, the method's float32 workspace, a cast copy for
writing) are reserved from the budget; the reservation is returned when the group's results are
written. Groups further ahead are admitted while the budget allows, so their tensors are read by
background threads while the current group computes: reading overlaps computing, and what is
alive never exceeds the budget. Each value is freed right after its last consumer.

The executor knows nothing of a method's math: it moves inputs to the device, calls the registered
function, rounds the float32 result to the step's dtype, and hands it on.
"""

from __future__ import annotations

import ctypes
import sys
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch

from . import methods
from .errors import BudgetExceeded, MergeError
from .graph import Compiled, Emit, Load, Merge, Write, inputs_of
from .io.reader import TensorReader
from .io.writer import human_size


def pick_device(name: str | None) -> torch.device:
    """'auto' (cuda when available), 'cpu', 'cuda' or 'cuda:N'."""
    name = (name or "auto").lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise MergeError(f"--device {name}: CUDA is not available on this machine (torch {torch.__version__}); "
                         "use --device cpu or auto")
    try:
        return torch.device(name)
    except RuntimeError:
        raise MergeError(f"--device {name}: expected auto, cpu, cuda or cuda:N") from None


def limit_allocator_caching() -> None:
    """Ask glibc to return freed tensor memory to the OS at once (M_MMAP_THRESHOLD = 1 MiB).

    Without it glibc raises its mmap threshold after the first large free and keeps later
    tensor-sized blocks in the heap, so RSS grows with model size instead of tensor size.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, 1 << 20)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):  # not glibc
        pass


def all_finite(tensor: torch.Tensor) -> bool:
    """No inf/NaN. An inf or NaN entry makes the sum inf or NaN, so a finite sum settles it in one
    cheap pass; only a non-finite sum (which finite entries could also give, by overflow) is
    checked entry by entry, in chunks so the boolean mask stays small."""
    if tensor.numel() == 0 or bool(torch.isfinite(tensor.sum())):
        return True
    flat = tensor.reshape(-1)
    return all(bool(torch.isfinite(chunk).all()) for chunk in flat.split(1 << 22))


class Budget:
    """Byte reservations under a limit, shared by the main thread and the writer thread."""

    def __init__(self, limit: int):
        self.limit = limit
        self.used = 0
        self.peak = 0
        self._cv = threading.Condition()

    def acquire(self, n: int, block: bool = True) -> bool:
        with self._cv:
            while self.used + n > self.limit:
                if not block:
                    return False
                self._cv.wait(0.1)
            self.used += n
            self.peak = max(self.peak, self.used)
            return True

    def release(self, n: int) -> None:
        with self._cv:
            self.used -= n
            self._cv.notify_all()


@dataclass
class Stats:
    """What a run did; ``peak_live_bytes`` is the most tensor bytes alive at once."""

    tensors: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    seconds: float = 0.0
    peak_live_bytes: int = 0
    peak_reserved_bytes: int = 0
    budget: int = 0
    device: str = "cpu"
    _live: int = field(default=0, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def alive(self, n: int) -> None:
        with self._lock:
            self._live += n
            self.peak_live_bytes = max(self.peak_live_bytes, self._live)

    @property
    def throughput(self) -> float:
        """Bytes merged (written) per second."""
        return self.bytes_written / self.seconds if self.seconds > 0 else 0.0


def auto_budget(compiled: Compiled) -> int:
    """Default budget: the largest step's need plus room to read ahead (half the largest
    float32 tensor, at least 64 MiB)."""
    return compiled.max_need + max(64 << 20, compiled.largest_input_f32 // 2)


def check_budget(compiled: Compiled, budget: int) -> None:
    need = compiled.max_need
    if need > budget:
        worst = compiled.groups[compiled.needs.index(need)][0]
        raise BudgetExceeded(f"--max-memory {human_size(budget)} is too small: merging tensor {worst} alone needs "
                             f"{human_size(need)} (its inputs, the method's float32 workspace and the result); "
                             f"raise --max-memory to at least {human_size(need)}")


class Executor:
    """Executes `compiled` on `device` within `budget` bytes.

    `writers` maps an output key (``""`` for the main output, a folder for a step's ``save:``) to
    an object with ``write(name, tensor)``. :meth:`run` yields ``(name, tensor)`` for Emit sinks.
    """

    def __init__(self, compiled: Compiled, *, device: str | torch.device | None = "auto", budget: int | None = None,
                 writers: dict[str, Any] | None = None, progress: bool = False, read_threads: int = 2,
                 lookahead: int = 64):
        self.compiled = compiled
        self.device = device if isinstance(device, torch.device) else pick_device(device)
        self.budget = Budget(budget if budget is not None else auto_budget(compiled))
        check_budget(compiled, self.budget.limit)
        self.writers = writers or {}
        self.progress = progress
        self.read_threads = read_threads
        self.lookahead = lookahead
        self.reader = TensorReader()
        self.stats = Stats(budget=self.budget.limit, device=str(self.device))

    # -- node execution ----------------------------------------------------------------------
    def _load(self, node: Load) -> torch.Tensor:
        tensor = self.reader.read(node.file, node.offset, node.shape, node.dtype)
        self.stats.alive(node.nbytes)
        with self.stats._lock:
            self.stats.bytes_read += node.nbytes
        return tensor

    def _merge(self, node: Merge, values: dict) -> torch.Tensor:
        method = methods.get(node.method)
        dev = self.device
        tensors = [values[n].to(dev, non_blocking=True) for n in node.inputs]
        base = values[node.base].to(dev, non_blocking=True) if node.base is not None else None
        kwargs: dict[str, Any] = {}
        for name, value in node.params:
            kwargs[method.param(name).pyname] = value
        for name, vals in node.model_params:
            kwargs[method.param(name).pyname] = list(vals)
        if method.random:
            kwargs["generators"] = [torch.Generator(device="cpu").manual_seed(s) for s in node.seeds]
        try:
            result = method.fn(tensors, base, **kwargs)
        except MergeError:
            raise
        except (ValueError, RuntimeError) as exc:
            where = f" (step '{node.step}')" if node.step else ""
            raise MergeError(f"merging tensor {node.tensor}{where} with '{node.method}' failed: {exc}") from exc
        del tensors, base
        if tuple(result.shape) != node.shape:
            raise RuntimeError(f"method {node.method} returned shape {tuple(result.shape)} for {node.tensor}, "
                               f"expected {node.shape}")
        if not all_finite(result):
            raise MergeError(f"merging tensor {node.tensor} with '{node.method}' produced inf or NaN; "
                             "check the inputs and the parameters for this tensor")
        # round to the step's dtype now, unless only sinks consume it (they round it themselves)
        out = result if node in self.compiled.keep_f32 else result.to(node.dtype)
        del result
        if out.device.type != "cpu":
            out = out.to("cpu")
        self.stats.alive(self.compiled.value_bytes(node))
        return out

    # -- scheduling --------------------------------------------------------------------------
    def run(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Run everything; yields Emit results, in output order."""
        limit_allocator_caching()
        groups = self.compiled.groups
        graph = self.compiled.graph
        needs = self.compiled.needs
        total_bytes = sum(s.nbytes for _, nodes in groups for s in nodes if isinstance(s, (Write, Emit)))
        n_sinks = sum(1 for _, nodes in groups for s in nodes if isinstance(s, (Write, Emit)))
        bar = None
        if self.progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc="merging", dynamic_ncols=True)
        start = time.perf_counter()
        readers = ThreadPoolExecutor(max_workers=self.read_threads, thread_name_prefix="mkl-read")
        writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mkl-write")
        loads: dict[Load, Future] = {}
        pending_writes: list[Future] = []
        admitted = 0
        done_sinks = 0
        errors: list[BaseException] = []

        def admit(i: int, block: bool) -> bool:
            if not self.budget.acquire(needs[i], block=block):
                return False
            for node in groups[i][1]:
                if isinstance(node, Load) and node not in loads:
                    loads[node] = readers.submit(self._load, node)
            return True

        def finish_sink(sink, value_bytes: int, release: int):
            nonlocal done_sinks
            self.stats.alive(-value_bytes)
            with self.stats._lock:
                self.stats.bytes_written += sink.nbytes
                self.stats.tensors += 1
            if release:
                self.budget.release(release)
            done_sinks += 1
            if bar is not None:
                bar.update(sink.nbytes)
                bar.set_postfix_str(f"{done_sinks}/{n_sinks} tensors", refresh=False)

        try:
            for i, (group, nodes) in enumerate(groups):
                while admitted <= i:
                    admit(admitted, block=True)
                    admitted += 1
                while admitted < len(groups) and admitted - i < self.lookahead and admit(admitted, block=False):
                    admitted += 1
                for err in (f.exception() for f in pending_writes if f.done()):
                    if err is not None:
                        raise err
                pending_writes = [f for f in pending_writes if not f.done()]

                values: dict[Any, torch.Tensor] = {}
                remaining = {n: graph.out_degree(n) for n in nodes}
                sinks_left = sum(1 for n in nodes if isinstance(n, (Write, Emit)))
                release_left = needs[i]

                def free_inputs(node):
                    for dep in inputs_of(node):
                        remaining[dep] -= 1
                        if remaining[dep] == 0:
                            values.pop(dep, None)
                            self.stats.alive(-self.compiled.value_bytes(dep))

                for node in nodes:
                    if isinstance(node, Load):
                        values[node] = loads.pop(node).result()
                    elif isinstance(node, Merge):
                        values[node] = self._merge(node, values)
                        free_inputs(node)
                    else:
                        value = values[node.value]
                        extra = 0
                        if isinstance(node, Emit) and value.dtype != node.dtype:
                            value = value.to(node.dtype)  # a Write rounds chunk by chunk instead
                            self.stats.alive(node.nbytes)
                            extra = node.nbytes
                        # the sink keeps its own reference; account its bytes until it is written
                        held = extra + self.compiled.value_bytes(node.value)
                        self.stats.alive(self.compiled.value_bytes(node.value))
                        free_inputs(node)
                        sinks_left -= 1
                        release = release_left if sinks_left == 0 else 0
                        if sinks_left == 0:
                            release_left = 0
                        if isinstance(node, Emit):
                            yield node.tensor, value
                            finish_sink(node, held, release)
                        else:
                            target = self.writers[node.output]

                            def do_write(target=target, node=node, value=value, held=held, release=release):
                                target.write(node.tensor, value)
                                finish_sink(node, held, release)

                            pending_writes.append(writer.submit(do_write))
                        del value
                if release_left:
                    self.budget.release(release_left)
            for f in pending_writes:
                f.result()
        except BaseException as exc:
            errors.append(exc)
            raise
        finally:
            for f in loads.values():
                f.cancel()
            readers.shutdown(wait=True, cancel_futures=True)
            writer.shutdown(wait=True, cancel_futures=bool(errors))
            self.reader.close()
            if bar is not None:
                bar.close()
            self.stats.seconds = time.perf_counter() - start
            self.stats.peak_reserved_bytes = self.budget.peak

    def execute(self) -> Stats:
        """Run to completion (for graphs whose sinks are all Writes)."""
        for _ in self.run():
            pass
        return self.stats
