"""Selection instead of sorting: rank cuts found from histograms (in pieces, any piece sizes) or from
one bracketed counting pass give exactly the masks of a stable sort, ties broken by position."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mergekit_lite.methods.select import Cut, cuts_for, rank_window, resolve_in_memory


def stable_lowest(score: np.ndarray, m: int) -> np.ndarray:
    """The m lowest-ranked entries by a stable sort (ties: the earlier position ranks lower)."""
    mask = np.zeros(score.size, dtype=bool)
    mask[np.argsort(score, kind="stable")[:m]] = True
    return mask


def scores(seed: int, n: int, levels: int | None) -> torch.Tensor:
    """|τ|-like scores; `levels` quantizes them (bf16 task vectors take few distinct values), and a
    share of exact zeros (unchanged weights)."""
    g = np.random.default_rng(seed)
    x = np.abs(g.standard_normal(n)) * 1e-3
    if levels:
        x = np.round(x / 1e-3 * levels) / levels * 1e-3
    x[g.random(n) < 0.1] = 0.0
    return torch.from_numpy(x.astype(np.float32))


def pieces_of(n: int, seed: int) -> list[tuple[int, int]]:
    g = np.random.default_rng(seed)
    cuts = sorted(set(g.integers(1, n, size=6).tolist()))
    edges = [0] + cuts + [n]
    return [(a, b) for a, b in zip(edges, edges[1:]) if b > a]


@pytest.mark.parametrize("levels", [None, 7, 64])
@pytest.mark.parametrize("seed", [0, 1])
def test_histogram_sweeps_in_pieces_equal_a_stable_sort(levels, seed):
    n = 5000
    score = scores(seed, n, levels)
    ref_np = score.numpy()
    for m in (1, 17, n // 3, n // 2, n - 5, n - 1):
        cut = Cut(m, n)
        parts = pieces_of(n, seed + m)
        for sweep in (0, 1):
            for a, b in parts:
                cut.observe(sweep, score[a:b])
            cut.end(sweep)
        for a, b in parts:
            cut.locate(score[a:b], a)
        got = np.concatenate([cut.lowest(score[a:b], a).numpy() for a, b in parts])
        assert np.array_equal(got, stable_lowest(ref_np, m)), m
        assert cut.value == np.sort(ref_np, kind="stable")[m - 1]


@pytest.mark.parametrize("levels", [None, 7])
def test_one_bracketed_pass_equals_a_stable_sort(levels):
    n = 200_000
    score = scores(3, n, levels)
    ms = [n // 10, n // 2, n - 100]
    cuts = [Cut(m, n) for m in ms]
    parts = pieces_of(n, 5)
    resolved = resolve_in_memory(cuts, score[::7].clone(), lambda: ((a, score[a:b]) for a, b in parts))
    assert resolved
    for cut, m in zip(cuts, ms):
        got = np.concatenate([cut.lowest(score[a:b], a).numpy() for a, b in parts])
        assert np.array_equal(got, stable_lowest(score.numpy(), m)), m


def test_a_sample_that_misses_is_reported_not_guessed():
    n = 10_000
    score = scores(4, n, None)
    misleading = torch.sort(score).values[:100].clone()  # the smallest entries only
    cut = Cut(n // 2, n)
    assert not resolve_in_memory([cut], misleading, lambda: iter([(0, score)]))
    assert cut.position is None and cut.need == 0


def test_trivial_cuts_and_rank_window():
    score = torch.tensor([1.0, 2.0, 2.0, 2.0, 3.0])
    low, high = cuts_for(score, [0, 5])
    assert low.trivial and high.trivial
    assert not low.lowest(score, 0).any() and high.lowest(score, 0).all()
    for lo, hi in [(1, 4), (2, 3), (0, 2), (3, 5)]:
        want = stable_lowest(score.numpy(), hi) & ~stable_lowest(score.numpy(), lo)
        assert rank_window(score, lo, hi).numpy().tolist() == want.tolist()
