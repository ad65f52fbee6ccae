"""Reading one merge step: a YAML mapping, checked key by key, into a :class:`MergePlan`.

Why a parser and not a schema library: a plan's author should see every problem at once, each
with its file, line and key path (``p.yml:5: models[1].parameters.weight: ...``, see
:class:`~mergekit_lite.errors.PlanError` and :mod:`mergekit_lite.plan.source`). So nothing here
raises: :class:`StepParser` records an :class:`~mergekit_lite.errors.Issue` and goes on with the next
key, and a step with any issue gives no plan. The caller (:func:`mergekit_lite.plan.schema.parse_plan`)
raises once for the whole file.

What each mapping may hold is declared once, at the top: :data:`STEP_KEYS`, the :class:`Keys` of the
nested mappings, :data:`UNSUPPORTED_KEYS`, the mergekit keys that are recognised but refused,
with why, and :data:`OTHER_TOOLS`, the keys that mark a configuration of another mergekit tool. ``models:`` entries and ``slices: sources:`` entries are both input entries and are read by
one method (:meth:`StepParser.input_entry`). Checks that depend on the merge method (parameter
values, model counts) are in :mod:`mergekit_lite.plan.checks`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping

from .. import methods
from ..dtypes import PLAN_DTYPES
from ..errors import Issue
from . import tokenizer as tok
from .checks import check_inputs, setting_problems
from .recipe import DepthUpscale, InputModel, MergePlan, ModelRef, OutputSlice, SliceSource
from . import output_keys
from .refs import OVERRIDE, read_ref
from .source import Document, Path
from .space import read_section

STEP_KEYS = {
    "merge_method": "the merge method (required)",
    "base_model": "the base model",
    "models": "the models to merge",
    "slices": "output slices built from layer ranges of the models",
    "depth_upscale": "short form of a SOLAR-style depth upscale",
    "parameters": "parameters for every tensor",
    "dtype": "dtype written when out_dtype is not given",
    "out_dtype": "dtype of the written tensors",
    "tokenizer_source": "the output vocabulary: base, union, or a model's",
    "tokenizer": "the output vocabulary with per-token settings: {source, tokens, pad_to_multiple_of}",
    "chat_template": "the output's chat template: auto, a built-in name, or a Jinja template",
    "embed_source": "model whose embeddings a slices plan copies (default: the first slice's)",
    "head_source": "model whose final norm and lm_head a slices plan copies (default: the last slice's)",
    "name": "the step's name (multi-step plans)",
    "save": "also write this step's result to this folder (multi-step plans)",
    "seed": "seed of the random methods (DARE, DELLA)",
    "output": "what the step writes: model (default), or adapter (the models are PEFT adapters of base_model)",
    "rank": "adapter outputs: rank of the re-factorised modules (default: the largest input rank)",
    "rank_error": "adapter outputs: per-module relative error target that picks each module's rank",
    "log_space": "IA3 adapter outputs: merge the logarithms of the scaling vectors",
    "search": "parameters for mergekit-lite search to try (ignored by run)",
}

# mergekit keys that mergekit-lite recognises but does not support: key -> why it is refused. Each
# mapping that may hold one names it in its Keys' `refused` below; a model reference written as a
# mapping refuses override_architecture (:mod:`mergekit_lite.plan.refs`).
UNSUPPORTED_KEYS = {
    # a step
    "modules": "multi-module (vision-language) plans are not supported yet",
    # a model reference written as a mapping
    "override_architecture": OVERRIDE,
}


# Configurations of mergekit's other tools, recognised by their own top-level key and refused as a
# whole (not key by key): key -> what the file is, and what to do instead.
OTHER_TOOLS = {
    "genome": "this is a mergekit-evolve configuration (genome:): evolutionary search over merge parameters "
              "is not supported by mergekit-lite; it runs merge plans (merge_method: and models: or slices:). "
              "Write the plan you want to evaluate, or drive a search from Python (mergekit_lite.Model(...).ties(...) "
              "and iter_tensors() read no files until asked)",
}


@dataclass(frozen=True)
class Keys:
    """The keys one mapping of a plan may hold, the refused ones, and how an unknown key is reported."""

    allowed: tuple[str, ...]  # in the order the message lists them
    unknown: str  # message for a key not allowed, with {key} and {allowed}
    refused: tuple[str, ...] = ()  # keys of UNSUPPORTED_KEYS that belong in this mapping

    def problems(self, mapping: Mapping[str, Any]) -> list[tuple[str, str]]:
        """(key, message) for every key of `mapping` that is refused or unknown, in the mapping's order."""
        out = []
        for key in mapping:
            if key in self.refused:
                out.append((key, UNSUPPORTED_KEYS[key]))
            elif key not in self.allowed:
                out.append((key, self.unknown.format(key=key, allowed=", ".join(self.allowed))))
        return out


