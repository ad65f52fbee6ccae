"""Exact rank selection without sorting: which entries of a score (a task vector's magnitudes) fall
below a rank, found with a magnitude histogram refined on its boundary bin.

The rank of an entry is its position in ascending order of the score, ties broken by position (the
earlier entry ranks lower), so a selection is a function of the values alone: the same on every
device, with every block size and in every run, and the same mask a full stable sort would give.

A score held in memory whole is resolved in one counting pass instead (:func:`resolve_in_memory`):
a sample of the score brackets the m-th smallest between two values; one pass counts the entries
below the bracket and keeps the few inside it with their positions, which gives the value, ``need``
and ``position`` at once. When the bracket misses (an unrepresentative sample), the sweeps below
decide, so the answer is exact either way.

``lowest(m)``, the entries of rank < m, is described by a :class:`Cut`: the m-th smallest value v,
and among the entries equal to v, how many belong to the lowest m (``need``; they are the first
``need`` equal entries in position order). It is found in two sweeps over the score, which may come
in pieces (row blocks, tiles), in any order within a sweep:

1. a histogram of the top 16 bits of the float32 score (a non-negative float's bit pattern orders
   like the float): the bin holding rank m, and how many entries lie below that bin;
2. a histogram of the low 16 bits of the entries in that bin: v exactly, and ``need``.

Where the equal entries straddle the cut, the position of the ``need``-th one is found from the
pieces in order (``Cut.locate``), once. Memory: two histograms per cut (768 KB), whatever the
tensor's size; no sort, no copy of the score.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from typing import Callable, Iterable

from ..lazy import np, torch

HI_BINS = 1 << 15  # top 16 bits of a non-negative float32 (the sign bit is 0)
LO_BINS = 1 << 16
CUT_BYTES = 2 * 8 * LO_BINS  # most histogram bytes one cut holds at once (a sweep's counts and their sum)


def score_bits(score: torch.Tensor) -> torch.Tensor:
    """The float32 score's bit patterns as int32 (monotone in the value for non-negative floats)."""
    return score.reshape(-1).view(torch.int32)


def _bin_of(hist: torch.Tensor, rank: int) -> tuple[int, int]:
    """The bin holding the entry of 0-based `rank` and the count of entries in earlier bins."""
    cum = torch.cumsum(hist, 0)
    b = int(torch.searchsorted(cum, torch.tensor(rank, dtype=cum.dtype), right=True))
    return b, int(cum[b - 1]) if b else 0


def _low_bits_in_bin(bits: torch.Tensor, top: int) -> torch.Tensor:
    """The low 16 bits of the entries whose top 16 bits are `top` (numpy on the CPU: its compare
    and compaction cost a fraction of torch's per entry)."""
    if bits.device.type != "cpu":
        return torch.bitwise_and(bits[torch.bitwise_right_shift(bits, 16) == top], 0xFFFF)
    values = bits.numpy()
    picked = values[np.flatnonzero((values >> 16) == top)]
    return torch.from_numpy(picked & 0xFFFF)


def _equal(flat: torch.Tensor, value: float) -> torch.Tensor:
    """Flat indices of the entries equal to `value`, in order."""
    if flat.device.type != "cpu":
        return torch.nonzero(flat == value).reshape(-1)
    return torch.from_numpy(np.flatnonzero(flat.numpy() == np.float32(value)))


