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
from .resolve import locate_model

Opened = Union[ModelFiles, AdapterFiles]


def open_inputs(recipe: Recipe, plan_dir: str | None, known: dict[str, Opened] | None = None,
                endpoint: str | None = None) -> dict[str, Opened]:
    """Resolve and index every model and adapter the recipe names (headers only); `known` ones are
    reused. Keys are ``str(ModelRef)`` (a ``base+adapter`` reference opens its base and its adapter
    under their own keys). Names of the recipe's steps are not models. Hub models are downloaded
    from `endpoint` (None: ``HF_ENDPOINT`` or huggingface.co) and remember where they came from."""
    step_names = {s.name for s in recipe.steps if s.name}
    files: dict[str, Opened] = dict(known or {})
    problems: list[str] = []
    for ref, is_adapter in _named(recipe):
        if (ref.path in step_names and ref.revision is None and not is_adapter) or str(ref) in files:
            continue
        try:
            files[str(ref)] = open_one(ref, plan_dir, is_adapter, endpoint)
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


def open_located(path: str, revision: str | None, plan_dir: str | None, endpoint: str | None = None) -> ModelFiles:
    """Resolve one model reference and index it, remembering where it came from on the Hub."""
    found = locate_model(path, revision, plan_dir, endpoint)
    files = open_model(found.path)
    files.hub = found.hub
    return files


def open_one(ref: ModelRef, plan_dir: str | None, is_adapter: bool = False, endpoint: str | None = None) -> Opened:
    """Open one model (an adapter folder given as a model is refused) or one adapter."""
    if is_adapter:
        found = locate_model(ref.path, ref.revision, plan_dir, endpoint, adapter=True)
        adapter = open_adapter(found.path)
        adapter.hub = found.hub
        return adapter
    return open_located(ref.path, ref.revision, plan_dir, endpoint)


def _named(recipe: Recipe) -> Iterator[tuple[ModelRef, bool]]:
    """Every model and adapter reference of every step (the tokenizer source included), in plan
    order, each with whether it names an adapter."""
    for step in recipe.steps:
        refs = step.referenced_models() + (step.vocabulary.models() if step.vocabulary is not None else [])
        for ref in refs:
            if ref.adapter is not None:
                yield ref.base, False
                yield ref.adapter, True
            else:
                yield ref, step.output == "adapter" and ref != step.base_model
