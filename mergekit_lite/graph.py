"""The dependency graph of a merge: small frozen task records in a networkx DAG.

A recipe (one or more steps) compiles into three kinds of nodes:

- :class:`Load` reads one tensor of one model file;
- :class:`Merge` calls a registered method on its input nodes (loads, or merges of an earlier step);
- :class:`Write` sends a result to an output folder (:class:`Emit` hands it to Python code instead).

Every node belongs to a *group*: the output tensor it is computed for. Nodes are deduplicated
within a group (a base model read by two steps of one tensor is read once) but not across groups,
so a tensor used by two far-apart outputs (a repeated layer) is read again rather than held in
memory for the whole run. Groups are ordered like the output (embeddings, layers in order, heads),
which follows the input shards; the executor runs them in that order.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Iterable, Mapping, Union

import networkx as nx
import torch

from . import methods
from .arch import detect
from .dtypes import element_size, numel
from .errors import ModelNotFound, TensorNotFound
from .io.reader import ModelFiles, TensorMeta, open_model
from .io.resolve import resolve_model
from .io.writer import PlannedTensor
from .plan.expand import OutputTensor, SourceInfo, StepLayout, TensorInfo, expand, upscale_to_slices
from .plan.schema import MergePlan, ModelRef, Recipe


@dataclass(frozen=True)
class Load:
    file: str
    tensor: str
    group: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    model: str  # label for messages
    offset: int = 0  # of the tensor's bytes in the file

    @property
    def nbytes(self) -> int:
        return numel(self.shape) * element_size(self.dtype)


@dataclass(frozen=True)
class Merge:
    method: str
    step: str
    tensor: str  # output tensor name within its step
    group: str
    inputs: tuple["Node", ...]
    base: Union["Node", None]
    params: tuple[tuple[str, Any], ...]
    model_params: tuple[tuple[str, tuple[Any, ...]], ...]
    seeds: tuple[int, ...] | None
    shape: tuple[int, ...]
    dtype: torch.dtype  # the step's output dtype; the float32 result is rounded to it

    @property
    def nbytes(self) -> int:
        return numel(self.shape) * element_size(self.dtype)

    @property
    def workspace_bytes(self) -> int:
        """Peak float32 temporaries of the method call (result included)."""
        n = len(self.inputs) + (self.base is not None)
        return int(methods.get(self.method).workspace(n) * numel(self.shape) * 4)


class _Sink:
    value: "Node"
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        """Bytes of the value in the sink's dtype."""
        return numel(self.value.shape) * element_size(self.dtype)


@dataclass(frozen=True)
class Write(_Sink):
    output: str  # output folder key ("" for the main output)
    tensor: str
    value: "Node"
    dtype: torch.dtype
    group: str


@dataclass(frozen=True)
class Emit(_Sink):
    tensor: str
    value: "Node"
    dtype: torch.dtype
    group: str


Node = Union[Load, Merge]
Sink = Union[Write, Emit]


def inputs_of(node: Any) -> tuple:
    if isinstance(node, Merge):
        return node.inputs + ((node.base,) if node.base is not None else ())
    if isinstance(node, (Write, Emit)):
        return (node.value,)
    return ()


