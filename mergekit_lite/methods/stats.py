"""Per-tensor statistics of separable methods: the few numbers over a whole tensor that a method
needs before it can merge any piece of it (SLERP's dot products, TIES' magnitude thresholds).

A method is *separable* when its result at an entry depends only on the inputs at that entry (or
that row) and on such statistics. The engine then merges a large tensor in row blocks, and each
block in cache-sized tiles; a method declares in its ``register(...)`` contract whether it is
separable and which :class:`Statistic` it needs, and the engine gathers it first:

- over the whole tensor at once when the tensor is merged in memory (:func:`gather`);
- in ``sweeps`` over the tensor's blocks, in order, when the tensor is streamed (one read of the
  inputs per sweep), then ``prepare`` on each block of the merging sweep, in order.

The method then receives ``stats.at(offset)`` for the piece whose first entry has the flat index
``offset``, and uses it instead of looking at the whole tensor. A statistic is a small object: its
state (``state_bytes``) is held by the memory ledger between sweeps; observing a piece of n entries
takes ``piece_bytes(n)`` transient bytes, and gathering over a whole tensor of n entries holds
``held_bytes(n)`` more while it lasts. The engine never learns what a statistic computes.

A piece is observed in two halves: ``measure`` (the work, which must not change the statistic)
and ``absorb`` (folding the result in, in piece order). A statistic declared ``parallel`` does its
work in ``measure``, and the engine measures its pieces on every compute thread at once; the
others do everything in ``observe``, called from ``absorb`` one piece after another.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator

from ..lazy import torch

from .spherical import CHUNK, acc_dtype


class Statistic:
    """What the engine calls; subclasses compute something in ``observe`` and ``end``."""

    sweeps = 1
    parallel = False  # measure() does the work, so pieces may be measured on several threads at once

    def observe(self, sweep: int, tensors: list[torch.Tensor], base: torch.Tensor | None, offset: int) -> None:
        """Take in a piece of the inputs (the entries from flat index `offset` on); a statistic
        that does its work in :meth:`measure` (``parallel``) measures the piece and absorbs it."""
        if not self.parallel:
            raise NotImplementedError
        self.absorb(sweep, self.measure(sweep, tensors, base, offset), tensors, base, offset)

    def measure(self, sweep: int, tensors: list[torch.Tensor], base: torch.Tensor | None, offset: int) -> Any:
        """What the piece at `offset` contributes, computed without changing the statistic: the
        engine measures pieces on any thread in any order, then absorbs them in order. By default
        nothing is measured ahead: :meth:`absorb` observes the piece."""
        return None

    def absorb(self, sweep: int, part: Any, tensors: list[torch.Tensor], base: torch.Tensor | None,
               offset: int) -> None:
        """Take in a piece and what :meth:`measure` gave for it; pieces come in order."""
        self.observe(sweep, tensors, base, offset)

    def end(self, sweep: int) -> None:
        """Every piece has been observed in this sweep."""

    def prepare(self, tensors: list[torch.Tensor], base: torch.Tensor | None, offset: int) -> None:
        """Before the piece at `offset` is merged; called for the pieces in order."""

    def at(self, offset: int) -> Any:
        """What the method receives for the piece starting at flat index `offset`."""
        return self

    def gather(self, tensors: list[torch.Tensor], base: torch.Tensor | None, pieces: list | None = None,
               pool: Any = None) -> "Statistic":
        """Every sweep over inputs held whole in memory, in `pieces` (row ranges; None: one piece):
        with a `pool`, the pieces are measured on its threads and absorbed in order on one of them."""
        pieces = list(_pieces(tensors, base, pieces or [(None, None)]))

        def measure(sweep: int) -> list:
            work = [lambda p=p: self.measure(sweep, *p[2:]) for p in pieces]
            return [f.result() for f in [pool.submit(w) for w in work]] if pool is not None else [w() for w in work]

        def absorb(sweep: int, parts: list) -> None:
            for p, part in zip(pieces, parts):
                self.absorb(sweep, part, *p[2:])
            self.end(sweep)

        for sweep in range(self.sweeps):
            parts = measure(sweep)
            pool.submit(absorb, sweep, parts).result() if pool is not None else absorb(sweep, parts)
        prepare = lambda: [self.prepare(*p[2:]) for p in pieces]  # noqa: E731
        pool.submit(prepare).result() if pool is not None else prepare()
        return self

    @property
    def state_bytes(self) -> int:
        return 0

    def piece_bytes(self, piece: int) -> int:
        """Transient bytes of observing (or preparing) one piece of `piece` entries."""
        return 0

    def held_bytes(self, whole: int) -> int:
        """Bytes held while gathering over a whole tensor of `whole` entries in memory."""
        return 0


def rows(tensor: torch.Tensor | None, first: int | None, stop: int | None) -> torch.Tensor | None:
    """Rows [first, stop) of a tensor (the whole of it when first is None or it has one dimension)."""
    if tensor is None or first is None or tensor.dim() < 2:
        return tensor
    return tensor[first:stop]


def _pieces(tensors: list[torch.Tensor], base: torch.Tensor | None, pieces: list) -> Iterator[tuple]:
    """(first, stop, the tensors' rows, the base's rows, flat offset) for each row range."""
    shape = tuple((base if base is not None else tensors[0]).shape)
    row = 1
    for d in shape[1:]:
        row *= d
    for first, stop in pieces:
        yield first, stop, [rows(t, first, stop) for t in tensors], rows(base, first, stop), (first or 0) * row


def gather(stat: Statistic, tensors: list[torch.Tensor], base: torch.Tensor | None) -> Statistic:
    """`stat` over inputs held whole in memory (what a method does when called on whole tensors)."""
    return stat.gather(tensors, base)


def fold(total: torch.Tensor, parts: torch.Tensor) -> torch.Tensor:
    """total + parts[0] + parts[1] + … added one after another (a float64 cumulative sum is
    sequential), so a sum over a tensor's rows does not depend on how the rows were grouped."""
    return torch.cat([total.reshape(1), parts]).cumsum(0)[-1]


