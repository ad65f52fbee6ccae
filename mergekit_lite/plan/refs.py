"""Model references in a plan: the forms a model may be named in, read into a :class:`ModelRef`.

One reader for every place a plan names a model (``base_model``, ``models:`` entries, slice sources,
donors, ``tokenizer_source``), so that they all accept the same forms:

- ``path`` (a folder or ``.safetensors`` file), ``org/name`` or ``org/name@revision``;
- ``{path: ..., revision: ...}``;
- a model with a PEFT adapter applied: mergekit's ``base+adapter`` string and its mapping
  ``{model: BASE, lora: ADAPTER}``, or this project's explicit form ``{base: BASE, adapter: ADAPTER}``
  (each side a path, a repo id with an optional ``@revision``, or ``{path, revision}``).

Problems go to a ``report(path, message)`` callback, as everywhere in plan parsing.
"""

from __future__ import annotations

import os
from typing import Any, Callable

from .recipe import ModelRef
from .source import Path

Report = Callable[[Path, str], None]

OVERRIDE = "override_architecture is not supported"
# mergekit's ModelReference mapping: {model: {path, revision}, lora: ..., override_architecture: ...}
MERGEKIT_KEYS = {"model", "lora", "override_architecture"}
EXPLICIT_KEYS = {"base", "adapter"}
FORMS = ("expected a model path or repo id (a string), {path: ..., revision: ...}, or a model with an adapter: "
         "BASE+ADAPTER or {base: BASE, adapter: ADAPTER}")


def read_ref(report: Report, path: Path, value: Any) -> ModelRef | None:
    """A model reference in any of the forms above."""
    if isinstance(value, dict):
        return _mapping(report, path, value)
    if not isinstance(value, str) or not value.strip():
        report(path, f"expected a model path or Hugging Face repo id, got {value!r}")
        return None
    value = value.strip()
    if "+" in value and not os.path.exists(value):
        parts = value.split("+")
        if len(parts) != 2 or not all(p.strip() for p in parts):
            report(path, f"'{value}': expected BASE+ADAPTER (one '+' between a model and a PEFT adapter)")
            return None
        return _with_adapter(report, path, parts[0].strip(), parts[1].strip())
    return _plain(report, path, value)


def _plain(report: Report, path: Path, value: Any) -> ModelRef | None:
    """A model without an adapter: a string, or {path, revision}."""
    if isinstance(value, dict):
        if isinstance(value.get("path"), str) and set(value) <= {"path", "revision"}:
            rev = value.get("revision")
            if rev is not None and not isinstance(rev, str):
                report(path + ("revision",), f"a revision is a string, got {rev!r}")
                return None
            return ModelRef(value["path"], rev)
        report(path, FORMS)
        return None
    if not isinstance(value, str) or not value.strip():
        report(path, f"expected a model path or Hugging Face repo id, got {value!r}")
        return None
    value = value.strip()
    if "@" in value and not os.path.exists(value):
        repo, _, rev = value.rpartition("@")
        if not repo or not rev:
            report(path, f"'{value}': expected org/name@revision")
            return None
        return ModelRef(repo, rev)
    return ModelRef(value)


def _with_adapter(report: Report, path: Path, base: Any, adapter: Any) -> ModelRef | None:
    b, a = _plain(report, path, base), _plain(report, path, adapter)
    if b is None or a is None:
        return None
    return ModelRef(b.path, b.revision, adapter=a)


def _mapping(report: Report, path: Path, value: dict) -> ModelRef | None:
    if set(value) <= EXPLICIT_KEYS and "base" in value:
        if "adapter" not in value:
            report(path, "{base: ...} needs 'adapter' too (or name the model as a plain path)")
            return None
        return _with_adapter(report, path, value["base"], value["adapter"])
    if set(value) <= MERGEKIT_KEYS and "model" in value:
        if value.get("override_architecture"):
            report(path, OVERRIDE)
            return None
        if value.get("lora") is None:
            return _plain(report, path, value["model"])
        return _with_adapter(report, path, value["model"], value["lora"])
    return _plain(report, path, value)
