"""Row-block streaming: the compiler cuts a large tensor's work into blocks of rows, so that peak
memory is bounded by the block size, not by the largest tensor.

A group (the work for one output tensor) is streamed when every node in it can run on row blocks
(``split_rows``/``block`` in the node contract, :mod:`.nodes`) and its largest value has more than
``block_numel`` entries. Each block becomes a group of its own: loads of the block's rows (a row
range of a safetensors tensor is one contiguous read), the merges restricted to those rows, and
sinks that write the rows at their place. The scheduler then reads block i+1 while block i is
merged and block i−1 is written, exactly as it does for whole tensors.

A merge whose method needs a statistic (:mod:`.methods.stats`) cannot merge a block before the
statistic has seen the whole tensor: its blocks are preceded by *sweeps* of :class:`Observe`
groups (the inputs read again in each), and the last Observe's value reaches every block's merge
(a value carried across groups, :mod:`.ledger`). A tensor merged whole gathers its statistic in
the merge itself. A statistic whose scope is the model (``trim_scope: model``) is one statistic
over every tensor of its step: its sweeps run over every tensor before any of them is merged.
"""

from __future__ import annotations

from typing import Any, Iterable

from .compute import Observe, StatSource
from .dtypes import numel

BLOCK_NUMEL = 1 << 24  # entries of a block's largest value (64 MiB in float32)


def stream(sinks: list[Any], block_numel: int = BLOCK_NUMEL, context: list[Any] = ()) -> list[Any]:
    """The roots (sinks, and the Observes of statistics' sweeps) in execution order, large groups
    cut into row blocks; a group small enough, with no statistic from outside, is left as is.
    `context`: nodes of tensors not written that a statistic over a whole step must still see."""
    return _Streamer(sinks, block_numel, context).roots()


def _following(roots: Iterable[Any], group: str) -> list[Any]:
    """The nodes of `group` that `roots` cut into row blocks: reached through args that follow
    the rows (``split_args``); the others are taken whole by every block."""
    order: list[Any] = []
    seen: set[Any] = set()

    def visit(node: Any) -> None:
        if node not in seen and node.group == group:
            seen.add(node)
            for dep, follows in zip(node.args, node.split_args):
                if follows:
                    visit(dep)
            order.append(node)

    for r in roots:
        visit(r)
    return order


def _closure(roots: Iterable[Any], group: str) -> list[Any]:
    """The nodes `roots` need within `group`, dependencies first."""
    order: list[Any] = []
    seen: set[Any] = set()

    def visit(node: Any) -> None:
        if node not in seen and node.group == group:
            seen.add(node)
            for dep in node.args:
                visit(dep)
            order.append(node)

    for r in roots:
        visit(r)
    return order


def _needs_statistic(node: Any) -> Any:
    stat = getattr(node, "statistic", None)
    return stat() if callable(stat) else None


