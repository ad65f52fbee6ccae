"""From a validated step and its inputs' headers to per-tensor work: name routing and parameters.

``expand`` decides every output tensor of a step: its name, shape and dtype, which tensor of which
model feeds it, and the method parameters resolved for it (filters, gradients, precedence). It reads
no tensor bytes: only the names/shapes/dtypes that headers (or earlier steps) provide. Missing
tensors, shape mismatches and missing parameters are all reported here, before any I/O.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch

from .. import methods
from ..arch import Architecture, get_dotted, natural_key, set_dotted, split_layer
from ..dtypes import dtype_name, numel, parse_dtype
from ..errors import Issue, PlanError, ShapeMismatch, TensorNotFound
from .params import resolve
from .schema import MergePlan, ModelRef, OutputSlice, SliceSource


@dataclass(frozen=True)
class TensorInfo:
    shape: tuple[int, ...]
    dtype: torch.dtype


@dataclass
class SourceInfo:
    """What expand needs to know about one input: a model on disk or an earlier step's output."""

    label: str  # for messages: "model 'path'" or "step 'name'"
    tensors: dict[str, TensorInfo]
    config: dict[str, Any]
    arch: Architecture


@dataclass(frozen=True)
class Input:
    ref: ModelRef
    tensor: str  # the tensor's name in that model


