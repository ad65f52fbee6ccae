"""Search spaces: the parameters ``mergekit-lite search`` varies (an addition to mergekit's YAML).

A step may hold a ``search:`` mapping from a parameter to the values to try::

    search:
      lambda: [0.5, 1.0, 1.5]                  # a list: these values
      density: {min: 0.2, max: 0.8, step: 0.2}  # a stepped range: 0.2, 0.4, 0.6, 0.8
      models[1].weight: {min: 0.0, max: 1.0}    # a continuous range (the random strategy only)

A key is a parameter of the step's method, set where the plan sets parameters: a bare name is the
step's top-level ``parameters`` (for a per-model parameter, every model's value), and
``models[i].NAME``, ``slices[i].NAME`` or ``slices[i].sources[j].NAME`` that entry's
``parameters`` (``.parameters.`` may be written out). The command line gives the same as
``--param KEY=a,b,c`` (a list) or ``--param KEY=MIN:MAX[:STEP]`` (a range).

Every key and value is checked like the rest of the plan, each problem reported with its file,
line and key path: the parameter must exist and be settable there, each value must be one the
parameter allows, and a top-level per-model parameter must not be overridden by a model's own
value (the search would change nothing). ``run`` ignores the section.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from .. import methods
from .params import is_number

RANGE_KEYS = ("min", "max", "step")
_KEY = re.compile(r"^(?:(?P<entry>(?:models|slices)\[\d+\](?:\.sources\[\d+\])?)\.)?(?:parameters\.)?"
                  r"(?P<name>[A-Za-z_]\w*)$")
_INDEX = re.compile(r"(\w+)\[(\d+)\]")

Report = Callable[[tuple, str], None]  # (key path inside the section, message)


@dataclass(frozen=True)
class Dimension:
    """One searched parameter: where it is set in the plan, and its values."""

    key: str  # as shown: "lambda", "models[1].weight" (prefixed "step/" in a multi-step plan)
    doc: int  # index of the YAML document holding the step
    target: tuple  # key path of the value inside that document
    param: methods.Param
    values: tuple = ()  # the values to try (a list or a stepped range)
    low: float | None = None  # a continuous range, when values is empty
    high: float | None = None

    @property
    def finite(self) -> bool:
        return bool(self.values)

    def sample(self, rng: random.Random) -> Any:
        if self.values:
            return rng.choice(self.values)
        value = rng.uniform(self.low, self.high)
        return round(value) if self.param.kind is int else round(value, 6)


def entry_path(entry: str | None) -> tuple:
    """'models[1]' -> ('models', 1); 'slices[0].sources[2]' -> ('slices', 0, 'sources', 2)."""
    out: tuple = ()
    for name, index in _INDEX.findall(entry or ""):
        out += (name, int(index))
    return out


def _entry(data: Mapping[str, Any], path: tuple) -> Any:
    cur: Any = data
    for part in path:
        if isinstance(part, int):
            if not isinstance(cur, list) or part >= len(cur):
                return None
        elif not isinstance(cur, dict) or part not in cur:
            return None
        cur = cur[part]
    return cur


def _own_settings(data: Mapping[str, Any], name: str) -> list[str]:
    """The model entries that set `name` in their own parameters (they win over the top level)."""
    found = [f"models[{i}]" for i, m in enumerate(data.get("models") or [])
             if isinstance(m, dict) and name in (m.get("parameters") or {})]
    for i, sl in enumerate(data.get("slices") or []):
        for j, src in enumerate((sl or {}).get("sources") or [] if isinstance(sl, dict) else []):
            if isinstance(src, dict) and name in (src.get("parameters") or {}):
                found.append(f"slices[{i}].sources[{j}]")
    return found


def read_section(section: Any, method: methods.Method, data: Mapping[str, Any], doc: int, prefix: tuple,
                 report: Report, label: str = "") -> tuple[Dimension, ...]:
    """The dimensions of a ``search:`` mapping of the step `data` (its raw YAML mapping), whose
    values are at `prefix` in YAML document `doc`; problems go to `report`."""
    if not isinstance(section, dict) or not section:
        report((), "search is a mapping of parameters to the values to try, e.g. {lambda: [0.5, 1.0]}")
        return ()
    dims = []
    for key, domain in section.items():
        dim = _dimension(str(key), domain, method, data, doc, prefix, lambda p, m, k=key: report((k,) + p, m))
        if dim is not None:
            dims.append(Dimension(f"{label}{dim.key}", dim.doc, dim.target, dim.param, dim.values, dim.low,
                                  dim.high))
    return tuple(dims)


def _dimension(key: str, domain: Any, method: methods.Method, data: Mapping[str, Any], doc: int, prefix: tuple,
               report: Callable[[tuple, str], None]) -> Dimension | None:
    match = _KEY.match(key)
    if not match:
        report((), "a search key is a parameter name (lambda), or models[i].NAME, slices[i].NAME or "
                   "slices[i].sources[j].NAME")
        return None
    name, entry = match.group("name"), entry_path(match.group("entry"))
    param = method.param(name)
    if param is None:
        known = ", ".join(p.name for p in method.params) or "none"
        report((), f"merge method '{method.name}' has no parameter '{name}'; its parameters: {known}")
        return None
    if entry and not isinstance(_entry(data, entry), dict):
        report((), f"the plan has no {match.group('entry')} to set '{name}' on")
        return None
    if entry and (entry[0] == "models" or "sources" in entry) and param.scope == "global":
        report((), f"'{name}' is a global parameter of '{method.name}': search it as '{name}'")
        return None
    if not entry and param.scope == "model" and _own_settings(data, name):
        own = _own_settings(data, name)
        report((), f"{', '.join(own)} {'sets its' if len(own) == 1 else 'set their'} own '{name}', which wins over "
                   f"the top-level value: search {own[0]}.{name} instead, or remove it")
        return None
    shown = f"{match.group('entry')}.{name}" if entry else name
    target = prefix + entry + ("parameters", name)
    return _domain(shown, domain, param, doc, target, report)


def _domain(key: str, domain: Any, param: methods.Param, doc: int, target: tuple,
            report: Callable[[tuple, str], None]) -> Dimension | None:
    if isinstance(domain, list):
        if not domain:
            report((), "expected at least one value to try")
            return None
        values = []
        for i, v in enumerate(domain):
            value, problem = param.validate(v)
            if problem:
                report((i,), f"{problem}; allowed: {param.allowed()}")
            values.append(value)
        return Dimension(key, doc, target, param, tuple(values)) if len(values) == len(domain) else None
    if isinstance(domain, dict):
        return _range(key, domain, param, doc, target, report)
    report((), f"expected a list of values or {{min, max[, step]}}, got {domain!r}")
    return None


def _range(key: str, domain: dict, param: methods.Param, doc: int, target: tuple,
           report: Callable[[tuple, str], None]) -> Dimension | None:
    unknown = [k for k in domain if k not in RANGE_KEYS]
    if unknown or "min" not in domain or "max" not in domain:
        report((), f"a range is {{min, max}} or {{min, max, step}}, got keys {sorted(map(str, domain))}")
        return None
    if param.kind not in (int, float):
        report((), f"'{param.name}' is not a number: give a list of values")
        return None
    low, high, step = domain["min"], domain["max"], domain.get("step")
    if not all(is_number(v) for v in (low, high)) or (step is not None and (not is_number(step) or step <= 0)):
        report((), "min and max are numbers and step a positive number")
        return None
    if low > high:
        report((), f"min ({low}) is above max ({high})")
        return None
    for bound in (low, high):
        problem = param.validate(bound)[1]
        if problem:
            report(("min" if bound == low else "max",), f"{problem}; allowed: {param.allowed()}")
            return None
    if step is None and low < high:
        return Dimension(key, doc, target, param, (), float(low), float(high))
    step = step or 1
    count = int((high - low) / step + 1e-9) + 1
    values = [low + i * step for i in range(count)]
    values = [int(round(v)) if param.kind is int else round(v, 10) for v in values]
    return Dimension(key, doc, target, param, tuple(values))


def parse_cli(spec: str) -> tuple[str, Any]:
    """``KEY=a,b,c`` -> (KEY, [a, b, c]); ``KEY=MIN:MAX[:STEP]`` -> (KEY, {min, max[, step]}).
    Values are read as YAML scalars (numbers, true/false, strings)."""
    import yaml

    key, sep, text = spec.partition("=")
    if not sep or not key.strip() or not text.strip():
        raise ValueError(f"expected KEY=VALUES, got {spec!r}")
    scalar = lambda s: yaml.safe_load(s.strip()) if s.strip() else None  # noqa: E731
    if ":" in text and "," not in text:
        parts = [scalar(p) for p in text.split(":")]
        if len(parts) not in (2, 3):
            raise ValueError(f"a range is MIN:MAX or MIN:MAX:STEP, got {text!r}")
        return key.strip(), dict(zip(RANGE_KEYS, parts))
    return key.strip(), [scalar(p) for p in text.split(",")]
