"""What a validated plan is: the frozen records that parsing produces and everything after it reads.

A :class:`Recipe` is a whole plan file; each of its steps is a :class:`MergePlan` (what mergekit calls
a MergeConfiguration) whose inputs are :class:`InputModel` entries (``models:``), :class:`OutputSlice`
entries of :class:`SliceSource` (``slices:``), one :class:`DepthUpscale`, or a mixture of experts
(:class:`MoESpec`, mergekit-moe's config, parsed by :mod:`mergekit_lite.plan.moe`). Every record keeps its key
path in the plan so that later checks (:mod:`mergekit_lite.plan.expand`, the graph) can still point
at the file and line. These records hold no parsing code: see :mod:`mergekit_lite.plan.schema` for
the entry points and :mod:`mergekit_lite.plan.parser` for the rules.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

from .. import methods
from ..errors import Issue
from .source import Document, Path

# Komatsuzaki et al. 2022, "Sparse Upcycling: Training Mixture-of-Experts from Dense Checkpoints"
MOE_PAPER = "https://arxiv.org/abs/2212.05055"


@dataclass(frozen=True)
class ModelRef:
    """A model as the plan names it: a local folder or file, or a Hub repo id with a revision;
    optionally with a PEFT adapter applied to it (``base+adapter``: the model that PEFT's
    ``merge_and_unload`` would give, formed tensor by tensor while merging)."""

    path: str
    revision: str | None = None
    adapter: "ModelRef | None" = None

    def __str__(self) -> str:
        base = self.path if self.revision is None else f"{self.path}@{self.revision}"
        return base if self.adapter is None else f"{base}+{self.adapter}"

    @property
    def base(self) -> "ModelRef":
        """The model without its adapter."""
        return self if self.adapter is None else ModelRef(self.path, self.revision)


@dataclass(frozen=True)
class TokenSource:
    """Where one token's embedding row comes from (mergekit's ``tokens: {TOKEN: {source: ...}}``):
    ``model`` (that model's row for the token), ``model_token`` (that model's row of another token
    or id) or ``zero``."""

    kind: str  # "model" | "model_token" | "zero"
    model: ModelRef | None = None
    token: str | None = None
    token_id: int | None = None


@dataclass(frozen=True)
class TokenSetting:
    """One entry of ``tokenizer: tokens:``; ``force`` applies the source even to models that have the token."""

    source: TokenSource | None
    force: bool = False


@dataclass(frozen=True)
class TokenizerSpec:
    """The output vocabulary of a step: ``tokenizer_source`` or the ``tokenizer:`` section."""

    source: ModelRef | str  # "base", "union" or a model
    tokens: tuple[tuple[str, TokenSetting], ...] = ()
    pad_to_multiple_of: int | None = None

    def models(self) -> list[ModelRef]:
        """Models the spec names (its source, the token sources)."""
        refs = [self.source] if isinstance(self.source, ModelRef) else []
        refs += [s.source.model for _, s in self.tokens if s.source is not None and s.source.model is not None]
        return refs


@dataclass(frozen=True)
class InputModel:
    model: ModelRef
    parameters: Mapping[str, Any]
    path: Path  # where it is in the plan, for error messages


@dataclass(frozen=True)
class SliceSource:
    model: ModelRef
    layer_range: tuple[int, int]
    parameters: Mapping[str, Any]
    path: Path


@dataclass(frozen=True)
class OutputSlice:
    sources: tuple[SliceSource, ...]
    parameters: Mapping[str, Any]
    base_model: ModelRef | None
    path: Path


@dataclass(frozen=True)
class DepthUpscale:
    """``depth_upscale: {model, copies, drop}``: SOLAR-style stacking of copies of one model."""

    model: ModelRef
    copies: int
    drop: int
    path: Path


@dataclass(frozen=True)
class Expert:
    """One entry of a mixture of experts' ``experts:`` (or ``shared_experts:``): the model whose MLP
    becomes the expert, the prompts its router row is made from, and mergekit-moe's perturbations."""

    source_model: ModelRef
    positive_prompts: tuple[str, ...]
    negative_prompts: tuple[str, ...]
    noise_scale: float | None
    residual_scale: float | None
    path: Path