STEP = Keys(tuple(STEP_KEYS), "unknown key '{key}'; allowed keys: {allowed}",
            refused=("modules",))
RECIPE = Keys(("steps", "seed"), "unknown key '{key}' next to 'steps'; allowed: {allowed}")
SLICE = Keys(("base_model", "parameters", "sources"), "unknown key '{key}' in a slice; allowed: {allowed}")
MAX_COPIES = 64  # depth_upscale copies: SOLAR uses 2; a huge count would only exhaust memory
UPSCALE = Keys(("model", "copies", "drop"), "unknown key '{key}'; allowed: {allowed}")


@dataclass(frozen=True)
class InputKind:
    """One kind of input entry: a ``models:`` entry or a ``slices: sources:`` entry."""

    keys: Keys
    expected: str  # what the entry is, for "expected a mapping with ..."
    shorthand: bool  # '- PATH' stands for '- model: PATH'

    @property
    def has_layers(self) -> bool:
        return "layer_range" in self.keys.allowed


MODEL_ENTRY = InputKind(Keys(("model", "parameters"), "unknown key '{key}' in a model entry; allowed: {allowed}"),
                        "'model' and optional 'parameters'", shorthand=True)
SLICE_SOURCE = InputKind(Keys(("model", "layer_range", "parameters"),
                              "unknown key '{key}' in a slice source; allowed: {allowed}"),
                         "'model' and 'layer_range'", shorthand=False)


def check_seed(doc: Document, path: Path, value: Any, issues: list[Issue]) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        issues.append(doc.issue(path, f"seed must be a non-negative integer, got {value!r}"))
        return None
    return value


