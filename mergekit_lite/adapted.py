"""Adapters as inputs of a merge graph: ``base+adapter`` models, and adapters as task vectors.

A *source* gives the compiler, per tensor name, the node that produces that tensor (see
:class:`mergekit_lite.graph.FileSource`). The sources here wrap adapters:

- :class:`AdaptedSource` is ``base+adapter`` as a model: every tensor of the base (a model on disk
  or an earlier step), with the adapter folded into the tensors it changes (:class:`FoldLora`,
  :class:`FoldIA3`) and its ``modules_to_save`` replacing theirs. Nothing is materialised: each fold
  happens when its output tensor is computed, and no merged copy is ever written.
- :class:`DeltaSource` is an adapter as a task vector over the modules some adapter of a plan
  changes: ΔW = scaling · B @ A per module (zero where this adapter does not touch it), or for IA3
  the scaling vector (the identity where absent), in float32. :class:`ConstantSource` is the base
  of such a plan: zeros (or ones for IA3 vectors). Adapter outputs
  (:mod:`mergekit_lite.adapter_output`) merge these with any engine method.

Every adapted module is checked against the base's headers first (:func:`~.io.adapters.bind`): a
module with no base tensor, or a shape that disagrees, is a plan error naming both.
"""

from __future__ import annotations

from typing import Any

import torch

from .adapter_nodes import Constant, FoldIA3, FoldLora, LoraDelta, MapValues
from .errors import PlanError
from .io.adapters import AdapterFiles, LoraModule, Placement, bind
from .io.reader import TensorMeta
from .nodes import Load, Merge, NodeBase
from .plan.expand import SourceInfo, TensorInfo
from .plan.schema import MergePlan, ModelRef


def load(meta: TensorMeta, group: str, label: str) -> Load:
    return Load(meta.file, meta.name, group, meta.shape, meta.dtype, label, meta.offset)


def rounded(node: Any, tensor: str, group: str, shape: tuple[int, ...], dtype: torch.dtype) -> Any:
    """`node`'s value in `dtype` (a passthrough merge rounds it, as any result is rounded)."""
    if node.dtype == dtype:
        return node
    return Merge("passthrough", "", tensor, group, (node,), None, (), (("scale", (1.0,)),), None, shape, dtype, dtype)


def placements(adapter: AdapterFiles, info: SourceInfo, step: MergePlan, ref: ModelRef) -> dict[str, Placement]:
    """Bind `adapter` to the base described by `info`; problems become one PlanError at `ref`'s place."""
    placed, problems = bind(adapter, {n: t.shape for n, t in info.tensors.items()}, info.label)
    if problems:
        where = ref_path(step, ref)
        shown = problems[:20] + ([f"... and {len(problems) - 20} more"] if len(problems) > 20 else [])
        raise PlanError([step.issue(where, p) for p in shown])
    return placed


def ref_path(step: MergePlan, ref: ModelRef) -> tuple:
    """Where `ref` is named in the step (its first mention), for messages."""
    if step.base_model == ref:
        return ("base_model",)
    for m in step.models or ():
        if m.model == ref:
            return m.path[len(step.prefix):] + ("model",)
    for sl in step.slices or ():
        for s in sl.sources:
            if s.model == ref:
                return s.path[len(step.prefix):] + ("model",)
    return ()


