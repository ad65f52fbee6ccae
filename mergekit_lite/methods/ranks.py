"""Magnitude-rank trims of task vectors (TIES' top-k, Breadcrumbs' window) as statistics, so the
trim of a tensor merged in pieces is exactly the trim of the whole tensor.

For each model i a window [lo, hi) of ascending ranks of |τ_i| survives (τ_i = θ_i − θ_base, ties
broken by position). The two rank cuts are found by selection (:mod:`.select`), never by sorting.

- :class:`TensorTrim` (``trim_scope: tensor``, mergekit's): one window per tensor.
- :class:`ModelTrim` (``trim_scope: model``, the TIES paper's reference code): one threshold per
  task vector over every tensor of the step: v = the k-th smallest |τ| with
  k = N − ⌊density·N⌋ over all N entries, and every entry with |τ| ≥ v survives (ties at v too, as
  in the reference). Two sweeps over the whole model, then the merge; memory is the histograms.

Models are independent: a tensor held in memory resolves each model's cuts on its own (in
parallel on the engine's compute threads), from a sample of its |τ| and one counting pass.
"""

from __future__ import annotations

from typing import Any, Iterable, Iterator

from ..lazy import torch

from .select import SAMPLE, Bracketed, Cut, memory_bytes
from .sparsify import Kept, l1_rescale_sums, window_kept
from .stats import Statistic, _pieces, fold



def _task_vectors(tensors: list[torch.Tensor], base: torch.Tensor, wanted: Iterable[int]
                  ) -> Iterator[tuple[int, torch.Tensor]]:
    """(i, τ_i) in float32 for the models wanted (one buffer, reused: valid until the next)."""
    base32 = base.to(torch.float32)
    buf = None
    for i in wanted:
        buf = torch.empty_like(base32) if buf is None else buf
        yield i, buf.copy_(tensors[i]).sub_(base32)


def _row_sums(x: torch.Tensor) -> torch.Tensor:
    """Per-row sums in float64 (a 1-D tensor is one row), on the CPU."""
    rows = x.reshape(x.shape[0], -1) if x.dim() >= 2 else x.reshape(1, -1)
    return rows.sum(dim=1, dtype=torch.float64).cpu()


