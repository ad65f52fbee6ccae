"""Finding and opening every model and adapter a recipe names, before anything is compiled.

The runner calls :func:`open_inputs` first: local folders (relative to the plan's folder or the
working directory) and Hub repo ids (downloaded by :mod:`.resolve`) are resolved and their headers
indexed. The compiler then sees headers only and never touches a path or the network. Every model
that cannot be opened is reported at once.

A ``base+adapter`` reference opens two entries, the base (as a model) and the adapter (as an
:class:`~.adapters.AdapterFiles`); in an ``output: adapter`` plan the models are adapters. An adapter
folder named where a full model is expected is recognised, and the error says how to use it.
"""

from __future__ import annotations

from typing import Iterator, Union

from ..errors import ModelNotFound
from ..plan.schema import ModelRef, Recipe
from .adapters import AdapterFiles, open_adapter
from .reader import ModelFiles, open_model
from .resolve import resolve_model

Opened = Union[ModelFiles, AdapterFiles]


def open_inputs(recipe: Recipe, plan_dir: str | None, known: dict[str, Opened] | None = None
                ) -> dict[str, Opened]:
    """Resolve and index every model and adapter the recipe names (headers only); `known` ones are
    reused. Keys are ``str(ModelRef)`` (a ``base+adapter`` reference opens its base and its adapter
    under their own keys). Names of the recipe's steps are not models."""
    step_names = {s.name for s in recipe.steps if s.name}
    files: dict[str, Opened] = dict(known or {})
    problems: list[str] = []
    for ref, is_adapter in _named(recipe):
        if (ref.path in step_names and ref.revision is None and not is_adapter) or str(ref) in files:
            continue
        try:
            files[str(ref)] = open_one(ref, plan_dir, is_adapter)
        except ModelNotFound as exc:
            hint = ""
            if step_names and "/" not in ref.path and not is_adapter:
                hint = f"; nor is it a step of this plan (steps: {', '.join(sorted(step_names))})"
            problems.append(f"{exc}{hint}")
    if len(problems) == 1:
        raise ModelNotFound(problems[0])
    if problems:
        raise ModelNotFound("cannot open the models:\n" + "\n".join(f"  - {p}" for p in problems))
    return files


def open_one(ref: ModelRef, plan_dir: str | None, is_adapter: bool = False) -> Opened:
    """Open one model (an adapter folder given as a model is refused) or one adapter."""
    path = resolve_model(ref.path, ref.revision, plan_dir, adapter=is_adapter)
    return open_adapter(path) if is_adapter else open_model(path)


def _named(recipe: Recipe) -> Iterator[tuple[ModelRef, bool]]:
    """Every model and adapter reference of every step (tokenizer sources included), in plan order,
    each with whether it names an adapter."""
    for step in recipe.steps:
        refs = step.referenced_models() + ([step.tokenizer_source] if isinstance(step.tokenizer_source, ModelRef)
                                           else [])
        for ref in refs:
            if ref.adapter is not None:
                yield ref.base, False
                yield ref.adapter, True
            else:
                yield ref, step.output == "adapter" and ref != step.base_model
