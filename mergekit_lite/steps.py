"""What each step of a recipe is, and where an output folder's non-tensor files come from.

Decided once at compile time, from the plan and the opened inputs, and stored in the frozen
:class:`~mergekit_lite.graph.Compiled`: the output's tokenizer (the donor's files, extended when
the vocabulary was aligned, with the chat template the plan asks for), the folder the config's
companions come from (generation config, custom code), a config.json consistent with the tensors
actually written, the model card's data, and a summary of every step for ``mergekit-lite plan``.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, replace
from typing import Any, Mapping

from . import chat_templates
from .arch import detect, set_dotted
from .dtypes import dtype_name, numel, parse_dtype
from .io.reader import ModelFiles
from .io.vocab import TokenizerOutput
from .plan.schema import ModelRef, Recipe
from .vocab import vocab_tensors


@dataclass(frozen=True)
class CardModel:
    """One input model as the card shows it."""

    name: str  # as the plan names it
    hub_id: str | None = None  # the Hub repo it was downloaded from (None: a local model)
    revision: str | None = None  # as asked for in the plan
    commit: str | None = None  # the commit that was downloaded
    endpoint: str | None = None
    license: tuple[tuple[str, str], ...] | None = None  # license keys of its own card


@dataclass(frozen=True)
class CardData:
    """What the model card says: the plan, the method, the models, the base, the dtype written."""

    plan_text: str
    method: str
    models: tuple[CardModel, ...]
    base: str | None
    paper: str
    description: str = ""
    dtype_note: str | None = None  # when --dtype overrode the plan's dtype


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
    vocabulary: str | None = None  # how its models' vocabularies are aligned, when they are
    details: tuple[tuple[str, Any], ...] = ()  # what else `plan` shows: a mixture of experts' experts and gates


def _is_step(ref: ModelRef, steps: Any) -> bool:
    return ref.revision is None and ref.path in steps


def step_summaries(recipe: Recipe, compilers: Mapping[str, Any]) -> tuple[StepSummary, ...]:
    out = []
    for step in recipe.steps:
        comp = compilers[step.name or ""]
        refs = step.referenced_models()
        out.append(StepSummary(step.name, step.merge_method, str(step.base_model) if step.base_model else None,
                               tuple(str(r) for r in refs), tuple(r.path for r in refs if _is_step(r, compilers)),
                               len(comp.layout.tensors), step.save, comp.plan.expanded_from,
                               _vocabulary(comp.alignment), moe_details(comp)))
    return tuple(out)


def _vocabulary(al: Any) -> str | None:
    if al is None:
        return None
    src = al.spec.source
    text = f"{src if isinstance(src, str) else 'from ' + str(src)}: {al.n} token ids"
    text += f", {len(al.tokenizer.added)} added to {al.donor}'s" if al.tokenizer.added else ""
    return text + (f", {al.size} rows" if al.size != al.n else "")


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


# -- tokenizer, config companions, config -------------------------------------------------------

def output_tokenizer(comp: Any) -> TokenizerOutput:
    """The tokenizer of a step's output: the aligned vocabulary's (the donor's files plus the tokens it
    added), else the tokenizer source's or the donor's as it is; the plan's chat template set on it."""
    al = comp.alignment
    if al is not None:
        donor = comp.lookup(al.donor).tokenizer()
        keep = al.tokenizer.keep_below
        added = tuple(a for a in donor.added if keep is None or a[1] < keep) + al.tokenizer.added
        out = TokenizerOutput(donor.folder, added, keep if keep is not None else donor.keep_below,
                              donor.chat_template)
    else:
        out = comp.lookup(comp.tokenizer_ref).tokenizer()
    setting = comp.plan.chat_template
    if setting is not None:
        found = [comp.lookup(ref).tokenizer().template() for ref in comp.plan.referenced_models()]
        template = chat_templates.resolve(setting, found)
        if template is not None:
            out = replace(out, chat_template=template)
    return out


def config_folder(comp: Any) -> str | None:
    """Folder of the model config.json comes from (following steps back to a model on disk): its
    generation_config.json and the custom code its ``auto_map`` names go with it."""
    return comp.lookup(comp.layout.donor).folder()


def written_dtype(tensors: Any) -> str | None:
    """The dtype most of the written floating-point entries have."""
    sizes: dict[Any, int] = {}
    for t in tensors:
        if t.dtype.is_floating_point:
            sizes[t.dtype] = sizes.get(t.dtype, 0) + numel(t.shape)
    return dtype_name(max(sizes, key=sizes.get)) if sizes else None


def consistent_config(config: Mapping[str, Any], tensors: Any) -> dict[str, Any]:
    """config.json as the written tensors make it: ``torch_dtype`` (and ``dtype``, transformers' new
    spelling, when present) from what is written, the layer count from the layers written, and
    ``vocab_size`` from the embedding's rows."""
    config = copy.deepcopy(dict(config))
    if not config:
        return config
    dtype = written_dtype(tensors)
    if dtype is not None:
        for cfg in [config] + [config[k] for k in ("text_config",) if isinstance(config.get(k), dict)]:
            for key in ("torch_dtype", "dtype"):
                if key in cfg or (cfg is config and key == "torch_dtype"):
                    cfg[key] = dtype
    shapes = {t.name: t for t in tensors}
    arch = detect(shapes, config)
    if arch.prefix is not None and arch.layer_key is not None:
        set_dotted(config, arch.layer_key, arch.num_layers)
    rows, _ = vocab_tensors(shapes, arch, config)
    if rows is not None:
        key = "vocab_size" if "vocab_size" in config or "text_config" not in config else "text_config.vocab_size"
        set_dotted(config, key, rows)
    return config


# -- the model card ----------------------------------------------------------------------------

def card_data(recipe: Recipe, comp: Any, files: Mapping[str, ModelFiles], override: Any = None) -> CardData:
    """The card of an output: every model the recipe reads (Hub ones with where they came from)."""
    steps = {s.name for s in recipe.steps if s.name}
    refs: list[ModelRef] = []
    for s in recipe.steps:
        for r in s.referenced_models() + (s.vocabulary.models() if s.vocabulary else []):
            if not _is_step(r, steps) and r not in refs:
                refs.append(r)
    plan = comp.plan
    asked = plan.out_dtype or plan.dtype
    note = None
    if override is not None and (asked is None or parse_dtype(asked) != override):
        note = (f"Weights are written as {dtype_name(override)} (`--dtype {dtype_name(override)}`"
                + (f"; the plan asks for {asked})." if asked else ")."))
    parts = [p for r in refs for p in ((r,) if r.adapter is None else (r.base, r.adapter))]  # base+adapter: both
    return CardData(recipe.text, plan.merge_method, tuple(card_model(r, files.get(str(r))) for r in parts),
                    str(plan.base_model) if plan.base_model else None, plan.paper, plan.summary, note)


def card_model(ref: ModelRef, files: ModelFiles | None) -> CardModel:
    hub = getattr(files, "hub", None)
    lic = files.card_license() if files is not None else None
    if hub is None:
        return CardModel(str(ref), license=lic)
    return CardModel(str(ref), hub.repo_id, hub.revision, hub.commit, hub.endpoint, lic)
