"""Magnitude-rank trims of task vectors (TIES' top-k, Breadcrumbs' window) as statistics, so the
trim of a tensor merged in pieces is exactly the trim of the whole tensor.

For each model i a window [lo, hi) of ascending ranks of |τ_i| survives (τ_i = θ_i − θ_base, ties
broken by position). The two rank cuts are found by selection (:mod:`.select`), never by sorting.

- :class:`TensorTrim` (``trim_scope: tensor``, mergekit's): one window per tensor.
- :class:`ModelTrim` (``trim_scope: model``, the TIES paper's reference code): one threshold per
  task vector over every tensor of the step: v = the k-th smallest |τ| with
  k = N − ⌊density·N⌋ over all N entries, and every entry with |τ| ≥ v survives (ties at v too, as
  in the reference). Two sweeps over the whole model, then the merge; memory is the histograms.
"""

from __future__ import annotations

from typing import Iterator

import torch

from .select import Cut
from .sparsify import Kept, l1_rescale_sums, window_kept
from .stats import Statistic, fold

def _task_vectors(tensors: list[torch.Tensor], base: torch.Tensor, wanted: list[bool]
                  ) -> Iterator[tuple[int, torch.Tensor]]:
    base32 = base.to(torch.float32)
    buf = None
    for i, t in enumerate(tensors):
        if wanted[i]:
            buf = torch.empty_like(base32) if buf is None else buf
            yield i, buf.copy_(t).sub_(base32)


def _row_sums(x: torch.Tensor) -> torch.Tensor:
    """Per-row sums in float64 (a 1-D tensor is one row), on the CPU."""
    rows = x.reshape(x.shape[0], -1) if x.dim() >= 2 else x.reshape(1, -1)
    return rows.sum(dim=1, dtype=torch.float64).cpu()


class _Trim(Statistic):
    """Cuts per model (a tuple of :class:`Cut`, or None for a model that is not trimmed)."""

    cuts: list[tuple[Cut, ...] | None]
    only: int | None = None  # while gathering one model at a time

    def _wanted(self) -> list[bool]:
        return [c is not None and self.only in (None, i) for i, c in enumerate(self.cuts)]

    def gather(self, tensors: list[torch.Tensor], base: torch.Tensor | None) -> "_Trim":
        """Over whole tensors, one model after the other: one model's histograms alive at a time."""
        for self.only in range(len(self.cuts)):
            Statistic.gather(self, tensors, base)
        self.only = None
        return self

    def end(self, sweep: int) -> None:
        for i, cuts in enumerate(self.cuts):
            for cut in cuts if self._wanted()[i] and sweep < 2 else ():
                cut.end(sweep)

    def at(self, offset: int) -> "_At":
        return _At(self, offset)

    @property
    def state_bytes(self) -> int:
        return 3 * 8 * (1 << 15) * sum(len(c) for c in self.cuts if c)  # a cut's histograms

    def gather_bytes(self, numel: int) -> int:
        return 4 * 4 * numel  # the upcast base, a task vector, its magnitudes, masks


class _At:
    """A trim statistic seen from one piece (what the method receives)."""

    def __init__(self, stat: "_Trim", offset: int):
        self.stat, self.offset = stat, offset

    def kept(self, i: int, delta: torch.Tensor) -> Kept | None:
        return self.stat.kept(i, delta, self.offset)


class TensorTrim(_Trim):
    """Per model: the rank window's two cuts, and with ``rescale_mode: l1`` the norms (a third
    sweep, once the cuts are known)."""

    def __init__(self, windows: list[tuple[int, int] | None], n: int, scale: str | None, densities: list[float]):
        self.cuts = [(Cut(w[0], n), Cut(w[1], n)) if w else None for w in windows]
        self.mode = scale  # None, "density" or "l1"
        self.densities = densities
        self.sweeps = 3 if scale == "l1" else 2
        self.norms = [[torch.zeros((), dtype=torch.float64)] * 2 for _ in windows]

    def observe(self, sweep: int, tensors: list[torch.Tensor], base: torch.Tensor | None, offset: int) -> None:
        for i, tau in _task_vectors(tensors, base, self._wanted()):
            mag = tau.abs()
            if sweep < 2:
                for cut in self.cuts[i]:
                    cut.observe(sweep, mag)
                continue
            for cut in self.cuts[i]:
                cut.locate(mag, offset)
            self.norms[i][0] = fold(self.norms[i][0], _row_sums(mag))
            kept = window_kept(*self.cuts[i], tau, offset)
            self.norms[i][1] = fold(self.norms[i][1], _row_sums((kept.apply_(tau) if kept else tau).abs_()))

    def _unlocated(self) -> list[bool]:
        return [w and any(not c.trivial and c.position is None for c in self.cuts[i])
                for i, w in enumerate(self._wanted())]

    def prepare(self, tensors: list[torch.Tensor], base: torch.Tensor | None, offset: int) -> None:
        """Locate the cuts' positions (pieces come in order); a no-op once they are known."""
        for i, tau in _task_vectors(tensors, base, self._unlocated()):
            mag = tau.abs()
            for cut in self.cuts[i]:
                cut.locate(mag, offset)

    def scale(self, i: int) -> float | torch.Tensor:
        if self.mode == "density":
            return 1.0 / self.densities[i]
        if self.mode == "l1":
            return l1_rescale_sums(*(float(x) for x in self.norms[i]))
        return 1.0

    def kept(self, i: int, delta: torch.Tensor, offset: int) -> Kept | None:
        return None if self.cuts[i] is None else window_kept(*self.cuts[i], delta, offset, self.scale(i))


class ModelTrim(_Trim):
    """Per model, one threshold over every tensor of the step (``trim_scope: model``); survivors
    are rescaled by 1/density with ``rescale``."""

    scope = "model"
    sweeps = 2

    def __init__(self, n: int, densities: list[float], rescale: bool = False):
        self.n, self.densities, self.rescale = n, list(densities), rescale
        # the threshold is the k-th smallest |τ|, k = N − ⌊d·N⌋ (with at least one entry surviving)
        self.cuts = [(Cut(n - max(1, int(d * n)), n),) if d < 1 else None for d in densities]

    @classmethod
    def joint(cls, parts: list["ModelTrim"]) -> "ModelTrim":
        """One statistic for the tensors whose parts are given (their entries add up)."""
        first = parts[0]
        for p in parts[1:]:
            if p.densities != first.densities:
                raise ValueError(f"trim_scope: model trims each task vector over the whole model, so every "
                                 f"tensor needs the same density per model; got {first.densities} and {p.densities}")
        return cls(sum(p.n for p in parts), first.densities, first.rescale)

    def observe(self, sweep: int, tensors: list[torch.Tensor], base: torch.Tensor | None, offset: int) -> None:
        for i, tau in _task_vectors(tensors, base, self._wanted()):
            self.cuts[i][0].observe(sweep, tau.abs_())

    def kept(self, i: int, delta: torch.Tensor, offset: int) -> Kept | None:
        if self.cuts[i] is None or self.cuts[i][0].trivial:
            return None
        scale = 1.0 / self.densities[i] if self.rescale else 1.0
        return Kept(None, scale, above=(self.cuts[i][0].value, 0))  # |τ| ≥ v: ties at the threshold survive
