"""The dependency graph of a merge: nodes in insertion order and their edges, no more."""

from __future__ import annotations

from typing import Any, Iterator


class Dag:
    """A directed graph of hashable nodes, in insertion order, with what the compiler, the ledger
    and the executor ask of it (edges are sets: a node listing the same input twice has one edge).
    Small on purpose: importing networkx for this cost a quarter of a second at every start."""

    def __init__(self) -> None:
        self._succ: dict[Any, dict[Any, None]] = {}
        self._pred: dict[Any, dict[Any, None]] = {}

    def add_node(self, node: Any) -> None:
        if node not in self._succ:
            self._succ[node] = {}
            self._pred[node] = {}

    def add_edge(self, a: Any, b: Any) -> None:
        self.add_node(a)
        self.add_node(b)
        self._succ[a][b] = None
        self._pred[b][a] = None

    def successors(self, node: Any) -> Iterator[Any]:
        return iter(self._succ[node])

    def predecessors(self, node: Any) -> Iterator[Any]:
        return iter(self._pred[node])

    def out_degree(self, node: Any) -> int:
        return len(self._succ[node])

    def in_degree(self, node: Any) -> int:
        return len(self._pred[node])

    def __iter__(self) -> Iterator[Any]:
        return iter(self._succ)

    def __contains__(self, node: Any) -> bool:
        return node in self._succ

    def __len__(self) -> int:
        return len(self._succ)
