"""Finding and opening every model a recipe names, before anything is compiled.

The runner calls :func:`open_inputs` first: local folders (relative to the plan's folder or the
working directory) and Hub repo ids (downloaded by :mod:`.resolve`) are resolved and their headers
indexed. The compiler then sees headers only and never touches a path or the network. Every model
that cannot be opened is reported at once.
"""

from __future__ import annotations

from ..errors import ModelNotFound
from ..plan.schema import ModelRef, Recipe
from .reader import ModelFiles, open_model
from .resolve import locate_model


def open_inputs(recipe: Recipe, plan_dir: str | None, known: dict[str, ModelFiles] | None = None,
                endpoint: str | None = None) -> dict[str, ModelFiles]:
    """Resolve and index every model file the recipe names (headers only); `known` ones are reused.
    Keys are ``str(ModelRef)``. Names of the recipe's steps are not models. Hub models are downloaded
    from `endpoint` (None: ``HF_ENDPOINT`` or huggingface.co) and remember where they came from."""
    step_names = {s.name for s in recipe.steps if s.name}
    files: dict[str, ModelFiles] = dict(known or {})
    problems: list[str] = []
    for ref in _models_named(recipe):
        if (ref.path in step_names and ref.revision is None) or str(ref) in files:
            continue
        try:
            files[str(ref)] = open_located(ref.path, ref.revision, plan_dir, endpoint)
        except ModelNotFound as exc:
            hint = ""
            if step_names and "/" not in ref.path:
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


def _models_named(recipe: Recipe) -> list[ModelRef]:
    """Every model reference of every step (the tokenizer source included), in plan order."""
    refs: list[ModelRef] = []
    for step in recipe.steps:
        refs.extend(step.referenced_models())
        if step.vocabulary is not None:
            refs.extend(step.vocabulary.models())
    return refs
