"""Where each value is rounded to its dtype: the one rule, decided once at compile time.

A merge whose only consumers are sinks (Write, Emit) keeps its float32 result and the sinks round it
chunk by chunk (no rounded copy whole in memory), unless it runs in tiles, which round each tile to
the sinks' dtype as they go (the same bits). Every other merge rounds its own result. Whoever
rounds checks the values (:func:`~mergekit_lite.dtypes.check_rounded`) and clamps overflows when
asked. The ledger counts values in the dtype decided here (``held_dtype``); the writer rounds what
arrives in float32.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from .compute import Merge
from .nodes import Emit, NodeBase, Write


def decide_rounding(sinks: list[Any], graph: Any, clamp: bool = False) -> list[Any]:
    """A merge consumed only by sinks is held in float32 (sinks round it, chunk by chunk, so no
    rounded copy is ever whole in memory); every other merge rounds its result to its dtype.
    Whoever rounds (a merge, an Emit; a Write's writer) clamps overflowing values when `clamp`."""
    consumers = {node: list(graph.successors(node)) for node in graph}  # `graph`: what `sinks` need
    memo: dict[Any, Any] = {}

    def rebuild(node: Any) -> Any:
        if node not in memo:
            changes = {f.name: _rebuilt(getattr(node, f.name), rebuild) for f in dataclasses.fields(node)}
            if (isinstance(node, Merge) and node.dtype.is_floating_point
                    and all(isinstance(c, (Write, Emit)) for c in consumers[node])):
                changes["held_dtype"] = _held_for_sinks(node, consumers[node])
            if isinstance(node, (Merge, Emit)):
                changes["clamp"] = clamp
            memo[node] = dataclasses.replace(node, **changes)
        return memo[node]

    return [rebuild(s) for s in sinks]


def _held_for_sinks(node: Merge, sinks: list[Any]) -> torch.dtype:
    """A merge run in tiles rounds each tile to its sinks' dtype (when they share one): the same
    bits as rounding the float32 result later, without holding it in float32. Any other merge
    consumed only by sinks is held in float32; the sinks round it chunk by chunk."""
    dtypes = {s.dtype for s in sinks}
    if node.tiled and len(dtypes) == 1 and next(iter(dtypes)).is_floating_point:
        return dtypes.pop()
    return torch.float32 if node.dtype != torch.float32 else node.dtype


def _rebuilt(value: Any, rebuild: Any) -> Any:
    if isinstance(value, NodeBase):
        return rebuild(value)
    if isinstance(value, tuple) and value and all(isinstance(v, NodeBase) for v in value):
        return tuple(rebuild(v) for v in value)
    return value