@dataclass
class Cut:
    """lowest(m) of a score of n entries: rank < m, ties by position.

    After both sweeps: ``value`` (the m-th smallest) and ``need`` (how many entries equal to it rank
    below m). ``position`` is the flat index of the ``need``-th equal entry once located (None
    until then): equal entries up to and including it are in lowest(m), later ones are not.
    """

    m: int
    n: int
    hi: torch.Tensor | None = None
    bin: int = -1
    below_bin: int = 0
    lo: torch.Tensor | None = None
    value: float = 0.0
    need: int = 0
    position: int | None = None
    _seen: int = 0  # equal entries met by `locate` so far

    @property
    def trivial(self) -> bool:
        """m = 0 (nothing is below) or m = n (everything is)."""
        return self.m <= 0 or self.m >= self.n

    def observe(self, sweep: int, score: torch.Tensor) -> None:
        """Add a piece of the score (float32, non-negative) to sweep 0 or 1's histogram."""
        if self.trivial or score.numel() == 0:
            return
        bits = score_bits(score)
        if sweep == 0:
            top = torch.bitwise_right_shift(bits, 16)
            counts = torch.bincount(top, minlength=HI_BINS)
            self.hi = counts if self.hi is None else self.hi.add_(counts)
        else:
            low = _low_bits_in_bin(bits, self.bin)
            counts = torch.bincount(low, minlength=LO_BINS)
            self.lo = counts if self.lo is None else self.lo.add_(counts)

    def end(self, sweep: int) -> None:
        if self.trivial:
            return
        if sweep == 0:
            self.bin, self.below_bin = _bin_of(self.hi.cpu(), self.m - 1)
            self.hi = None
        else:
            low, below = _bin_of(self.lo.cpu(), self.m - 1 - self.below_bin)
            self.lo = None
            bits = torch.tensor([(self.bin << 16) | low], dtype=torch.int32)
            self.value = float(bits.view(torch.float32))
            self.need = self.m - self.below_bin - below

    def locate(self, score: torch.Tensor, offset: int) -> None:
        """Find ``position`` from the pieces of the score, given in order from the start."""
        if self.trivial or self.position is not None:
            return
        where = _equal(score.reshape(-1), self.value)
        if self._seen + where.numel() >= self.need:
            self.position = offset + int(where[self.need - self._seen - 1])
        self._seen += where.numel()

    def lowest(self, score: torch.Tensor, offset: int) -> torch.Tensor:
        """Bool mask (shape of the piece) of its entries in lowest(m). Pieces are located in order
        before they are asked about, so a ``position`` not found yet lies after this piece: all of
        its equal entries are below."""
        if self.m <= 0:
            return torch.zeros(score.shape, dtype=torch.bool, device=score.device)
        if self.m >= self.n:
            return torch.ones(score.shape, dtype=torch.bool, device=score.device)
        flat = score.reshape(-1)
        mask = flat < self.value
        cut = flat.numel() if self.position is None else self.position - offset + 1  # equal entries before it are below
        if cut > 0:
            head = flat[:cut]
            mask[:cut].logical_or_(head == self.value)
        return mask.view(score.shape)


def cuts_for(score: torch.Tensor, ms: list[int]) -> list[Cut]:
    """Every cut of `ms`, resolved over one whole score in memory."""
    cuts = [Cut(m, score.numel()) for m in ms]
    for sweep in (0, 1):
        for c in cuts:
            c.observe(sweep, score)
            c.end(sweep)
    for c in cuts:
        c.locate(score, 0)
    return cuts


def rank_window(score: torch.Tensor, lo: int, hi: int) -> torch.Tensor | None:
    """Bool mask (shape of `score`) of the entries whose ascending rank r satisfies lo ≤ r < hi;
    None when that is every entry. Ties are ranked by position."""
    n = score.numel()
    lo, hi = max(0, lo), min(n, hi)
    if lo == 0 and hi == n:
        return None
    score = score.to(torch.float32) if score.dtype != torch.float32 else score
    low, high = cuts_for(score, [lo, hi])
    keep = high.lowest(score, 0)
    if lo > 0:
        keep &= ~low.lowest(score, 0)
    return keep


SAMPLE = 1 << 16  # entries of the sample that brackets a cut


def band_limit(n: int) -> int:
    """Most entries kept inside a bracket (a sixteenth of the score, at least 65536): beyond that
    the histogram sweeps decide, so the memory of a resolution stays bounded by the score's size."""
    return max(1 << 16, n >> 4)


def memory_bytes(n: int) -> int:
    """Transient bytes of resolving one cut in memory: the sample, the kept entries (position and
    value), bool or float scratch of a piece."""
    return 8 * min(n, SAMPLE) + 12 * band_limit(n)


