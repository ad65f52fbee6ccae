"""The memory ledger: one set of rules for the tensor bytes a group holds, to plan and to account.

A group (the work for one output tensor) runs its nodes in order. The rules, applied node by node:

1. when the group is admitted, the values of prefetched nodes (reads started then) are alive, and
   so are the values it receives from earlier groups (*carried in*);
2. while a node runs, what is alive plus its ``workspace_bytes`` is in use;
3. when it has run, its ``value_bytes`` are alive (a sink's value includes what it holds);
4. a value is freed as soon as its last consumer in the group has run, unless a later group
   consumes it too (it is *carried out*: alive until that group frees it).

Values cross groups only for statistics gathered in sweeps over a tensor's row blocks (the
statistic passes from block to block and reaches every block's merge); everything else a group
needs is read in that group.

The compiler runs the rules over a group's nodes without executing anything (:func:`plan_peak`),
which gives the bytes to reserve from the budget for that group; the executor drives the *same*
:class:`Ledger` while it runs the group (``before`` and ``after`` around each node) and frees the
values the ledger says are dead. So the planned peak is, by construction, the peak of the
accounting the executor does; a test checks both against measured bytes.

Held values (sinks) are released from the budget by the executor when their hand-off completes.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any, Iterable, Mapping


@dataclass(frozen=True)
class GroupView:
    """What the rules need to know about one group in its graph."""

    consumers: dict  # node (of the group, or carried in) -> its consumers in the group
    carried_in: frozenset  # values from earlier groups that this group consumes
    carried_out: frozenset  # values alive here that later groups consume


def group_view(graph: Any, nodes: Iterable[Any], order: Mapping[str, int]) -> GroupView:
    """The consumers and carried values of the group of `nodes` (``order``: group -> position)."""
    nodes = list(nodes)
    here = set(nodes)
    index = order[nodes[0].group] if nodes else 0
    carried_in = frozenset(d for n in nodes for d in n.args if d not in here)
    consumers, out = {}, set()
    for n in nodes + list(carried_in):
        succ = list(graph.successors(n))
        consumers[n] = sum(1 for s in succ if s in here)
        if any(order[s.group] > index for s in succ):
            out.add(n)
    return GroupView(consumers, carried_in, frozenset(out))


class Ledger:
    """Bytes alive while one group runs, under the rules above."""

    def __init__(self, consumers: Mapping[Any, int], carried_out: Iterable[Any] = ()):
        self.remaining = dict(consumers)  # node -> consumers that have not run yet
        self.carried_out = frozenset(carried_out)
        self.live = 0
        self.peak = 0

    def open(self, nodes: Iterable[Any], carried_in: Iterable[Any] = ()) -> None:
        """The group is admitted: values of prefetched nodes (reads) are alive from now on, and so
        are the values carried in from earlier groups."""
        self.live += sum(n.value_bytes for n in nodes if n.prefetched)
        self.live += sum(n.value_bytes for n in carried_in)
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
            if self.remaining[dep] == 0 and dep not in self.carried_out:
                self.live -= dep.value_bytes
                dead.append(dep)
        self.peak = max(self.peak, self.live)
        return dead


def plan_peak(graph: Any, nodes: list[Any], order: Mapping[str, int]) -> int:
    """Peak bytes of running `nodes` in order: a dry run of the ledger the executor drives."""
    view = group_view(graph, nodes, order)
    ledger = Ledger(view.consumers, view.carried_out)
    ledger.open(nodes, view.carried_in)
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
