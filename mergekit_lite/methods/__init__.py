"""Registry of merge methods.

A merge method is a small pure function over tensors, registered under the name a plan uses for
``merge_method``. It never reads files, never chooses a device and never rounds its result: the
executor hands it tensors already on the compute device (in their storage dtype; methods upcast to
float32 themselves, one input at a time when they can, to keep memory low) and rounds the float32
result once, when it is written.

Call convention::

    fn(tensors, base, **params) -> torch.Tensor

- ``tensors``: the non-base inputs, in plan order (for methods without a base, every input).
- ``base``: the base model's tensor, or None.
- global parameters arrive as scalars; per-model parameters as lists aligned with ``tensors``.
- random methods also receive ``draws``: one :class:`~.draws.Draws` per input, positioned at the
  piece's first entry (entry j's uniform depends on the seed and j alone, so a random method can
  be separable); their statistic factory finds the same draws, at the tensor's start, under
  ``params["draws"]``.
- methods that declare a ``statistic`` also receive ``stats``: None when called on whole tensors
  (the method gathers it itself), else what the statistic gives for this piece (:mod:`.stats`).
- methods registered with ``sectioned=True`` also receive ``section``: where the tensor sits in the
  model, as :mod:`mergekit_lite.arch` tells from its name: ``"layer"`` (the main layer stack),
  ``"stack"`` (another numbered stack), ``"pre"`` (embeddings) or ``"post"`` (final norm, heads).
  The methods that factor each layer's weight matrix (TSV, Iso-C) treat embeddings and heads apart.

Methods must not modify their inputs in place: a loaded tensor may be shared with another consumer.

A method declared ``separable`` computes each entry (or each row, ``separable="rows"``) of its
result from the same entry (row) of its inputs and the statistic alone, so the engine may call it
on any row range of a tensor and concatenate the results: it then streams large tensors in row
blocks and merges each block in cache-sized tiles, with the same bits as a call on the whole.

Method modules take torch from :mod:`mergekit_lite.lazy` (``from ..lazy import torch``), never
``import torch``, and use it only inside functions: importing the registry must not import torch,
so that ``mergekit-lite methods`` and ``--help`` answer at once (``tests/test_cli_hygiene.py``).
"""

from __future__ import annotations

import inspect
import keyword
from dataclasses import dataclass, field
from typing import Any, Callable, Literal

from ..errors import did_you_mean

REQUIRED: Any = type("Required", (), {"__repr__": lambda self: "REQUIRED"})()


@dataclass(frozen=True)
class Param:
    """A parameter a method takes.

    ``scope`` is ``"global"`` (one value per output tensor, set under the plan's or a slice's
    ``parameters``) or ``"model"`` (one value per input model, set under that model's ``parameters``
    or, as a default for every model, under the plan's ``parameters``).
    ``check`` returns an explanation when a value is not allowed (None when it is).
    """

    name: str
    kind: type  # float, int, bool or str
    scope: Literal["global", "model"]
    default: Any = REQUIRED
    doc: str = ""
    check: Callable[[Any], str | None] | None = None
    choices: tuple[str, ...] | None = None

    @property
    def required(self) -> bool:
        return self.default is REQUIRED

    @property
    def pyname(self) -> str:
        """Keyword the function receives (``lambda`` is a Python keyword: it arrives as ``lambda_``)."""
        return self.name + "_" if keyword.iskeyword(self.name) else self.name

    def allowed(self) -> str:
        """Human description of allowed values, for error messages."""
        if self.choices:
            return "one of " + ", ".join(repr(c) for c in self.choices)
        kind = {float: "a number", int: "an integer", bool: "true or false", str: "a string"}[self.kind]
        return kind + (f" ({self.doc})" if self.doc else "")

    def validate(self, value: Any) -> tuple[Any, str | None]:
        """Coerce a plan value to this parameter's type; returns (value, problem)."""
        if self.kind is bool:
            if not isinstance(value, bool):
                return value, f"expected true or false, got {value!r}"
        elif self.kind is float:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                return value, f"expected a number, got {value!r}"
            value = float(value)
            if value != value or value in (float("inf"), float("-inf")):
                return value, f"expected a finite number, got {value!r}"
        elif self.kind is int:
            if isinstance(value, bool) or not isinstance(value, int):
                if isinstance(value, float) and value.is_integer():
                    value = int(value)
                else:
                    return value, f"expected an integer, got {value!r}"
        elif self.kind is str:
            if not isinstance(value, str):
                return value, f"expected a string, got {value!r}"
            if self.choices and value not in self.choices:
                return value, f"expected {self.allowed()}, got {value!r}"
        if self.check is not None:
            problem = self.check(value)
            if problem:
                return value, problem
        return value, None


