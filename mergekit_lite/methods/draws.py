"""Random draws addressed by position: the uniform number of an entry of a tensor is a function of
the seed and the entry's flat index alone.

DARE and DELLA drop each entry of a task vector with some probability. A generator that can only
be read in order (mergekit's global torch RNG, or one torch generator per tensor) ties every draw
to the ones before it: the tensor must be drawn whole, on one thread, and its mask held until it is
applied. Here the draw of entry j is the j-th 32-bit word of a PCG64 stream (numpy's, a dependency
already) seeded by (plan seed, step, tensor, model): the stream can skip ahead in O(log j)
(``advance``), so any row block or tile draws exactly its own entries, on any compute thread, and
the bits do not depend on how the tensor was cut, the thread count, the memory budget or the
device (draws are made on the CPU and moved).

Entry j keeps with probability p when u_j < p, u_j ∈ [0, 1) the top 24 bits of its word (as many
as a float32 uniform of ``torch.rand`` has): u_j = ⌊v_j/2⁸⌋/2²⁴ with v_j = w_j + 2³¹, w_j the word
read as a signed 32-bit integer.
Every comparison is exact (in integers for one p, in float32 for a p per entry), so P(keep) is
⌈p·2²⁴⌉/2²⁴.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..lazy import np, torch

_HALF = 1 << 31
_BITS = 24  # bits of a uniform


@dataclass(frozen=True)
class Draws:
    """The uniform draws of one model over one tensor, from flat index ``offset`` on."""

    seed: int
    offset: int = 0

    def shifted(self, entries: int) -> "Draws":
        """The draws of the piece starting `entries` entries further on."""
        return Draws(self.seed, self.offset + entries)

    def words(self, n: int) -> torch.Tensor:
        """w_j for j in [offset, offset + n), as int32 (uniform over every 32-bit pattern)."""
        first = self.offset // 2  # each 64-bit output holds two entries' words (low half first)
        count = (self.offset + n + 1) // 2 - first
        stream = np.random.PCG64(self.seed)
        stream.advance(first)
        raw = stream.random_raw(count).astype("<u8", copy=False).view("<i4")
        skip = self.offset - 2 * first
        return torch.from_numpy(raw[skip:skip + n])

    def bernoulli(self, shape: tuple[int, ...], p: float, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Tensor of `shape` (bool, or 0/1 in `dtype`): entry j is 1 when u_j < p. A float32 mask
        costs a quarter of a bool one to apply on the CPU (no mixed-dtype product)."""
        # u_j < p ⇔ ⌊v_j/2⁸⌋ < ⌈p·2²⁴⌉ ⇔ v_j < ⌈p·2²⁴⌉·2⁸ ⇔ w_j < ⌈p·2²⁴⌉·2⁸ − 2³¹ (p·2²⁴ is exact)
        threshold = math.ceil(p * 2 ** _BITS) * 2 ** (32 - _BITS) - _HALF
        dtype = dtype or torch.bool
        if threshold >= _HALF:
            return torch.ones(shape, dtype=dtype)
        n = math.prod(shape)
        return torch.lt(self.words(n), max(threshold, -_HALF), out=torch.empty(n, dtype=dtype)).view(shape)

    def keep(self, p: torch.Tensor) -> torch.Tensor:
        """Bool tensor shaped like `p` (float32 probabilities on the CPU): u_j < p_j, compared as
        ⌊v_j/2⁸⌋ < p_j·2²⁴ in float32 (both sides exact)."""
        top = torch.bitwise_right_shift(self.words(p.numel()), 32 - _BITS)  # ⌊v_j/2⁸⌋ − 2²³
        return torch.lt(top.to(torch.float32).add_(2 ** (_BITS - 1)), (p.reshape(-1) * 2 ** _BITS)).view(p.shape)
