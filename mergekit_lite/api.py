"""Python API: lazy, composable merges, compiled to the same plans, graph and executor as the CLI.

::

    from mergekit_lite import Model

    base = Model("path/or/org/name")
    math = Model("math-ft") - base              # a task vector
    code = Model("code-ft") - base
    merged = base + 0.7 * math + 0.5 * code     # task arithmetic
    merged = base.ties([math, code], density=0.5)
    merged.save("out/", dtype="bfloat16")

An expression is only a description: nothing is read until :meth:`Expr.save`, :meth:`Expr.tensor`
or :meth:`Expr.iter_tensors`. Every expression lowers to a mergekit-style YAML plan
(:meth:`Expr.to_plan`); the plan is what runs, so an expression and its YAML give the same bits.
Expressions are checked when built: other architectures or shapes, task vectors against other bases
or bad parameters raise at once.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Sequence

import torch

from . import methods
from .errors import MergeError
from .executor import Executor
from .io.inputs import ModelFiles, open_located
from .io.resolve import looks_like_repo_id
from .lowering import Lowering, dump_plan
from .merge import Options, Upload, compile_plan, execute
from .plan.schema import Recipe, parse_plan

if TYPE_CHECKING:
    from .stacking import LayerRange

Number = (int, float)


class Expr:
    """A model-valued expression (a model on disk, or a merge of other expressions)."""

    _name: str | None = None
    _leaf = False  # a model on disk (lowers to its path)

    def __sub__(self, other: Any) -> "TaskVector | Expr":
        if isinstance(other, TaskVector):
            return self + (-other)
        if isinstance(other, Expr):
            _whole(self, other)
            return TaskVector(((self, 1.0),), other)
        return _no_number("subtract", other)

    def __add__(self, other: Any) -> "Expr":
        if isinstance(other, TaskVector):
            return _apply(self, other)
        if isinstance(other, Expr):
            if not _partial(self) and not _partial(other):
                raise TypeError(_ADDED.format(a=self, b=other))
            return _Combo.of(self) + _Combo.of(other)
        return _no_number("add", other)

    __radd__ = __add__

    def __rsub__(self, other: Any):
        return _no_number("subtract", other)

    def __mul__(self, c: Any) -> "Expr":
        if isinstance(c, Number) and not isinstance(c, bool):
            return _Combo(((self, float(c)),))
        return NotImplemented

    __rmul__ = __mul__

    def __truediv__(self, c: Any) -> "Expr":
        if isinstance(c, Number) and not isinstance(c, bool):
            return self * (1.0 / c)
        return NotImplemented

    def __neg__(self) -> "Expr":
        raise TypeError(f"cannot negate the model {self!r}: -θ is not a model. To remove what a fine-tune "
                        "learned, subtract its task vector: base - 0.5 * (finetuned - base)")

    def merge(self, method: str, others: "Expr | TaskVector | Sequence[Expr | TaskVector]" = (),
              **params: Any) -> "Expr":
        """Merge with a registered method. For methods with a base model (ties, slerp, dare_ties,
        task_arithmetic ...) `self` is the base and `others` the models or task vectors (a task
        vector's coefficient becomes that model's ``weight``); for the others (linear, karcher ...)
        `self` is the first model. Per-model parameters take one value per model, in that order, or
        one value for all; global parameters take a value, a gradient or a filter list."""
        try:
            m = methods.get(method)
        except KeyError as exc:
            raise ValueError(exc.args[0]) from None
        others = [others] if isinstance(others, (Expr, TaskVector)) else list(others)
        inputs: list[tuple[Expr, dict[str, Any]]] = []
        for o in others:
            if isinstance(o, TaskVector):
                if m.base == "none":
                    raise TypeError(f"'{method}' merges models, not task vectors; pass the models themselves")
                if not _same(o.base, self):
                    raise TypeError(f"a task vector passed to {self!r}.{method}() must be taken against {self!r}, "
                                    f"not {o.base!r}")
                for x, c in o.terms:
                    if m.param("weight") is None:
                        if c != 1.0:
                            raise TypeError(f"'{method}' takes no per-model weight, so the task vector {o!r} "
                                            "cannot be scaled here")
                        inputs.append((x, {}))
                    else:
                        inputs.append((x, {"weight": c}))
            elif isinstance(o, Expr):
                inputs.append((o, {}))
            else:
                raise TypeError(f"cannot merge {type(o).__name__} {o!r}: expected models or task vectors")
        base = self if m.base != "none" else None
        if base is None:
            inputs.insert(0, (self, {}))
        glob: dict[str, Any] = {}
        for name, value in params.items():
            p = m.param(name)
            if p is None:
                known = ", ".join(q.name for q in m.params) or "none"
                raise TypeError(f"'{method}' has no parameter {name!r}; its parameters: {known}")
            if p.scope == "model" and isinstance(value, (list, tuple)) and len(value) == len(inputs) and (
                    len(inputs) > 1 or isinstance(value[0], (list, tuple, dict))):
                for (_, per), v in zip(inputs, value):
                    if name in per and per[name] != v:
                        raise TypeError(f"{name} given twice for a model (task vector coefficient {per[name]} "
                                        f"and {name}={v})")
                    per[name] = v
            else:
                glob[name] = value
        return _Merged(m.name, base, tuple(inputs), glob)._checked()

    def __getattr__(self, name: str):
        if name.startswith("_") or name not in methods.REGISTRY:
            raise AttributeError(f"{type(self).__name__!s} has no attribute {name!r}")

        def call(others=(), **params):
            return self.merge(name, others, **params)

        call.__doc__ = methods.REGISTRY[name].doc
        return call

    def layers(self, start: int, end: int) -> "LayerRange":
        """Layers [start, end) of this model, for :func:`stack`."""
        from .stacking import LayerRange

        return LayerRange(self, start, end)

    def upscale(self, copies: int = 2, drop: int = 0) -> "Expr":
        """SOLAR-style depthwise upscaling: `copies` stacked copies, dropping `drop` layers at each
        seam (the first copy keeps [0, n−drop), the last [drop, n))."""
        from .stacking import Upscale

        return Upscale(self, copies, drop)._checked()

    def named(self, name: str) -> "Expr":
        """Give this expression's step a name (shown in plans and by ``mergekit-lite plan``)."""
        self._name = name
        return self

    def to_plan(self) -> str:
        """The equivalent mergekit-style YAML plan (several ``---`` documents when it has steps)."""
        return dump_plan(self)

    def recipe(self) -> Recipe:
        return parse_plan(self.to_plan(), "<python expression>")

    def _files(self) -> dict[str, ModelFiles]:
        out: dict[str, ModelFiles] = {}
        for leaf in self._leaves():
            if leaf._model_files is not None:
                out[str(leaf)] = leaf._model_files
        return out

    def _leaves(self) -> Iterator["Model"]:
        raise NotImplementedError  # every kind of expression names its models

    def _compile(self, options: Options, **kwargs):
        return compile_plan(self.recipe(), options, plan_dir=os.getcwd(), files=self._files(), **kwargs)

    def _checked(self) -> "Expr":
        """Compile the expression now (headers only) so impossible merges fail when built."""
        leaves = list(self._leaves())
        if all(leaf._local() for leaf in leaves):
            for leaf in leaves:
                leaf._open()
            self._compile(Options())
        return self

    def save(self, out: str | os.PathLike, *, dtype: str | torch.dtype | None = None, device: str = "auto",
             max_shard_size: str | int = "5GB", max_memory: str | int | None = None, overwrite: bool = False,
             seed: int | None = None, quiet: bool = True, upload: "Upload | str | None" = None,
             force_overwrite: bool = False, resume: bool = False, clamp_overflow: bool = False,
             block_size: str | int | None = None, max_device_memory: str | int | None = None):
        """Run the merge into `out`, then upload it to the Hub repo `upload` if given (keywords: Options)."""
        options = Options(**{k: v for k, v in locals().items() if k not in ("self", "out")})
        return execute(self._compile(options), os.fspath(out), options)

    def iter_tensors(self, *, dtype: str | torch.dtype | None = None, device: str = "auto",
                     max_memory: str | int | None = None, seed: int | None = None, only: Iterable[str] | None = None,
                     clamp_overflow: bool = False, block_size: str | int | None = None,
                     max_device_memory: str | int | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        """Stream ``(name, tensor)`` pairs of the merged model (CPU tensors) without writing files."""
        options = Options(**{k: v for k, v in locals().items() if k not in ("self", "only")})
        compiled = self._compile(options, sink="emit", only=only)
        yield from Executor(compiled, device=options.device, budget=options.budget(compiled),
                            device_budget=options.device_budget()).run()

    def tensor(self, name: str, **options: Any) -> torch.Tensor:
        """One tensor of the merged model; only what it needs is read."""
        for _, value in self.iter_tensors(only=[name], **options):
            return value
        raise MergeError(f"no tensor {name!r}")  # pragma: no cover - compile_recipe checks names


class Model(Expr):
    """A model on disk or on the Hugging Face Hub: a folder, a ``.safetensors`` file, or
    ``org/name`` (optionally with ``revision``)."""

    _leaf = True

    def __init__(self, path: str | os.PathLike, revision: str | None = None):
        self.path, self.revision = os.fspath(path), revision
        self._model_files: ModelFiles | None = None

    def __repr__(self) -> str:
        return f"Model({str(self)!r})"

    def __str__(self) -> str:
        return self.path if self.revision is None else f"{self.path}@{self.revision}"

    def _leaves(self):
        yield self

    def _local(self) -> bool:
        return self.revision is None and (os.path.exists(os.path.expanduser(self.path)) or not looks_like_repo_id(self.path))

    def _open(self) -> ModelFiles:
        if self._model_files is None:
            self._model_files = open_located(self.path, self.revision, os.getcwd())
        return self._model_files

    def with_adapter(self, adapter: str | os.PathLike, revision: str | None = None) -> "Model":
        """This model with a PEFT adapter (LoRA, IA3) applied, ``BASE+ADAPTER`` (see :mod:`.api_adapters`)."""
        from .api_adapters import AdaptedModel
        return AdaptedModel(self, os.fspath(adapter), revision)._checked()


class TaskVector:
    """Σ cᵢ·(θᵢ − θ_base): what a fine-tune changed, scaled. Not a model: add it to one."""

    def __init__(self, terms: tuple[tuple[Expr, float], ...], base: Expr):
        self.terms = terms
        self.base = base

    def __repr__(self) -> str:
        inner = " + ".join(f"{c:g}*({x!r} - {self.base!r})" for x, c in self.terms)
        return f"TaskVector({inner})"

    def __mul__(self, c: Any) -> "TaskVector":
        if isinstance(c, Number) and not isinstance(c, bool):
            return TaskVector(tuple((x, w * c) for x, w in self.terms), self.base)
        return NotImplemented

    __rmul__ = __mul__

    def __truediv__(self, c: Any) -> "TaskVector":
        return self * (1.0 / c)

    def __neg__(self) -> "TaskVector":
        return self * -1.0

    def __add__(self, other: Any):
        if isinstance(other, (int, float)) and not isinstance(other, bool) and other == 0:
            return self  # 0 is the additive identity of task vectors: sum([a - base, b - base]) works
        if isinstance(other, TaskVector):
            if not _same(self.base, other.base):
                raise TypeError(f"cannot add task vectors taken against different bases ({self.base!r} and "
                                f"{other.base!r})")
            return TaskVector(_add_terms(self.terms, other.terms), self.base)
        if isinstance(other, Expr):
            return _apply(other, self)
        return _no_number("add", other)

    __radd__ = __add__

    def __sub__(self, other: Any):
        if isinstance(other, TaskVector):
            return self + (-other)
        raise TypeError("cannot subtract a model from a task vector; subtract task vectors, or add the task "
                        "vector to a model")

    def save(self, *args, **kwargs):
        raise TypeError("a task vector is not a model: add it to a base first, e.g. (base + 1.0 * tv).save(...)")

    to_plan = iter_tensors = tensor = save


def merge(method: str, models: Sequence[Expr | TaskVector], base: Expr | None = None, **params: Any) -> Expr:
    """Function form of :meth:`Expr.merge`: ``merge("ties", [a - base, b - base], base=base, density=0.5)``."""
    if base is not None:
        return base.merge(method, models, **params)
    first, *rest = models
    return first.merge(method, rest, **params)


# ------------------------------------------------------------------------------------------------
# expression nodes


class _Combo(Expr):
    """Σ cⱼ·θⱼ (lowered to ``linear``, normalize: false); a model only when Σ cⱼ = 1 (0.5·a + 0.5·b).
    Otherwise it is *partial* (0.5·a on its way to an average) and using it as a model is an error."""

    def __init__(self, terms: tuple[tuple[Expr, float], ...]):
        self.terms = terms

    @staticmethod
    def of(x: Expr) -> "_Combo":
        return x if isinstance(x, _Combo) and x._name is None else _Combo(((x, 1.0),))

    def __add__(self, other: Any):
        if isinstance(other, Expr) and (_partial(self) or _partial(other)):
            combo = _Combo(_add_terms(self.terms, _Combo.of(other).terms))
            return combo if _partial(combo) else combo._checked()
        return Expr.__add__(self, other)

    __radd__ = __add__

    def __mul__(self, c: Any):
        if isinstance(c, Number) and not isinstance(c, bool) and self._name is None:
            return _Combo(tuple((x, w * c) for x, w in self.terms))
        return Expr.__mul__(self, c)

    __rmul__ = __mul__

    def __repr__(self) -> str:
        return " + ".join(f"{c:g}*{x!r}" for x, c in self.terms)

    def _leaves(self):
        for x, _ in self.terms:
            yield from x._leaves()

    def _doc(self, low: "Lowering") -> dict | None:
        _whole(self)
        if len(self.terms) == 1 and self.terms[0][1] == 1.0:
            return None  # the identity
        return {"merge_method": "linear",
                "models": [{"model": low.ref(x), "parameters": {"weight": c}} for x, c in self.terms],
                "parameters": {"normalize": False}}


class _Merged(Expr):
    def __init__(self, method: str, base: Expr | None, inputs: tuple[tuple[Expr, dict]], params: dict):
        self.method, self.base, self.inputs, self.params = method, base, inputs, params

    def __repr__(self) -> str:
        return f"{self.method}({', '.join(repr(x) for x, _ in self.inputs)}{', base=' + repr(self.base) if self.base else ''})"

    def _leaves(self):
        if self.base is not None:
            yield from self.base._leaves()
        for x, _ in self.inputs:
            yield from x._leaves()

    def _doc(self, low: "Lowering") -> dict:
        doc: dict[str, Any] = {"merge_method": self.method}
        if self.base is not None:
            doc["base_model"] = low.ref(self.base)
        models = []
        for x, per in self.inputs:
            entry: dict[str, Any] = {"model": low.ref(x)}
            if per:
                entry["parameters"] = dict(per)
            models.append(entry)
        doc["models"] = models
        if self.params:
            doc["parameters"] = dict(self.params)
        return doc


def _apply(model: Expr, tv: TaskVector) -> Expr:
    """model + Σ cᵢ(θᵢ − θ_base): task arithmetic when `model` is the base, else a linear combination."""
    if _same(tv.base, model):
        return _Merged("task_arithmetic", model, tuple((x, {"weight": c}) for x, c in tv.terms), {})._checked()
    if (isinstance(model, _Merged) and model.method == "task_arithmetic" and model._name is None
            and not model.params and _same(model.base, tv.base)):
        # (base + Σ wᵢτᵢ) + cτ: one task arithmetic over all the task vectors
        terms = TaskVector(tuple((x, per["weight"]) for x, per in model.inputs), model.base) + tv
        return _Merged("task_arithmetic", model.base, tuple((x, {"weight": c}) for x, c in terms.terms),
                       {})._checked()
    total = sum(c for _, c in tv.terms)
    return _Combo.of(model) + _Combo(tuple(tv.terms) + ((tv.base, -total),))


def _add_terms(terms: tuple[tuple[Expr, float], ...], more: tuple[tuple[Expr, float], ...]
               ) -> tuple[tuple[Expr, float], ...]:
    """Σ cⱼ·xⱼ + Σ dₖ·yₖ, adding the coefficients of the same model."""
    out = list(terms)
    for x, c in more:
        for i, (y, w) in enumerate(out):
            if _same(x, y):
                out[i] = (y, w + c)
                break
        else:
            out.append((x, c))
    return tuple(out)


def _same(a: Any, b: Any) -> bool:
    return a is b or (isinstance(a, Model) and isinstance(b, Model) and str(a) == str(b))  # adapter included


_ADDED = ("cannot add the models {a!r} and {b!r}: a sum of models is not a model (its weights add up to 2). "
          "Subtract the base first to add what a fine-tune learned: base + (finetuned - base); average models "
          "with weights summing to 1: 0.5 * a + 0.5 * b; or ask for this linear merge by name: "
          "merge('linear', [a, b], weight=[1, 1], normalize=False)")
_PARTIAL = ("{x!r} is not a model: its weights sum to {total:g}, not 1. Average models with weights summing to 1 "
            "(0.5 * a + 0.5 * b), scale what a fine-tune learned instead (base + 2 * (finetuned - base)), or ask "
            "for this linear combination by name: merge('linear', [...], weight=[...], normalize=False)")


def _weight_sum(x: Expr) -> float:
    return sum(c for _, c in x.terms) if isinstance(x, _Combo) else 1.0


def _partial(x: Expr) -> bool:
    """A scaled model on its way to a weighted average (Σ weights ≠ 1), not yet a model."""
    return abs(_weight_sum(x) - 1.0) > 1e-9


def _whole(*xs: Expr) -> None:
    for x in filter(_partial, xs):
        raise TypeError(_PARTIAL.format(x=x, total=_weight_sum(x)))


def _no_number(op: str, other: Any):
    if op == "add" and isinstance(other, Number) and other == 0:
        raise TypeError("cannot add 0 and a model (sum() of models?): models do not add up. Add task vectors, "
                        "base + sum(m - base for m in models), or average: merge('linear', models, weight=[...])")
    raise TypeError(f"cannot {op} {type(other).__name__} {other!r} and a model: scale a task vector instead, "
                    "e.g. base + 0.5 * (finetuned - base)")
