"""Node kinds for adapters: folding LoRA/IA3 into a tensor, forming deltas, stacking and factorising.

Each kind declares what the engine needs (see :mod:`mergekit_lite.nodes`): its arguments, its
outputs as held in memory, and the workspace of running it, so the memory ledger plans and accounts
for the factors, the formed delta and the SVD's arrays like any merge. The math is in
:mod:`mergekit_lite.lowrank`; the executor knows none of it.

- :class:`FoldLora`, :class:`FoldIA3`: a base tensor with an adapter applied (``base+adapter``);
- :class:`LoraDelta`: scaling · B @ A alone, in the base's layout (an adapter as a task vector);
- :class:`Constant`: a tensor of one value (the zero base of a merge in delta space, IA3's identity);
- :class:`MapValues`: log / exp of IA3 vectors (merging them in log space);
- :class:`StackLora`: concatenated factors (two outputs, A and B);
- :class:`Factorise`: truncated SVD of a delta, or of a fine-tune minus its base (two outputs);
- :class:`Differs`: whether two tensors differ (one bool), for extraction's first pass.

Factorising and stacking record each module's rank and error in a :class:`Manifest`, which the
runner reads to write ``adapter_config.json`` and the report.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

import torch

from .dtypes import element_size, numel
from .lowrank import F32, fold_lora, fold_workspace, ia3_scale, lora_delta, stack_factors, svd_workspace, truncated_svd
from .nodes import NodeBase, Spec, node_kind


class Manifest:
    """What an adapter output's modules turned out to be: rank, relative error, ‖Δ‖, algorithm."""

    def __init__(self) -> None:
        self.modules: dict[str, tuple[int, float, float, str]] = {}
        self._lock = threading.Lock()

    def record(self, module: str, rank: int, error: float, norm: float, algorithm: str) -> None:
        with self._lock:
            self.modules[module] = (rank, error, norm, algorithm)

    def overall_error(self) -> float:
        """‖Δ − B @ A‖ / ‖Δ‖ over every factorised module together."""
        total = sum(norm ** 2 for _, _, norm, _ in self.modules.values())
        lost = sum((err * norm) ** 2 for _, err, norm, _ in self.modules.values())
        return (lost / total) ** 0.5 if total else 0.0


def _f32(*shapes: tuple[int, ...]) -> int:
    return sum(4 * numel(s) for s in shapes)


def _cpu(t: torch.Tensor) -> torch.Tensor:
    return t if t.device.type == "cpu" else t.to("cpu")


def _moved(ctx: Any, args: list) -> list[torch.Tensor]:
    return [a.to(ctx.device, non_blocking=True) for a in args]


