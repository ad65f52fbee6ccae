"""Merge plans: mergekit's YAML schema, validated strictly. This module is the front door: YAML text -> Recipe.

A plan file holds one merge, or several named steps (mergekit-multi's ``---`` documents with
``name:``, or one document with ``steps:``) whose outputs feed each other. Parsing checks every
key, every model reference's form and every parameter value against the method that will use it,
and reports all problems at once, each with its file, line and key path: one
:class:`~mergekit_lite.errors.PlanError` lists every :class:`~mergekit_lite.errors.Issue`, located by
:mod:`mergekit_lite.plan.source`. Nothing is read from the models here (see
:mod:`mergekit_lite.plan.expand` for checks that need tensor headers).

The work is split so that each part stays small: :mod:`~mergekit_lite.plan.recipe` holds the records
(re-exported here, their usual import place), :mod:`~mergekit_lite.plan.parser` reads one step,
:mod:`~mergekit_lite.plan.checks` checks a step against its merge method, and this module reads the
file, splits it into steps and orders them. A document with ``experts:`` is mergekit-moe's config, read
by :mod:`~mergekit_lite.plan.moe` into a step of the same kind.
"""

from __future__ import annotations

import os
import stat
from dataclasses import replace

from ..errors import Issue, PlanError
from .checks import value_is_conditional_list
from .moe import MoEParser, is_moe
from .parser import RECIPE, STEP_KEYS, UNSUPPORTED_KEYS, StepParser, check_seed
from .recipe import DepthUpscale, InputModel, MergePlan, ModelRef, OutputSlice, Recipe, SliceSource
from .source import MAX_PLAN_BYTES, Document, load_documents

__all__ = [
    "DepthUpscale", "InputModel", "MergePlan", "ModelRef", "OutputSlice", "Recipe", "SliceSource",
    "STEP_KEYS", "UNSUPPORTED_KEYS", "load_plan", "parse_plan", "parse_documents", "value_is_conditional_list",
]


def load_plan(path: str | os.PathLike) -> Recipe:
    """Read and validate a plan file (a regular file of at most MAX_PLAN_BYTES)."""
    path = os.fspath(path)
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):  # a FIFO or a device would block or never end
            raise PlanError(Issue(path, None, "", "the plan is not a regular file"))
        with open(path, encoding="utf-8") as fh:
            text = fh.read(MAX_PLAN_BYTES + 1)
    except FileNotFoundError:
        raise PlanError(Issue(path, None, "", "the plan file does not exist")) from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise PlanError(Issue(path, None, "", f"cannot read the plan file: {exc}")) from None
    return parse_plan(text, path)


def parse_plan(text: str, file: str = "<plan>") -> Recipe:
    """Validate plan text (one or several YAML documents) into a :class:`Recipe`."""
    return parse_documents(load_documents(text, file), file, text)


def parse_documents(docs: list[Document], file: str, text: str) -> Recipe:
    """Validate the YAML documents of a plan (as :func:`~mergekit_lite.plan.source.load_documents`
    reads them; a caller may have rewritten their data, as ``mergekit-multi`` does) into a Recipe."""
    issues: list[Issue] = []
    warnings: list[str] = []
    steps: list[MergePlan] = []
    seed = None
    if len(docs) == 1 and isinstance(docs[0].data, dict) and "steps" in docs[0].data:
        doc = docs[0]
        issues.extend(doc.issue((key,), message) for key, message in RECIPE.problems(doc.data))
        seed = check_seed(doc, ("seed",), doc.data.get("seed"), issues)
        raw_steps = doc.data["steps"]
        if not isinstance(raw_steps, list) or not raw_steps:
            issues.append(doc.issue(("steps",), "expected a non-empty list of steps"))
        else:
            for i, raw in enumerate(raw_steps):
                step = parser_for(raw)(doc, raw, ("steps", i), issues, warnings).parse()
                if step is not None:
                    steps.append(step)
    else:
        for doc in docs:
            step = parser_for(doc.data)(doc, doc.data, (), issues, warnings).parse()
            if step is not None:
                steps.append(step)
    if len(steps) > 1:
        issues.extend(s.issue(("output",), "output: adapter is for single-step plans; merge the adapters in a "
                              "plan of their own") for s in steps if s.output == "adapter")
    if issues:
        raise PlanError(issues)
    if seed is not None:
        steps = [s if s.seed is not None else replace(s, seed=seed) for s in steps]
    ordered = _order_steps(steps, file)
    return Recipe(steps=tuple(ordered), file=file, text=text, warnings=tuple(warnings))


def parser_for(data: object) -> type[StepParser]:
    """A merge step, or a mixture of experts (mergekit-moe's config: ``experts:``)."""
    return MoEParser if is_moe(data) else StepParser


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
    sinks = [s for s in steps if s.name not in used]
    if unnamed:
        output = unnamed[0]
    else:
        # the step no other uses; among several, the one without save: (the others are outputs too)
        candidates = sinks if len(sinks) <= 1 else [s for s in sinks if not s.save]
        if len(candidates) != 1:
            listed = ", ".join(repr(s.name) for s in sinks) or "none (every step is used by another)"
            raise PlanError(Issue(file, None, "", "cannot tell which step is the output: steps no other "
                                  f"step uses: {listed}; leave the output step unnamed"))
        output = candidates[0]
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

    # steps no other uses but saved (save:) are outputs of their own; they run first, the output last
    for root in [s for s in sinks if s.save and s is not output] + [output]:
        visit(root, [])
    unused = [s for s in steps if id(s) not in state]
    if unused:
        raise PlanError([s.issue(("name",), f"step '{s.name}' is not used by the output step") for s in unused])
    return order
