"""Compiling a recipe into the dependency graph of a merge: node records in a networkx DAG.

The compiler sees headers only: the runner has already resolved and opened every input
(:func:`mergekit_lite.io.inputs.open_inputs`). Each step is expanded (:mod:`.plan.expand`) into
output tensors; each output tensor becomes nodes (:mod:`.nodes`): loads of the tensors it needs,
the merges of every step on the way, and the sinks that write it (or hand it to Python).

Every node belongs to a *group*: the output tensor it is computed for. Nodes are deduplicated
within a group (a base model read by two steps of one tensor is read once) but not across groups,
so a tensor used by two far-apart outputs (a repeated layer) is read again rather than held in
memory for the whole run. Groups are ordered like the output (embeddings, layers in order, heads),
which follows the input shards; the executor runs them in that order, each under the peak that the
memory ledger (:mod:`.ledger`) plans for it here.

The result, :class:`Compiled`, is frozen: the graph, the groups with their planned peaks, and one
:class:`OutputSpec` per output folder (what it holds and where its config, tokenizer and card
come from), so that nothing downstream digs through steps or plans again.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Any, Iterable, Mapping

import networkx as nx
import torch

from . import methods
from .adapted import AdaptedSource
from .arch import detect
from .blocks import BLOCK_NUMEL, stream
from .compute import Merge
from .dtypes import numel
from .errors import MergeError, TensorNotFound
from .io.reader import ModelFiles, TensorMeta
from .io.vocab import TokenizerOutput, Vocab
from .io.writer import PlannedTensor, ShardLayout, ShardLimit
from .ledger import plan_peak
from .nodes import NODE_KINDS, AlignVocab, Emit, Load, NodeBase, Pick, Write, stable_seed
from .plan.expand import OutputTensor, SourceInfo, StepLayout, TensorInfo, expand
from .plan.schema import MergePlan, ModelRef, Recipe
from .rounding import decide_rounding
from .steps import (CardData, StepSummary, card_data, config_folder, consistent_config, output_tokenizer,
                    step_summaries)
from .vocab import Alignment, align_step, members_of

__all__ = ["Compiled", "OutputSpec", "compile_recipe", "describe", "Load", "Merge", "Pick", "Write", "Emit",
           "stable_seed", "inputs_of", "order_groups", "assemble"]


def inputs_of(node: Any) -> tuple:
    return node.args


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

    def vocab(self) -> Vocab | None:
        return self.files.vocab()

    def tokenizer(self) -> TokenizerOutput:
        return TokenizerOutput(self.files.folder)

    def folder(self) -> str:
        return self.files.folder


class StepSource:
    """The output of an earlier step, computed in the graph, never written unless asked for."""

    def __init__(self, compiler: "StepCompiler"):
        self.compiler = compiler
        self.label = f"step '{compiler.plan.name}'"
        layout = compiler.layout
        tensors = {t.name: TensorInfo(t.shape, t.dtype) for t in layout.tensors}
        self.info = SourceInfo(self.label, tensors, layout.config, detect(tensors, layout.config))

    def node(self, tensor: str, group: str) -> NodeBase:
        return self.compiler.node(tensor, group)

    def vocab(self) -> Vocab | None:
        return self.compiler.vocab()

    def tokenizer(self) -> TokenizerOutput:
        return self.compiler.tokenizer

    def folder(self) -> str | None:
        return config_folder(self.compiler)


class StepCompiler:
    """One step: its vocabulary alignment, its expanded layout, and its nodes built on demand per
    (tensor, group)."""

    def __init__(self, plan: MergePlan, sources: Mapping[ModelRef, Any], seed: int, lookup: Any,
                 allow_crimes: bool = False):
        self.sources = sources
        self.seed = seed
        self.lookup = lookup  # ModelRef -> its source (models the step does not merge included)
        infos = {ref: src.info for ref, src in sources.items()}
        self.alignment: Alignment | None = align_step(plan, members_of(plan, sources), lambda ref: lookup(ref).vocab())
        if self.alignment is not None:
            infos = {ref: self.alignment.aligned(info, ref) for ref, info in infos.items()}
        self.layout: StepLayout = expand(plan, infos, allow_crimes=allow_crimes)
        self.plan = self.layout.plan  # as expanded (a depth_upscale short form becomes slices)
        self.by_name = {t.name: t for t in self.layout.tensors}
        self._nodes: dict[tuple[str, str], NodeBase] = {}
        self.save_sinks: dict[str, Write] = {}  # tensor -> Write, when the step has `save:`

    @cached_property
    def tokenizer(self) -> TokenizerOutput:
        """The tokenizer of this step's output (see :func:`mergekit_lite.steps.output_tokenizer`)."""
        return output_tokenizer(self)

    def vocab(self) -> Vocab | None:
        """The vocabulary of this step's output, for a later step that aligns it."""
        if self.alignment is not None:
            al = self.alignment
            donor = self.lookup(al.donor).vocab()
            added = {t: e for t, e in (donor.added if donor else {}).items() if t in al.tokens}
            added.update({t: dict(f) for t, _, f in al.tokenizer.added})
            return Vocab(dict(al.tokens), added)
        return self.lookup(self.tokenizer_ref).vocab()

    @property
    def tokenizer_ref(self) -> ModelRef:
        """The model whose tokenizer this step's output takes when it builds none."""
        src = self.plan.tokenizer_source
        if src == "base":
            return self.plan.base_model or self.layout.donor
        return src if isinstance(src, ModelRef) else self.layout.donor

    def node(self, tensor: str, group: str) -> NodeBase:
        key = (tensor, group)
        if key not in self._nodes:
            ot: OutputTensor = self.by_name[tensor]
            if ot.producer is not None:
                node = ot.producer(self.sources, self.seed, group)
            else:
                node = self._copy(ot, group) if ot.copy else self._merge(ot, group)
            self._nodes[key] = node
            if self.plan.save and tensor not in self.save_sinks:
                self.save_sinks[tensor] = Write(self.plan.save, tensor, node, ot.dtype, group)
        return self._nodes[key]

    def _input_nodes(self, ot: OutputTensor, group: str) -> list[NodeBase]:
        """The nodes of the tensor's inputs (base last); vocabulary tensors go through their alignment."""
        ins = list(ot.inputs) + ([ot.base] if ot.base else [])
        nodes = [self.sources[i.ref].node(i.tensor, group) for i in ins]
        al = self.alignment
        if al is not None and any(al.covers(i.ref, i.tensor) for i in ins):
            align = AlignVocab(ot.name, group, tuple(nodes), al.row_plan(tuple(i.ref for i in ins)))
            nodes = [Pick(align, k, group) for k in range(len(nodes))]
        return nodes

    def _copy(self, ot: OutputTensor, group: str) -> NodeBase:
        node = self._input_nodes(ot, group)[0]
        if node.dtype != ot.dtype:  # a copy written in another dtype: round it like any result
            node = Merge("passthrough", self.plan.name or "", ot.name, group, (node,), None, (),
                         (("scale", (1.0,)),), None, ot.shape, ot.dtype, ot.dtype)
        return node

    def _merge(self, ot: OutputTensor, group: str) -> Merge:
        method = methods.get(self.plan.merge_method)
        nodes = self._input_nodes(ot, group)
        ins, base = tuple(nodes[:len(ot.inputs)]), (nodes[-1] if ot.base else None)
        seeds = None
        if method.random:
            seeds = tuple(stable_seed(self.seed, self.plan.name or "", ot.name, str(i.ref)) for i in ot.inputs)
        return Merge(method.name, self.plan.name or "", ot.name, group, ins, base, ot.params, ot.model_params,
                     seeds, ot.shape, ot.dtype, ot.dtype, section=ot.section)