@dataclass(frozen=True)
class OutputTensor:
    """One output tensor of a step, fully decided."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype  # what the step produces (written, or passed on to the next step)
    inputs: tuple[Input, ...]  # the method's tensors (non-base inputs), in plan order
    base: Input | None
    params: tuple[tuple[str, Any], ...] = ()  # global parameters
    model_params: tuple[tuple[str, tuple[Any, ...]], ...] = ()  # per-model, aligned with inputs
    copy: bool = False  # not merged (non-float buffers): taken from inputs[0]
    section: str = "post"
    # neither read nor merged (an MoE router): producer(sources, seed, group) builds its node
    producer: Any = None

    @property
    def numel(self) -> int:
        return numel(self.shape)


@dataclass
class StepLayout:
    tensors: list[OutputTensor]
    config: dict[str, Any]
    donor: ModelRef  # where config.json and the tokenizer come from
    warnings: list[str] = field(default_factory=list)
    plan: MergePlan | None = None  # the step as expanded (a depth_upscale short form becomes slices)


@dataclass
class _Slice:
    """A slice with the parameter scopes mergekit gives it (``models:`` plans are one slice)."""

    sources: list[SliceSource]
    parameters: Mapping[str, Any]
    base: ModelRef | None
    path: tuple


def expand(plan: MergePlan, infos: Mapping[ModelRef, SourceInfo], *, allow_crimes: bool = False) -> StepLayout:
    """Decide every output tensor of `plan`; `infos` describes each referenced model.
    `allow_crimes` (mergekit's flag) turns models of different architectures from an error into a
    warning; their tensors must still have the same names and shapes (not an MoE's experts)."""
    if plan.moe is not None:  # a mixture of experts (mergekit-moe's config)
        from ..moe.layout import expand_moe
        return expand_moe(plan, infos)
    if plan.depth_upscale is not None:
        plan = upscale_to_slices(plan, infos[plan.depth_upscale.model].arch.num_layers)
    method = plan.method
    ex = _Expander(plan, method, infos)
    ex.allow_crimes = allow_crimes
    if plan.slices is not None:
        layout = ex.expand_slices()
    else:
        layout = ex.expand_models()
    ex.raise_problems()
    layout.plan = plan
    return layout


class _Expander:
    allow_crimes = False  # models of different architectures: a warning, not an error

    def __init__(self, plan: MergePlan, method: methods.Method, infos: Mapping[ModelRef, SourceInfo]):
        self.plan = plan
        self.method = method
        self.infos = infos
        self.issues: list[Issue] = []
        self.missing: list[str] = []
        self.mismatched: list[str] = []
        self.warnings: list[str] = []
        self._seen: set[tuple] = set()
        self.out_dtype = parse_dtype(plan.out_dtype or plan.dtype) if (plan.out_dtype or plan.dtype) else None

    # -- problems ----------------------------------------------------------------------------
    def issue_once(self, key: tuple, path: tuple, message: str) -> None:
        if key not in self._seen:
            self._seen.add(key)
            self.issues.append(self.plan.issue(path, message))

    def raise_problems(self) -> None:
        if self.issues:
            raise PlanError(self.issues)
        for problems, cls, what in ((self.mismatched, ShapeMismatch, "shape mismatches"),
                                    (self.missing, TensorNotFound, "missing tensors")):
            if problems:
                shown = problems[:20] + ([f"... and {len(problems) - 20} more"] if len(problems) > 20 else [])
                raise cls(f"{len(problems)} {what}:\n" + "\n".join(f"  - {p}" for p in shown))

    # -- helpers -----------------------------------------------------------------------------
    def lookup(self, ref: ModelRef, name: str) -> str | None:
        """Name of tensor `name` in model `ref`, following tied embeddings for a missing lm_head."""
        info = self.infos[ref]
        if name in info.tensors:
            return name
        if info.arch.tied_embeddings and info.arch.section(name) == "post" and "head" in name:
            embeds = [n for n in info.tensors if info.arch.section(n) == "pre" and len(info.tensors[n].shape) == 2]
            if len(embeds) == 1:
                return embeds[0]
        return None

    def method_inputs(self, sl: _Slice) -> tuple[list[SliceSource], SliceSource | None]:
        base = None
        if self.method.base != "none" and sl.base is not None:
            base = next((s for s in sl.sources if s.model == sl.base), None)
        return [s for s in sl.sources if s is not base], base

    def make(self, sl: _Slice, out_name: str, names: list[str], t: float, section: str,
             ref_index: int) -> OutputTensor | None:
        """One output tensor from tensor `names[i]` of `sl.sources[i]`; `ref_index` gives the shape."""
        found = []
        for src, name in zip(sl.sources, names):
            real = self.lookup(src.model, name)
            if real is None:
                self.missing.append(f"tensor {name} is missing from {self.infos[src.model].label} "
                                    f"(needed for output tensor {out_name})")
            found.append(real)
        if any(f is None for f in found):
            return None
        ref_info = self.infos[sl.sources[ref_index].model].tensors[found[ref_index]]
        shapes = [self.infos[s.model].tensors[f].shape for s, f in zip(sl.sources, found)]
        if any(shape != ref_info.shape for shape in shapes):
            detail = ", ".join(f"{self.infos[s.model].label}: {f} {list(shape)}"
                               for s, f, shape in zip(sl.sources, found, shapes))
            self.mismatched.append(f"output tensor {out_name}: input shapes differ ({detail})")
            return None
        by_source = {id(s): Input(s.model, f) for s, f in zip(sl.sources, found)}
        if not ref_info.dtype.is_floating_point:
            # integer/bool buffers are not merged: copy them from the reference model
            return OutputTensor(out_name, ref_info.shape, ref_info.dtype, (by_source[id(sl.sources[ref_index])],),
                                None, copy=True, section=section)
        inputs, base = self.method_inputs(sl)
        params, model_params = self.resolve_params(sl, out_name, inputs, [by_source[id(s)].tensor for s in inputs], t)
        dtype = self.out_dtype or (self.infos[base.model] if base else self.infos[inputs[0].model]).tensors[
            by_source[id(base or inputs[0])].tensor].dtype
        shape_of = {id(s): shape for s, shape in zip(sl.sources, shapes)}
        shape = self.method.output_shape([shape_of[id(s)] for s in inputs], shape_of[id(base)] if base else None,
                                         {**dict(params), **dict(model_params)})
        return OutputTensor(out_name, shape, dtype, tuple(by_source[id(s)] for s in inputs),
                            by_source[id(base)] if base else None, params, model_params, section=section)

    def resolve_params(self, sl: _Slice, out_name: str, inputs: list[SliceSource], in_names: list[str], t: float):
        plan, method = self.plan, self.method
        values: dict[str, Any] = {}
        for p in method.global_params:
            v = resolve(p.name, [sl.parameters, plan.parameters], out_name, t)
            values[p.name] = self.finish_value(p, v, out_name, sl.path, None)
        model_values: dict[str, list[Any]] = {}
        for p in method.model_params:
            vals = []
            for src, in_name in zip(inputs, in_names):
                v = resolve(p.name, [src.parameters, sl.parameters, plan.parameters], in_name, t)
                vals.append(self.finish_value(p, v, in_name, src.path, src.model))
            model_values[p.name] = vals
        problem = method.check({**values, **model_values})
        if problem:
            self.issue_once(("check", problem), sl.path if sl.path else ("parameters",), f"tensor {out_name}: {problem}")
        return (tuple(values.items()), tuple((k, tuple(v)) for k, v in model_values.items()))

    def finish_value(self, p: methods.Param, v: Any, tensor: str, path: tuple, model: ModelRef | None) -> Any:
        if v is None:
            if p.required:
                who = f" for model {model}" if model is not None else ""
                self.issue_once(("required", p.name, model), path,
                                f"'{self.method.name}' needs parameter '{p.name}'{who} (first missing for tensor "
                                f"{tensor}); set it under this entry's parameters or in the top-level parameters")
                return 0.0 if p.kind is float else p.default
            return p.default
        value, problem = p.validate(v)
        if problem:
            self.issue_once(("value", p.name, model, problem), path, f"parameter '{p.name}' for tensor {tensor}: "
                            f"{problem}; allowed: {p.allowed()}")
        return value

    def donated(self, ref: ModelRef, name: str, section: str) -> OutputTensor:
        """A tensor copied unmerged from the donor the plan names (embed_source / head_source)."""
        info = self.infos[ref].tensors[name]
        dtype = self.out_dtype if (self.out_dtype and info.dtype.is_floating_point) else info.dtype
        return OutputTensor(name, info.shape, dtype, (Input(ref, name),), None, copy=True, section=section)

    def check_same_architecture(self, refs: list[ModelRef]) -> None:
        """Models of different architectures (config model_type / architectures) cannot be merged."""
        kinds = {}
        for ref in refs:
            cfg = self.infos[ref].config
            kind = (cfg.get("model_type"), tuple(cfg.get("architectures") or ()))
            if kind != (None, ()):
                kinds.setdefault(kind, []).append(self.infos[ref].label)
        if len(kinds) > 1:
            detail = "; ".join(f"{k[0] or '?'} {list(k[1])}: {', '.join(v)}" for k, v in kinds.items())
            if self.allow_crimes:
                self.warnings.append(f"merging models of different architectures ({detail}) as --allow-crimes "
                                     "asks; config.json comes from the base (or first) model")
                return
            self.issue_once(("mixed-arch",), (), f"the models have different architectures ({detail}); "
                            "merging them would produce a model no library can load (mergekit's --allow-crimes "
                            "merges them anyway when their tensors agree)")

    # -- models: -----------------------------------------------------------------------------
    def expand_models(self) -> StepLayout:
        plan = self.plan
        sources = [SliceSource(m.model, (0, 0), m.parameters, m.path) for m in plan.models]
        if plan.base_model is not None and plan.base_model not in [s.model for s in sources]:
            # mergekit appends an unlisted base model as an input without parameters
            sources.append(SliceSource(plan.base_model, (0, 0), {}, plan.prefix + ("base_model",)))
        sl = _Slice(sources, {}, plan.base_model, ())
        donor = plan.base_model or sources[0].model
        ref_index = [s.model for s in sources].index(donor)
        self.check_same_architecture([s.model for s in sources])
        ref = self.infos[donor]
        # every model must have the same number of layers (mergekit's rule for a models: merge)
        for s in sources:
            arch = self.infos[s.model].arch
            if arch.num_layers != ref.arch.num_layers:
                self.issue_once(("layers", s.model), s.path, f"{self.infos[s.model].label} has {arch.num_layers} "
                                f"layers but {ref.label} has {ref.arch.num_layers}; a models: merge needs equal "
                                "layer counts (use slices: to combine different depths)")
        if self.issues:
            return StepLayout([], {}, donor)
        out = []
        for name in order_names(ref.tensors, ref.arch):
            ot = self.make(sl, name, [name] * len(sources), ref.arch.t(name), ref.arch.section(name), ref_index)
            if ot is not None:
                out.append(ot)
        for s in sources:
            extra = [n for n in self.infos[s.model].tensors if n not in ref.tensors]
            if extra:
                self.warnings.append(f"{len(extra)} tensor(s) of {self.infos[s.model].label} are not in "
                                     f"{ref.label} and are not merged, e.g. {extra[0]}")
        config = output_config(ref.config, self.out_dtype, out)
        return StepLayout(out, config, donor, self.warnings)

    # -- slices: -----------------------------------------------------------------------------
    def expand_slices(self) -> StepLayout:
        plan = self.plan
        slices = [_Slice(list(s.sources), s.parameters, s.base_model or plan.base_model, s.path) for s in plan.slices]
        for sl in slices:
            if self.method.base != "none" and sl.base is not None and sl.base not in [s.model for s in sl.sources]:
                self.issue_once(("slicebase", sl.path), sl.path + ("sources",),
                                f"base model {sl.base} is not one of this slice's sources; '{self.method.name}' "
                                "needs it listed with a layer_range")
            for src in sl.sources:
                info = self.infos[src.model]
                a, b = src.layer_range
                if info.arch.prefix is None:
                    self.issue_once(("nolayers", src.model), src.path + ("layer_range",),
                                    f"{info.label} has no numbered layer stack to slice (no tensor names like "
                                    "model.layers.N.*)")
                elif b > info.arch.num_layers:
                    self.issue_once(("range", src.path), src.path + ("layer_range",),
                                    f"layer_range {[a, b]} is outside {info.label}, which has "
                                    f"{info.arch.num_layers} layers (allowed: 0 <= start < end <= {info.arch.num_layers})")
        self.check_same_architecture([s.model for sl in slices for s in sl.sources]
                                     + [r for r in (plan.embed_source, plan.head_source) if r is not None])
        archs = {self.infos[s.model].arch.prefix for sl in slices for s in sl.sources}
        if len(archs) > 1:
            self.issue_once(("mixed",), ("slices",), "the slices mix architectures with different layer names: "
                            + ", ".join(sorted(str(a) for a in archs)))
        if self.issues:
            return StepLayout([], {}, slices[0].sources[0].model)

        first, last = slices[0], slices[-1]
        pre_donor = self.infos[plan.embed_source or first.sources[0].model]
        post_donor = self.infos[plan.head_source or last.sources[0].model]
        for info in {id(pre_donor): pre_donor, id(post_donor): post_donor}.values():
            for name in info.tensors:
                if info.arch.section(name) == "stack":
                    self.issue_once(("stack", name), ("slices",), f"cannot place tensor {name} of {info.label}: it "
                                    f"belongs to a second numbered stack ({split_layer(name).prefix}*), and "
                                    "slicing such models is not supported")
        if self.issues:
            return StepLayout([], {}, first.sources[0].model)

        out: list[OutputTensor] = []
        ref_pre = [n for n in order_names(pre_donor.tensors, pre_donor.arch) if pre_donor.arch.section(n) == "pre"]
        for name in ref_pre:
            ot = (self.donated(plan.embed_source, name, "pre") if plan.embed_source
                  else self.make(first, name, [name] * len(first.sources), 0.0, "pre", 0))
            if ot:
                out.append(ot)
        k = 0
        for sl in slices:
            n = sl.sources[0].layer_range[1] - sl.sources[0].layer_range[0]
            for idx in range(n):
                t = idx / (n - 1) if n > 1 else 1.0
                lead = sl.sources[0]
                lead_info = self.infos[lead.model]
                j = lead.layer_range[0] + idx
                rests = [lead_info.arch.layer(nm).rest for nm in order_names(lead_info.tensors, lead_info.arch)
                         if (ln := lead_info.arch.layer(nm)) is not None and ln.index == j]
                prefix = lead_info.arch.prefix
                for rest in rests:
                    names = [f"{self.infos[s.model].arch.prefix}{s.layer_range[0] + idx}.{rest}" for s in sl.sources]
                    ot = self.make(sl, f"{prefix}{k}.{rest}", names, t, "layer", 0)
                    if ot:
                        out.append(ot)
                k += 1
        ref_post = [n for n in order_names(post_donor.tensors, post_donor.arch) if post_donor.arch.section(n) == "post"]
        for name in ref_post:
            ot = (self.donated(plan.head_source, name, "post") if plan.head_source
                  else self.make(last, name, [name] * len(last.sources), 0.0, "post", 0))
            if ot:
                out.append(ot)
        donor = plan.base_model or first.sources[0].model
        config = output_config(self.infos[donor].config, self.out_dtype, out)
        layer_map = [(s.model, s.layer_range[0] + i) for sl in slices for i in
                     range(sl.sources[0].layer_range[1] - sl.sources[0].layer_range[0]) for s in sl.sources[:1]]
        restack_config(config, self.infos, layer_map, self.infos[donor].arch)
        return StepLayout(out, config, donor, self.warnings)


def order_names(tensors: Mapping[str, Any], arch: Architecture) -> list[str]:
    """Output order: embeddings, then layers in numeric order, then other stacks, then the rest."""
    rank = {"pre": 0, "layer": 1, "stack": 2, "post": 3}

    def key(name: str):
        ln = split_layer(name)
        if arch.layer(name) is not None:
            return (1, ln.index, natural_key(ln.rest))
        return (rank[arch.section(name)], 0, natural_key(name))

    return sorted(tensors, key=key)


def output_config(config: dict[str, Any], out_dtype: torch.dtype | None, tensors: list[OutputTensor]) -> dict:
    """config.json of the output: the donor's, with torch_dtype set to what is written."""
    config = copy.deepcopy(config)
    if out_dtype is None:
        sizes: dict[torch.dtype, int] = {}
        for t in tensors:
            if t.dtype.is_floating_point:
                sizes[t.dtype] = sizes.get(t.dtype, 0) + t.numel
        out_dtype = max(sizes, key=sizes.get) if sizes else None
    if out_dtype is not None and config:
        config["torch_dtype"] = dtype_name(out_dtype)
        if "dtype" in config:  # transformers v5 spelling
            config["dtype"] = dtype_name(out_dtype)
    return config


def restack_config(config: dict[str, Any], infos: Mapping[ModelRef, SourceInfo],
                   layer_map: list[tuple[ModelRef, int]], donor_arch: Architecture) -> None:
    """After slicing: the layer count under the model's own key, and every per-layer list
    (``layer_types``, per-layer head counts, sliding-window flags ...) rebuilt from the layers used."""
    if not config:
        return
    n_out = len(layer_map)
    key = donor_arch.layer_key
    if key is None:
        for cand in ("num_hidden_layers", "n_layer", "num_layers"):
            if cand in config:
                key = cand
                break
    if key is not None:
        set_dotted(config, key, n_out)

    def rebuild(cfg: dict[str, Any], path: str) -> None:
        for k, v in list(cfg.items()):
            full = f"{path}{k}"
            if isinstance(v, dict):
                rebuild(v, full + ".")
            elif isinstance(v, list) and v and k not in ("architectures",):
                donor_len = donor_arch.num_layers
                if len(v) != donor_len:
                    continue
                new = []
                for ref, j in layer_map:
                    src_cfg = infos[ref].config
                    src_list = get_dotted(src_cfg, full)
                    if not isinstance(src_list, list) or len(src_list) != infos[ref].arch.num_layers:
                        src_list = v
                    new.append(src_list[j] if j < len(src_list) else src_list[-1])
                cfg[k] = new

    rebuild(config, "")


def upscale_to_slices(plan: MergePlan, num_layers: int) -> MergePlan:
    """Expand ``depth_upscale: {model, copies, drop}`` into the equivalent ``slices:`` plan.

    SOLAR-style (Kim et al. 2023): of a model with n layers, the first copy keeps layers
    [0, n − drop), the last copy keeps [drop, n), and any copies in between keep [drop, n − drop).
    With copies = 2 and drop = 8 a 32-layer model becomes 24 + 24 = 48 layers.
    """
    import yaml

    from .schema import SliceSource

    up = plan.depth_upscale
    n, d, c = num_layers, up.drop, up.copies
    ranges = [(0, n - d)] + [(d, n - d)] * (c - 2) + [(d, n)]
    if any(b <= a for a, b in ranges):
        raise PlanError(plan.issue(up.path[len(plan.prefix):] + ("drop",),
                                   f"drop {d} leaves no layers of the {n}-layer model {up.model} in some copy "
                                   f"(allowed: drop < {n // 2 if c > 2 else n})"))
    slices = tuple(OutputSlice((SliceSource(up.model, r, {}, up.path),), {}, None, up.path) for r in ranges)
    expanded = {"merge_method": "passthrough",
                "slices": [{"sources": [{"model": str(up.model), "layer_range": list(r)}]} for r in ranges]}
    text = yaml.safe_dump(expanded, sort_keys=False, default_flow_style=None)
    from dataclasses import replace

    return replace(plan, slices=slices, depth_upscale=None, expanded_from=text)
