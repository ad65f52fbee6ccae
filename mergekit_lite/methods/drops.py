"""DARE's and DELLA's random drops: which entries of a task vector survive a random draw, and
mergekit's L1 rescale of the survivors, gathered over a whole tensor.

- :func:`drop_and_rescale` (DARE): drop each entry with probability 1 − density.
- :func:`magprune` (DELLA): drop with a probability that falls with the entry's magnitude rank in
  its row.
- :class:`KeptNorms`: ‖τ‖₁ and ‖τ̂‖₁ over the whole tensor (the L1 rescale), before any piece of
  it is merged.

Masks are drawn on the CPU from the caller's :class:`~.draws.Draws` (entry j's draw depends on the
seed and j alone) and then moved to the tensor's device, so the same seed gives the same bits on
any device, with any thread count, and on any piece of whole rows: the engine merges these methods
tile by tile like the deterministic ones.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

from ..lazy import np, torch

from .draws import Draws
from .sparsify import Kept, l1_rescale_sums
from .spherical import acc_dtype
from .stats import Statistic, fold, gather

# Per-row ranking and float64 row sums work on blocks of about this many entries.
CHUNK = 1 << 22


def l1_rows(delta: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of `delta` (a 1-D tensor is one row): Σ|τ| and Σ|τ ⊙ mask|, accumulated in float64
    row by row (as TIES' norms are), so the sums do not depend on how the tensor was cut into
    pieces of whole rows."""
    mag = _rows(delta).abs()
    dt = acc_dtype(delta.device)
    before = mag.sum(dim=1, dtype=dt)
    return before, mag.mul_(_rows(mask)).sum(dim=1, dtype=dt)


def l1_norms(delta: torch.Tensor, mask: torch.Tensor) -> tuple[float, float]:
    """‖τ‖₁ and ‖τ ⊙ mask‖₁: the row sums of :func:`l1_rows` added in row order."""
    before, after = l1_rows(delta, mask)
    zero = torch.zeros((), dtype=before.dtype, device=before.device)
    return float(fold(zero, before)), float(fold(zero, after))