# ------------------------------------------------------------------------------------------------
# the compiled recipe


@dataclass(frozen=True)
class OutputSpec:
    """One output folder: what it holds, how it is sharded, where its other files come from."""

    key: str  # "" for the main output, else the folder of a step's ``save:``
    kind: str  # "model" (a Hugging Face model folder) or "adapter" (a PEFT adapter folder)
    tensors: tuple[PlannedTensor, ...]
    layout: ShardLayout
    config: Mapping[str, Any]  # consistent with the tensors written (dtype, layers, vocab_size); for an
    # adapter, adapter_config.json without the ranks
    tokenizer: TokenizerOutput  # the donor's tokenizer files, extended when the vocabulary was aligned
    config_folder: str | None  # the config donor's folder: generation config, custom code
    card: CardData
    manifest: Any = None  # adapters: the ranks and errors of the modules, recorded while running


@dataclass(frozen=True)
class Compiled:
    """A recipe ready to run: the graph, its groups in order with their planned peaks, the outputs."""

    recipe: Recipe
    graph: nx.DiGraph
    groups: tuple[tuple[str, tuple[Any, ...]], ...]  # (group, its nodes in execution order)
    needs: tuple[int, ...]  # planned peak bytes of each group (the ledger's dry run)
    layout: StepLayout  # of the output step
    outputs: tuple[OutputSpec, ...]
    steps: tuple[StepSummary, ...]
    warnings: tuple[str, ...] = ()
    inputs: tuple[str, ...] = ()  # every input model's folder (or file) and weight files: never written

    @property
    def max_need(self) -> int:
        return max(self.needs, default=0)

    @cached_property
    def order(self) -> dict[str, int]:
        """Group name -> its position in the execution order."""
        return {name: i for i, (name, _) in enumerate(self.groups)}

    @cached_property
    def largest_input_f32(self) -> int:
        """Bytes of the largest tensor read, in float32."""
        return max((numel(n.shape) * 4 for n in self.graph if isinstance(n, Load)), default=0)


