"""Checks of a step against the merge method that will run it: parameter settings and model counts.

The parser (:mod:`mergekit_lite.plan.parser`) checks the shape of the YAML; what a value may be
depends on the method (``weight`` is a number for ``linear``, ``t`` is in [0, 1] for ``slerp``), and
how many models a step needs depends on it too. These checks live here so that the rules about
methods stay apart from the rules about keys. They report problems, never raise: the parser collects
every problem of a plan before raising one :class:`~mergekit_lite.errors.PlanError`.
"""

from __future__ import annotations

from typing import Any

from .. import methods
from ..errors import Issue
from .params import is_number, is_scalar
from .recipe import MergePlan, ModelRef
from .source import Path


def value_is_conditional_list(setting: Any) -> bool:
    return isinstance(setting, list) and bool(setting) and all(isinstance(v, dict) for v in setting)


def setting_problems(param: methods.Param, setting: Any) -> list[tuple[Path, str]]:
    """Structure and type of one parameter setting: each problem as (key path inside the setting, message).

    A setting is a scalar, a gradient, one ``{filter, value}`` or a list of them (see
    :mod:`mergekit_lite.plan.params`); every leaf value is validated by the parameter itself.
    """
    problems: list[tuple[Path, str]] = []

    def leaf(value: Any, sub: Path) -> None:
        _, problem = param.validate(value)
        if problem:
            problems.append((sub, f"{problem}; '{param.name}' takes {param.allowed()}"))

    def scalar_or_gradient(value: Any, sub: Path) -> None:
        if is_scalar(value):
            leaf(value, sub)
        elif isinstance(value, list) and value and all(is_scalar(v) for v in value):
            if param.kind is float and not all(is_number(v) for v in value):
                problems.append((sub, f"a gradient is a list of numbers, got {value!r}"))
                return
            for k, v in enumerate(value):
                leaf(v, sub + (k,))
        else:
            problems.append((sub, f"expected a value or a gradient (a list of numbers), got {value!r}; "
                             f"'{param.name}' takes {param.allowed()}"))

    def conditional(value: dict, sub: Path) -> None:
        for key in value:
            if key not in ("filter", "value"):
                problems.append((sub + (key,), f"unknown key '{key}' in a filtered value; allowed: filter, value"))
        if "value" not in value:
            problems.append((sub, "a filtered value needs 'value'"))
        else:
            scalar_or_gradient(value["value"], sub + ("value",))
        f = value.get("filter")
        if f is not None and not isinstance(f, str):
            problems.append((sub + ("filter",), f"a filter is a substring of tensor names, got {f!r}"))

    if value_is_conditional_list(setting):
        for k, cond in enumerate(setting):
            conditional(cond, (k,))
    elif isinstance(setting, dict):
        conditional(setting, ())
    elif isinstance(setting, list) and any(isinstance(v, dict) for v in setting):
        problems.append(((), "a filter list must contain only {filter, value} entries"))
    else:
        scalar_or_gradient(setting, ())
    return problems


def check_inputs(plan: MergePlan, method: methods.Method, issues: list[Issue], warnings: list[str]) -> None:
    """Number of models and use of base_model, against what the method needs."""
    groups: list[tuple[Path, list[ModelRef], ModelRef | None]] = []
    if plan.models is not None:
        # in an adapter output, base_model is the adapters' base, not an input of a base-less method
        adapters_base = plan.output == "adapter" and method.base == "none"
        groups.append((("models",), [m.model for m in plan.models], None if adapters_base else plan.base_model))
    if plan.slices is not None:
        for sl in plan.slices:
            groups.append((sl.path[len(plan.prefix):] + ("sources",), [s.model for s in sl.sources],
                           sl.base_model or plan.base_model))
    for path, refs, base in groups:
        _check_group(plan, method, path, refs, base, issues, warnings)
    # per-model parameters given to the base model are not used by methods with a base
    if method.base != "none" and plan.models is not None:
        for m in plan.models:
            if m.model == plan.base_model and m.parameters:
                warnings.append(f"{plan.issue(m.path, '')}".rstrip(": ") +
                                f": parameters of the base model ({', '.join(m.parameters)}) are not used by "
                                f"'{method.name}'")


def _check_group(plan: MergePlan, method: methods.Method, path: Path, refs: list[ModelRef],
                 base: ModelRef | None, issues: list[Issue], warnings: list[str]) -> None:
    """One group of models merged together (``models:``, or one slice's sources) with its base model."""
    if len(set(refs)) != len(refs):
        issues.append(plan.issue(path, "a model is listed twice; list each model once"))
        return
    if method.base == "required" and base is None:
        issues.append(plan.issue(("merge_method",), f"'{method.name}' needs base_model (the model its task "
                                 "vectors are taken against)"))
        return
    appended = ""
    if method.base == "none":
        n = len(refs)
        if base is not None and base not in refs and plan.models is not None:
            if any(p.required for p in method.model_params):
                issues.append(plan.issue(("base_model",), f"'{method.name}' does not use a base model; list "
                                         f"{base} under models with a weight, or remove base_model"))
                return
            # mergekit appends an unlisted base model as one more input; a method whose per-model
            # parameters all have defaults (karcher) merges it like the listed models
            n += 1
            appended = " (base_model counts as one)"
            warnings.append(f"{plan.issue(('base_model',), '')}".rstrip(": ") + f": '{method.name}' does not "
                            f"treat a base model specially; {base} is merged as one more model, as in mergekit")
    else:
        n = len([r for r in refs if r != base])
    if n < method.min_models or (method.max_models is not None and n > method.max_models):
        other = " besides the base model" if method.base != "none" else ""
        issues.append(plan.issue(path, f"'{method.name}' merges {_wanted(method)} model(s){other}, got {n}{appended}"))


def _wanted(method: methods.Method) -> str:
    """How many models the method merges, in words: 'exactly 2', 'at least 1', '2 to 3'."""
    if method.max_models == method.min_models:
        return f"exactly {method.min_models}"
    if method.max_models is None:
        return f"at least {method.min_models}"
    return f"{method.min_models} to {method.max_models}"