def bracket(sample: torch.Tensor, m: int, n: int) -> tuple[float, float]:
    """Values that bracket the m-th smallest of n entries with near certainty, from a sample of
    them: the sample's order statistics four standard deviations (and two entries) either side."""
    s = sample.numel()
    q = m / n
    spread = 4.0 * math.sqrt(s * q * (1.0 - q)) + 2.0
    lo, hi = max(0, int(q * s - spread)), min(s - 1, int(math.ceil(q * s + spread)))
    part = np.partition(sample.numpy(), hi)  # one k at a time: a tuple of ks is several times slower
    low = np.partition(part[:hi + 1], lo)
    return float(low[lo]), float(part[hi])


def _band(score: torch.Tensor, lo: float, hi: float) -> tuple[int, torch.Tensor]:
    """(entries below lo, flat indices of the entries in [lo, hi]) of one piece. On the CPU with
    numpy: its comparisons and ``flatnonzero`` cost a fraction of torch's ``nonzero`` per entry."""
    flat = score.reshape(-1)
    if flat.device.type != "cpu":
        at_least = flat >= lo
        inside = at_least & (flat <= hi)
        return flat.numel() - int(torch.count_nonzero(at_least)), torch.nonzero(inside).reshape(-1)
    values = flat.numpy()
    at_least = values >= np.float32(lo)
    under = values.size - int(np.count_nonzero(at_least))
    at_least &= values <= np.float32(hi)
    return under, torch.from_numpy(np.flatnonzero(at_least))


class Bracketed:
    """One counting pass of several cuts of one score held in memory: each cut bracketed by a
    sample of the score; pieces (flat offset, values) may come in any order, from several threads."""

    def __init__(self, cuts: list[Cut], sample: torch.Tensor):
        self.live = [c for c in cuts if not c.trivial]
        self.brackets = [bracket(sample.cpu(), c.m, c.n) for c in self.live] if self.live else []
        self.parts: dict[int, list] = {}  # offset -> per cut (entries below, positions, values)
        self.kept = 0
        self.failed = False
        self._lock = threading.Lock()

    def feed(self, offset: int, piece: torch.Tensor) -> None:
        if self.failed or not self.live:
            return
        flat = piece.reshape(-1)
        found = []
        for lo, hi in self.brackets:
            under, idx = _band(flat, lo, hi)
            found.append((under, (idx + offset).cpu(), flat[idx].cpu()))
        with self._lock:
            self.parts[offset] = found
            self.kept += sum(f[1].numel() for f in found)
            self.failed = self.failed or self.kept > sum(band_limit(c.n) for c in self.live)

    def finish(self) -> bool:
        """Set each cut's value, need and position; False (cuts untouched) when a bracket missed
        or held too many entries."""
        if self.failed:
            return False
        ordered = [self.parts[k] for k in sorted(self.parts)]
        found = [_pick(c, sum(p[j][0] for p in ordered), [p[j][1:] for p in ordered])
                 for j, c in enumerate(self.live)]
        if not all(f is not None for f in found):
            return False
        for c, (value, need, position) in zip(self.live, found):
            c.value, c.need, c.position = value, need, position
        return True


def resolve_in_memory(cuts: list[Cut], sample: torch.Tensor, pieces: Callable[[], Iterable]) -> bool:
    """Resolve `cuts` (value, need, position) over a score in memory in one counting pass:
    `sample` is a sample of the score (float32), `pieces()` yields (flat offset, piece). Returns
    False, leaving the cuts untouched, when a bracket missed or held too many."""
    pass_ = Bracketed(cuts, sample)
    for offset, piece in pieces():
        pass_.feed(offset, piece)
    return pass_.finish()


def _pick(cut: Cut, below: int, inside: list) -> tuple[float, int, int] | None:
    """The cut from the entries below its bracket and those inside (positions, values)."""
    positions = torch.cat([p for p, _ in inside]) if inside else torch.zeros(0, dtype=torch.int64)
    values = torch.cat([v for _, v in inside]) if inside else torch.zeros(0)
    r = cut.m - below  # 1-based rank of the m-th smallest among the entries inside
    if not 1 <= r <= values.numel():
        return None
    value = float(np.partition(values.numpy(), r - 1)[r - 1])
    need = cut.m - below - int(torch.count_nonzero(values < value))
    equal = positions[values == value]  # in position order: pieces and indices came in order
    return value, need, int(equal[need - 1])
