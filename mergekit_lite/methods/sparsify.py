"""Sparsification steps shared by the task-vector methods: which entries of a task vector survive,
and by how much the survivors are rescaled.

Every step looks at one task vector τ (float32, on the compute device) and returns a :class:`Kept`
(or None when every entry survives unscaled). A ``Kept`` is cheap to hold (a bool mask, and a
scalar or a per-entry scale), so the methods can re-apply it in a second pass instead of holding
every sparsified task vector at once.

- :func:`trim` (TIES): keep the ``k = max(1, ⌊density·n⌋)`` entries of largest |τ|.
- :func:`trim_outliers` (Model Breadcrumbs): drop the ``⌊gamma·n⌋`` largest |τ| and the small
  tail, keeping ``k`` entries.
- DARE's and DELLA's random drops live in :mod:`.drops`.

Ties in magnitude are broken by position (the earlier entry ranks lower), so a selection is a
function of the values alone: the same on every device and in every run.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..lazy import np, torch

from .select import Cut, cuts_for, rank_window  # noqa: F401  (rank_window re-exported)

RESCALE_MODES = ("density", "l1")


@dataclass
class Kept:
    """The surviving entries of one task vector: ``τ̂ = τ ⊙ mask · scale``.

    ``mask`` is a bool tensor or 0/1 in float32 (None: every entry); ``scale`` a number, a 0-d
    tensor, or a per-entry float32 tensor (DELLA's 1/p_i, zero where dropped). A top-k trim is held as
    ``above = (v, first)`` instead of a mask: entries with |τ| > v survive, and so do those equal
    to v from local flat index ``first`` on (ties broken by position). It is applied with float
    operations only (a threshold and a copysign), several times faster than a bool mask on CPU.
    """

    mask: torch.Tensor | None = None
    scale: float | torch.Tensor = 1.0
    above: tuple[float, int] | None = None

    def apply_(self, delta: torch.Tensor) -> torch.Tensor:
        """τ̂ in place of `delta` (a float32 buffer the caller owns)."""
        if self.mask is not None:
            delta.mul_(self.mask)
        if self.above is not None:
            _keep_above_(delta, *self.above)
        if isinstance(self.scale, torch.Tensor) or self.scale != 1.0:
            delta.mul_(self.scale)
        return delta


def _keep_above_(delta: torch.Tensor, value: float, first: int) -> None:
    """Zero the entries with |τ| < v, and those equal to v before local flat index `first`: one
    hard shrinkage in place per part (|τ| > v, then |τ| > the float below v, i.e. ≥ v). Dropped
    entries become +0 where τ·0 would give −0 for a negative τ: the sums they enter all start
    from +0, so no result changes."""
    flat = delta.reshape(-1)
    first = max(0, min(first, flat.numel()))
    if first:
        torch.ops.aten.hardshrink.out(flat[:first], value, out=flat[:first])
    if first < flat.numel():
        below = float(np.nextafter(np.float32(value), np.float32(-np.inf)))
        torch.ops.aten.hardshrink.out(flat[first:], below, out=flat[first:])


def keep_count(n: int, density: float) -> int:
    """Entries a magnitude trim keeps: ⌊density·n⌋, but at least one (a tiny tensor at a low
    density keeps its largest entry instead of vanishing)."""
    return max(1, int(density * n))


_EPS32 = 1.0000000116860974e-07  # float32(1e-7): mergekit's guard, as a float32 compare sees it


def l1_rescale_sums(before: float, after: float) -> float | torch.Tensor:
    """‖τ‖₁/‖τ̂‖₁ (mergekit's rescale) from the two norms, as a float32 0-d tensor (the float32
    quotient of float32 sums: float64 division rounded once more is the same); 1 when either is
    below 1e-7."""
    if before < _EPS32 or after < _EPS32:
        return 1.0
    return torch.tensor(before / after, dtype=torch.float32)  # float32(a/b) even via float64


def trim_window(n: int, density: float) -> tuple[int, int] | None:
    """TIES: the k = max(1, ⌊density·n⌋) largest ranks; None when nothing is trimmed."""
    if density >= 1 or n == 0:
        return None
    return n - keep_count(n, density), n


def outlier_window(n: int, density: float, gamma: float) -> tuple[int, int] | None:
    """Breadcrumbs: ranks [n_bot, n_bot + k), n_bot = max(0, n − k − ⌊gamma·n⌋)."""
    if density >= 1 or n == 0:
        return None
    k = keep_count(n, density)
    n_bot = max(0, n - k - int(gamma * n))
    return n_bot, n_bot + k


def window_kept(low: Cut, high: Cut, delta: torch.Tensor, offset: int, scale: float | torch.Tensor = 1.0
                ) -> Kept | None:
    """The survivors of the piece `delta` (flat offset `offset`) in the rank window
    [low.m, high.m); None when every entry survives unscaled."""
    if high.m >= high.n:
        if low.m <= 0:
            return None if not isinstance(scale, torch.Tensor) and scale == 1.0 else Kept(None, scale)
        first = low.position - offset + 1 if low.position is not None else delta.numel()
        return Kept(None, scale, above=(low.value, first))
    mag = delta.abs()
    keep = high.lowest(mag, offset)
    if low.m > 0:
        keep &= ~low.lowest(mag, offset)
    return Kept(keep, scale)


def _trimmed(delta: torch.Tensor, window: tuple[int, int] | None, density: float, rescale: bool,
             mode: str) -> Kept | None:
    if window is None or (window[0] <= 0 and window[1] >= delta.numel()):
        return None
    low, high = cuts_for(delta.abs(), list(window))
    kept = window_kept(low, high, delta, 0)
    if not rescale:
        return kept
    if mode == "density":
        return Kept(kept.mask, 1.0 / density, kept.above)
    after = kept.apply_(delta.clone()).abs().sum()
    kept.scale = l1_rescale_sums(float(delta.abs().sum()), float(after))
    return kept


def trim(delta: torch.Tensor, density: float, *, rescale: bool = False, mode: str = "l1") -> Kept | None:
    """TIES "trim": keep the k = max(1, ⌊density·n⌋) entries of largest |τ|, zero the rest.

    With ``rescale``, survivors are scaled by ‖τ‖₁/‖τ̂‖₁ (``mode="l1"``) or 1/density
    (``mode="density"``).
    """
    return _trimmed(delta, trim_window(delta.numel(), density), density, rescale, mode)


def trim_outliers(delta: torch.Tensor, density: float, gamma: float, *, rescale: bool = False,
                  mode: str = "l1") -> Kept | None:
    """Model Breadcrumbs: drop the ⌊gamma·n⌋ largest |τ| (outliers) and the smallest, keeping
    k = max(1, ⌊density·n⌋) entries: ascending ranks [n_bot, n_bot + k) with
    n_bot = max(0, n − k − ⌊gamma·n⌋) (when outliers and density overlap, fewer outliers are
    dropped so that k entries survive, as mergekit does). At density 1 nothing is dropped.
    """
    return _trimmed(delta, outlier_window(delta.numel(), density, gamma), density, rescale, mode)