class Dots(Statistic):
    """Dot products Σ xᵢ·xⱼ of vectors formed from the inputs (``vectors(tensors, base)``), for the
    index pairs asked, in float64: each row's products summed (exact products, one row at a time,
    at most :data:`~.spherical.CHUNK` entries in float64 at once), then the row sums added in row
    order. The angle between two huge tensors stays exact to float32 rounding, and the sums are the
    same bits whether the tensor is observed whole, in row blocks or in tiles."""

    def __init__(self, vectors: Callable[[list, Any], list[torch.Tensor]], pairs: list[tuple[int, int]]):
        self.vectors = vectors
        self.pairs = pairs
        self.sums: dict[tuple[int, int], torch.Tensor] = {}

    parallel = True

    def measure(self, sweep: int, tensors: list[torch.Tensor], base: torch.Tensor | None, offset: int) -> dict:
        """Each pair's products summed per row, in float64 (the rows of the piece in order)."""
        vecs = self.vectors(tensors, base)
        rows = [v.reshape(v.shape[0], -1) if v.dim() >= 2 else v.reshape(1, -1) for v in vecs]
        dt = acc_dtype(rows[0].device)
        step = max(1, CHUNK // max(1, rows[0].shape[1]))
        parts: dict[tuple[int, int], list[torch.Tensor]] = {p: [] for p in self.pairs}
        for start in range(0, rows[0].shape[0], step):
            chunks = [r[start:start + step].to(dt) for r in rows]
            for i, j in self.pairs:
                parts[(i, j)].append((chunks[i] * chunks[j]).sum(dim=1))
        return {p: torch.cat(v) for p, v in parts.items()}

    def absorb(self, sweep: int, part: dict, tensors: list, base: torch.Tensor | None, offset: int) -> None:
        for p, row_sums in part.items():
            total = self.sums.get(p)
            if total is None:
                total = torch.zeros((), dtype=row_sums.dtype, device=row_sums.device)
            self.sums[p] = fold(total, row_sums)

    def dot(self, i: int, j: int) -> float:
        return float(self.sums[(i, j)])

    def piece_bytes(self, piece: int) -> int:
        """The float32 vectors of a piece (when formed, e.g. task vectors) and the float64 chunks."""
        return 4 * 2 * piece + 3 * 8 * min(piece, CHUNK)
