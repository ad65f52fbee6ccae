"""Parameter values of a plan: scalars, layer gradients and name filters, with mergekit's semantics.

A setting is one of:

- a scalar: ``0.5``, ``true``, ``"sum"``;
- a gradient: a list of numbers ``[0, 0.5, 1]`` interpolated along ``t`` in [0, 1] (``t`` is the
  layer's position in its slice: layer ``i`` of ``n`` has ``t = i / (n - 1)``; embeddings and other
  non-layer tensors have ``t = 0``). A list of non-numbers is a step function;
- a filter list: ``[{filter: self_attn, value: 0.5}, {value: 1}]``: the first entry whose ``filter`` is
  absent, ``"*"`` or a substring of the tensor name gives the value (itself a scalar or gradient).
  When no entry matches the setting gives nothing and the next scope is asked.

Scopes, highest precedence first: the model's own parameters, the slice's, the plan's top-level
``parameters``, then the method's default.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping

Setting = Any


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def is_scalar(value: Any) -> bool:
    return isinstance(value, (int, float, bool, str))


def interpolate(values: list[Any], t: float) -> Any:
    """Value of a gradient at ``t`` in [0, 1]: piecewise-linear between evenly spaced points.

    With ``scaled = t·(n−1)`` and ``i = ⌊scaled⌋``: ``(1−f)·values[i] + f·values[i+1]``, ``f = scaled − i``.
    A list that is not all numbers is a step function: ``values[⌊t·(n−1)⌋]``.
    """
    n = len(values)
    if not all(is_number(v) for v in values):
        return values[int(t * (n - 1))]
    scaled = t * (n - 1)
    i0 = int(scaled)
    i1 = min(n - 1, i0 + 1)
    frac = scaled - i0
    return (1 - frac) * values[i0] + frac * values[i1]


def _matches(filter_: Any, tensor_name: str) -> bool:
    return filter_ is None or filter_ == "*" or (bool(tensor_name) and str(filter_) in tensor_name)


def evaluate(setting: Setting, tensor_name: str, t: float) -> Any:
    """The value of one setting for a tensor at gradient position ``t``; None when no filter matches."""
    if isinstance(setting, Mapping):  # a single {filter, value}
        setting = [setting]
    if is_scalar(setting):
        return setting
    if isinstance(setting, list):
        if not setting:
            return None
        if all(is_scalar(v) for v in setting):
            return interpolate(setting, t)
        for cond in setting:
            if isinstance(cond, Mapping) and _matches(cond.get("filter"), tensor_name):
                return evaluate(cond.get("value"), tensor_name, t)
        return None
    raise TypeError(f"unexpected parameter setting {setting!r}")  # the schema rejects these earlier


def resolve(name: str, scopes: Iterable[Mapping[str, Setting] | None], tensor_name: str, t: float) -> Any:
    """First value of parameter `name` found in `scopes` (highest precedence first), or None."""
    for scope in scopes:
        if scope and name in scope:
            value = evaluate(scope[name], tensor_name, t)
            if value is not None:
                return value
    return None
