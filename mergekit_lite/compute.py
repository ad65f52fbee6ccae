"""The node kinds that compute: :class:`Merge` (a registered method over its inputs) and
:class:`Observe` (one sweep of a method's statistic over a row block), with :class:`StatSource`,
what creates a statistic. The contract they follow is :mod:`mergekit_lite.nodes`'.

A Merge of a separable method runs tile by tile on the CPU (:mod:`.tiles`). When its tensor is
streamed in row blocks (:mod:`.blocks`), the statistic the method needs is gathered by Observe nodes
in sweeps over the blocks before the first block is merged, and reaches each block's Merge as its
``stats`` argument; a tensor merged whole gathers it in the Merge itself, tile by tile.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import Any, Callable

import torch

from . import methods, tiles
from .dtypes import all_finite, check_rounded, element_size, numel
from .errors import MergeError
from .methods.draws import Draws
from .nodes import NodeBase, Spec, node_kind, row_count


@node_kind
@dataclass(frozen=True)
class Merge(NodeBase):
    """Calls a registered merge method on its input values; the float32 result is rounded to
    ``held_dtype`` (the step's dtype, or the sinks' when only sinks consume it and it is merged in
    tiles), or held in float32 for sinks that round it themselves.

    A separable method runs tile by tile (:mod:`.tiles`) on the CPU; its statistic, when it needs
    one, is gathered first over the tiles, or comes from ``stats`` (the last :class:`Observe` of
    its sweeps) when the tensor is merged in row blocks: rows ``first_row``… of ``whole_shape``.
    """

    method: str
    step: str
    tensor: str  # output tensor name within its step
    group: str
    inputs: tuple[Any, ...]  # the method's tensors
    base: Any  # the base model's node, or None
    params: tuple[tuple[str, Any], ...]
    model_params: tuple[tuple[str, tuple[Any, ...]], ...]
    seeds: tuple[int, ...] | None
    shape: tuple[int, ...]
    dtype: torch.dtype  # the step's output dtype
    held_dtype: torch.dtype  # what the value is kept as
    first_row: int = 0
    whole_shape: tuple[int, ...] | None = None  # of the whole tensor, when this is a row block of it
    stats: Any = None  # the node giving the gathered statistic, when merged in row blocks
    clamp: bool = False  # values that overflow `held_dtype` when rounded are clamped, not refused
    section: str = "layer"  # where the tensor sits in the model (for sectioned methods)

    @property
    def args(self) -> tuple:
        return self.inputs + ((self.base,) if self.base is not None else ()) + ((self.stats,) if self.stats else ())

    @property
    def outputs(self) -> tuple[Spec, ...]:
        return (Spec(self.tensor, self.shape, self.held_dtype),)

    @property
    def nbytes(self) -> int:
        return numel(self.shape) * element_size(self.dtype)

    def param_values(self) -> dict[str, Any]:
        """{name: value}, per-model values as lists (what checks and statistics receive)."""
        values: dict[str, Any] = dict(self.params)
        values.update((name, list(vals)) for name, vals in self.model_params)
        return values

    @property
    def separable(self) -> bool:
        """A separable method over a tensor that can be cut into rows (row blocks, tiles)."""
        return row_count(self.shape) is not None and methods.get(self.method).streams(self.param_values())

    @property
    def tiled(self) -> bool:
        """Runs tile by tile on the CPU: separable, and larger than one tile."""
        return self.separable and len(tiles.tile_ranges(self.shape)) > 1

    def statistic(self) -> Any:
        """A fresh statistic for this tensor (None when the method needs none)."""
        factory = methods.get(self.method).statistic
        if not factory:
            return None
        values = self.param_values()
        if self.seeds is not None:
            values["draws"] = self.draws(0)
        return factory(values, self.whole_shape or self.shape)

    def draws(self, offset: int) -> list[Draws]:
        """Each input's random draws from the whole tensor's flat index `offset` on."""
        return [Draws(seed, offset) for seed in self.seeds]

    @property
    def split_rows(self) -> int | None:
        return self.shape[0] if self.separable else None

    def block(self, first: int | None, stop: int | None, args: tuple, group: str, stats: Any = None) -> "Merge":
        n = len(self.inputs)
        changes = dict(group=group, inputs=tuple(args[:n]), base=args[n] if self.base is not None else None,
                       stats=stats)
        if first is not None:
            changes.update(shape=(stop - first,) + self.shape[1:], first_row=self.first_row + first,
                           whole_shape=self.whole_shape or self.shape)
        return dataclasses.replace(self, **changes)

    @property
    def workspace_bytes(self) -> int:
        """Tiled: each compute thread's tile temporaries, the statistic gathered here, the result's
        buffer. Whole: the method's float32 temporaries (its result included), the rounded copy.
        With a statistic from row-block sweeps: locating in it (``prepare``) too."""
        method = methods.get(self.method)
        n = len(self.inputs) + (self.base is not None)
        size = numel(self.shape)
        locate = self.stats.source.statistic.piece_bytes(min(size, tiles.tile_numel(self.shape))) if self.stats else 0
        if not self.tiled:
            work = method.workspace_bytes(n, size)
            return work + (self.nbytes if self.held_dtype != torch.float32 else 0) + locate
        tile = tiles.tile_numel(self.shape)
        threads = min(tiles.THREADS, len(tiles.tile_ranges(self.shape)))
        stat = None if self.stats else self.statistic()
        gathering = stat.state_bytes + stat.held_bytes(size) + threads * stat.piece_bytes(tile) if stat else 0
        held = size * element_size(self.held_dtype)
        return threads * method.workspace_bytes(n, tile) + held + gathering + locate

    def run(self, ctx: Any, args: list) -> torch.Tensor:
        method = methods.get(self.method)
        stats = args.pop() if self.stats else None
        kwargs: dict[str, Any] = {method.param(name).pyname: value for name, value in self.params}
        kwargs.update((method.param(name).pyname, list(vals)) for name, vals in self.model_params)
        if method.random:
            kwargs["draws"] = self.draws(self.first_row * numel(self.shape[1:]))
        if method.sectioned:
            kwargs["section"] = self.section
        if self.tiled and ctx.device.type == "cpu":
            return self._run_tiled(ctx, method, args, stats, kwargs)
        moved = [ctx.on_device(a) for a in args]
        base = moved.pop() if self.base is not None else None
        if stats is not None:
            offset = self.first_row * numel(self.shape[1:])
            stats.prepare(moved[:len(self.inputs)], base, offset)
            kwargs["stats"] = stats.at(offset)
        with ctx.measuring():
            result = self._call(method.fn, moved, base, kwargs, self.shape)
            del moved, base
            out = result if self.held_dtype == torch.float32 else result.to(self.held_dtype)
            check_rounded(result, out, self.tensor, self.clamp)
            del result
        return ctx.to_host(out) if out.device.type != "cpu" else out

    def _run_tiled(self, ctx: Any, method: Any, args: list, stats: Any, kwargs: dict) -> torch.Tensor:
        base = args.pop() if self.base is not None else None
        row = numel(self.shape[1:])
        out = ctx.empty(self.shape, self.held_dtype)
        with ctx.measuring():
            if stats is None and (stat := self.statistic()) is not None:
                pool = None if ctx.measure else ctx.compute
                stats = stat.gather(args, base, tiles.tile_ranges(self.shape), pool)
            elif stats is not None:
                tiles.for_tiles(ctx, self.shape, lambda a, b: stats.prepare(
                    [tiles.rows(t, a, b) for t in args], tiles.rows(base, a, b), (self.first_row + a) * row),
                    ordered=True)

            def tile(first: int, stop: int) -> None:
                offset = (self.first_row + first) * row
                kw = kwargs if stats is None else dict(kwargs, stats=stats.at(offset))
                if "draws" in kw:
                    kw = dict(kw, draws=self.draws(offset))
                ins = [tiles.rows(t, first, stop) for t in args]
                shape = (stop - first,) + self.shape[1:]
                result = self._call(method.fn, ins, tiles.rows(base, first, stop), kw, shape)
                out[first:stop].copy_(result)
                if out.dtype != result.dtype:
                    check_rounded(result, out[first:stop], self.tensor, self.clamp)

            tiles.for_tiles(ctx, self.shape, tile)
        return out

    def _call(self, fn: Callable[..., torch.Tensor], tensors: list, base: Any, kwargs: dict,
              shape: tuple[int, ...]) -> torch.Tensor:
        try:
            result = fn(tensors, base, **kwargs)
        except MergeError:
            raise
        except (ValueError, RuntimeError) as exc:
            where = f" (step '{self.step}')" if self.step else ""
            raise MergeError(f"merging tensor {self.tensor}{where} with '{self.method}' failed: {exc}") from exc
        if tuple(result.shape) != shape:
            raise RuntimeError(f"method {self.method} returned shape {tuple(result.shape)} for {self.tensor}, "
                               f"expected {shape}")
        if not all_finite(result):
            raise MergeError(f"merging tensor {self.tensor} with '{self.method}' produced inf or NaN; "
                             "check the inputs and the parameters for this tensor")
        return result


@dataclass(frozen=True, eq=False)
class StatSource:
    """What creates the statistic that :class:`Observe` nodes gather: the whole-tensor merges it is
    for (one, or every tensor of a step when the statistic's scope is the model)."""

    merges: tuple[Any, ...]

    def create(self) -> Any:
        parts = [m.statistic() for m in self.merges]
        return parts[0] if len(parts) == 1 else type(parts[0]).joint(parts)

    @functools.cached_property
    def state_bytes(self) -> int:
        return self.create().state_bytes

    @functools.cached_property
    def statistic(self) -> Any:
        """A statistic of this source's kind, asked only about its memory."""
        return self.merges[0].statistic()


@node_kind
@dataclass(frozen=True)
class Observe(NodeBase):
    """One sweep of a statistic over one row block of a tensor: the block's inputs go in, the
    statistic comes out (the first Observe creates it, each later one takes the one before)."""

    source: StatSource
    merge: Any  # the whole tensor's Merge, at the rows observed (block(...) of it)
    sweep: int
    last: bool  # the last block of the sweep: the sweep ends here
    previous: Any  # the Observe before this one, or None
    group: str

    @property
    def args(self) -> tuple:
        ins = self.merge.inputs + ((self.merge.base,) if self.merge.base is not None else ())
        return ins + ((self.previous,) if self.previous is not None else ())

    @property
    def outputs(self) -> tuple[Spec, ...]:
        return (Spec(self.merge.tensor + "#statistic", (self.source.state_bytes,), torch.uint8),)

    @property
    def workspace_bytes(self) -> int:
        shape = self.merge.shape
        tile = numel(shape) if row_count(shape) is None else tiles.tile_numel(shape)
        stat = self.source.statistic
        at_once = min(tiles.THREADS, len(tiles.tile_ranges(shape))) if stat.parallel else 1
        return at_once * stat.piece_bytes(tile) + (0 if self.previous is not None else self.source.state_bytes)

    def run(self, ctx: Any, args: list) -> Any:
        stat = args.pop() if self.previous is not None else self.source.create()
        tensors = [ctx.on_device(a) for a in args]
        base = tensors.pop() if self.merge.base is not None else None
        with ctx.measuring():
            observe_tiles(ctx, stat, self.sweep, self.merge.shape, tensors, base, self.merge.first_row)
        if self.last:
            stat.end(self.sweep)
        return stat


def observe_tiles(ctx: Any, stat: Any, sweep: int, shape: tuple[int, ...], tensors: list, base: Any,
                  first_row: int) -> None:
    """One sweep of `stat` over the tiles of a block of `shape` (rows `first_row`… of its tensor):
    each tile measured on the compute threads in any order, then absorbed in tile order on one of
    them, so what the statistic folds is folded in the same order however the work was spread."""
    row = numel(shape[1:])

    def piece(first: int, stop: int) -> tuple:
        return [tiles.rows(t, first, stop) for t in tensors], tiles.rows(base, first, stop), (first_row + first) * row

    parts = tiles.map_tiles(ctx, shape, lambda a, b: stat.measure(sweep, *piece(a, b)))
    tiles.for_tiles(ctx, shape, lambda a, b: stat.absorb(sweep, parts.pop(a), *piece(a, b)), ordered=True)