def _rounded(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    """Bytes of a copy rounded to `dtype` (none when the float32 result is kept as it is)."""
    return numel(shape) * element_size(dtype) if dtype != F32 else 0


class _OneTensor(NodeBase):
    """A node with one output: tensor `tensor` of `shape`, held in `dtype`."""

    tensor: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def outputs(self) -> tuple[Spec, ...]:
        return (Spec(self.tensor, self.shape, self.dtype),)


@node_kind
@dataclass(frozen=True)
class FoldLora(_OneTensor):
    """W + scaling · B @ A: the base tensor with a LoRA module folded in, rounded to `dtype`."""

    base: Any
    a: Any
    b: Any
    tensor: str
    group: str
    scaling: float
    transpose: bool
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def args(self) -> tuple:
        return (self.base, self.a, self.b)

    @property
    def workspace_bytes(self) -> int:
        """Factors upcast, the delta (the float32 sum is formed in it), and the rounded copy."""
        return fold_workspace(self.a.shape, self.b.shape, self.shape, self.transpose) + _rounded(self.shape, self.dtype)

    def run(self, ctx: Any, args: list) -> torch.Tensor:
        with ctx.measuring():
            w, a, b = _moved(ctx, args)
            return _cpu(fold_lora(w, a, b, self.scaling, self.transpose, self.dtype))


@node_kind
@dataclass(frozen=True)
class FoldIA3(_OneTensor):
    """W (or a bias) scaled by an IA3 vector, by rows or columns, rounded to `dtype`."""

    base: Any
    vector: Any
    tensor: str
    group: str
    transpose: bool
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def args(self) -> tuple:
        return (self.base, self.vector)

    @property
    def workspace_bytes(self) -> int:
        return _f32(self.vector.shape, self.shape) + _rounded(self.shape, self.dtype)

    def run(self, ctx: Any, args: list) -> torch.Tensor:
        with ctx.measuring():
            w, v = _moved(ctx, args)
            return _cpu(ia3_scale(w, v, self.transpose, self.dtype))


@node_kind
@dataclass(frozen=True)
class LoraDelta(_OneTensor):
    """scaling · B @ A in float32, in the base tensor's layout: a LoRA module as a task vector."""

    a: Any
    b: Any
    tensor: str
    group: str
    scaling: float
    transpose: bool
    shape: tuple[int, ...]

    dtype = F32

    @property
    def args(self) -> tuple:
        return (self.a, self.b)

    @property
    def workspace_bytes(self) -> int:
        return _f32(self.a.shape, self.b.shape, self.shape)

    def run(self, ctx: Any, args: list) -> torch.Tensor:
        with ctx.measuring():
            a, b = _moved(ctx, args)
            return _cpu(lora_delta(a, b, self.scaling, self.transpose).contiguous())


@node_kind
@dataclass(frozen=True)
class Constant(_OneTensor):
    """A float32 tensor filled with one value."""

    value: float
    tensor: str
    group: str
    shape: tuple[int, ...]

    dtype = F32

    @property
    def workspace_bytes(self) -> int:
        return _f32(self.shape)

    def run(self, ctx: Any, args: list) -> torch.Tensor:
        with ctx.measuring():
            return torch.full(self.shape, self.value, dtype=F32)


@node_kind
@dataclass(frozen=True)
class MapValues(_OneTensor):
    """``log`` or ``exp`` of a tensor, in float32 (IA3 vectors merged in log space)."""

    value: Any
    fn: str  # "log" or "exp"
    tensor: str
    group: str

    dtype = F32

    @property
    def shape(self) -> tuple[int, ...]:
        return self.value.outputs[0].shape

    @property
    def args(self) -> tuple:
        return (self.value,)

    @property
    def workspace_bytes(self) -> int:
        return 2 * _f32(self.shape)

    def run(self, ctx: Any, args: list) -> torch.Tensor:
        with ctx.measuring():
            x = args[0].to(ctx.device).to(F32)
            return _cpu(torch.log(x) if self.fn == "log" else torch.exp(x))


@node_kind
@dataclass(frozen=True)
class StackLora(NodeBase):
    """Concatenated LoRA factors (A, B) with B @ A = Σ cᵢ BᵢAᵢ, at rank Σ rᵢ."""

    factors: tuple[Any, ...]  # a₁, b₁, a₂, b₂, ...
    coefficients: tuple[float, ...]  # cᵢ = wᵢ · scalingᵢ
    module: str
    group: str
    manifest: Manifest = field(compare=False, hash=False, repr=False)

    @property
    def args(self) -> tuple:
        return self.factors

    @property
    def outputs(self) -> tuple[Spec, ...]:
        a, b = self.factors[0].shape, self.factors[1].shape
        rank = sum(f.shape[0] for f in self.factors[0::2])
        return (Spec(self.module + ".A", (rank, a[1]), F32), Spec(self.module + ".B", (b[0], rank), F32))

    @property
    def workspace_bytes(self) -> int:
        """Each factor upcast and scaled, and the two concatenations."""
        return 2 * sum(s.nbytes for s in self.outputs)

    def run(self, ctx: Any, args: list) -> tuple[torch.Tensor, torch.Tensor]:
        with ctx.measuring():
            moved = _moved(ctx, args)
            a, b = stack_factors([(moved[i], moved[i + 1], c) for i, c in zip(range(0, len(moved), 2),
                                                                              self.coefficients)])
        self.manifest.record(self.module, a.shape[0], 0.0, 0.0, "concatenation (exact)")
        return _cpu(a), _cpu(b)


@node_kind
@dataclass(frozen=True)
class Factorise(NodeBase):
    """Truncated SVD of a matrix (or of `value` − `minus`) into LoRA factors (A, B) of rank at most
    `max_rank` (exactly `max_rank` without `max_error`). With `transpose`, the matrix's transpose is
    factorised (GPT-2 Conv1D weights and embeddings keep B @ A in the Linear layout)."""

    value: Any
    minus: Any  # a node, or None
    module: str
    group: str
    max_rank: int
    max_error: float | None
    transpose: bool
    randomised: bool
    manifest: Manifest = field(compare=False, hash=False, repr=False)

    @property
    def args(self) -> tuple:
        return (self.value,) if self.minus is None else (self.value, self.minus)

    @property
    def matrix(self) -> tuple[int, int]:
        m, n = self.value.outputs[0].shape
        return (n, m) if self.transpose else (m, n)

    @property
    def rank(self) -> int:
        m, n = self.matrix
        return max(1, min(self.max_rank, m, n))

    @property
    def outputs(self) -> tuple[Spec, ...]:
        m, n = self.matrix
        return (Spec(self.module + ".A", (self.rank, n), F32), Spec(self.module + ".B", (m, self.rank), F32))

    @property
    def workspace_bytes(self) -> int:
        m, n = self.matrix
        return svd_workspace(m, n, self.rank) + (8 * m * n if self.minus is not None else 0)

    def run(self, ctx: Any, args: list) -> tuple[torch.Tensor, torch.Tensor]:
        with ctx.measuring():
            moved = _moved(ctx, args)
            delta = moved[0].to(F32) if len(moved) == 1 else torch.sub(moved[0].to(F32), moved[1])
            del moved
            found = truncated_svd(delta.T if self.transpose else delta, self.max_rank, self.max_error,
                                  randomised=self.randomised)
        self.manifest.record(self.module, found.rank, found.error, found.norm, found.algorithm)
        return _cpu(found.a), _cpu(found.b)


@node_kind
@dataclass(frozen=True)
class Differs(NodeBase):
    """One bool: whether two tensors differ anywhere."""

    value: Any
    other: Any
    tensor: str
    group: str

    dtype = torch.bool
    shape = (1,)

    @property
    def args(self) -> tuple:
        return (self.value, self.other)

    @property
    def outputs(self) -> tuple[Spec, ...]:
        return (Spec(self.tensor, (1,), torch.bool),)

    @property
    def workspace_bytes(self) -> int:
        return numel(self.value.outputs[0].shape)  # the element-wise comparison

    def run(self, ctx: Any, args: list) -> torch.Tensor:
        with ctx.measuring():
            a, b = _moved(ctx, args)
            return torch.tensor([not torch.equal(a, b)])