class KeptNorms(Statistic):
    """‖τ_i‖₁ and ‖τ_i ⊙ m_i‖₁ of every model over a whole tensor of `numel` entries, m_i the mask
    a random sparsifier draws (``mask(i, τ_i, draws_i)``, None when it keeps everything):
    mergekit's L1 rescale needs both before any piece is merged. Each piece draws its own entries'
    mask (position-addressed draws), and the row sums are folded in row order, so the ratio is the
    same bits however the tensor is cut.

    The masks drawn are kept, packed to a bit per entry, for the merge that follows: it draws
    nothing again (DELLA ranks every row once, not twice), whether the tensor is merged in memory
    or in row blocks after the sweep.
    """

    parallel = True

    def __init__(self, mask: Callable[[int, torch.Tensor, Draws], torch.Tensor | None], draws: list[Draws],
                 numel: int = 0):
        self.mask = mask
        self.draws = draws
        self.numel = numel
        self.sums: list[list[torch.Tensor] | None] = [None] * len(draws)
        self.masks: dict[tuple[int, int], tuple[int, Any]] = {}  # (model, offset) -> (entries, packed bits)

    def measure(self, sweep: int, tensors: list[torch.Tensor], base: torch.Tensor | None, offset: int) -> list:
        """Per model, the piece's row sums of |τ| and |τ ⊙ m| and its mask packed to bits (None:
        the model keeps everything)."""
        base32 = base.to(torch.float32)
        parts = []
        for i, t in enumerate(tensors):
            tau = t.to(torch.float32) - base32
            mask = self.mask(i, tau, self.draws[i].shifted(offset))
            parts.append(None if mask is None else (l1_rows(tau, mask), np.packbits(mask.reshape(-1).cpu().numpy())))
            del tau, mask
        return parts

    def absorb(self, sweep: int, part: list, tensors: list, base: torch.Tensor | None, offset: int) -> None:
        for i, p in enumerate(part):
            if p is None:
                continue
            self.masks[(i, offset)] = (tensors[i].numel(), p[1])
            if self.sums[i] is None:
                self.sums[i] = [torch.zeros((), dtype=r.dtype, device=r.device) for r in p[0]]
            self.sums[i] = [fold(total, r) for total, r in zip(self.sums[i], p[0])]

    def scale(self, i: int) -> float | torch.Tensor:
        """‖τ_i‖₁/‖τ̂_i‖₁ (1 when either is below 1e-7, or model i keeps everything)."""
        sums = self.sums[i]
        return 1.0 if sums is None else l1_rescale_sums(float(sums[0]), float(sums[1]))

    def kept_mask(self, i: int, offset: int, n: int) -> torch.Tensor | None:
        """Model i's mask over the n entries from `offset` on, as drawn in the sweep (bool, flat,
        on the CPU; the pieces observed there are handed over and forgotten), or None when the
        sweep did not cover exactly those pieces (the caller draws it again)."""
        bits, at = [], offset
        while at < offset + n and (got := self.masks.pop((i, at), None)) is not None:
            bits.append(np.unpackbits(got[1], count=got[0]))
            at += got[0]
        if at != offset + n:
            return None
        return torch.from_numpy(bits[0] if len(bits) == 1 else np.concatenate(bits)).view(torch.bool)

    def at(self, offset: int) -> "KeptPiece":
        return KeptPiece(self, offset)

    @property
    def state_bytes(self) -> int:
        """The L1 sums and every model's mask at a bit per entry."""
        return len(self.draws) * (16 + (self.numel + 7) // 8)

    def piece_bytes(self, piece: int) -> int:
        """The task vector and |τ|, the mask's draws and ranks (DELLA: |τ|, int64 keys, their sorted
        copy and the ranks, float32 p and the draws; measured by tests/test_memory_ledger.py)."""
        return 4 * 9 * piece


@dataclass
class KeptPiece:
    """What a piece's merge receives: the L1 ratios, and the piece's masks from the sweep."""

    norms: KeptNorms
    offset: int

    def scale(self, i: int) -> float | torch.Tensor:
        return self.norms.scale(i)

    def mask(self, i: int, shape: tuple[int, ...]) -> torch.Tensor | None:
        """Model i's mask over this piece of `shape` as drawn in the sweep, or None (draw it)."""
        n = math.prod(shape)
        mask = self.norms.kept_mask(i, self.offset, n)
        return mask.view(shape) if mask is not None else None


def whole_tensor_norms(statistic: Callable[[dict, tuple[int, ...]], KeptNorms | None], params: dict,
                       tensors: list[torch.Tensor], base: torch.Tensor) -> KeptPiece | None:
    """For a call on whole tensors (no statistic from the engine): the method's L1 statistic
    gathered here, or None when its parameters need none."""
    stat = statistic(params, tuple(base.shape))
    return gather(stat, tensors, base).at(0) if stat is not None else None


def from_norms(stats: KeptPiece | None, i: int, shape: tuple[int, ...]) -> dict:
    """What a random sparsifier takes from the L1 statistic for model i's piece: the ratio and
    the mask drawn in the sweep (nothing without a statistic)."""
    return {} if stats is None else {"l1": stats.scale(i), "mask": stats.mask(i, tuple(shape))}


def bernoulli_mask(shape: torch.Size | tuple[int, ...], p: float, draws: Draws,
                   device: torch.device | str = "cpu", dtype: torch.dtype | None = None) -> torch.Tensor:
    """Tensor whose entries are independently 1 (True) with probability `p` (u_j < p, entry j's
    uniform from `draws`), drawn on the CPU as bool or 0/1 in `dtype`, then moved to `device`."""
    return draws.bernoulli(tuple(shape), p, dtype).to(device)


def _l1_or_given(delta: torch.Tensor, mask: torch.Tensor, l1: float | torch.Tensor | None) -> float | torch.Tensor:
    """The L1 rescale: `l1` when the caller gathered it over the whole tensor, else this piece's."""
    return l1 if l1 is not None else l1_rescale_sums(*l1_norms(delta, mask))


def drop_and_rescale(delta: torch.Tensor, density: float, draws: Draws, *, rescale: bool = True,
                     mode: str = "density", l1: float | torch.Tensor | None = None,
                     mask: torch.Tensor | None = None) -> Kept | None:
    """DARE: drop each entry independently with probability 1 − density; rescale the survivors
    by 1/density (``mode="density"``, the paper's rule: E[τ̂] = τ) or by ‖τ‖₁/‖τ̂‖₁
    (``mode="l1"``, mergekit's rule; `l1` is that ratio over the whole tensor when `delta` is a
    piece of it; `mask`, the mask when it was drawn already)."""
    if density >= 1 or delta.numel() == 0:
        return None
    if mask is None:  # as 0/1 in float32 on the CPU, where a bool product costs four times more
        mask = bernoulli_mask(delta.shape, density, draws, delta.device,
                              torch.float32 if delta.device.type == "cpu" else None)
    mask = mask.to(delta.device)
    if not rescale:
        return Kept(mask)
    return Kept(mask, _l1_or_given(delta, mask, l1) if mode == "l1" else 1.0 / density)


def dare_mask(delta: torch.Tensor, density: float, draws: Draws) -> torch.Tensor | None:
    """DARE's mask of `delta` (None: every entry kept)."""
    return None if density >= 1 or delta.numel() == 0 else bernoulli_mask(delta.shape, density, draws, delta.device)


def _rows(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(t.shape[0], -1) if t.dim() >= 2 else t.reshape(1, -1)


def row_ranks(rows: torch.Tensor) -> torch.Tensor:
    """The rank of each |τ| within its row (0 = smallest; equal magnitudes ranked by position), as
    int64. On the CPU a sort of unique int64 keys (the float32 bits of |τ|, which order as integers,
    then the position) in numpy, whose vectorised sort is several times faster than torch's stable
    argsort; elsewhere torch's stable argsort. The ranks are the same."""
    m = rows.shape[1]
    mag = rows.abs()
    positions = torch.arange(m, device=rows.device).expand(rows.shape[0], m)
    if rows.device.type == "cpu":
        shift = max(1, (m - 1).bit_length())
        keys = mag.view(torch.int32).to(torch.int64).bitwise_left_shift_(shift).bitwise_or_(positions)
        order = torch.from_numpy(np.sort(keys.numpy(), axis=1)).bitwise_and_((1 << shift) - 1)
    else:
        order = torch.argsort(mag, dim=1, stable=True)
    del mag
    return torch.empty_like(order).scatter_(1, order, positions)


def magprune_keep(delta: torch.Tensor, density: float, epsilon: float, draws: Draws,
                  inverse_p: torch.Tensor | None = None) -> torch.Tensor:
    """MagPrune's draw over `delta`'s rows: a bool tensor shaped like `delta` (on the CPU), entry
    j kept when u_j < p_j (see :func:`magprune`); `inverse_p` (float32, delta's shape, on the CPU)
    receives 1/p_j where kept and 0 elsewhere. Ranks are computed on delta's device, a block of
    rows at a time."""
    rows = _rows(delta)
    n_rows, m = rows.shape
    keep = torch.empty((n_rows, m), dtype=torch.bool)
    scale = inverse_p.view(n_rows, m) if inverse_p is not None else None
    block = max(1, CHUNK // max(1, m))
    for r0 in range(0, n_rows, block):
        ranks = row_ranks(rows[r0:r0 + block]).cpu()
        if m > 1:
            p = (ranks.to(torch.float32) / (m - 1)).mul_(2 * epsilon).add_(density - epsilon)
        else:
            p = torch.full(ranks.shape, density, dtype=torch.float32)
        del ranks
        k = draws.shifted(r0 * m).keep(p)
        keep[r0:r0 + block] = k
        if scale is not None:
            scale[r0:r0 + block] = torch.where(k, 1.0 / p.clamp(min=1e-12), 0.0)
    return keep.view(delta.shape)


def magprune(delta: torch.Tensor, density: float, epsilon: float, draws: Draws, *, rescale: bool = True,
             mode: str = "l1", l1: float | torch.Tensor | None = None, mask: torch.Tensor | None = None
             ) -> Kept | None:
    """DELLA's MagPrune: within each row (a 1-D tensor is one row), rank the entries by |τ|
    (r = 0 … m−1, ties by position) and keep entry i with probability
    p_i = density − ε + 2ε·r_i/(m−1) (mean p = density; a one-entry row keeps p = density).

    Rescaling (``rescale``): ``mode="density"`` divides each survivor by its own p_i (the paper's
    1/(1 − drop probability), unbiased: E[τ̂] = τ); ``mode="l1"`` scales by ‖τ‖₁/‖τ̂‖₁ (mergekit;
    `l1` is that ratio over the whole tensor when `delta` is a piece of it; `mask`, the mask when
    it was drawn already). Ranks are computed on the tensor's device; probabilities and draws on
    the CPU.
    """
    if density >= 1 or delta.numel() == 0:
        return None
    if rescale and mode == "density":
        scale = torch.empty(delta.shape, dtype=torch.float32)
        magprune_keep(delta, density, epsilon, draws, scale)
        return Kept(None, scale.to(delta.device))
    mask = (mask if mask is not None else magprune_keep(delta, density, epsilon, draws)).to(delta.device)
    return Kept(mask, _l1_or_given(delta, mask, l1)) if rescale else Kept(mask)


def della_mask(delta: torch.Tensor, density: float, epsilon: float, draws: Draws) -> torch.Tensor | None:
    """MagPrune's mask of `delta` (None: every entry kept)."""
    if density >= 1 or delta.numel() == 0:
        return None
    return magprune_keep(delta, density, epsilon, draws).to(delta.device)