def _sample(tensor: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """|τ| over rows spread evenly through the tensor (about SAMPLE entries), float32."""
    if tensor.dim() < 2 or tensor.numel() <= SAMPLE:
        return (tensor.to(torch.float32) - base.to(torch.float32)).abs_().reshape(-1)
    step = max(1, tensor.shape[0] * (tensor.numel() // tensor.shape[0]) // SAMPLE)
    return (tensor[::step].to(torch.float32) - base[::step].to(torch.float32)).abs_().reshape(-1)


class _Trim(Statistic):
    """Cuts per model (a tuple of :class:`Cut`, or None for a model that is not trimmed)."""

    cuts: list[tuple[Cut, ...] | None]
    sweeps = 2

    def models(self) -> list[int]:
        return [i for i, c in enumerate(self.cuts) if c is not None]

    def observe(self, sweep: int, tensors: list[torch.Tensor], base: torch.Tensor | None, offset: int) -> None:
        self.observe_models(sweep, tensors, base, offset, self.models())

    def observe_models(self, sweep: int, tensors: list, base: torch.Tensor, offset: int, models: list[int]) -> None:
        for i, tau in _task_vectors(tensors, base, models):
            mag = tau.abs_()
            for cut in self.cuts[i]:
                cut.observe(sweep, mag)

    def end(self, sweep: int, models: list[int] | None = None) -> None:
        for i in self.models() if models is None else models:
            for cut in self.cuts[i] if sweep < 2 else ():
                cut.end(sweep)

    def gather(self, tensors: list[torch.Tensor], base: torch.Tensor | None, pieces: list | None = None,
               pool: Any = None) -> "_Trim":
        """Over tensors in memory, model by model (on `pool`'s threads when given)."""
        pieces = pieces or [(None, None)]
        work = [(i, tensors, base, pieces) for i in self.models()]
        list(pool.map(lambda w: self.gather_model(*w), work)) if pool is not None else [self.gather_model(*w)
                                                                                         for w in work]
        return self

    def gather_model(self, i: int, tensors: list, base: torch.Tensor, pieces: list) -> None:
        """Model i's cuts over inputs in memory: the sweeps, then the positions."""
        for sweep in range(self.sweeps):
            for _, _, ins, b, offset in _pieces(tensors, base, pieces):
                self.observe_models(sweep, ins, b, offset, [i])
            self.end(sweep, [i])
        for _, _, ins, b, offset in _pieces(tensors, base, pieces):
            self.prepare_models(ins, b, offset, [i])

    def prepare_models(self, tensors: list, base: torch.Tensor, offset: int, models: list[int]) -> None:
        """Locate the cuts' positions (pieces come in order); a no-op once they are known."""
        todo = [i for i in models if any(not c.trivial and c.position is None for c in self.cuts[i])]
        for i, tau in _task_vectors(tensors, base, todo):
            mag = tau.abs_()
            for cut in self.cuts[i]:
                cut.locate(mag, offset)

    def prepare(self, tensors: list[torch.Tensor], base: torch.Tensor | None, offset: int) -> None:
        self.prepare_models(tensors, base, offset, self.models())

    def at(self, offset: int) -> "_At":
        return _At(self, offset)

    @property
    def state_bytes(self) -> int:
        return 3 * 8 * (1 << 15) * sum(len(c) for c in self.cuts if c)  # a cut's histograms

    def piece_bytes(self, piece: int) -> int:
        """The upcast base, a task vector, its magnitudes and masks; a histogram's counts."""
        return 4 * 4 * piece + 8 * (1 << 16)

    def held_bytes(self, whole: int) -> int:
        """Each non-trivial cut's sample and the entries kept inside its bracket."""
        return sum(memory_bytes(c.n) for cuts in self.cuts if cuts for c in cuts if not c.trivial)


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

    def observe_models(self, sweep: int, tensors: list, base: torch.Tensor, offset: int, models: list[int]) -> None:
        if sweep < 2:
            return super().observe_models(sweep, tensors, base, offset, models)
        for i, tau in _task_vectors(tensors, base, models):
            mag = tau.abs()
            for cut in self.cuts[i]:
                cut.locate(mag, offset)
            self.norms[i][0] = fold(self.norms[i][0], _row_sums(mag))
            kept = window_kept(*self.cuts[i], tau, offset)
            self.norms[i][1] = fold(self.norms[i][1], _row_sums((kept.apply_(tau) if kept else tau).abs_()))

    def gather(self, tensors: list[torch.Tensor], base: torch.Tensor | None, pieces: list | None = None,
               pool: Any = None) -> "TensorTrim":
        """Over tensors in memory: one counting pass per model, bracketed by a sample of its |τ|
        (pieces spread over `pool`'s threads, each forming the upcast base once for every model);
        the sweeps for a model whose bracket missed; the norms for the l1 rescale."""
        pieces = pieces or [(None, None)]
        models = self.models()
        each = pool.map if pool is not None else map  # models are independent: one per thread
        passes = dict(each(lambda i: (i, Bracketed(list(self.cuts[i]), _sample(tensors[i], base))), models))

        def piece(first: int | None, stop: int | None) -> None:
            for _, _, ins, b, offset in _pieces(tensors, base, [(first, stop)]):
                for i, tau in _task_vectors(ins, b, models):
                    passes[i].feed(offset, tau.abs_())

        list(each(lambda p: piece(*p), pieces))
        finished = dict(each(lambda i: (i, passes[i].finish()), models))
        for i in models:
            if not finished[i]:
                super().gather_model(i, tensors, base, pieces)
            if self.mode == "l1":
                for _, _, ins, b, offset in _pieces(tensors, base, pieces):
                    self.observe_models(2, ins, b, offset, [i])
        return self

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

    def prepare_models(self, tensors: list, base: torch.Tensor, offset: int, models: list[int]) -> None:
        pass  # |τ| ≥ v survives whatever its position: nothing to locate

    def kept(self, i: int, delta: torch.Tensor, offset: int) -> Kept | None:
        if self.cuts[i] is None or self.cuts[i][0].trivial:
            return None
        scale = 1.0 / self.densities[i] if self.rescale else 1.0
        return Kept(None, scale, above=(self.cuts[i][0].value, 0))  # |τ| ≥ v: ties at the threshold survive