@dataclass(frozen=True)
class Method:
    """A registered merge method: its function and what it needs from a plan."""

    name: str
    fn: Callable[..., Any]
    params: tuple[Param, ...]
    base: Literal["required", "optional", "none"]
    min_models: int = 1  # non-base inputs (every input when base == "none")
    max_models: int | None = None
    random: bool = False
    sectioned: bool = False  # receives ``section`` (where the tensor sits in the model)
    paper: str = ""
    # Peak float32 temporaries beyond the inputs, in units of one output-sized float32 tensor,
    # as a function of the number of inputs (base included). Used by the memory budget.
    workspace: Callable[[int], float] = field(default=lambda n: 2.0)
    # Scratch bytes that do not scale with the tensor (bounded buffers), as a function of the
    # output's number of entries; counted on top of `workspace`.
    scratch: Callable[[int], int] = field(default=lambda numel: 0)
    # Cross-parameter checks: each takes {name: value} (per-model values as lists) and returns
    # the problem, or None.
    checks: tuple[Callable[[dict], str | None], ...] = ()
    # Shape of the result from the inputs' shapes (non-base inputs, base) and the parameters.
    shape: Callable[[list, Any, dict], tuple[int, ...]] = field(default=lambda shapes, base, params: same_shape(
        shapes, base, params))
    # Whether the method may run on row ranges of a tensor (see the module docstring): False, True
    # (entry by entry) or "rows"; or a function of the parameters giving one of those.
    separable: Any = False
    # The per-tensor statistic it needs, a function (params, shape) -> Statistic, or None.
    statistic: Callable[[dict, tuple[int, ...]], Any] | None = None

    def check(self, values: dict) -> str | None:
        """The first problem the cross-parameter checks find with these values, or None."""
        return next((problem for check in self.checks if (problem := check(values))), None)

    def output_shape(self, shapes: list[tuple[int, ...]], base: tuple[int, ...] | None, params: dict
                     ) -> tuple[int, ...]:
        return tuple(self.shape(shapes, base, params))

    def streams(self, params: dict) -> bool:
        """Whether a call with these parameters may run on row ranges (row blocks, tiles)."""
        kind = self.separable(params) if callable(self.separable) else self.separable
        return bool(kind)

    def workspace_bytes(self, n_inputs: int, numel: int) -> int:
        """Peak bytes of temporaries of one call (its float32 result included)."""
        return int(self.workspace(n_inputs) * numel * 4) + self.scratch(numel)

    @property
    def doc(self) -> str:
        return inspect.getdoc(self.fn) or ""

    def param(self, name: str) -> Param | None:
        return next((p for p in self.params if p.name == name), None)

    @property
    def global_params(self) -> tuple[Param, ...]:
        return tuple(p for p in self.params if p.scope == "global")

    @property
    def model_params(self) -> tuple[Param, ...]:
        return tuple(p for p in self.params if p.scope == "model")


def same_shape(shapes: list[tuple[int, ...]], base: tuple[int, ...] | None, params: dict) -> tuple[int, ...]:
    """The default output shape rule: the inputs' shape (the plan checks that they agree)."""
    return tuple(base if base is not None else shapes[0])


REGISTRY: dict[str, Method] = {}


