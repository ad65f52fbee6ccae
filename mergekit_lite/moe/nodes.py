"""The node kinds of a mixture of experts that are not a plain read: each one class, through the node
contract of :mod:`mergekit_lite.nodes` (the executor and the memory ledger learn nothing about MoEs).

- :class:`EmbeddingRows` reads only the embedding rows of the prompts' tokens (a few positioned reads
  of one row each), never the whole matrix, once per layer's router;
- :class:`EmbedRouter`, :class:`RandomRouter` and :class:`HiddenRouter` make a router tensor
  (``cheap_embed``; ``random`` / ``uniform_random``; ``hidden*``); the last reads nothing itself and
  takes its rows from the one forward pass of :mod:`.hidden`;
- :class:`Perturbed` is an expert tensor with mergekit-moe's ``noise_scale`` / ``residual_scale``;
- :class:`Zeros` is a bias an architecture needs and the base lacks (qwen2_moe's q/k/v biases).

Every generated value is float32; the sink that writes it rounds it to the output dtype.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..dtypes import element_size, numel
from ..nodes import NodeBase, Spec, node_kind
from . import gates

F32 = torch.float32


class _Generated(NodeBase):
    """A node whose one float32 output is made by :meth:`make` (under the executor's measuring)."""

    tensor: str
    shape: tuple[int, ...]
    dtype = F32

    @property
    def outputs(self) -> tuple[Spec, ...]:
        return (Spec(self.tensor, self.shape, F32),)

    @property
    def nbytes(self) -> int:
        return numel(self.shape) * 4

    def run(self, ctx: Any, args: list) -> torch.Tensor:
        with ctx.measuring():
            return self.make(ctx, args)

    def make(self, ctx: Any, args: list) -> torch.Tensor:  # pragma: no cover - every kind defines it
        raise NotImplementedError


@node_kind
@dataclass(frozen=True)
class EmbeddingRows(NodeBase):
    """Rows `ids` of an embedding matrix (row i of a row-major (vocab, width) tensor is one run of bytes)."""

    prefetched = True

    file: str
    tensor: str
    group: str
    offset: int  # of the matrix's first byte in the file
    width: int
    dtype: torch.dtype
    ids: tuple[int, ...]  # sorted, distinct
    model: str  # label for messages

    @property
    def outputs(self) -> tuple[Spec, ...]:
        return (Spec(f"{self.tensor}[rows]", (len(self.ids), self.width), self.dtype),)

    def start(self, ctx: Any) -> None:
        row = self.width * element_size(self.dtype)

        def read() -> torch.Tensor:
            rows = [ctx.read(self.file, self.offset + i * row, (self.width,), self.dtype) for i in self.ids]
            return torch.stack(rows) if rows else torch.empty((0, self.width), dtype=self.dtype)

        ctx.prefetch(self, read)

    def run(self, ctx: Any, args: list) -> torch.Tensor:
        return ctx.fetched(self)


@node_kind
@dataclass(frozen=True)
class EmbedRouter(_Generated):
    """``cheap_embed``: one row per expert from its prompts' embedding rows (:func:`gates.cheap_embed_gate`)."""

    tensor: str
    group: str
    shape: tuple[int, ...]
    rows: EmbeddingRows
    prompts: tuple[tuple[tuple[tuple[int, ...], ...], tuple[tuple[int, ...], ...]], ...]  # per expert (pos, neg)
    pad: int

    @property
    def args(self) -> tuple:
        return (self.rows,)

    @property
    def workspace_bytes(self) -> int:
        return gates.cheap_embed_workspace(self.shape[-1], self.prompts, len(self.rows.ids))

    def make(self, ctx: Any, args: list) -> torch.Tensor:
        index = {token: i for i, token in enumerate(self.rows.ids)}
        return gates.cheap_embed_gate(args[0], index, self.prompts, self.pad)


@node_kind
@dataclass(frozen=True)
class RandomRouter(_Generated):
    """``random`` / ``uniform_random``: seeded by (plan seed, tensor name), so order-independent."""

    tensor: str
    group: str
    shape: tuple[int, ...]
    seed: int
    uniform: bool

    @property
    def workspace_bytes(self) -> int:
        return self.nbytes

    def make(self, ctx: Any, args: list) -> torch.Tensor:
        return gates.random_gate(self.shape, self.seed, self.uniform)


@node_kind
@dataclass(frozen=True)
class HiddenRouter(_Generated):
    """``hidden*``: layer `layer`'s rows for `experts` from the base model's hidden states (computed
    once, by the first router that runs; that run holds the base model, so each declares it)."""

    tensor: str
    group: str
    shape: tuple[int, ...]
    states: Any  # the plan's HiddenStates (moe/hidden.py), shared by every layer's router
    layer: int
    experts: tuple[int, ...]  # rows of the states to take

    @property
    def workspace_bytes(self) -> int:
        return self.states.workspace_bytes + self.nbytes

    def make(self, ctx: Any, args: list) -> torch.Tensor:
        return self.states.rows(self.layer, self.experts, ctx.device)


@node_kind
@dataclass(frozen=True)
class Perturbed(_Generated):
    """An expert tensor with mergekit-moe's perturbations: (θ + noise_scale·N(0, 1)) · residual_scale,
    the noise seeded by (plan seed, tensor name); residual_scale applies to down projections only."""

    tensor: str
    group: str
    shape: tuple[int, ...]
    source: Any  # the node of the expert's tensor
    noise_scale: float | None
    residual_scale: float | None
    seed: int

    @property
    def args(self) -> tuple:
        return (self.source,)

    @property
    def workspace_bytes(self) -> int:
        return self.nbytes * (2 if self.noise_scale is not None else 1)

    def make(self, ctx: Any, args: list) -> torch.Tensor:
        out = args[0].to(F32, copy=True)
        if self.noise_scale is not None:
            gen = torch.Generator(device="cpu").manual_seed(self.seed)
            out.add_(torch.randn(self.shape, generator=gen, dtype=F32).mul_(self.noise_scale))
        if self.residual_scale is not None:
            out.mul_(self.residual_scale)
        return out


@node_kind
@dataclass(frozen=True)
class Zeros(_Generated):
    """A tensor of zeros (a bias the output architecture has and the base model lacks)."""

    tensor: str
    group: str
    shape: tuple[int, ...]

    @property
    def workspace_bytes(self) -> int:
        return self.nbytes

    def make(self, ctx: Any, args: list) -> torch.Tensor:
        return torch.zeros(self.shape, dtype=F32)
