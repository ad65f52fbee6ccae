"""Lowering a Python expression to plan documents: what :meth:`mergekit_lite.Expr.to_plan` writes.

An expression tree becomes one YAML document per intermediate step, dependencies first, each
named (``name:``) so later steps can use it as a model; models on disk are leaves and lower to
their path. The plan is what runs, so an expression and its YAML give the same bits.
"""

from __future__ import annotations

from typing import Any

import yaml


def dump_plan(expr: Any) -> str:
    """The mergekit-style YAML of `expr` (several ``---`` documents when it has steps)."""
    return yaml.dump_all(Lowering().run(expr), Dumper=PlanDumper, sort_keys=False)


class Lowering:
    """Turns an expression into plan documents, one per intermediate step, dependencies first."""

    def __init__(self):
        self.docs: list[dict] = []
        self.names: dict[int, str] = {}
        self.used: set[str] = set()

    def ref(self, x: Any) -> str:
        if x._leaf:
            return str(x)
        if id(x) in self.names:
            return self.names[id(x)]
        doc = x._doc(self)
        if doc is None:  # identity combination
            return self.ref(x.terms[0][0])
        name = x._name or f"step{len(self.docs) + 1}"
        if name in self.used:
            raise ValueError(f"two steps are named {name!r}")
        self.used.add(name)
        self.docs.append({"name": name, **doc})
        self.names[id(x)] = name
        return name

    def run(self, x: Any) -> list[dict]:
        if x._leaf:
            doc = {"merge_method": "passthrough", "models": [{"model": str(x)}]}
        else:
            doc = x._doc(self)
            if doc is None:
                return self.run(x.terms[0][0])
        if x._name:
            doc = {"name": x._name, **doc}
        return self.docs + [doc]


class PlanDumper(yaml.SafeDumper):
    """Numeric lists (gradients, layer ranges) in flow style, as mergekit writes them."""


def _represent_list(dumper: yaml.SafeDumper, data: list):
    flow = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in data)
    return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flow)


PlanDumper.add_representer(list, _represent_list)
PlanDumper.add_representer(tuple, _represent_list)