@dataclass(frozen=True)
class MoESpec:
    """A mergekit-moe config's own keys (the base model, dtype and tokenizer are the step's)."""

    experts: tuple[Expert, ...]
    shared_experts: tuple[Expert, ...]
    gate_mode: str
    experts_per_token: int
    architectures: tuple[str, ...]  # output architectures the config allows (all, without `architecture:`)
    path: Path

    @property
    def models(self) -> list[ModelRef]:
        return [e.source_model for e in self.experts + self.shared_experts]


@dataclass(frozen=True)
class MergePlan:
    """One merge step: what mergekit calls a MergeConfiguration."""

    merge_method: str
    base_model: ModelRef | None
    models: tuple[InputModel, ...] | None
    slices: tuple[OutputSlice, ...] | None
    parameters: Mapping[str, Any]
    dtype: str | None = None
    out_dtype: str | None = None
    tokenizer_source: ModelRef | str | None = None
    tokenizer: TokenizerSpec | None = None
    chat_template: str | None = None  # "auto", a built-in name or a Jinja template
    name: str | None = None
    save: str | None = None
    seed: int | None = None
    depth_upscale: DepthUpscale | None = None
    embed_source: ModelRef | None = None
    head_source: ModelRef | None = None
    moe: MoESpec | None = None  # a mixture of experts built from dense models (mergekit-moe's config)
    search: tuple = ()  # the ``search:`` section's Dimensions (plan/space.py); run ignores them
    expanded_from: str | None = None  # the short form this step was expanded from (for `plan`)
    output: str = "model"  # "model", or "adapter": the models are adapters of base_model, merged into one
    rank: int | None = None  # adapter outputs: rank of the re-factorised modules (default: the inputs')
    rank_error: float | None = None  # adapter outputs: per-module relative error target that picks the rank
    log_space: bool = False  # IA3 adapter outputs: merge log(l) instead of l
    doc: Document | None = field(default=None, compare=False, repr=False)
    prefix: Path = ()  # key path of this step inside its document (``steps[i]``)

    @property
    def method(self) -> methods.Method:
        return methods.get(self.merge_method)

    @property
    def paper(self) -> str:
        """Where the step's method is described (for the model card)."""
        return MOE_PAPER if self.moe is not None else self.method.paper

    @property
    def summary(self) -> str:
        """One sentence on what the step's method does (for the model card)."""
        if self.moe is not None:
            return (f"A mixture of experts upcycled from dense models (gate mode {self.moe.gate_mode}, "
                    f"{self.moe.experts_per_token} experts per token).")
        doc = self.method.doc
        return doc.split("\n\n")[0].replace("\n", " ") if doc else ""

    def referenced_models(self) -> list[ModelRef]:
        """Every model the step reads, in first-mention order, base first."""
        seen: list[ModelRef] = []
        for ref in [self.base_model] + [m.model for m in self.models or ()] + [
            s.model for sl in self.slices or () for s in sl.sources
        ] + [self.depth_upscale.model if self.depth_upscale else None, self.embed_source, self.head_source] + (
            self.moe.models if self.moe else []):
            if ref is not None and ref not in seen:
                seen.append(ref)
        return seen

    @property
    def vocabulary(self) -> TokenizerSpec | None:
        """The step's output vocabulary setting (``tokenizer:`` or ``tokenizer_source``), None without one:
        then every model must have the same vocabulary and the donor's tokenizer is copied."""
        if self.tokenizer is not None:
            return self.tokenizer
        return TokenizerSpec(self.tokenizer_source) if self.tokenizer_source is not None else None

    def issue(self, path: Path, message: str) -> Issue:
        if self.doc is None:
            return Issue("<plan>", None, "", message)
        return self.doc.issue(self.prefix + tuple(path), message)


@dataclass(frozen=True)
class Recipe:
    """A whole plan file: one or more steps; ``steps[-1]`` is the output."""

    steps: tuple[MergePlan, ...]
    file: str
    text: str
    warnings: tuple[str, ...] = ()

    @property
    def output(self) -> MergePlan:
        return self.steps[-1]

    def step(self, name: str) -> MergePlan | None:
        return next((s for s in self.steps if s.name == name), None)