class StepParser:
    """Reads one step (a YAML document, or one entry of ``steps:``) into a MergePlan.

    Problems go to `issues` (with `prefix`, the step's key path in its document, before each path),
    notes to `warnings`. :meth:`parse` reads the keys in the order of :attr:`READERS`, which is the
    order their problems are reported in.
    """

    def __init__(self, doc: Document, data: Any, prefix: Path, issues: list[Issue], warnings: list[str]):
        self.doc = doc
        self.data = data
        self.prefix = tuple(prefix)
        self.issues = issues
        self.warnings = warnings
        self.method: methods.Method | None = None  # known once merge_method is read

    def report(self, path: Path, message: str) -> None:
        self.issues.append(self.doc.issue(self.prefix + tuple(path), message))

    def check_keys(self, path: Path, mapping: Mapping[str, Any], keys: Keys) -> None:
        for key, message in keys.problems(mapping):
            self.report(path + (key,), message)

    def parse(self) -> MergePlan | None:
        n_before = len(self.issues)
        if not isinstance(self.data, dict):
            self.report((), "a merge plan is a mapping of keys such as merge_method and models, "
                        f"got {type(self.data).__name__}")
            return None
        tool = next((key for key in OTHER_TOOLS if key in self.data), None)
        if tool is not None:
            self.report((tool,), OTHER_TOOLS[tool])
            return None
        self.check_keys((), self.data, STEP)
        values = {key: read(self, key) for key, read in self.READERS.items()}
        self.check_one_form()
        if values["output"] == "adapter":
            output_keys.check_adapter_inputs(self, values)
        if len(self.issues) > n_before or self.method is None:
            return None
        plan = MergePlan(**values, doc=self.doc, prefix=self.prefix)
        check_inputs(plan, self.method, self.issues, self.warnings)
        tok.check_token_sources(plan, self.issues)
        return plan if len(self.issues) == n_before else None

    # one reader per key: returns the MergePlan field of the same name ---------------------------

    def merge_method(self, key: str) -> str | None:
        name = self.data.get(key)
        if name is None:
            if "depth_upscale" not in self.data:
                self.report((), "missing key 'merge_method'; known methods: " + ", ".join(methods.names()))
                return None
            name = "passthrough"
        if not isinstance(name, str):
            self.report((key,), f"expected a method name, got {name!r}")
            return None
        try:
            self.method = methods.get(name)
        except KeyError as exc:
            self.report((key,), exc.args[0])
            return None
        return self.method.name

    def dtype(self, key: str) -> Any:
        value = self.data.get(key)
        if value is not None and (not isinstance(value, str) or value.removeprefix("torch.") not in PLAN_DTYPES):
            self.report((key,), f"unknown dtype {value!r}; allowed: {', '.join(PLAN_DTYPES)}")
        return value

    def name(self, key: str) -> str | None:
        name = self.data.get(key)
        if name is not None and (not isinstance(name, str) or not name.strip()):
            self.report((key,), f"a step name is a non-empty string, got {name!r}")
            return None
        return name.strip() if name else None

    def save(self, key: str) -> str | None:
        save = self.data.get(key)
        if save is not None and (not isinstance(save, str) or not save.strip()):
            self.report((key,), f"save is a folder path, got {save!r}")
            return None
        return save

    def seed(self, key: str) -> int | None:
        return check_seed(self.doc, self.prefix + (key,), self.data.get(key), self.issues)

    def base_model(self, key: str) -> ModelRef | None:
        if self.data.get(key) is None:
            return None
        return self.model_ref((key,), self.data[key])

    def parameters(self, key: str) -> Mapping[str, Any]:
        return self.settings((key,), self.data.get(key), "global")

    def models(self, key: str) -> tuple[InputModel, ...] | None:
        if key not in self.data:
            return None
        raw = self.data[key]
        if not isinstance(raw, list) or not raw:
            self.report((key,), "expected a non-empty list of models (each '- model: PATH')")
            return None
        entries = [self.input_entry((key, i), entry, MODEL_ENTRY) for i, entry in enumerate(raw)]
        return tuple(e for e in entries if e is not None)

    def slices(self, key: str) -> tuple[OutputSlice, ...] | None:
        if key not in self.data:
            return None
        raw = self.data[key]
        if not isinstance(raw, list) or not raw:
            self.report((key,), "expected a non-empty list of slices (each with 'sources')")
            return None
        slices = [self.output_slice((key, i), sl) for i, sl in enumerate(raw)]
        return tuple(s for s in slices if s is not None)

    def depth_upscale(self, key: str) -> DepthUpscale | None:
        if key not in self.data:
            return None
        upscale = self.upscale((key,), self.data[key])
        if self.method is not None and self.method.name != "passthrough":
            self.report(("merge_method",), "depth_upscale stacks copies of one model and needs merge_method: "
                        f"passthrough (or no merge_method), got '{self.method.name}'")
        return upscale

    def donor(self, key: str) -> ModelRef | None:
        """embed_source and head_source: the model a slices plan copies those tensors from."""
        if self.data.get(key) is None:
            return None
        ref = self.model_ref((key,), self.data[key])
        if "slices" not in self.data and "depth_upscale" not in self.data:
            self.report((key,), f"{key} applies to slices plans (layer stacking); a models: merge merges every tensor")
        return ref

    def search(self, key: str) -> tuple:
        """The ``search:`` section (:mod:`mergekit_lite.plan.space`), checked against the step."""
        if key not in self.data or self.method is None:
            return ()
        label = f"{self.data['name']}/" if isinstance(self.data.get("name"), str) else ""
        self.warnings.append("the search: section is for mergekit-lite search; merging uses the plan's own "
                             "parameters")
        return read_section(self.data[key], self.method, self.data, self.doc.index, self.prefix,
                            lambda path, message: self.report((key,) + path, message), label)

    # the step's keys in the order they are read (and their problems reported)
    READERS: dict[str, Callable[[StepParser, str], Any]] = {
        "merge_method": merge_method,
        "dtype": dtype,
        "out_dtype": dtype,
        "name": name,
        "save": save,
        "seed": seed,
        "output": output_keys.output,
        "rank": output_keys.rank,
        "rank_error": output_keys.rank_error,
        "log_space": output_keys.log_space,
        "base_model": base_model,
        "tokenizer_source": tok.tokenizer_source,
        "tokenizer": tok.tokenizer_section,
        "chat_template": tok.chat_template,
        "parameters": parameters,
        "models": models,
        "slices": slices,
        "depth_upscale": depth_upscale,
        "embed_source": donor,
        "head_source": donor,
        "search": search,
    }

    def check_one_form(self) -> None:
        given = [k for k in ("models", "slices", "depth_upscale") if k in self.data]
        if not given:
            self.report((), "a plan needs exactly one of 'models', 'slices' or 'depth_upscale'")
        elif len(given) > 1:
            self.report((given[1],), f"'{given[0]}' and '{given[1]}' cannot both be given: use exactly one")

    # the parts of a step --------------------------------------------------------------------------

    def input_entry(self, path: Path, entry: Any, kind: InputKind) -> InputModel | SliceSource | None:
        """One model to read: a ``models:`` entry, or (with a layer range) a slice's source."""
        if kind.shorthand and isinstance(entry, str):
            entry = {"model": entry}
        if not isinstance(entry, dict):
            self.report(path, f"expected a mapping with {kind.expected}, got {entry!r}")
            return None
        self.check_keys(path, entry, kind.keys)
        if "model" not in entry:
            self.report(path, "missing key 'model'")
            return None
        ref = self.model_ref(path + ("model",), entry["model"])
        layers = None
        if kind.has_layers:
            layers = self.layer_range(path + ("layer_range",), entry.get("layer_range"))
            if layers is None:
                return None
        params = self.settings(path + ("parameters",), entry.get("parameters"), "model")
        if ref is None:
            return None
        if layers is None:
            return InputModel(ref, params, self.prefix + path)
        return SliceSource(ref, layers, params, self.prefix + path)

    def layer_range(self, path: Path, lr: Any) -> tuple[int, int] | None:
        if (not isinstance(lr, list) or len(lr) != 2
                or not all(isinstance(x, int) and not isinstance(x, bool) for x in lr)
                or lr[0] < 0 or lr[1] <= lr[0]):
            self.report(path, f"layer_range is [start, end) with 0 <= start < end, got {lr!r}")
            return None
        return lr[0], lr[1]

    def output_slice(self, path: Path, sl: Any) -> OutputSlice | None:
        if not isinstance(sl, dict):
            self.report(path, f"expected a mapping with 'sources', got {sl!r}")
            return None
        self.check_keys(path, sl, SLICE)
        raw = sl.get("sources")
        if not isinstance(raw, list) or not raw:
            self.report(path + ("sources",), "expected a non-empty list of sources (each with model and layer_range)")
            return None
        found = [self.input_entry(path + ("sources", j), src, SLICE_SOURCE) for j, src in enumerate(raw)]
        sources = tuple(s for s in found if s is not None)
        if len({s.layer_range[1] - s.layer_range[0] for s in sources}) > 1:
            self.report(path + ("sources",), "all sources of a slice must have the same number of layers, got "
                        + ", ".join(f"{s.layer_range}" for s in sources))
        base = None
        if sl.get("base_model") is not None:
            base = self.model_ref(path + ("base_model",), sl["base_model"])
        params = self.settings(path + ("parameters",), sl.get("parameters"), "global")
        return OutputSlice(sources, params, base, self.prefix + path)

    def upscale(self, path: Path, raw: Any) -> DepthUpscale | None:
        if not isinstance(raw, dict):
            self.report(path, "expected {model: PATH, copies: 2, drop: N}")
            return None
        n_before = len(self.issues)
        self.check_keys(path, raw, UPSCALE)
        ref = None
        if "model" not in raw:
            self.report(path, "missing key 'model'")
        else:
            ref = self.model_ref(path + ("model",), raw["model"])
        counts = {}
        for key, lo, hi, default in (("copies", 2, MAX_COPIES, 2), ("drop", 0, None, 0)):
            v = raw.get(key, default)
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                self.report(path + (key,), f"{key} must be an integer >= {lo}, got {v!r}")
            elif hi is not None and v > hi:
                self.report(path + (key,), f"{key} must be at most {hi} (each copy repeats every layer), got {v}")
            counts[key] = v
        if len(self.issues) > n_before or ref is None:
            return None
        return DepthUpscale(ref, counts["copies"], counts["drop"], self.prefix + path)

    def settings(self, path: Path, raw: Any, scope: str) -> Mapping[str, Any]:
        """A ``parameters:`` mapping. scope: 'global' (step or slice: any parameter) or 'model' (per-model only)."""
        if raw is None:
            return {}
        if not isinstance(raw, dict):
            self.report(path, f"parameters is a mapping of parameter names to values, got {raw!r}")
            return {}
        method = self.method
        if method is None:
            return raw
        for pname, setting in raw.items():
            param = method.param(pname)
            if param is None:
                known = ", ".join(p.name for p in method.params) or "none"
                self.report(path + (pname,), f"merge method '{method.name}' has no parameter '{pname}'; "
                            f"its parameters: {known}")
            elif scope == "model" and param.scope == "global":
                self.report(path + (pname,), f"'{pname}' is a global parameter of '{method.name}' (one value per "
                            "tensor, not per model): set it in the top-level parameters")
            else:
                for sub, message in setting_problems(param, setting):
                    self.report(path + (pname,) + sub, message)
        return raw

    def model_ref(self, path: Path, value: Any) -> ModelRef | None:
        """A model reference in any form :mod:`mergekit_lite.plan.refs` reads (adapters included)."""
        return read_ref(self.report, path, value)