class AdaptedSource:
    """``base+adapter``: the inner source's tensors, with the adapter applied where it changes them."""

    def __init__(self, ref: ModelRef, inner: Any, adapter: AdapterFiles, step: MergePlan):
        self.ref = ref
        self.inner = inner
        self.adapter = adapter
        self.label = f"model '{ref}'"
        self.placed = placements(adapter, inner.info, step, ref)
        info = inner.info
        self.info = SourceInfo(self.label, dict(info.tensors), info.config, info.arch)

    def vocab(self) -> Any:
        return self.inner.vocab()

    def tokenizer(self) -> Any:
        return self.inner.tokenizer()

    def folder(self) -> str | None:
        return self.inner.folder()

    def node(self, tensor: str, group: str) -> NodeBase:
        meta = self.adapter.replaced.get(tensor)
        if meta is not None:  # modules_to_save: the adapter's copy, in the base's dtype
            want = self.info.tensors[tensor]
            node = rounded(load(meta, group, self.adapter.label), tensor, group, want.shape, want.dtype)
        else:
            node = self.inner.node(tensor, group)
        place = self.placed.get(tensor)
        if place is None:
            return node
        info = self.info.tensors[tensor]
        mod = place.module
        if isinstance(mod, LoraModule):
            return FoldLora(node, load(mod.a, group, self.adapter.label), load(mod.b, group, self.adapter.label),
                            tensor, group, mod.scaling, place.transpose, info.shape, info.dtype)
        return FoldIA3(node, load(mod.vector, group, self.adapter.label), tensor, group, place.transpose,
                       info.shape, info.dtype)


class _OverBase:
    """Sources over the base of an adapter output: its vocabulary, tokenizer and folder are the base's."""

    base: Any

    def vocab(self) -> Any:
        return self.base.vocab()

    def tokenizer(self) -> Any:
        return self.base.tokenizer()

    def folder(self) -> str | None:
        return self.base.folder()


class DeltaSource(_OverBase):
    """An adapter as a task vector over `shapes` (the modules any adapter of the plan changes);
    the `whole` tensors (some adapter's modules_to_save) are full tensors: this adapter's, or the
    base's where it does not replace them."""

    def __init__(self, ref: ModelRef, adapter: AdapterFiles, placed: dict[str, Placement],
                 shapes: dict[str, tuple[int, ...]], base: Any, whole: set[str], log_space: bool = False):
        self.ref = ref
        self.adapter = adapter
        self.placed = placed
        self.shapes = shapes
        self.base = base
        self.whole = whole
        self.log_space = log_space
        self.label = adapter.label
        tensors = {n: TensorInfo(s, torch.float32) for n, s in shapes.items()}
        self.info = SourceInfo(self.label, tensors, base.info.config, base.info.arch)

    def node(self, tensor: str, group: str) -> NodeBase:
        if tensor in self.whole:
            meta = self.adapter.replaced.get(tensor)
            return load(meta, group, self.label) if meta is not None else self.base.node(tensor, group)
        place = self.placed.get(tensor)
        shape = self.shapes[tensor]
        if place is None:
            return Constant(identity(self.adapter.kind, self.log_space), tensor, group, shape)
        mod = place.module
        if isinstance(mod, LoraModule):
            return LoraDelta(load(mod.a, group, self.label), load(mod.b, group, self.label), tensor, group,
                             mod.scaling, place.transpose, shape)
        vector = load(mod.vector, group, self.label)
        return MapValues(vector, "log", tensor, group) if self.log_space else vector


class ConstantSource(_OverBase):
    """The base of a merge in delta space: every tensor is the identity (zeros; ones for IA3),
    but the `whole` tensors, which are the base's own."""

    def __init__(self, ref: ModelRef, shapes: dict[str, tuple[int, ...]], base: Any, whole: set[str], kind: str,
                 log_space: bool = False):
        self.ref = ref
        self.shapes = shapes
        self.base = base
        self.whole = whole
        self.value = identity(kind, log_space)
        self.label = f"model '{ref}'"
        tensors = {n: TensorInfo(s, torch.float32) for n, s in shapes.items()}
        self.info = SourceInfo(self.label, tensors, base.info.config, base.info.arch)

    def node(self, tensor: str, group: str) -> NodeBase:
        if tensor in self.whole:
            return self.base.node(tensor, group)
        return Constant(self.value, tensor, group, self.shapes[tensor])


def identity(kind: str, log_space: bool) -> float:
    """The change that changes nothing: ΔW = 0 for LoRA, l = 1 (log l = 0) for IA3."""
    return 1.0 if kind == "ia3" and not log_space else 0.0