def register(name: str, *, params: tuple[Param, ...] = (), base: str = "none", min_models: int = 1,
             max_models: int | None = None, random: bool = False, sectioned: bool = False, paper: str = "",
             checks: Callable[[dict], str | None] | tuple[Callable[[dict], str | None], ...] = (),
             shape: Callable[[list, Any, dict], tuple[int, ...]] | None = None,
             workspace: Callable[[int], float] | None = None, scratch: Callable[[int], int] | None = None,
             separable: Any = False, statistic: Callable[[dict, tuple[int, ...]], Any] | None = None):
    """Decorator: register `fn` as merge method `name`, with its whole contract in one place.

    - `params`: what a plan may set (name, type, scope, default, per-value check);
    - `checks`: cross-parameter checks over the resolved values of one tensor (reported as plan
      errors with file and line, before any tensor is read);
    - `shape`: the output shape from the inputs' shapes and the parameters (default: the inputs');
    - `workspace` / `scratch`: the memory declaration the ledger plans with (float32 temporaries in
      output-sized units, as a function of the number of inputs; bounded scratch bytes);
    - `separable` / `statistic`: whether the engine may run it on row ranges, and the per-tensor
      statistic it then needs gathered first (:mod:`.stats`; the function receives ``stats``).

    Checked at import: the function's keyword-only parameters are exactly the declared params
    (plus ``draws`` for random methods, ``section`` for sectioned ones). Decision: a
    keyword-only parameter may have a default in the signature (so the function reads well when
    called directly), but then it must equal the Param's default; a required Param must have none.
    The executor always passes every declared parameter, so the signature's defaults never decide a
    value in a merge: the Param's do.
    """

    def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
        if name in REGISTRY:
            raise ValueError(f"merge method {name!r} registered twice")
        _check_signature(name, fn, params, random, statistic is not None, sectioned)
        REGISTRY[name] = Method(name=name, fn=fn, params=tuple(params), base=base, min_models=min_models,
                                max_models=max_models, random=random, sectioned=sectioned, paper=paper,
                                checks=checks if isinstance(checks, tuple) else (checks,),
                                shape=shape or same_shape, workspace=workspace or (lambda n: 2.0),
                                scratch=scratch or (lambda numel: 0), separable=separable, statistic=statistic)
        return fn

    return wrap


def _check_signature(name: str, fn: Callable[..., Any], params: tuple[Param, ...], random: bool,
                     stats: bool, sectioned: bool = False) -> None:
    sig = inspect.signature(fn)
    declared = ({p.pyname for p in params} | ({"draws"} if random else set())
                | ({"stats"} if stats else set()) | ({"section"} if sectioned else set()))
    taken = {n for n, p in sig.parameters.items() if p.kind == p.KEYWORD_ONLY}
    if declared != taken:
        raise TypeError(f"merge method {name!r}: keyword parameters {sorted(taken)} "
                        f"do not match the declared {sorted(declared)}")
    for p in params:
        default = sig.parameters[p.pyname].default
        if default is inspect.Parameter.empty:
            continue
        if p.required:
            raise TypeError(f"merge method {name!r}: parameter {p.name!r} is required, but the function gives it "
                            f"the default {default!r}")
        if default != p.default or type(default) is not type(p.default):
            raise TypeError(f"merge method {name!r}: parameter {p.name!r} defaults to {p.default!r} in its Param "
                            f"but to {default!r} in the function's signature")


def get(name: str) -> Method:
    """The method registered as `name`; KeyError listing the known names otherwise (with the
    name meant, when `name` differs from one only in case or by a typo). Names are exact, as in
    mergekit: ``TIES`` is not ``ties``."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown merge method {name!r}{did_you_mean(name, REGISTRY)}; "
                       f"known methods: {', '.join(sorted(REGISTRY))}") from None


def names() -> list[str]:
    return sorted(REGISTRY)


# Shared checks for common parameters ------------------------------------------------------------

def in_unit_interval(value: float) -> str | None:
    return None if 0.0 <= value <= 1.0 else f"must be between 0 and 1, got {value}"


def density_check(value: float) -> str | None:
    return None if 0.0 < value <= 1.0 else f"density is the fraction of entries kept: it must be in (0, 1], got {value}"


def positive(value: float) -> str | None:
    return None if value > 0 else f"must be positive, got {value}"


def non_negative(value: float) -> str | None:
    return None if value >= 0 else f"must be zero or positive, got {value}"


# Importing the method modules registers them.
from . import linear as _linear  # noqa: E402,F401
from . import passthrough as _passthrough  # noqa: E402,F401
from . import task_arithmetic as _task_arithmetic  # noqa: E402,F401
from . import ties as _ties  # noqa: E402,F401
from . import dare as _dare  # noqa: E402,F401
from . import breadcrumbs as _breadcrumbs  # noqa: E402,F401
from . import della as _della  # noqa: E402,F401
from . import slerp as _slerp  # noqa: E402,F401
from . import nuslerp as _nuslerp  # noqa: E402,F401
from . import multislerp as _multislerp  # noqa: E402,F401
from . import karcher as _karcher  # noqa: E402,F401
from . import model_stock as _model_stock  # noqa: E402,F401
from . import sce as _sce  # noqa: E402,F401
from . import nearswap as _nearswap  # noqa: E402,F401
from . import arcee_fusion as _arcee_fusion  # noqa: E402,F401
from . import ram as _ram  # noqa: E402,F401
from . import concat as _concat  # noqa: E402,F401
from . import tsv as _tsv  # noqa: E402,F401
from . import iso as _iso  # noqa: E402,F401
