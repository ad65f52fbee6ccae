"""Adapter outputs (``output: adapter``): several PEFT adapters of one base merged into one adapter.

A plan whose ``models:`` are adapters of ``base_model`` compiles to one group per adapted module:

- ``merge_method: concat`` stacks the LoRA factors (:class:`~.adapter_nodes.StackLora`): the result
  is exactly Σ wᵢ·scalingᵢ·BᵢAᵢ at rank Σ rᵢ (a module only some adapters change gets their ranks);
- any engine method runs on the full per-module deltas, exactly as in a model merge (the adapters
  are task vectors, :class:`~.adapted.DeltaSource`, over a zero base), and the merged delta is
  re-factorised by truncated SVD (:class:`~.adapter_nodes.Factorise`) to ``rank`` (default: the
  largest rank among the adapters that change the module), or to the smallest rank meeting the
  relative error ``rank_error``;
- IA3 adapters: the method runs on the scaling vectors (absent modules count as the identity, 1),
  or on their logarithms with ``log_space: true`` (``linear`` then gives the weighted geometric mean).

The folder is written through the same :class:`~.io.writer.ShardedWriter`, as
``adapter_model.safetensors``, with ``adapter_config.json`` (ranks from the run's
:class:`~.adapter_nodes.Manifest`) and a ``library_name: peft`` card.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from types import SimpleNamespace
import os
from collections import Counter
from typing import Any, Mapping

import torch

from . import methods
from .adapted import ConstantSource, DeltaSource, load, placements
from .adapter_nodes import Factorise, Manifest, MapValues, StackLora
from .dtypes import parse_dtype
from .errors import MergeError, PlanError
from .graph import Compiled, FileSource, OutputSpec, StepCompiler, assemble, input_paths, step_seed
from .io.adapters import PREFIX, AdapterFiles, Placement
from .io.vocab import TokenizerOutput
from .io.writer import PlannedTensor, ShardLayout
from .nodes import Pick, Write
from .plan.expand import OutputTensor
from .plan.schema import MergePlan, ModelRef, Recipe
from .steps import card_data, step_summaries

ONE_FILE = 1 << 62  # PEFT reads one adapter_model.safetensors: never shard it


@dataclass
class AdapterResult:
    """What writing an adapter did: the run's stats, each module's rank and error, the tensors
    saved whole (extraction's modules_to_save) and those left out."""

    stats: Any
    manifest: Manifest
    saved: tuple[str, ...] = ()
    dropped: tuple[str, ...] = ()  # changed tensors an adapter cannot hold (biases of LoRA modules)

    def report(self) -> str:
        saved = f"\nsaved whole (modules_to_save): {', '.join(self.saved)}" if self.saved else ""
        dropped = (f"\nnot represented (biases of LoRA modules; PEFT LoRA has no bias): {', '.join(self.dropped)}"
                   if self.dropped else "")
        return manifest_report(self.manifest) + saved + dropped


def compile_adapter_output(recipe: Recipe, files: Mapping[str, Any], *, seed: int | None = None,
                           dtype: torch.dtype | None = None, sink: str = "write") -> Compiled:
    """Compile an ``output: adapter`` plan (headers only) into its graph and its adapter OutputSpec."""
    step = recipe.output
    if sink != "write":
        raise MergeError("an adapter output is written to a folder (mergekit-lite run PLAN OUT); it is not streamed")
    base = FileSource(step.base_model, files[str(step.base_model)])
    adapters: dict[ModelRef, AdapterFiles] = {m.model: files[str(m.model)] for m in step.models}
    kind = _check_kinds(step, adapters)
    placed = {ref: placements(a, base.info, step, ref) for ref, a in adapters.items()}
    whole, warnings = _whole(step, adapters, placed)
    shapes = _union(step, base, placed, kind)
    shapes.update((n, base.info.tensors[n].shape) for n in whole)
    comp = _delta_compiler(step, base, adapters, placed, shapes, whole, kind, step_seed(step, seed))
    manifest = Manifest()
    written = step.out_dtype or step.dtype
    out_dtype = dtype or (parse_dtype(written) if written else None)
    sinks, planned = [], []
    for ot in comp.layout.tensors:
        if ot.name in whole:  # merged whole, saved whole (in the base's dtype unless told otherwise)
            outs = [(PREFIX + ot.name, comp.node(ot.name, ot.name), False, base.info.tensors[ot.name].dtype)]
        else:
            outs = [(*o, torch.float32) for o in _outputs(step, comp, ot, placed, manifest, kind)]
        for name, node, bounded, natural in outs:
            planned.append(PlannedTensor(name, tuple(node.shape), out_dtype or natural, bounded))
            sinks.append(Write("", name, node, out_dtype or natural, ot.name))
    graph, groups, needs = assemble(sinks)
    config = static_config(step, kind, adapters, placed, base, whole)
    card = card_data(recipe, SimpleNamespace(plan=step), files)
    spec = OutputSpec("", "adapter", tuple(planned), ShardLayout(planned, ONE_FILE, "adapter_model"), config,
                      TokenizerOutput(None), None, card, manifest)
    return Compiled(recipe, graph, groups, needs, comp.layout, (spec,), step_summaries(recipe, {"": comp}),
                    tuple(recipe.warnings) + tuple(warnings), input_paths(files))


def _check_kinds(step: MergePlan, adapters: Mapping[ModelRef, AdapterFiles]) -> str:
    kinds = {a.kind for a in adapters.values()}
    if len(kinds) > 1:
        raise PlanError(step.issue(("models",), "the adapters mix LoRA and IA3; an adapter output merges adapters "
                                   "of one type"))
    kind = kinds.pop()
    problems = []
    if kind == "ia3" and step.merge_method == "concat":
        problems.append((("merge_method",), "concat stacks LoRA factors; merge IA3 adapters with a method such as "
                         "linear"))
    if kind == "ia3" and (step.rank is not None or step.rank_error is not None):
        problems.append((("rank" if step.rank is not None else "rank_error",), "IA3 adapters have no rank"))
    if kind == "lora" and step.merge_method == "concat" and (step.rank is not None or step.rank_error is not None):
        problems.append((("rank" if step.rank is not None else "rank_error",), "concat is exact at rank Σ rᵢ; rank "
                         "and rank_error apply to the methods whose result is re-factorised"))
    if kind == "lora" and step.log_space:
        problems.append((("log_space",), "log_space applies to IA3 adapters (scaling vectors), not to LoRA"))
    if problems:
        raise PlanError([step.issue(p, m) for p, m in problems])
    return kind


def _whole(step: MergePlan, adapters: Mapping[ModelRef, AdapterFiles],
           placed: Mapping[ModelRef, dict[str, Placement]]) -> tuple[set[str], list[str]]:
    """Tensors some adapter replaces whole (modules_to_save): they are merged as full tensors (the
    base's where an adapter does not replace them) and saved whole. Saved embedding layers under a
    LoRA (PEFT's save_embedding_layers) are taken to be the base's, with a warning."""
    whole: set[str] = set()
    warnings = []
    for ref, adapter in adapters.items():
        whole.update(n for n in adapter.replaced if n not in placed[ref])
        layers = sorted(n for n in adapter.replaced if n in placed[ref])
        if layers:
            warnings.append(f"{adapter.label} also stores its base's {', '.join(layers)} (saved embedding layers); "
                            "the output adapter leaves them out and uses base_model's")
    clash = sorted(n for n in whole if any(n in found for found in placed.values()))
    if clash:
        raise PlanError(step.issue(("models",), f"{clash[0]} is saved whole by one adapter (modules_to_save) and "
                                   "adapted by another; an adapter output cannot hold both"))
    return whole, warnings


def _union(step: MergePlan, base: FileSource, placed: Mapping[ModelRef, dict[str, Placement]],
           kind: str) -> dict[str, tuple[int, ...]]:
    """Every module some adapter changes, with the shape its delta (or IA3 vector) has; the
    adapters must agree on how each module is laid out."""
    shapes: dict[str, tuple[int, ...]] = {}
    layout: dict[str, tuple] = {}
    problems = []
    for ref, found in placed.items():
        for name, p in found.items():
            if name.endswith(".bias"):
                continue  # IA3 scales biases only when folded into a model
            mod = p.module
            shape = base.info.tensors[name].shape if kind == "lora" else mod.vector.shape
            how = (shape, p.transpose, getattr(mod, "embedding", False))
            if layout.setdefault(name, how) != how:
                problems.append(f"adapter '{ref}' lays out module {mod.module} differently from another adapter "
                                f"({_layout_text(how)} vs {_layout_text(layout[name])})")
            shapes[name] = shape
    if problems:
        raise PlanError([step.issue(("models",), p) for p in problems[:20]])
    return shapes


def _layout_text(how: tuple) -> str:
    shape, transpose, embedding = how
    return f"{list(shape)}{', transposed' if transpose else ''}{', embedding' if embedding else ''}"


def _delta_compiler(step: MergePlan, base: FileSource, adapters: Mapping[ModelRef, AdapterFiles],
                    placed: Mapping[ModelRef, dict[str, Placement]], shapes: dict[str, tuple[int, ...]],
                    whole: set[str], kind: str, seed: int) -> StepCompiler:
    """The step as a merge of task vectors over a zero base (IA3: vectors over the identity), and of
    the `whole` tensors over the base's; the written dtype applies to the factors, so the merge
    itself stays in float32."""
    method = methods.get(step.merge_method)
    plan = dataclasses.replace(step, dtype=None, out_dtype=None,
                               base_model=step.base_model if method.base != "none" else None)
    sources: dict[ModelRef, Any] = {ref: DeltaSource(ref, a, placed[ref], shapes, base, whole, step.log_space)
                                    for ref, a in adapters.items()}
    if plan.base_model is not None:
        sources[plan.base_model] = ConstantSource(plan.base_model, shapes, base, whole, kind, step.log_space)
    return StepCompiler(plan, sources, seed, sources.__getitem__)


def _outputs(step: MergePlan, comp: StepCompiler, ot: OutputTensor, placed: Mapping[ModelRef, dict[str, Placement]],
             manifest: Manifest, kind: str) -> list[tuple[str, Any, bool]]:
    """(tensor name in the adapter file, node, bounded shape?) for one module."""
    module = ot.name.removesuffix(".weight")
    group = ot.name
    if kind == "ia3":
        node = comp.node(ot.name, group)
        if step.log_space:
            node = MapValues(node, "exp", ot.name, group)
        return [(f"{PREFIX}{module}.ia3_l", node, False)]
    present = [(i, placed[inp.ref][ot.name]) for i, inp in enumerate(ot.inputs) if ot.name in placed[inp.ref]]
    first = present[0][1]
    if step.merge_method == "concat":
        weights = dict(ot.model_params)["weight"]
        factors = tuple(n for i, p in present for n in (load(p.module.a, group, str(ot.inputs[i].ref)),
                                                        load(p.module.b, group, str(ot.inputs[i].ref))))
        node = StackLora(factors, tuple(weights[i] * p.module.scaling for i, p in present), module, group, manifest)
    else:
        rank = step.rank or max(p.module.rank for _, p in present)
        node = Factorise(comp.node(ot.name, group), None, module, group, rank, step.rank_error, first.transpose,
                         True, manifest)
    bounded = step.rank_error is not None and step.merge_method != "concat"
    names = (("lora_embedding_A", "lora_embedding_B") if first.module.embedding
             else ("lora_A.weight", "lora_B.weight"))
    return [(f"{PREFIX}{module}.{names[k]}", Pick(node, k, group), bounded) for k in (0, 1)]


# ------------------------------------------------------------------------------------------------
# adapter_config.json


def static_config(step: MergePlan, kind: str, adapters: Mapping[ModelRef, AdapterFiles],
                  placed: Mapping[ModelRef, dict[str, Placement]], base: FileSource, whole: set[str]
                  ) -> dict[str, Any]:
    """adapter_config.json but the ranks (known once the modules are factorised)."""
    mods = {p.module.module: p for found in placed.values() for name, p in found.items()
            if not name.endswith(".bias")}
    base_modules = {n.removesuffix(".weight") for n in base.info.tensors if n.endswith(".weight")}
    names = {a.base_name for a in adapters.values()}
    config: dict[str, Any] = {
        "peft_type": kind.upper(),
        "base_model_name_or_path": names.pop() if len(names) == 1 and None not in names else str(step.base_model),
        "task_type": _common(a.config.get("task_type") for a in adapters.values()),
        "target_modules": target_modules(set(mods), base_modules),
        "fan_in_fan_out": any(p.transpose and not getattr(p.module, "embedding", False) for p in mods.values()),
        "modules_to_save": sorted({n.rsplit(".", 1)[0] for n in whole}) or None,
        "inference_mode": True,
    }
    if kind == "ia3":
        ff = {m for m, p in mods.items() if p.module.feedforward}
        leaves = isinstance(config["target_modules"], list) and set(config["target_modules"]) != set(mods)
        config["feedforward_modules"] = sorted({m.rsplit(".", 1)[-1] for m in ff}) if leaves else sorted(ff)
        config["init_ia3_weights"] = True
    else:
        config.update({"lora_dropout": 0.0, "bias": "none", "use_rslora": False, "use_dora": False,
                       "init_lora_weights": True})
    return config


def target_modules(written: set[str], base_modules: set[str]) -> list[str]:
    """The modules' last names (q_proj, ...) when those name exactly the written modules in the base,
    else the full module names (an adapter of some layers only)."""
    leaves = {m.rsplit(".", 1)[-1] for m in written}
    if {b for b in base_modules if b.rsplit(".", 1)[-1] in leaves} == written:
        return sorted(leaves)
    return sorted(written)


def _common(values: Any) -> Any:
    found = set(values)
    return found.pop() if len(found) == 1 else None


def ranked_config(config: Mapping[str, Any], manifest: Manifest) -> dict[str, Any]:
    """Add r / lora_alpha (the most common rank, scaling 1) and rank_pattern / alpha_pattern for
    the modules of other ranks."""
    out = dict(config)
    if out["peft_type"] != "LORA":
        return out
    ranks = {m: v[0] for m, v in manifest.modules.items()}
    r = Counter(ranks.values()).most_common(1)[0][0] if ranks else 8
    pattern = {m: k for m, k in sorted(ranks.items()) if k != r}
    out.update({"r": r, "lora_alpha": r, "rank_pattern": pattern, "alpha_pattern": dict(pattern)})
    return out


def write_adapter_config(folder: str, spec: OutputSpec) -> None:
    """adapter_config.json, with the ranks the run recorded."""
    with open(os.path.join(folder, "adapter_config.json"), "w", encoding="utf-8") as fh:
        json.dump(ranked_config(spec.config, spec.manifest), fh, indent=2)
        fh.write("\n")


def manifest_report(manifest: Manifest) -> str:
    """Each module's rank and relative Frobenius error, and the error over all modules."""
    lines = [f"{m}: rank {rank}, relative error {err:.3g} ({how})"
             for m, (rank, err, _, how) in manifest.modules.items()]
    if manifest.modules:
        lines.append(f"overall relative error {manifest.overall_error():.3g} over {len(manifest.modules)} modules")
    return "\n".join(lines)


def print_reports(compiled: Compiled) -> None:
    """Print the module report of every adapter output of a run (nothing for model outputs)."""
    for spec in compiled.outputs:
        if spec.manifest is not None and spec.manifest.modules:
            print(manifest_report(spec.manifest))
