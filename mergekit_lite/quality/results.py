"""What a search leaves behind: its results file (resumable) and the best plan.

The results file is JSON lines: a header ``{"search": {...}}`` naming the plan (and a hash of its
text), the task files, the metric and the strategy, then one line per candidate as soon as it is
scored: ``{"params": {...}, "score": ..., "metrics": {...}, "seconds": ...}`` or ``{"params":
{...}, "error": "..."}``. Opening an existing file resumes: its candidates are not run again. A
file written for another search (another plan text, tasks or metric) is refused rather than mixed
in; a last line cut short by an interrupted run is dropped.

The best plan is written with its local model paths rewritten relative to its own folder, so it
runs from wherever it is written (Hub ids and absolute paths are kept as they are).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from typing import Any, Iterator

import yaml

from ..errors import MergeError
from ..lowering import PlanDumper
from ..plan.recipe import MergePlan, Recipe
from ..plan.schema import parse_plan
from ..plan.source import load_documents


class ResultsFile:
    """The trials of one search, on disk (see the module docstring)."""

    def __init__(self, path: str, header: dict[str, Any]):
        from .search import Trial

        self.path = path
        self.done: dict[str, Trial] = {}
        if os.path.exists(path) and os.path.getsize(path) > 0:
            for record in self._records(header):
                trial = Trial(**{k: record[k] for k in ("params", "score", "metrics", "error", "seconds")
                                 if k in record})
                self.done[key_of(trial.params)] = trial
        else:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            with open(path, "w", encoding="utf-8") as fh:
                fh.write(json.dumps({"search": header}) + "\n")

    def _records(self, header: dict[str, Any]) -> Iterator[dict[str, Any]]:
        with open(self.path, encoding="utf-8") as fh:
            lines = fh.read().split("\n")
        complete = [ln for ln in lines[:-1]]  # the text after the last newline is an interrupted write
        for number, line in enumerate(complete, 1):
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                raise MergeError(f"{self.path}:{number}: not a results line (invalid JSON)") from None
            if number == 1:
                self._check_header(record, header)
            elif not isinstance(record, dict) or not isinstance(record.get("params"), dict):
                raise MergeError(f"{self.path}:{number}: not a results line (expected params)")
            else:
                yield record

    def _check_header(self, record: Any, header: dict[str, Any]) -> None:
        theirs = record.get("search") if isinstance(record, dict) else None
        if not isinstance(theirs, dict):
            raise MergeError(f"{self.path}: not a mergekit-lite search results file (no header line)")
        differ = [k for k in ("plan_sha256", "tasks", "metric", "limit") if theirs.get(k) != header.get(k)]
        if differ:
            raise MergeError(f"{self.path} holds the results of another search ({', '.join(differ)} differ); "
                             "give another --results file, or delete this one to start over")

    def add(self, trial: Any) -> None:
        record = {k: v for k, v in asdict(trial).items() if v is not None and v != {}}
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")
        self.done[key_of(trial.params)] = trial


def key_of(params: dict[str, Any]) -> str:
    return json.dumps(params, sort_keys=True)


# -- the best plan ----------------------------------------------------------------------------------

def _ref_paths(step: MergePlan) -> list[tuple]:
    """Key paths (in the step's document) of every model reference the step names."""
    paths = [step.prefix + (k,) for k in ("base_model", "tokenizer_source", "embed_source", "head_source")]
    if step.depth_upscale is not None:
        paths.append(step.depth_upscale.path + ("model",))
    paths += [m.path + ("model",) for m in step.models or ()]
    for sl in step.slices or ():
        paths.append(sl.path + ("base_model",))
        paths += [src.path + ("model",) for src in sl.sources]
    return paths


def _relocated(value: str, plan_dir: str, new_dir: str) -> str:
    """A local path as the plan resolved it (working directory first, then the plan's folder),
    rewritten relative to `new_dir`; anything else unchanged."""
    expanded = os.path.expanduser(value)
    if os.path.isabs(expanded):
        return value
    for cand in (expanded, os.path.join(plan_dir, expanded)):
        if os.path.exists(cand):
            return os.path.relpath(os.path.abspath(cand), new_dir)
    return value


def relocate(text: str, file: str, new_file: str) -> str:
    """Plan `text` (read from `file`) with its local model paths made relative to `new_file`'s folder."""
    recipe: Recipe = parse_plan(text, file)
    docs = {d.index: d for d in load_documents(text, file)}
    plan_dir = os.path.dirname(os.path.abspath(file))
    new_dir = os.path.dirname(os.path.abspath(new_file))
    steps = {s.name for s in recipe.steps if s.name}
    for step in recipe.steps:
        for path in _ref_paths(step):
            holder, key = _holder(docs[step.doc.index if step.doc else 0].data, path)
            if holder is None:
                continue
            value = holder[key]
            if isinstance(value, dict):  # {path, revision} or {model: {path, revision}}
                holder, key = (value.get("model"), "path") if isinstance(value.get("model"), dict) else (value, "path")
                value = holder.get(key)
            if isinstance(value, str) and value not in steps and value != "base" and "@" not in value:
                holder[key] = _relocated(value, plan_dir, new_dir)
    return yaml.dump_all([d.data for d in docs.values()], Dumper=PlanDumper, sort_keys=False)


def _holder(data: Any, path: tuple) -> tuple[Any, Any]:
    cur = data
    for part in path[:-1]:
        try:
            cur = cur[part]
        except (KeyError, IndexError, TypeError):
            return None, None
    if not isinstance(cur, dict) or path[-1] not in cur:
        return None, None
    return cur, path[-1]


def write_plan(path: str, text: str, file: str, comment: list[str]) -> None:
    """Write `text` (a plan read from `file`) to `path`, relocated, under `comment` lines."""
    body = relocate(text, file, path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write("".join(f"# {line}\n" for line in comment) + body)
    os.replace(tmp, path)