def stable_seed(*parts: object) -> int:
    """A 63-bit seed from the parts' text; the same on every machine and process (unlike hash())."""
    digest = hashlib.blake2b("\x1f".join(str(p) for p in parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & 0x7FFF_FFFF_FFFF_FFFF


# ------------------------------------------------------------------------------------------------
# sources: where a step's input tensors come from


class FileSource:
    """A model on disk."""

    def __init__(self, ref: ModelRef, files: ModelFiles):
        self.ref = ref
        self.files = files
        self.label = f"model '{ref}'"
        arch = detect(files.tensors, files.config)
        self.info = SourceInfo(self.label, {n: TensorInfo(m.shape, m.dtype) for n, m in files.tensors.items()},
                               files.config, arch)

    def node(self, tensor: str, group: str) -> Load:
        meta: TensorMeta = self.files.tensors[tensor]
        return Load(meta.file, tensor, group, meta.shape, meta.dtype, self.label, meta.offset)


class StepSource:
    """The output of an earlier step, computed in the graph, never written unless asked for."""

    def __init__(self, compiler: "StepCompiler"):
        self.compiler = compiler
        self.label = f"step '{compiler.plan.name}'"
        layout = compiler.layout
        tensors = {t.name: TensorInfo(t.shape, t.dtype) for t in layout.tensors}
        self.info = SourceInfo(self.label, tensors, layout.config, detect(tensors, layout.config))

    def node(self, tensor: str, group: str) -> Node:
        return self.compiler.node(tensor, group)


class StepCompiler:
    """One step: its expanded layout, and its nodes built on demand per (tensor, group)."""

    def __init__(self, plan: MergePlan, sources: Mapping[ModelRef, Any], seed: int):
        self.plan = plan
        self.sources = sources
        self.seed = seed
        self.layout: StepLayout = expand(plan, {ref: src.info for ref, src in sources.items()})
        self.by_name = {t.name: t for t in self.layout.tensors}
        self._nodes: dict[tuple[str, str], Node] = {}
        self.save_sinks: dict[str, Write] = {}  # tensor -> Write, when the step has `save:`

    def node(self, tensor: str, group: str) -> Node:
        key = (tensor, group)
        if key in self._nodes:
            return self._nodes[key]
        ot: OutputTensor = self.by_name[tensor]
        if ot.copy:
            node = self.sources[ot.inputs[0].ref].node(ot.inputs[0].tensor, group)
            if node.dtype != ot.dtype:  # a copy written in another dtype: round it like any result
                node = Merge("passthrough", self.plan.name or "", tensor, group, (node,), None, (),
                             (("scale", (1.0,)),), None, ot.shape, ot.dtype)
        else:
            method = methods.get(self.plan.merge_method)
            ins = tuple(self.sources[i.ref].node(i.tensor, group) for i in ot.inputs)
            base = self.sources[ot.base.ref].node(ot.base.tensor, group) if ot.base else None
            seeds = None
            if method.random:
                seeds = tuple(stable_seed(self.seed, self.plan.name or "", tensor, str(i.ref)) for i in ot.inputs)
            node = Merge(method.name, self.plan.name or "", tensor, group, ins, base, ot.params, ot.model_params,
                         seeds, ot.shape, ot.dtype)
        self._nodes[key] = node
        if self.plan.save and tensor not in self.save_sinks:
            self.save_sinks[tensor] = Write(self.plan.save, tensor, node, ot.dtype, group)
        return node


# ------------------------------------------------------------------------------------------------
# compiling a recipe


@dataclass
class Compiled:
    """A recipe ready to run: the graph, its sinks in order, and what the output will hold."""

    recipe: Recipe
    graph: nx.DiGraph
    groups: list[tuple[str, list[Any]]]  # (group, its nodes in execution order)
    layout: StepLayout  # of the output step
    steps: dict[str, StepCompiler]
    outputs: dict[str, tuple[list[PlannedTensor], StepLayout]]  # output key -> (tensors, layout)
    files: dict[str, ModelFiles] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    # merges whose only consumers are sinks: their float32 result is handed to the sink as is and
    # rounded there (the writer rounds chunk by chunk, so no rounded copy is ever whole in memory)
    keep_f32: frozenset = frozenset()

    @cached_property
    def needs(self) -> list[int]:
        """Peak bytes of each group (see :func:`group_need`), computed once."""
        return [group_need(self.graph, nodes, self.keep_f32) for _, nodes in self.groups]

    @property
    def max_need(self) -> int:
        return max(self.needs, default=0)

    @cached_property
    def largest_input_f32(self) -> int:
        """Bytes of the largest tensor read, in float32."""
        return max((numel(n.shape) * 4 for n in self.graph if isinstance(n, Load)), default=0)

    def value_bytes(self, node: Any) -> int:
        return value_bytes(node, self.keep_f32)


def open_sources(recipe: Recipe, plan_dir: str | None, known: dict[str, ModelFiles] | None = None
                 ) -> dict[str, ModelFiles]:
    """Resolve and index every model file the recipe names (headers only); `known` ones are reused."""
    step_names = {s.name for s in recipe.steps if s.name}
    files: dict[str, ModelFiles] = dict(known or {})
    problems: list[str] = []
    for step in recipe.steps:
        refs = step.referenced_models()
        if isinstance(step.tokenizer_source, ModelRef):
            refs.append(step.tokenizer_source)
        for ref in refs:
            if ref.path in step_names and ref.revision is None:
                continue
            key = str(ref)
            if key in files:
                continue
            try:
                files[key] = open_model(resolve_model(ref.path, ref.revision, plan_dir))
            except ModelNotFound as exc:
                hint = ""
                if step_names and "/" not in ref.path:
                    hint = f"; nor is it a step of this plan (steps: {', '.join(sorted(step_names))})"
                problems.append(f"{exc}{hint}")
    if problems:
        if len(problems) == 1:
            raise ModelNotFound(problems[0])
        raise ModelNotFound("cannot open the models:\n" + "\n".join(f"  - {p}" for p in problems))
    return files


def compile_recipe(recipe: Recipe, *, plan_dir: str | None = None, seed: int | None = None,
                   dtype: torch.dtype | None = None, sink: str = "write",
                   files: dict[str, ModelFiles] | None = None, only: Iterable[str] | None = None) -> Compiled:
    """Build the graph of `recipe`. `seed` overrides the plan's; `dtype` overrides the written dtype;
    `sink` is ``"write"`` (Write nodes into the output) or ``"emit"`` (Emit nodes for Python);
    `only` restricts the output to these tensor names; `files` are already-opened models."""
    files = open_sources(recipe, plan_dir, known=files)
    file_sources: dict[str, FileSource] = {}
    compilers: dict[str, StepCompiler] = {}
    warnings = list(recipe.warnings)
    for step in recipe.steps:
        sources: dict[ModelRef, Any] = {}
        for ref in step.referenced_models():
            if ref.revision is None and ref.path in compilers:
                sources[ref] = StepSource(compilers[ref.path])
            else:
                key = str(ref)
                if key not in file_sources:
                    file_sources[key] = FileSource(ref, files[key])
                sources[ref] = file_sources[key]
        if step.depth_upscale is not None:
            step = upscale_to_slices(step, sources[step.depth_upscale.model].info.arch.num_layers)
        step_seed = seed if seed is not None else (step.seed if step.seed is not None else 0)
        comp = StepCompiler(step, sources, step_seed)
        warnings.extend(comp.layout.warnings)
        compilers[step.name or ""] = comp
    final = compilers[recipe.output.name or ""]

    sinks: list[Any] = []
    planned: list[PlannedTensor] = []
    wanted = set(only) if only is not None else None
    if wanted is not None:
        unknown = sorted(wanted - set(final.by_name))
        if unknown:
            raise TensorNotFound(f"the merged model has no tensor {unknown[0]!r}; it has "
                                 f"{len(final.by_name)} tensors, e.g. {next(iter(final.by_name), '')!r}")
    for ot in final.layout.tensors:
        if wanted is not None and ot.name not in wanted:
            continue
        node = final.node(ot.name, ot.name)
        out_dtype = dtype if (dtype is not None and ot.dtype.is_floating_point) else ot.dtype
        planned.append(PlannedTensor(ot.name, ot.shape, out_dtype))
        sinks.append(Write("", ot.name, node, out_dtype, ot.name) if sink == "write"
                     else Emit(ot.name, node, out_dtype, ot.name))
    outputs: dict[str, tuple[list[PlannedTensor], StepLayout]] = {"": (planned, final.layout)}
    # An intermediate step with `save:` also writes every tensor. Those the output already computes
    # are written from the same node; the others get groups of their own.
    for comp in compilers.values():
        if comp is final or not comp.plan.save or wanted is not None:
            continue
        for ot in comp.layout.tensors:
            if ot.name not in comp.save_sinks:
                comp.node(ot.name, f"{comp.plan.save}::{ot.name}")
        sinks.extend(comp.save_sinks[ot.name] for ot in comp.layout.tensors)
        outputs[comp.plan.save] = ([PlannedTensor(ot.name, ot.shape, ot.dtype) for ot in comp.layout.tensors],
                                   comp.layout)
    graph = nx.DiGraph()
    for s in sinks:
        _add(graph, s)
    keep_f32 = frozenset(n for n in graph if isinstance(n, Merge) and n.dtype != torch.float32
                         and all(isinstance(c, (Write, Emit)) for c in graph.successors(n)))
    return Compiled(recipe, graph, order_groups(graph, sinks), final.layout, compilers, outputs, files, warnings,
                    keep_f32)


def _add(graph: nx.DiGraph, node: Any) -> None:
    if node in graph:
        return
    graph.add_node(node)
    for dep in inputs_of(node):
        _add(graph, dep)
        graph.add_edge(dep, node)


def order_groups(graph: nx.DiGraph, sinks: list[Any]) -> list[tuple[str, list[Any]]]:
    """Execution order: groups in the order of their first sink (the output order); inside a group,
    a depth-first post-order from its sinks, so each tensor is read just before the merge that
    needs it and an earlier step's inputs are freed before a later step's are read."""
    by_group: dict[str, list[Any]] = {}
    for s in sinks:
        by_group.setdefault(s.group, []).append(s)
    groups: list[tuple[str, list[Any]]] = []
    for group, group_sinks in by_group.items():
        order: list[Any] = []
        seen: set[Any] = set()

        def visit(node: Any) -> None:
            if node in seen:
                return
            seen.add(node)
            for dep in inputs_of(node):
                visit(dep)
            order.append(node)

        for s in group_sinks:
            visit(s)
        groups.append((group, order))
    return groups


def value_bytes(node: Any, keep_f32: frozenset = frozenset()) -> int:
    """Bytes of a node's value while it is alive."""
    if node in keep_f32:
        return numel(node.shape) * 4
    return node.nbytes


def group_need(graph: nx.DiGraph, nodes: list[Any], keep_f32: frozenset = frozenset()) -> int:
    """Peak bytes alive while running `nodes` in order (the executor's own accounting).

    A value consumed by a sink stays counted until the group ends: the writer thread holds it
    until it is on disk. A merge's float32 result is part of its workspace; rounding it to the
    step's dtype copies it, unless only sinks consume it (they round it themselves).
    """
    remaining = {n: graph.out_degree(n) for n in nodes}
    live = peak = 0
    for node in nodes:
        if isinstance(node, Load):
            live += node.nbytes
        elif isinstance(node, Merge):
            cast = node.nbytes if (node.dtype != torch.float32 and node not in keep_f32) else 0
            peak = max(peak, live + node.workspace_bytes + cast)
            live += value_bytes(node, keep_f32)
        elif isinstance(node, Emit) and node.dtype != (torch.float32 if node.value in keep_f32 else node.value.dtype):
            live += node.nbytes  # Emit hands over a rounded copy; a Write rounds chunk by chunk
        peak = max(peak, live)
        sink = isinstance(node, (Write, Emit))
        for dep in inputs_of(node):
            remaining[dep] -= 1
            if remaining[dep] == 0 and not sink:
                live -= value_bytes(dep, keep_f32)
    return peak


def describe(compiled: Compiled) -> dict[str, Any]:
    """Numbers for ``mergekit-lite plan``: what will be read, computed and written."""
    g = compiled.graph
    loads = [n for n in g if isinstance(n, Load)]
    merges = [n for n in g if isinstance(n, Merge)]
    writes = [n for n in g if isinstance(n, (Write, Emit))]
    per_tensor = [len(inputs_of(n)) for n in merges]
    return {
        "output_tensors": len([w for w in writes if getattr(w, "output", "") == ""]),
        "loads": len(loads),
        "merges": len(merges),
        "bytes_read": sum(n.nbytes for n in loads),
        "bytes_written": sum(w.nbytes for w in writes),
        "max_inputs_per_tensor": max(per_tensor, default=0),
        "min_inputs_per_tensor": min(per_tensor, default=0),
        "peak_step_bytes": compiled.max_need,
        "largest_tensor_f32": compiled.largest_input_f32,
    }
