"""The kinds of node in a merge graph, each declaring everything the engine needs to know about it.

A node is a small frozen record. Its kind (its class) says, in one place:

- ``args``: the nodes whose values it consumes, in the order ``run`` receives them;
- ``outputs``: the tensors it produces, as :class:`Spec` (name, shape, dtype *as held in memory*);
  one or several (a node with several outputs yields a tuple; :class:`Pick` selects one of them);
- ``workspace_bytes``: the transient bytes of running it, beyond what is already alive;
- ``holds``: whether it keeps its inputs alive after running, until a hand-off completes (sinks:
  the writer thread holds the tensor until it is on disk);
- ``start(ctx)``: called when its group is admitted (a :class:`Load` submits its read then);
  ``prefetched`` kinds hold their value from then on, not only once they have run;
- ``run(ctx, args)``: produce the value from the input values;
- ``split_rows``, ``split_args`` and ``block(first, stop, args, group)``: the leading dimension
  along which the node can run on row blocks (None: it cannot), which of its args follow the same
  rows (default: all; a LoRA's A factor does not, it is used whole by every block), and the node
  restricted to rows [first, stop) over args so restricted (first None: the same rows, other args). The compiler streams a large tensor
  in row blocks when every node of its group can (:mod:`mergekit_lite.blocks`).

The memory ledger (:mod:`mergekit_lite.ledger`) and the executor (:mod:`mergekit_lite.executor`)
only use these members, never a node's class: a new kind of work (a LoRA fold, an SVD with two
outputs, a generated router tensor) is one new class here, registered with :func:`node_kind`.

Every decision is made at compile time and stored in the node: a merge's ``held_dtype`` is float32
when only sinks consume it (they round it themselves, chunk by chunk), else the step's dtype.
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass
from typing import Any, Union

import torch

from .dtypes import check_rounded, element_size, numel

NODE_KINDS: dict[str, type] = {}


def node_kind(cls: type) -> type:
    """Register a node class by name (``describe`` counts nodes per kind); checks the contract."""
    for member in ("args", "outputs", "run"):
        if not hasattr(cls, member):
            raise TypeError(f"node kind {cls.__name__} lacks {member!r}")
    NODE_KINDS[cls.__name__] = cls
    return cls


@dataclass(frozen=True)
class Spec:
    """One tensor a node produces, as it is held in memory."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return numel(self.shape) * element_size(self.dtype)


class NodeBase:
    """Defaults of the node contract: no inputs, no workspace, no hold, nothing to start."""

    holds = False
    prefetched = False  # its value is alive from the group's admission (started reads)
    group: str

    @property
    def args(self) -> tuple:
        return ()

    @property
    def workspace_bytes(self) -> int:
        return 0

    @property
    def value_bytes(self) -> int:
        """Bytes of this node's value while it is alive (a holding node: what it holds too)."""
        own = sum(s.nbytes for s in self.outputs)
        return own + (sum(d.value_bytes for d in self.args) if self.holds else 0)

    def start(self, ctx: Any) -> None:
        pass

    @property
    def split_rows(self) -> int | None:
        return None

    @property
    def split_args(self) -> tuple[bool, ...]:
        """For each arg, whether it is cut into the same row blocks as this node."""
        return (True,) * len(self.args)

    def block(self, first: int | None, stop: int | None, args: tuple, group: str) -> "NodeBase":
        raise TypeError(f"{type(self).__name__} nodes do not run on row blocks")


def row_count(shape: tuple[int, ...]) -> int | None:
    """Rows of a tensor that can be cut along dimension 0 (two or more dimensions), else None."""
    return shape[0] if len(shape) >= 2 else None


