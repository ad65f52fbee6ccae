"""Cache-sized tiles: a separable method, or a sweep of its statistic, over a block of rows, one
tile after another.

Called on a whole block, a method's float32 temporaries are block-sized: every operation streams
through main memory, and every fresh buffer pays its page faults (about 0.1 s per 262 MB here).
A separable method gives the same bits on any row range (:mod:`.methods`), so a block is cut into
tiles of about :data:`TILE` entries (1 MiB of float32): each tile's temporaries stay in the CPU
caches, and the allocator hands the same small buffers back tile after tile. Tiles whose order does
not matter run on the compute threads (one torch thread each, so no thread barrier per operation).

A tile is a row range of the block: rows are never cut, so methods with one result per row
(vectors along the last dimension) are separable too.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from .dtypes import numel

TILE = 1 << 18  # entries per tile (a target; at least one row)


def rows_per_tile(shape: tuple[int, ...]) -> int:
    """Rows of a tile of a tensor of `shape` (split along dimension 0)."""
    row = numel(shape[1:]) if len(shape) > 1 else 1
    return max(1, TILE // max(1, row))


def tile_ranges(shape: tuple[int, ...]) -> list[tuple[int, int]]:
    """The row ranges of the tiles of a tensor of `shape`; one range for tensors of fewer than two
    dimensions (they are never cut)."""
    if len(shape) < 2:
        return [(0, shape[0] if shape else 1)]
    step = rows_per_tile(shape)
    return [(r, min(r + step, shape[0])) for r in range(0, shape[0], step)] or [(0, 0)]


def rows(tensor: torch.Tensor | None, first: int, stop: int) -> torch.Tensor | None:
    """The row range [first, stop) of `tensor` (the whole of a tensor of fewer than two dimensions)."""
    if tensor is None or tensor.dim() < 2:
        return tensor
    return tensor[first:stop]


def for_tiles(ctx: Any, shape: tuple[int, ...], run: Callable[[int, int], None], ordered: bool = False) -> None:
    """``run(first, stop)`` for every tile of a block of `shape`, on the compute threads: one after
    the other on one thread when `ordered`, else spread over them. Each compute thread runs torch
    single-threaded: small operations split across threads wait at a barrier each, which costs more
    than the operation when the machine is busy. A run that measures allocations stays on this
    thread (the allocation probe sees only its own thread)."""
    ranges = tile_ranges(shape)
    pool = getattr(ctx, "compute", None)
    if pool is None or getattr(ctx, "measure", False):
        for first, stop in ranges:
            run(first, stop)
    elif ordered or len(ranges) == 1:
        pool.submit(lambda: [run(first, stop) for first, stop in ranges]).result()
    else:  # one task per thread, every THREADS-th tile: few hand-offs between threads
        shares = [ranges[k::THREADS] for k in range(THREADS)]
        for future in [pool.submit(lambda share=share: [run(a, b) for a, b in share]) for share in shares]:
            future.result()


def map_tiles(ctx: Any, shape: tuple[int, ...], run: Callable[[int, int], Any]) -> dict[int, Any]:
    """``run(first, stop)`` for every tile, spread over the compute threads as :func:`for_tiles`
    does; the results by each tile's first row."""
    results: dict[int, Any] = {}

    def one(first: int, stop: int) -> None:
        results[first] = run(first, stop)

    for_tiles(ctx, shape, one)
    return results


THREADS = 2  # compute threads running tiles (the memory ledger plans for each holding one tile)


def tile_numel(shape: tuple[int, ...]) -> int:
    """Entries of one tile of a tensor of `shape`."""
    first, stop = tile_ranges(shape)[0]
    return (stop - first) * (numel(shape[1:]) if len(shape) > 1 else 1)