def compile_recipe(recipe: Recipe, files: Mapping[str, ModelFiles], *, seed: int | None = None,
                   dtype: torch.dtype | None = None, sink: str = "write", only: Iterable[str] | None = None,
                   max_shard_size: int | ShardLimit = 5 * 10**9, allow_crimes: bool = False,
                   block_numel: int = BLOCK_NUMEL, clamp: bool = False) -> Compiled:
    """Build the graph of `recipe` over the opened `files` (``str(ModelRef)`` -> headers).

    `seed` overrides the plan's; `dtype` overrides the written dtype; `sink` is ``"write"`` (into
    the output folders) or ``"emit"`` (to Python); `only` restricts the output to these tensors;
    `allow_crimes` lets models of different architectures be merged (mergekit's --allow-crimes);
    tensors with more than `block_numel` entries are streamed in row blocks (:mod:`.blocks`);
    `clamp` clamps values that overflow the dtype they are rounded to (else they are an error)."""
    compilers = _compile_steps(recipe, files, seed, allow_crimes)
    final = compilers[recipe.output.name or ""]
    sinks, planned = _output_sinks(final, dtype, sink, only)
    outputs = {"": (planned, final)}
    if only is None:
        for comp in compilers.values():
            if comp is not final and comp.plan.save:
                sinks.extend(_save_sinks(comp))
                outputs[comp.plan.save] = ([PlannedTensor(t.name, t.shape, t.dtype) for t in comp.layout.tensors], comp)
    # a statistic over a whole step sees every tensor of it, even those not asked for (`only`)
    context = [final.node(t.name, t.name) for t in final.layout.tensors if only is not None and t.name not in only]
    try:
        roots = stream(decide_rounding(sinks, _build(sinks), clamp), block_numel, context)
    except ValueError as exc:  # a statistic over the whole model whose tensors disagree
        raise MergeError(str(exc)) from None
    graph, groups, needs = assemble(roots)
    specs = tuple(_output_spec(key, tensors, comp, files, recipe, max_shard_size, dtype if key == "" else None)
                  for key, (tensors, comp) in outputs.items())
    warnings = list(recipe.warnings) + [w for c in compilers.values() for w in c.layout.warnings]
    warnings += [w for c in compilers.values() if c.alignment is not None for w in c.alignment.warnings]
    return Compiled(recipe, graph, groups, needs, final.layout, specs, step_summaries(recipe, compilers), tuple(warnings),
                    input_paths(files))


def input_paths(files: Mapping[str, Any]) -> tuple[str, ...]:
    """Every opened input's folder (or single file) and weight files: what outputs keep away from."""
    out: set[str] = set()
    for m in files.values():
        out.add(m.path)
        out.update(getattr(m, "files", ()) or ())
    return tuple(sorted(out))


def assemble(roots: list[Any]) -> tuple[nx.DiGraph, tuple, tuple[int, ...]]:
    """The graph of everything `roots` (sinks, statistics' sweeps) need, its groups in execution
    order, and each group's planned peak (the ledger's dry run)."""
    graph = _build(roots)
    groups = tuple(order_groups(graph, roots))
    order = {name: i for i, (name, _) in enumerate(groups)}
    return graph, groups, tuple(plan_peak(graph, nodes, order) for _, nodes in groups)


def _compile_steps(recipe: Recipe, files: Mapping[str, Any], seed: int | None,
                   allow_crimes: bool) -> dict[str, StepCompiler]:
    sources: dict[str, Any] = {}
    compilers: dict[str, StepCompiler] = {}

    def lookup(ref: ModelRef) -> Any:
        """The source a reference names: an earlier step, else a model on disk (one object per model);
        either with an adapter applied (:class:`~mergekit_lite.adapted.AdaptedSource`)."""
        if ref.adapter is not None:
            key = "adapted:" + str(ref)
            if key not in sources:
                sources[key] = AdaptedSource(ref, lookup(ref.base), files[str(ref.adapter)], step)
            return sources[key]
        is_step = ref.revision is None and ref.path in compilers
        key = ("step:" if is_step else "file:") + str(ref)
        if key not in sources:
            sources[key] = StepSource(compilers[ref.path]) if is_step else FileSource(ref, files[str(ref)])
        return sources[key]

    for step in recipe.steps:
        compilers[step.name or ""] = StepCompiler(step, {ref: lookup(ref) for ref in step.referenced_models()},
                                                  step_seed(step, seed), lookup, allow_crimes)
    return compilers


