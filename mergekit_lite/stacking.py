"""Layer stacking in the Python API: layer ranges, :func:`stack` (frankenmerges) and upscaling.

They lower to ``slices:`` and ``depth_upscale:`` plans, exactly as a YAML plan would say them.
"""

from __future__ import annotations

from typing import Any, Sequence

from .api import Expr
from .lowering import Lowering


class LayerRange:
    """Layers [start, end) of a model, for :func:`stack`."""

    def __init__(self, expr: Expr, start: int, end: int):
        if not (isinstance(start, int) and isinstance(end, int) and 0 <= start < end):
            raise ValueError(f"a layer range is [start, end) with 0 <= start < end, got [{start}, {end})")
        self.expr, self.start, self.end = expr, start, end

    def __repr__(self) -> str:
        return f"{self.expr!r}.layers({self.start}, {self.end})"


def stack(*ranges: LayerRange | Sequence[LayerRange], method: str = "passthrough", **params: Any) -> Expr:
    """Stack layer ranges into a deeper model (a frankenmerge). Each argument is one output slice:
    a :class:`LayerRange`, or a list of ranges of equal length merged with `method`."""
    slices = []
    for r in ranges:
        group = [r] if isinstance(r, LayerRange) else list(r)
        if not group or not all(isinstance(g, LayerRange) for g in group):
            raise TypeError(f"stack() takes layer ranges such as model.layers(0, 8), got {r!r}")
        slices.append(tuple(group))
    if not slices:
        raise TypeError("stack() needs at least one layer range")
    return Stack(tuple(slices), method, params)._checked()


class Stack(Expr):
    def __init__(self, slices: tuple[tuple[LayerRange, ...], ...], method: str, params: dict):
        self.slices, self.method, self.params = slices, method, params

    def __repr__(self) -> str:
        return f"stack({', '.join(repr(s) for s in self.slices)})"

    def _leaves(self):
        for group in self.slices:
            for r in group:
                yield from r.expr._leaves()

    def _doc(self, low: "Lowering") -> dict:
        doc: dict[str, Any] = {"merge_method": self.method, "slices": [
            {"sources": [{"model": low.ref(r.expr), "layer_range": [r.start, r.end]} for r in group]}
            for group in self.slices]}
        if self.params:
            doc["parameters"] = dict(self.params)
        return doc


class Upscale(Expr):
    def __init__(self, expr: Expr, copies: int, drop: int):
        self.expr, self.copies, self.drop = expr, copies, drop

    def __repr__(self) -> str:
        return f"{self.expr!r}.upscale(copies={self.copies}, drop={self.drop})"

    def _leaves(self):
        yield from self.expr._leaves()

    def _doc(self, low: "Lowering") -> dict:
        return {"depth_upscale": {"model": low.ref(self.expr), "copies": self.copies, "drop": self.drop}}
