"""Merge plans: mergekit's YAML schema, validated strictly.

A plan file holds one merge, or several named steps (mergekit-multi's ``---`` documents with
``name:``, or one document with ``steps:``) whose outputs feed each other. Parsing checks every
key, every model reference's form and every parameter value against the method that will use it,
and reports all problems at once, each with its file, line and key path. Nothing is read from the
models here (see :mod:`mergekit_lite.plan.expand` for checks that need tensor headers).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from typing import Any, Mapping

from .. import methods
from ..dtypes import PLAN_DTYPES
from ..errors import Issue, PlanError
from .params import is_number, is_scalar
from .source import Document, Path, load_documents

STEP_KEYS = {
    "merge_method": "the merge method (required)",
    "base_model": "the base model",
    "models": "the models to merge",
    "slices": "output slices built from layer ranges of the models",
    "depth_upscale": "short form of a SOLAR-style depth upscale",
    "parameters": "parameters for every tensor",
    "dtype": "dtype written when out_dtype is not given",
    "out_dtype": "dtype of the written tensors",
    "tokenizer_source": "where the tokenizer comes from: base, or a model",
    "embed_source": "model whose embeddings a slices plan copies (default: the first slice's)",
    "head_source": "model whose final norm and lm_head a slices plan copies (default: the last slice's)",
    "name": "the step's name (multi-step plans)",
    "save": "also write this step's result to this folder (multi-step plans)",
    "seed": "seed of the random methods (DARE, DELLA)",
}
UNSUPPORTED_KEYS = {
    "modules": "multi-module (vision-language) plans are not supported yet",
    "tokenizer": "tokenizer building (union vocabularies, added tokens) is not supported yet; "
                 "use tokenizer_source: base or a model",
    "chat_template": "chat templates are not supported yet; the tokenizer donor's template is copied",
}
MODEL_KEYS = {"model", "parameters"}
SOURCE_KEYS = {"model", "layer_range", "parameters"}
SLICE_KEYS = {"sources", "parameters", "base_model"}
UPSCALE_KEYS = {"model", "copies", "drop"}
RECIPE_KEYS = {"steps", "seed"}


@dataclass(frozen=True)
class ModelRef:
    """A model as the plan names it: a local folder or file, or a Hub repo id with a revision."""

    path: str
    revision: str | None = None

    def __str__(self) -> str:
        return self.path if self.revision is None else f"{self.path}@{self.revision}"


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
    name: str | None = None
    save: str | None = None
    seed: int | None = None
    depth_upscale: DepthUpscale | None = None
    embed_source: ModelRef | None = None
    head_source: ModelRef | None = None
    expanded_from: str | None = None  # the short form this step was expanded from (for `plan`)
    doc: Document | None = field(default=None, compare=False, repr=False)
    prefix: Path = ()  # key path of this step inside its document (``steps[i]``)

    @property
    def method(self) -> methods.Method:
        return methods.get(self.merge_method)

    def referenced_models(self) -> list[ModelRef]:
        """Every model the step reads, in first-mention order, base first."""
        seen: list[ModelRef] = []
        for ref in [self.base_model] + [m.model for m in self.models or ()] + [
            s.model for sl in self.slices or () for s in sl.sources
        ] + [self.depth_upscale.model if self.depth_upscale else None, self.embed_source, self.head_source]:
            if ref is not None and ref not in seen:
                seen.append(ref)
        return seen

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


# --------------------------------------------------------------------------------------------------
# parsing


def load_plan(path: str | os.PathLike) -> Recipe:
    """Read and validate a plan file."""
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    except FileNotFoundError:
        raise PlanError(Issue(path, None, "", "the plan file does not exist")) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise PlanError(Issue(path, None, "", f"cannot read the plan file: {exc}")) from None
    return parse_plan(text, path)


def parse_plan(text: str, file: str = "<plan>") -> Recipe:
    """Validate plan text (one or several YAML documents) into a :class:`Recipe`."""
    docs = load_documents(text, file)
    issues: list[Issue] = []
    warnings: list[str] = []
    steps: list[MergePlan] = []
    seed = None
    if len(docs) == 1 and isinstance(docs[0].data, dict) and "steps" in docs[0].data:
        doc = docs[0]
        for key in doc.data:
            if key not in RECIPE_KEYS:
                issues.append(doc.issue((key,), f"unknown key '{key}' next to 'steps'; allowed: steps, seed"))
        seed = _check_seed(doc, ("seed",), doc.data.get("seed"), issues)
        raw_steps = doc.data["steps"]
        if not isinstance(raw_steps, list) or not raw_steps:
            issues.append(doc.issue(("steps",), "expected a non-empty list of steps"))
        else:
            for i, raw in enumerate(raw_steps):
                step = _parse_step(doc, raw, ("steps", i), issues, warnings)
                if step is not None:
                    steps.append(step)
    else:
        for doc in docs:
            step = _parse_step(doc, doc.data, (), issues, warnings)
            if step is not None:
                steps.append(step)
    if issues:
        raise PlanError(issues)
    if seed is not None:
        steps = [s if s.seed is not None else replace(s, seed=seed) for s in steps]
    ordered = _order_steps(steps, file)
    return Recipe(steps=tuple(ordered), file=file, text=text, warnings=tuple(warnings))


def _order_steps(steps: list[MergePlan], file: str) -> list[MergePlan]:
    """Check names and dependencies between steps; return them in dependency order, output last."""
    if len(steps) == 1:
        return steps
    issues: list[Issue] = []
    names: dict[str, MergePlan] = {}
    unnamed = [s for s in steps if s.name is None]
    for s in steps:
        if s.name is None:
            continue
        if s.name in names:
            issues.append(s.issue(("name",), f"two steps are named '{s.name}'"))
        names[s.name] = s
    if len(unnamed) > 1:
        for s in unnamed[1:]:
            issues.append(s.issue((), "only one step may be unnamed (the final output); name this step"))
    deps = {id(s): [r.path for r in s.referenced_models() if r.path in names] for s in steps}
    used = {d for ds in deps.values() for d in ds}
    for s in steps:
        if s.name is not None and s.name in [r.path for r in s.referenced_models()]:
            issues.append(s.issue(("name",), f"step '{s.name}' uses itself as a model"))
    if issues:
        raise PlanError(issues)
    if unnamed:
        output = unnamed[0]
    else:
        sinks = [s for s in steps if s.name not in used]
        if len(sinks) != 1:
            listed = ", ".join(repr(s.name) for s in sinks) or "none (every step is used by another)"
            raise PlanError(Issue(file, None, "", "cannot tell which step is the output: steps no other "
                                  f"step uses: {listed}; leave the output step unnamed"))
        output = sinks[0]
    # depth-first order from the output; a step reached again while on the stack is a cycle
    order: list[MergePlan] = []
    state: dict[int, str] = {}

    def visit(step: MergePlan, chain: list[str]):
        key = id(step)
        if state.get(key) == "done":
            return
        if state.get(key) == "active":
            cycle = " -> ".join(chain[chain.index(step.name):] + [step.name])
            raise PlanError(step.issue(("name",), f"the steps form a cycle: {cycle}"))
        state[key] = "active"
        for dep in deps[key]:
            visit(names[dep], chain + [step.name or "<output>"])
        state[key] = "done"
        order.append(step)

    visit(output, [])
    unused = [s for s in steps if id(s) not in state]
    if unused:
        raise PlanError([s.issue(("name",), f"step '{s.name}' is not used by the output step") for s in unused])
    return order


def _check_seed(doc: Document, path: Path, value: Any, issues: list[Issue]) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        issues.append(doc.issue(path, f"seed must be a non-negative integer, got {value!r}"))
        return None
    return value


def _parse_model_ref(doc: Document, path: Path, value: Any, issues: list[Issue]) -> ModelRef | None:
    """A model reference: ``path``, ``org/name@revision`` or ``{path, revision}``."""
    if isinstance(value, dict):
        inner = value.get("model", value) if set(value) <= {"model", "lora", "override_architecture"} else value
        if isinstance(value.get("lora"), str) or value.get("override_architecture"):
            issues.append(doc.issue(path, "LoRA inputs and override_architecture are not supported yet"))
            return None
        if isinstance(inner, dict) and isinstance(inner.get("path"), str) and set(inner) <= {"path", "revision"}:
            rev = inner.get("revision")
            if rev is not None and not isinstance(rev, str):
                issues.append(doc.issue(path + ("revision",), f"a revision is a string, got {rev!r}"))
                return None
            return ModelRef(inner["path"], rev)
        issues.append(doc.issue(path, "expected a model path or repo id (a string), or {path: ..., revision: ...}"))
        return None
    if not isinstance(value, str) or not value.strip():
        issues.append(doc.issue(path, f"expected a model path or Hugging Face repo id, got {value!r}"))
        return None
    value = value.strip()
    if "+" in value and not os.path.exists(value):
        issues.append(doc.issue(path, f"'{value}' names a LoRA adapter (model+lora); LoRA inputs are not supported yet"))
        return None
    if "@" in value and not os.path.exists(value):
        repo, _, rev = value.rpartition("@")
        if not repo or not rev:
            issues.append(doc.issue(path, f"'{value}': expected org/name@revision"))
            return None
        return ModelRef(repo, rev)
    return ModelRef(value)


def _parse_step(doc: Document, data: Any, prefix: Path, issues: list[Issue], warnings: list[str]) -> MergePlan | None:
    n_before = len(issues)

    def bad(path: Path, message: str) -> None:
        issues.append(doc.issue(prefix + tuple(path), message))

    if not isinstance(data, dict):
        bad((), f"a merge plan is a mapping of keys such as merge_method and models, got {type(data).__name__}")
        return None
    for key in data:
        if key in UNSUPPORTED_KEYS:
            bad((key,), UNSUPPORTED_KEYS[key])
        elif key not in STEP_KEYS:
            bad((key,), f"unknown key '{key}'; allowed keys: {', '.join(STEP_KEYS)}")

    # merge method ---------------------------------------------------------------------------
    method_name = data.get("merge_method")
    method = None
    if method_name is None:
        if "depth_upscale" in data:
            method_name = "passthrough"
        else:
            bad((), "missing key 'merge_method'; known methods: " + ", ".join(methods.names()))
    if method_name is not None:
        if not isinstance(method_name, str):
            bad(("merge_method",), f"expected a method name, got {method_name!r}")
        else:
            try:
                method = methods.get(method_name)
            except KeyError as exc:
                bad(("merge_method",), exc.args[0])

    # simple scalars ---------------------------------------------------------------------------
    for key in ("dtype", "out_dtype"):
        value = data.get(key)
        if value is not None and (not isinstance(value, str) or value.removeprefix("torch.") not in PLAN_DTYPES):
            bad((key,), f"unknown dtype {value!r}; allowed: {', '.join(PLAN_DTYPES)}")
    name = data.get("name")
    if name is not None and (not isinstance(name, str) or not name.strip()):
        bad(("name",), f"a step name is a non-empty string, got {name!r}")
        name = None
    save = data.get("save")
    if save is not None and (not isinstance(save, str) or not save.strip()):
        bad(("save",), f"save is a folder path, got {save!r}")
        save = None
    seed = _check_seed(doc, prefix + ("seed",), data.get("seed"), issues)

    base = None
    if data.get("base_model") is not None:
        base = _parse_model_ref(doc, prefix + ("base_model",), data["base_model"], issues)

    tok = data.get("tokenizer_source")
    tokenizer_source: ModelRef | str | None = None
    if tok is not None:
        if tok == "union":
            bad(("tokenizer_source",), "tokenizer_source: union is not supported yet; allowed: base, or a model")
        elif tok == "base":
            tokenizer_source = "base"
        else:
            tokenizer_source = _parse_model_ref(doc, prefix + ("tokenizer_source",), tok, issues)

    # parameters -------------------------------------------------------------------------------
    def check_params(raw: Any, path: Path, where: str) -> Mapping[str, Any]:
        """where: 'global' (plan or slice level: any parameter) or 'model' (per-model only)."""
        if raw is None:
            return {}
        if not isinstance(raw, dict):
            bad(path, f"parameters is a mapping of parameter names to values, got {raw!r}")
            return {}
        if method is None:
            return raw
        for pname, setting in raw.items():
            param = method.param(pname)
            if param is None:
                known = ", ".join(p.name for p in method.params) or "none"
                bad(path + (pname,), f"merge method '{method.name}' has no parameter '{pname}'; its parameters: {known}")
                continue
            if where == "model" and param.scope == "global":
                bad(path + (pname,), f"'{pname}' is a global parameter of '{method.name}' (one value per tensor, "
                    "not per model): set it in the top-level parameters")
                continue
            _check_setting(param, setting, lambda p, m: bad(path + (pname,) + tuple(p), m))
        return raw

    parameters = check_params(data.get("parameters"), ("parameters",), "global")

    models = None
    if "models" in data:
        raw_models = data["models"]
        if not isinstance(raw_models, list) or not raw_models:
            bad(("models",), "expected a non-empty list of models (each '- model: PATH')")
        else:
            models = []
            for i, entry in enumerate(raw_models):
                mpath = ("models", i)
                if isinstance(entry, str):  # tolerate '- path' shorthand
                    entry = {"model": entry}
                if not isinstance(entry, dict):
                    bad(mpath, f"expected a mapping with 'model' and optional 'parameters', got {entry!r}")
                    continue
                for key in entry:
                    if key not in MODEL_KEYS:
                        bad(mpath + (key,), f"unknown key '{key}' in a model entry; allowed: model, parameters")
                if "model" not in entry:
                    bad(mpath, "missing key 'model'")
                    continue
                ref = _parse_model_ref(doc, prefix + mpath + ("model",), entry["model"], issues)
                params = check_params(entry.get("parameters"), mpath + ("parameters",), "model")
                if ref is not None:
                    models.append(InputModel(ref, params, prefix + mpath))
            models = tuple(models)

    slices = None
    if "slices" in data:
        slices = _parse_slices(doc, data["slices"], prefix, issues, bad, check_params)

    upscale = None
    if "depth_upscale" in data:
        raw = data["depth_upscale"]
        if not isinstance(raw, dict):
            bad(("depth_upscale",), "expected {model: PATH, copies: 2, drop: N}")
        else:
            ok = True
            for key in raw:
                if key not in UPSCALE_KEYS:
                    bad(("depth_upscale", key), f"unknown key '{key}'; allowed: model, copies, drop")
                    ok = False
            ref = None
            if "model" not in raw:
                bad(("depth_upscale",), "missing key 'model'")
            else:
                ref = _parse_model_ref(doc, prefix + ("depth_upscale", "model"), raw["model"], issues)
            values = {}
            for key, lo, default in (("copies", 2, 2), ("drop", 0, 0)):
                v = raw.get(key, default)
                if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                    bad(("depth_upscale", key), f"{key} must be an integer >= {lo}, got {v!r}")
                    ok = False
                values[key] = v
            if ok and ref is not None:
                upscale = DepthUpscale(ref, values["copies"], values["drop"], prefix + ("depth_upscale",))
        if method is not None and method.name != "passthrough":
            bad(("merge_method",), f"depth_upscale stacks copies of one model and needs merge_method: passthrough "
                f"(or no merge_method), got '{method.name}'")

    donors = {}
    for key in ("embed_source", "head_source"):
        if data.get(key) is not None:
            donors[key] = _parse_model_ref(doc, prefix + (key,), data[key], issues)
            if "slices" not in data and "depth_upscale" not in data:
                bad((key,), f"{key} applies to slices plans (layer stacking); a models: merge merges every tensor")

    given = [k for k in ("models", "slices", "depth_upscale") if k in data]
    if len(given) != 1:
        if not given:
            bad((), "a plan needs exactly one of 'models', 'slices' or 'depth_upscale'")
        else:
            bad((given[1],), f"'{given[0]}' and '{given[1]}' cannot both be given: use exactly one")

    if len(issues) > n_before or method is None:
        return None
    plan = MergePlan(merge_method=method.name, base_model=base, models=models, slices=slices,
                     parameters=parameters, dtype=data.get("dtype"), out_dtype=data.get("out_dtype"),
                     tokenizer_source=tokenizer_source, name=name.strip() if name else None,
                     save=save, seed=seed, depth_upscale=upscale, embed_source=donors.get("embed_source"),
                     head_source=donors.get("head_source"), doc=doc, prefix=prefix)
    _check_inputs(plan, method, issues, warnings)
    return plan if len(issues) == n_before else None


def _parse_slices(doc, raw, prefix, issues, bad, check_params):
    if not isinstance(raw, list) or not raw:
        bad(("slices",), "expected a non-empty list of slices (each with 'sources')")
        return None
    out = []
    for i, sl in enumerate(raw):
        spath = ("slices", i)
        if not isinstance(sl, dict):
            bad(spath, f"expected a mapping with 'sources', got {sl!r}")
            continue
        for key in sl:
            if key not in SLICE_KEYS:
                bad(spath + (key,), f"unknown key '{key}' in a slice; allowed: {', '.join(sorted(SLICE_KEYS))}")
        sources_raw = sl.get("sources")
        if not isinstance(sources_raw, list) or not sources_raw:
            bad(spath + ("sources",), "expected a non-empty list of sources (each with model and layer_range)")
            continue
        sources = []
        for j, src in enumerate(sources_raw):
            ppath = spath + ("sources", j)
            if not isinstance(src, dict):
                bad(ppath, f"expected a mapping with 'model' and 'layer_range', got {src!r}")
                continue
            for key in src:
                if key not in SOURCE_KEYS:
                    bad(ppath + (key,), f"unknown key '{key}' in a slice source; allowed: model, layer_range, parameters")
            if "model" not in src:
                bad(ppath, "missing key 'model'")
                continue
            ref = _parse_model_ref(doc, prefix + ppath + ("model",), src["model"], issues)
            lr = src.get("layer_range")
            if (not isinstance(lr, list) or len(lr) != 2 or not all(isinstance(x, int) and not isinstance(x, bool) for x in lr)
                    or lr[0] < 0 or lr[1] <= lr[0]):
                bad(ppath + ("layer_range",), f"layer_range is [start, end) with 0 <= start < end, got {lr!r}")
                continue
            params = check_params(src.get("parameters"), ppath + ("parameters",), "model")
            if ref is not None:
                sources.append(SliceSource(ref, (lr[0], lr[1]), params, prefix + ppath))
        lengths = {s.layer_range[1] - s.layer_range[0] for s in sources}
        if len(lengths) > 1:
            bad(spath + ("sources",), "all sources of a slice must have the same number of layers, got "
                + ", ".join(f"{s.layer_range}" for s in sources))
        sbase = None
        if sl.get("base_model") is not None:
            sbase = _parse_model_ref(doc, prefix + spath + ("base_model",), sl["base_model"], issues)
        sparams = check_params(sl.get("parameters"), spath + ("parameters",), "global")
        out.append(OutputSlice(tuple(sources), sparams, sbase, prefix + spath))
    return tuple(out)


def _check_setting(param: methods.Param, setting: Any, bad) -> None:
    """Structure and type of one parameter setting; `bad(subpath, message)` records a problem."""

    def leaf(value: Any, sub: Path) -> None:
        _, problem = param.validate(value)
        if problem:
            bad(sub, f"{problem}; '{param.name}' takes {param.allowed()}")

    def scalar_or_gradient(value: Any, sub: Path) -> None:
        if is_scalar(value):
            leaf(value, sub)
        elif isinstance(value, list) and value and all(is_scalar(v) for v in value):
            if param.kind is float and not all(is_number(v) for v in value):
                bad(sub, f"a gradient is a list of numbers, got {value!r}")
                return
            for k, v in enumerate(value):
                leaf(v, sub + (k,))
        else:
            bad(sub, f"expected a value or a gradient (a list of numbers), got {value!r}; "
                f"'{param.name}' takes {param.allowed()}")

    def conditional(value: Any, sub: Path) -> None:
        for key in value:
            if key not in ("filter", "value"):
                bad(sub + (key,), f"unknown key '{key}' in a filtered value; allowed: filter, value")
        if "value" not in value:
            bad(sub, "a filtered value needs 'value'")
        else:
            scalar_or_gradient(value["value"], sub + ("value",))
        f = value.get("filter")
        if f is not None and not isinstance(f, str):
            bad(sub + ("filter",), f"a filter is a substring of tensor names, got {f!r}")

    if value_is_conditional_list(setting):
        for k, cond in enumerate(setting):
            conditional(cond, (k,))
    elif isinstance(setting, dict):
        conditional(setting, ())
    elif isinstance(setting, list) and any(isinstance(v, dict) for v in setting):
        bad((), "a filter list must contain only {filter, value} entries")
    else:
        scalar_or_gradient(setting, ())


def value_is_conditional_list(setting: Any) -> bool:
    return isinstance(setting, list) and bool(setting) and all(isinstance(v, dict) for v in setting)


def _check_inputs(plan: MergePlan, method: methods.Method, issues: list[Issue], warnings: list[str]) -> None:
    """Number of models and use of base_model, against what the method needs."""
    groups: list[tuple[Path, list[ModelRef], ModelRef | None]] = []
    if plan.models is not None:
        groups.append((("models",), [m.model for m in plan.models], plan.base_model))
    if plan.slices is not None:
        for sl in plan.slices:
            groups.append((sl.path[len(plan.prefix):] + ("sources",), [s.model for s in sl.sources],
                           sl.base_model or plan.base_model))
    for path, refs, base in groups:
        if len(set(refs)) != len(refs):
            issues.append(plan.issue(path, "a model is listed twice; list each model once"))
            continue
        if method.base == "required" and base is None:
            issues.append(plan.issue(("merge_method",), f"'{method.name}' needs base_model (the model its task "
                                     "vectors are taken against)"))
            continue
        appended = ""
        if method.base == "none":
            n = len(refs)
            if base is not None and base not in refs and plan.models is not None:
                if any(p.required for p in method.model_params):
                    issues.append(plan.issue(("base_model",), f"'{method.name}' does not use a base model; list "
                                             f"{base} under models with a weight, or remove base_model"))
                    continue
                # mergekit appends an unlisted base model as one more input; a method whose per-model
                # parameters all have defaults (karcher) merges it like the listed models
                n += 1
                appended = " (base_model counts as one)"
                warnings.append(f"{plan.issue(('base_model',), '')}".rstrip(": ") + f": '{method.name}' does not "
                                f"treat a base model specially; {base} is merged as one more model, as in mergekit")
        else:
            n = len([r for r in refs if r != base])
        if n < method.min_models or (method.max_models is not None and n > method.max_models):
            if method.max_models == method.min_models:
                want = f"exactly {method.min_models}"
            elif method.max_models is None:
                want = f"at least {method.min_models}"
            else:
                want = f"{method.min_models} to {method.max_models}"
            other = " besides the base model" if method.base != "none" else ""
            issues.append(plan.issue(path, f"'{method.name}' merges {want} model(s){other}, got {n}{appended}"))
    # per-model parameters given to the base model are not used by methods with a base
    if method.base != "none" and plan.models is not None:
        for m in plan.models:
            if m.model == plan.base_model and m.parameters:
                warnings.append(f"{plan.issue(m.path, '')}".rstrip(": ") +
                                f": parameters of the base model ({', '.join(m.parameters)}) are not used by "
                                f"'{method.name}'")
