"""The memory ledger: one set of rules for the tensor bytes a group holds, to plan and to account.

A group (the work for one output tensor) runs its nodes in order. The rules, applied node by node:

1. when the group is admitted, the values of prefetched nodes (reads started then) are alive;
2. while a node runs, what is alive plus its ``workspace_bytes`` is in use;
3. when it has run, its ``value_bytes`` are alive (a sink's value includes what it holds);
4. a value is freed as soon as its last consumer in the group has run.

The compiler runs the rules over a group's nodes without executing anything (:func:`plan_peak`),
which gives the bytes to reserve from the budget for that group; the executor drives the *same*
:class:`Ledger` while it runs the group (``before`` and ``after`` around each node) and frees the
values the ledger says are dead. So the planned peak is, by construction, the peak of the
accounting the executor does; a test checks both against measured bytes.

Held values (sinks) are released from the budget by the executor when their hand-off completes.
"""

from __future__ import annotations

import threading
from typing import Any, Iterable, Mapping


class Ledger:
    """Bytes alive while one group runs, under the rules above."""

    def __init__(self, consumers: Mapping[Any, int]):
        self.remaining = dict(consumers)  # node -> consumers that have not run yet
        self.live = 0
        self.peak = 0

    def open(self, nodes: Iterable[Any]) -> None:
        """The group is admitted: values of prefetched nodes (reads) are alive from now on."""
        self.live += sum(n.value_bytes for n in nodes if n.prefetched)
        self.peak = max(self.peak, self.live)

    def before(self, node: Any) -> None:
        """`node` is about to run: its workspace is in use on top of what is alive."""
        self.peak = max(self.peak, self.live + node.workspace_bytes)

    def after(self, node: Any) -> list[Any]:
        """`node` has run: its value is alive; returns the inputs whose last consumer it was."""
        if not node.prefetched:
            self.live += node.value_bytes
        dead = []
        for dep in node.args:
            self.remaining[dep] -= 1
            if self.remaining[dep] == 0:
                self.live -= dep.value_bytes
                dead.append(dep)
        self.peak = max(self.peak, self.live)
        return dead


def consumers(graph: Any, nodes: Iterable[Any]) -> dict[Any, int]:
    """How many nodes consume each node's value (edges of the graph)."""
    return {n: graph.out_degree(n) for n in nodes}


def plan_peak(graph: Any, nodes: list[Any]) -> int:
    """Peak bytes of running `nodes` in order: a dry run of the ledger the executor drives."""
    ledger = Ledger(consumers(graph, nodes))
    ledger.open(nodes)
    for node in nodes:
        ledger.before(node)
        ledger.after(node)
    return ledger.peak


class Budget:
    """Byte reservations under a limit, shared by the main thread and the writer thread."""

    def __init__(self, limit: int):
        self.limit = limit
        self.used = 0
        self.peak = 0
        self.broken: BaseException | None = None  # a hand-off failed: what it held is never released
        self._cv = threading.Condition()

    def acquire(self, n: int, block: bool = True) -> bool:
        with self._cv:
            while self.used + n > self.limit:
                if self.broken is not None:
                    raise self.broken
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

    def break_(self, exc: BaseException) -> None:
        """A hand-off failed (a full disk): waiting for its bytes would never end, so every wait
        raises its error instead."""
        with self._cv:
            self.broken = exc
            self._cv.notify_all()


class Meter:
    """Measured tensor bytes alive at once across threads (the real tensors, not the plan), with
    transient peaks (a method's temporaries, when measured) on top."""

    def __init__(self) -> None:
        self.live = 0
        self.peak = 0
        self._lock = threading.Lock()

    def add(self, n: int) -> None:
        with self._lock:
            self.live += n
            self.peak = max(self.peak, self.live)

    def transient(self, n: int) -> None:
        """`n` more bytes were in use for a moment (a method's workspace)."""
        with self._lock:
            self.peak = max(self.peak, self.live + n)