def stable_seed(*parts: object) -> int:
    """A 63-bit seed from the parts' text; the same on every machine and process (unlike hash())."""
    digest = hashlib.blake2b("\x1f".join(str(p) for p in parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & 0x7FFF_FFFF_FFFF_FFFF


# ------------------------------------------------------------------------------------------------
# sources


@node_kind
@dataclass(frozen=True)
class Load(NodeBase):
    """Reads one tensor of one model file (on a reading thread, as soon as its group is admitted)."""

    prefetched = True

    file: str
    tensor: str
    group: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    model: str  # label for messages
    offset: int = 0  # of the tensor's bytes in the file

    @property
    def outputs(self) -> tuple[Spec, ...]:
        return (Spec(self.tensor, self.shape, self.dtype),)

    @property
    def nbytes(self) -> int:
        return numel(self.shape) * element_size(self.dtype)

    def start(self, ctx: Any) -> None:
        ctx.prefetch(self, lambda: ctx.read(self.file, self.offset, self.shape, self.dtype))

    def run(self, ctx: Any, args: list) -> torch.Tensor:
        return ctx.fetched(self)

    @property
    def split_rows(self) -> int | None:
        return row_count(self.shape)

    def block(self, first: int | None, stop: int | None, args: tuple, group: str) -> "Load":
        """Rows [first, stop) are contiguous bytes of the file: a read of its own."""
        if first is None:
            return dataclasses.replace(self, group=group)
        row_bytes = numel(self.shape[1:]) * element_size(self.dtype)
        return dataclasses.replace(self, group=group, shape=(stop - first,) + self.shape[1:],
                                   offset=self.offset + first * row_bytes)


# ------------------------------------------------------------------------------------------------
# selection


@node_kind
@dataclass(frozen=True)
class Pick(NodeBase):
    """One output of a node with several outputs (its value is a tuple)."""

    source: Any
    index: int
    group: str

    @property
    def args(self) -> tuple:
        return (self.source,)

    @property
    def outputs(self) -> tuple[Spec, ...]:
        return (self.source.outputs[self.index],)

    @property
    def shape(self) -> tuple[int, ...]:
        return self.outputs[0].shape

    @property
    def dtype(self) -> torch.dtype:
        return self.outputs[0].dtype

    def block(self, first: int | None, stop: int | None, args: tuple, group: str) -> "Pick":
        if first is not None:
            return super().block(first, stop, args, group)
        return dataclasses.replace(self, source=args[0], group=group)

    def run(self, ctx: Any, args: list) -> torch.Tensor:
        return args[0][self.index]


@node_kind
@dataclass(frozen=True)
class AlignVocab(NodeBase):
    """One vocabulary-indexed tensor (embeddings, lm_head) of each input model, re-indexed to the
    step's output vocabulary (:mod:`mergekit_lite.vocab`); one output per input, in its dtype.
    ``rows`` is the compile-time :class:`~mergekit_lite.vocab.RowPlan` (compared by identity)."""

    tensor: str  # output tensor name
    group: str
    inputs: tuple[Any, ...]  # each model's tensor
    rows: Any

    @property
    def args(self) -> tuple:
        return self.inputs

    @property
    def outputs(self) -> tuple[Spec, ...]:
        return tuple(Spec(f"{self.tensor}[{i}]", (self.rows.size, *n.outputs[0].shape[1:]), n.outputs[0].dtype)
                     for i, n in enumerate(self.inputs))

    @property
    def workspace_bytes(self) -> int:
        first = self.inputs[0].outputs[0]
        return self.rows.workspace_bytes(first.shape[1:], [n.outputs[0].dtype for n in self.inputs])

    def run(self, ctx: Any, args: list) -> tuple:
        with ctx.measuring():
            return self.rows.apply(args)


# ------------------------------------------------------------------------------------------------
# sinks: they hold their input until the hand-off completes


class _Sink(NodeBase):
    holds = True
    last = True  # the tensor's last (or only) piece: a tensor written in row blocks counts once
    value: Any
    dtype: torch.dtype

    @property
    def args(self) -> tuple:
        return (self.value,)

    @property
    def nbytes(self) -> int:
        """Bytes of the value in the sink's dtype."""
        return numel(self.value.shape) * element_size(self.dtype)


@node_kind
@dataclass(frozen=True)
class Write(_Sink):
    """Sends a value to an output folder's writer (which rounds a float32 value chunk by chunk)."""

    output: str  # output folder key ("" for the main output)
    tensor: str
    value: Any
    dtype: torch.dtype
    group: str
    first_row: int = 0  # a row block of the tensor, from this row
    last: bool = True  # the tensor's last block

    @property
    def outputs(self) -> tuple[Spec, ...]:
        return ()

    @property
    def split_rows(self) -> int | None:
        return self.value.split_rows

    def block(self, first: int | None, stop: int | None, args: tuple, group: str) -> "Write":
        if first is None:
            return dataclasses.replace(self, value=args[0], group=group)
        return dataclasses.replace(self, value=args[0], group=group, first_row=self.first_row + first,
                                   last=stop == self.value.split_rows)

    def run(self, ctx: Any, args: list) -> None:
        ctx.hand_off(self, lambda: ctx.writers[self.output].write(self.tensor, args[0], self.first_row))


@node_kind
@dataclass(frozen=True)
class Emit(_Sink):
    """Hands a value to Python code (``Executor.run`` yields it), rounded to ``dtype`` first."""

    tensor: str
    value: Any
    dtype: torch.dtype
    group: str
    clamp: bool = False  # as Merge.clamp

    @property
    def outputs(self) -> tuple[Spec, ...]:
        held = self.value.outputs[0].dtype
        return () if held == self.dtype else (Spec(self.tensor, self.value.shape, self.dtype),)

    def block(self, first: int | None, stop: int | None, args: tuple, group: str) -> "Emit":
        """Python code receives whole tensors: only over the same rows (a new input, another group)."""
        if first is not None:
            return super().block(first, stop, args, group)
        return dataclasses.replace(self, value=args[0], group=group)

    def run(self, ctx: Any, args: list) -> None:
        value = args[0] if args[0].dtype == self.dtype else args[0].to(self.dtype)
        check_rounded(args[0], value, self.tensor, self.clamp)
        ctx.emit(self, self.tensor, value)


Node = Union[Load, Pick]  # and the computing kinds of :mod:`mergekit_lite.compute`

_COMPUTING = ("Merge", "Observe", "StatSource")


def __getattr__(name: str) -> Any:
    """The computing kinds live in :mod:`mergekit_lite.compute` (which builds on this module);
    ``from .nodes import Merge`` still finds them."""
    if name in _COMPUTING:
        from . import compute

        return getattr(compute, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


Sink = Union[Write, Emit]
SINK_KINDS = (Write, Emit)
