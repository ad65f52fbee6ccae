"""What a run reports while it runs and when it ends: :class:`Stats` (bytes, tensors, peaks, each
group's peak three ways) and the progress bar. Kept apart from the executor, which only fills them."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any


@dataclass
class GroupPeak:
    """One group's peak three ways: planned at compile time, accounted by the ledger while running,
    and measured on the real tensors (with method temporaries when the run measures them)."""

    group: str
    planned: int
    accounted: int
    measured: int


@dataclass
class Stats:
    """What a run did; ``peak_live_bytes`` is the most tensor bytes measured alive at once."""

    tensors: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    seconds: float = 0.0
    peak_live_bytes: int = 0
    peak_reserved_bytes: int = 0
    peak_device_bytes: int = 0  # CUDA: the most device memory allocated at once
    budget: int = 0
    device: str = "cpu"
    groups: list[GroupPeak] = field(default_factory=list, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def count(self, read: int = 0, written: int = 0, tensors: int = 0) -> None:
        with self._lock:
            self.bytes_read += read
            self.bytes_written += written
            self.tensors += tensors

    @property
    def throughput(self) -> float:
        """Bytes merged (written) per second."""
        return self.bytes_written / self.seconds if self.seconds > 0 else 0.0


class Progress:
    """A tqdm bar over the bytes the sinks hand off."""

    def __init__(self, compiled: Any):
        from tqdm.auto import tqdm

        sinks = [n for _, nodes in compiled.groups for n in nodes if n.holds]
        self.total = sum(s.last for s in sinks)
        self.done = 0
        self.bar = tqdm(total=sum(s.nbytes for s in sinks), unit="B", unit_scale=True, desc="merging",
                        dynamic_ncols=True)
        self._lock = threading.Lock()

    def advance(self, sink: Any) -> None:
        with self._lock:
            self.done += sink.last
            self.bar.update(sink.nbytes)
            self.bar.set_postfix_str(f"{self.done}/{self.total} tensors", refresh=False)

    def close(self) -> None:
        self.bar.close()