class _Streamer:
    def __init__(self, sinks: list[Any], block_numel: int, context: list[Any] = ()):
        self.sinks = sinks
        self.context = list(context)
        self.block_numel = block_numel
        self.final: dict[Any, Any] = {}  # merge -> the last Observe of its statistic's sweeps
        self.memo: dict[tuple, Any] = {}
        self.early: list[Any] = []  # roots of sweeps that must run before everything else
        self.model: dict[str, list[Any]] = {}  # step -> its merges with a model-scope statistic

    def roots(self) -> list[Any]:
        groups: dict[str, list[Any]] = {}
        for s in self.sinks:
            groups.setdefault(s.group, []).append(s)
        self._model_sweeps(groups)
        late: list[Any] = []
        for group, sinks in groups.items():
            late.extend(self._group(group, sinks))
        return self.early + late

    def blocks(self, nodes: list[Any]) -> list[tuple[int | None, int | None]]:
        """Row ranges to cut these nodes into: [(None, None)] when they stay whole."""
        rows = {n.split_rows for n in nodes}
        largest = max((numel(s.shape) for n in nodes for s in n.outputs), default=0)
        if len(rows) != 1 or None in rows or largest <= self.block_numel:
            return [(None, None)]
        total = rows.pop()
        step = max(1, total * self.block_numel // largest)
        return [(r, min(r + step, total)) for r in range(0, total, step)]

    def _group(self, group: str, sinks: list[Any]) -> list[Any]:
        nodes = _closure(sinks, group)
        blocks = self.blocks(_following(sinks, group))
        pending = [n for n in nodes if n not in self.final and _needs_statistic(n) is not None]
        if len(blocks) == 1 and not any(n in self.final for n in nodes):
            return sinks
        roots: list[Any] = []
        for node in pending if len(blocks) > 1 else ():
            roots.extend(self._sweeps(node, blocks, f"{group}#{len(roots)}"))
        for i, (first, stop) in enumerate(blocks):
            name = group if blocks == [(None, None)] else f"{group}#{i}"
            roots.extend(self.restrict(s, first, stop, name) for s in sinks)
        return roots

    def restrict(self, node: Any, first: int | None, stop: int | None, group: str) -> Any:
        """`node` over rows [first, stop) in `group`, its statistic (if it needs one gathered in
        sweeps) taken from the last Observe of those sweeps."""
        key = (node, first, group)
        if key not in self.memo:
            args = tuple(self.restrict(d, first, stop, group) if follows else self.restrict(d, None, None, group)
                         for d, follows in zip(node.args, node.split_args))
            if node in self.final:
                self.memo[key] = node.block(first, stop, args, group, stats=self.final[node])
            else:
                self.memo[key] = node.block(first, stop, args, group)
        return self.memo[key]

    def _sweeps(self, merge: Any, blocks: list[tuple[int | None, int | None]], prefix: str,
                source: StatSource | None = None, previous: Any = None, last_block: bool = True) -> list[Any]:
        """Observe groups over `merge`'s blocks, sweep after sweep; records the last one."""
        source = source or StatSource((merge,))
        roots = []
        for sweep in range(source.create().sweeps):
            for i, (first, stop) in enumerate(blocks):
                group = f"{prefix}.{sweep}.{i}"
                args = tuple(self.restrict(d, first, stop, group) if f else self.restrict(d, None, None, group)
                             for d, f in zip(merge.args, merge.split_args))
                observed = merge.block(first, stop, args, group)
                last = last_block and i == len(blocks) - 1
                previous = Observe(source, observed, sweep, last, previous, group)
                roots.append(previous)
        self.final[merge] = previous
        return roots

    def _model_sweeps(self, groups: dict[str, list[Any]]) -> None:
        """Statistics over a whole step (``scope == "model"``): one source per step, its sweeps
        over every tensor of the step, before anything else runs."""
        seen: dict[tuple[str, str], Any] = {}
        everything = list(groups.items()) + [(n.group, [n]) for n in self.context]
        for group, sinks in everything:
            for node in _closure(sinks, group):
                stat = _needs_statistic(node)
                if stat is not None and getattr(stat, "scope", "tensor") == "model":
                    key = (node.step, node.tensor)
                    self.model.setdefault(node.step, []).append(node)
                    seen.setdefault(key, node)
        for step, merges in self.model.items():
            unique = [m for m in merges if seen[(m.step, m.tensor)] is m]
            source = StatSource(tuple(unique))
            self._model_step(source, unique, merges)

    def _model_step(self, source: StatSource, unique: list[Any], every: list[Any]) -> None:
        sweeps = source.create().sweeps
        previous = None
        for sweep in range(sweeps):
            for j, merge in enumerate(unique):
                blocks = self.blocks(_following([merge], merge.group))
                if sweep == 0 and len(blocks) > 1:  # statistics of the merges feeding this one first
                    for up in _closure(merge.args, merge.group):
                        if up not in self.final and _needs_statistic(up) is not None:
                            self.early.extend(self._sweeps(up, blocks, f"{merge.group}#{merge.step}.up"))
                for i, (first, stop) in enumerate(blocks):
                    group = f"{merge.group}#{merge.step}.model.{sweep}.{i}"
                    args = tuple(self.restrict(d, first, stop, group) if f else self.restrict(d, None, None, group)
                                 for d, f in zip(merge.args, merge.split_args))
                    observed = merge.block(first, stop, args, group)
                    last = j == len(unique) - 1 and i == len(blocks) - 1
                    previous = Observe(source, observed, sweep, last, previous, group)
                    self.early.append(previous)
        for merge in every:
            self.final[merge] = previous
