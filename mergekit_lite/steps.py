"""What each step of a recipe is, and where an output folder's non-tensor files come from.

Decided once at compile time, from the plan and the opened inputs, and stored in the frozen
:class:`~mergekit_lite.graph.Compiled`: the tokenizer donor of each output (following steps back
to a model on disk), the model card's data, and a summary of every step for ``mergekit-lite plan``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from .io.reader import ModelFiles
from .plan.schema import MergePlan, ModelRef, Recipe


@dataclass(frozen=True)
class CardData:
    """What the model card says: the plan, the method, the models and the base."""

    plan_text: str
    method: str
    models: tuple[str, ...]
    base: str | None
    paper: str


@dataclass(frozen=True)
class StepSummary:
    name: str | None
    method: str
    base_model: str | None
    models: tuple[str, ...]
    depends_on: tuple[str, ...]  # earlier steps it reads
    tensors: int
    save: str | None
    expanded: str | None  # the short form it was expanded from
    details: tuple[tuple[str, Any], ...] = ()  # what else `plan` shows: a mixture of experts' experts and gates


def _is_step(ref: ModelRef, compilers: Mapping[str, Any]) -> bool:
    return ref.revision is None and ref.path in compilers


def step_summaries(recipe: Recipe, compilers: Mapping[str, Any]) -> tuple[StepSummary, ...]:
    out = []
    for step in recipe.steps:
        comp = compilers[step.name or ""]
        refs = step.referenced_models()
        out.append(StepSummary(step.name, step.merge_method, str(step.base_model) if step.base_model else None,
                               tuple(str(r) for r in refs), tuple(r.path for r in refs if _is_step(r, compilers)),
                               len(comp.layout.tensors), step.save, comp.plan.expanded_from, moe_details(comp)))
    return tuple(out)


def moe_details(comp: Any) -> tuple[tuple[str, Any], ...]:
    """A mixture of experts' output architecture, gate mode, experts per token and experts."""
    spec = comp.plan.moe
    if spec is None:
        return ()
    experts = [{"model": str(e.source_model), "positive_prompts": len(e.positive_prompts),
                "negative_prompts": len(e.negative_prompts), "noise_scale": e.noise_scale,
                "residual_scale": e.residual_scale} for e in spec.experts]
    shared = [{"model": str(e.source_model), "positive_prompts": len(e.positive_prompts)} for e in spec.shared_experts]
    config = comp.layout.config
    return (("architecture", config.get("model_type")), ("gate_mode", spec.gate_mode),
            ("experts_per_token", spec.experts_per_token), ("experts", experts), ("shared_experts", shared))


def tokenizer_ref(plan: MergePlan, donor: ModelRef) -> ModelRef | None:
    """The model whose tokenizer a step's output takes (``tokenizer_source``, else the donor)."""
    if plan.tokenizer_source == "base":
        return plan.base_model or donor
    if isinstance(plan.tokenizer_source, ModelRef):
        return plan.tokenizer_source
    return donor


def tokenizer_folder(comp: Any, compilers: Mapping[str, Any], files: Mapping[str, ModelFiles]) -> str | None:
    """Folder holding the tokenizer of a step's output (following steps back to a model on disk)."""
    seen = set()
    ref = tokenizer_ref(comp.plan, comp.layout.donor)
    while ref is not None:
        if _is_step(ref, compilers) and ref.path not in seen:
            seen.add(ref.path)
            step = compilers[ref.path]
            ref = tokenizer_ref(step.plan, step.layout.donor)
            continue
        found = files.get(str(ref))
        return found.folder if found else None
    return None


def card_data(recipe: Recipe, plan: MergePlan, compilers: Mapping[str, Any]) -> CardData:
    models = tuple(str(r) for s in recipe.steps for r in s.referenced_models() if not _is_step(r, compilers))
    return CardData(recipe.text, plan.merge_method, models, str(plan.base_model) if plan.base_model else None,
                    plan.paper)