def step_seed(step: MergePlan, seed: int | None) -> int:
    """The seed of a step's random methods: the run's override, else the plan's, else 0."""
    return seed if seed is not None else (step.seed if step.seed is not None else 0)


def _output_sinks(final: StepCompiler, dtype: torch.dtype | None, sink: str, only: Iterable[str] | None
                  ) -> tuple[list[Any], list[PlannedTensor]]:
    wanted = set(only) if only is not None else None
    if wanted is not None:
        unknown = sorted(wanted - set(final.by_name))
        if unknown:
            raise TensorNotFound(f"the merged model has no tensor {unknown[0]!r}; it has "
                                 f"{len(final.by_name)} tensors, e.g. {next(iter(final.by_name), '')!r}")
    sinks: list[Any] = []
    planned: list[PlannedTensor] = []
    for ot in final.layout.tensors:
        if wanted is not None and ot.name not in wanted:
            continue
        node = final.node(ot.name, ot.name)
        out_dtype = dtype if (dtype is not None and ot.dtype.is_floating_point) else ot.dtype
        planned.append(PlannedTensor(ot.name, ot.shape, out_dtype))
        sinks.append(Write("", ot.name, node, out_dtype, ot.name) if sink == "write"
                     else Emit(ot.name, node, out_dtype, ot.name))
    return sinks, planned


def _save_sinks(comp: StepCompiler) -> list[Write]:
    """An intermediate step with `save:` writes every tensor. Those the output already computes
    are written from the same node; the others get groups of their own."""
    for ot in comp.layout.tensors:
        if ot.name not in comp.save_sinks:
            comp.node(ot.name, f"{comp.plan.save}::{ot.name}")
    return [comp.save_sinks[ot.name] for ot in comp.layout.tensors]


def _build(sinks: list[Any]) -> nx.DiGraph:
    graph = nx.DiGraph()
    stack = list(sinks)
    seen: set[Any] = set()
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        graph.add_node(node)
        for dep in node.args:
            stack.append(dep)
            graph.add_edge(dep, node)
    return graph


def order_groups(graph: nx.DiGraph, roots: list[Any]) -> list[tuple[str, tuple[Any, ...]]]:
    """Execution order: groups in the order of their first root (sweeps, then the output order);
    inside a group, a depth-first post-order from its roots, so each tensor is read just before the
    merge that needs it and an earlier step's inputs are freed before a later step's are read.
    Values of other (earlier) groups are carried in, not visited."""
    by_group: dict[str, list[Any]] = {}
    for s in roots:
        by_group.setdefault(s.group, []).append(s)
    groups = []
    for group, group_sinks in by_group.items():
        order: list[Any] = []
        seen: set[Any] = set()

        def visit(node: Any) -> None:
            if node not in seen and node.group == group:
                seen.add(node)
                for dep in node.args:
                    visit(dep)
                order.append(node)

        for s in group_sinks:
            visit(s)
        groups.append((group, tuple(order)))
    return groups


def _output_spec(key: str, tensors: list[PlannedTensor], comp: StepCompiler, files: Mapping[str, ModelFiles],
                 recipe: Recipe, max_shard_size: int | ShardLimit, override: torch.dtype | None) -> OutputSpec:
    return OutputSpec(key, "model", tuple(tensors), ShardLayout(tensors, max_shard_size),
                      consistent_config(comp.layout.config, tensors), comp.tokenizer, config_folder(comp),
                      card_data(recipe, comp, files, override))


def describe(compiled: Compiled) -> dict[str, Any]:
    """Numbers for ``mergekit-lite plan``: what will be read, computed and written."""
    g = compiled.graph
    kinds = {name: [n for n in g if type(n) is cls] for name, cls in NODE_KINDS.items()}
    sinks = kinds["Write"] + kinds["Emit"]
    merges = {(m.step, m.tensor, m.group.split("#")[0]): m for m in kinds["Merge"]}  # blocks counted once
    per_tensor = [len(n.inputs) + (n.base is not None) for n in merges.values()]
    return {
        "output_tensors": len([w for w in sinks if getattr(w, "output", "") == "" and w.last]),
        "loads": len(kinds["Load"]),
        "merges": len(merges),
        "blocks": len(compiled.groups),
        "statistic_sweeps": len(kinds["Observe"]),
        "bytes_read": sum(n.nbytes for n in kinds["Load"]),
        "bytes_written": sum(w.nbytes for w in sinks),
        "max_inputs_per_tensor": max(per_tensor, default=0),
        "min_inputs_per_tensor": min(per_tensor, default=0),
        "peak_step_bytes": compiled.max_need,
        "largest_tensor_f32": compiled.largest_input_f32,
    }
