"""Sparsification steps shared by the task-vector methods: which entries of a task vector survive,
and by how much the survivors are rescaled.

Every step looks at one task vector τ (float32, on the compute device) and returns a :class:`Kept`
(or None when every entry survives unscaled). A ``Kept`` is cheap to hold (a bool mask, and a
scalar or a per-entry scale), so the methods can re-apply it in a second pass instead of holding
every sparsified task vector at once.

- :func:`trim` (TIES): keep the ``k = max(1, ⌊density·n⌋)`` entries of largest |τ|.
- :func:`trim_outliers` (Model Breadcrumbs): drop the ``⌊gamma·n⌋`` largest |τ| and the small
  tail, keeping ``k`` entries.
- :func:`drop_and_rescale` (DARE): drop each entry with probability 1 − density.
- :func:`magprune` (DELLA): drop with a probability that falls with the entry's magnitude rank.

Ties in magnitude are broken by position (the earlier entry ranks lower), so a selection is a
function of the values alone: the same on every device and in every run. Random masks are drawn
on the CPU from the caller's ``torch.Generator`` in fixed-size chunks (a function of the tensor's
shape only) and then moved to the tensor's device, so the same seed gives the same bits on any
device and with any thread count.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..lazy import torch

# Random draws and per-row ranking work on blocks of about this many entries (fixed: the bits
# drawn must depend on the tensor's shape only).
CHUNK = 1 << 22

RESCALE_MODES = ("density", "l1")


@dataclass
class Kept:
    """The surviving entries of one task vector: ``τ̂ = τ ⊙ mask · scale``.

    ``mask`` is a bool tensor (None: every entry); ``scale`` a number, a 0-d tensor, or a
    per-entry float32 tensor (DELLA's 1/p_i, zero where dropped).
    """

    mask: torch.Tensor | None = None
    scale: float | torch.Tensor = 1.0

    def apply_(self, delta: torch.Tensor) -> torch.Tensor:
        """τ̂ in place of `delta` (a float32 buffer the caller owns)."""
        if self.mask is not None:
            delta.mul_(self.mask)
        if isinstance(self.scale, torch.Tensor) or self.scale != 1.0:
            delta.mul_(self.scale)
        return delta


def keep_count(n: int, density: float) -> int:
    """Entries a magnitude trim keeps: ⌊density·n⌋, but at least one (a tiny tensor at a low
    density keeps its largest entry instead of vanishing)."""
    return max(1, int(density * n))


def _lowest(score: torch.Tensor, k: int) -> torch.Tensor:
    """Bool mask of the `k` lowest-ranked entries of the flat `score` (0 < k < n); among equal
    values the earlier position ranks lower."""
    v = torch.kthvalue(score, k).values
    below = score < v
    eq = score == v
    need = k - int(below.sum())
    n_eq = int(eq.sum())
    if need < n_eq:  # ties straddle the boundary: take the first `need` of them
        idx_dtype = torch.int32 if score.numel() < 2**31 else torch.int64
        eq &= torch.cumsum(eq, 0, dtype=idx_dtype) <= need
    return below.logical_or_(eq)


def rank_window(score: torch.Tensor, lo: int, hi: int) -> torch.Tensor | None:
    """Bool mask (shape of `score`) of the entries whose ascending rank r satisfies lo ≤ r < hi;
    None when that is every entry. Ties are ranked by position."""
    n = score.numel()
    lo, hi = max(0, lo), min(n, hi)
    if lo == 0 and hi == n:
        return None
    flat = score.reshape(-1)
    keep = torch.ones(n, dtype=torch.bool, device=score.device)
    if hi < n:
        keep = _lowest(flat, hi) if hi > 0 else torch.zeros_like(keep)
    if lo > 0:
        keep &= ~_lowest(flat, lo)
    return keep.view(score.shape)


def l1_rescale(delta: torch.Tensor, mask: torch.Tensor, eps: float = 1e-7) -> torch.Tensor | float:
    """‖τ‖₁ / ‖τ ⊙ mask‖₁ (mergekit's rescale), or 1 when either norm is below `eps`."""
    before = delta.abs().sum()
    after = (delta * mask).abs().sum()
    if before < eps or after < eps:
        return 1.0
    return before / after


def _scale(delta: torch.Tensor, mask: torch.Tensor, keep_fraction: float, rescale: bool,
           mode: str) -> Kept:
    if not rescale:
        return Kept(mask)
    if mode == "l1":
        return Kept(mask, l1_rescale(delta, mask))
    return Kept(mask, 1.0 / keep_fraction)


def trim(delta: torch.Tensor, density: float, *, rescale: bool = False, mode: str = "l1") -> Kept | None:
    """TIES "trim": keep the k = max(1, ⌊density·n⌋) entries of largest |τ|, zero the rest.

    With ``rescale``, survivors are scaled by ‖τ‖₁/‖τ̂‖₁ (``mode="l1"``) or 1/density
    (``mode="density"``).
    """
    n = delta.numel()
    if density >= 1 or n == 0:
        return None
    k = keep_count(n, density)
    mask = rank_window(delta.abs(), n - k, n)
    return None if mask is None else _scale(delta, mask, density, rescale, mode)


def trim_outliers(delta: torch.Tensor, density: float, gamma: float, *, rescale: bool = False,
                  mode: str = "l1") -> Kept | None:
    """Model Breadcrumbs: drop the ⌊gamma·n⌋ largest |τ| (outliers) and the smallest, keeping
    k = max(1, ⌊density·n⌋) entries: ascending ranks [n_bot, n_bot + k) with
    n_bot = max(0, n − k − ⌊gamma·n⌋) (when outliers and density overlap, fewer outliers are
    dropped so that k entries survive, as mergekit does). At density 1 nothing is dropped.
    """
    n = delta.numel()
    if density >= 1 or n == 0:
        return None
    k = keep_count(n, density)
    n_bot = max(0, n - k - int(gamma * n))
    mask = rank_window(delta.abs(), n_bot, n_bot + k)
    return None if mask is None else _scale(delta, mask, density, rescale, mode)


def bernoulli_mask(shape: torch.Size | tuple[int, ...], p: float, generator: torch.Generator,
                   device: torch.device | str = "cpu") -> torch.Tensor:
    """Bool tensor whose entries are independently True with probability `p` (u < p, u uniform
    in [0, 1)), drawn on the CPU from `generator` in chunks of :data:`CHUNK`, then moved to
    `device`."""
    n = 1
    for d in shape:
        n *= d
    out = torch.empty(n, dtype=torch.bool)
    for start in range(0, n, CHUNK):
        m = min(CHUNK, n - start)
        torch.lt(torch.rand(m, generator=generator, dtype=torch.float32), p, out=out[start:start + m])
    return out.view(tuple(shape)).to(device)


def drop_and_rescale(delta: torch.Tensor, density: float, generator: torch.Generator, *,
                     rescale: bool = True, mode: str = "density") -> Kept | None:
    """DARE: drop each entry independently with probability 1 − density; rescale the survivors
    by 1/density (``mode="density"``, the paper's rule: E[τ̂] = τ) or by ‖τ‖₁/‖τ̂‖₁
    (``mode="l1"``, mergekit's rule)."""
    if density >= 1 or delta.numel() == 0:
        return None
    mask = bernoulli_mask(delta.shape, density, generator, delta.device)
    return _scale(delta, mask, density, rescale, mode)


def _rows(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(t.shape[0], -1) if t.dim() >= 2 else t.reshape(1, -1)


def magprune(delta: torch.Tensor, density: float, epsilon: float, generator: torch.Generator, *,
             rescale: bool = True, mode: str = "l1") -> Kept | None:
    """DELLA's MagPrune: within each row (a 1-D tensor is one row), rank the entries by |τ|
    (r = 0 … m−1, ties by position) and keep entry i with probability
    p_i = density − ε + 2ε·r_i/(m−1) (mean p = density; a one-entry row keeps p = density).

    Rescaling (``rescale``): ``mode="density"`` divides each survivor by its own p_i (the paper's
    1/(1 − drop probability), unbiased: E[τ̂] = τ); ``mode="l1"`` scales by ‖τ‖₁/‖τ̂‖₁ (mergekit).
    Ranks are computed on the tensor's device; probabilities and draws on the CPU.
    """
    if density >= 1 or delta.numel() == 0:
        return None
    rows = _rows(delta)
    n_rows, m = rows.shape
    keep = torch.empty((n_rows, m), dtype=torch.bool)
    per_entry = rescale and mode == "density"
    scale = torch.empty((n_rows, m), dtype=torch.float32) if per_entry else None
    block = max(1, CHUNK // max(1, m))
    positions = None
    for r0 in range(0, n_rows, block):
        mag = rows[r0:r0 + block].abs()
        order = torch.argsort(mag, dim=1, stable=True)
        if positions is None or positions.shape != order.shape:
            positions = torch.arange(m, device=order.device).expand_as(order)
        ranks = torch.empty_like(order).scatter_(1, order, positions).cpu()
        del mag, order
        if m > 1:
            p = (ranks.to(torch.float32) / (m - 1)).mul_(2 * epsilon).add_(density - epsilon)
        else:
            p = torch.full(ranks.shape, density, dtype=torch.float32)
        k = torch.rand(p.shape, generator=generator, dtype=torch.float32) < p
        keep[r0:r0 + block] = k
        if per_entry:
            scale[r0:r0 + block] = torch.where(k, 1.0 / p.clamp(min=1e-12), 0.0)
    if per_entry:
        return Kept(None, scale.view(delta.shape).to(delta.device))
    mask = keep.view(delta.shape).to(delta.device)
    return _scale(delta, mask, density, rescale, "l1") if rescale else Kept(mask)
