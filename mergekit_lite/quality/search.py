"""``mergekit-lite search``: the parameters of a plan that score best, each candidate merged in memory.

The space comes from the plan's ``search:`` sections and ``--param`` options
(:mod:`mergekit_lite.plan.space`). Two strategies:

- ``grid``: every combination of the values, in the order the dimensions are declared (every
  dimension must be finite: a list or a stepped range);
- ``random``: a budgeted sampler: `budget` candidates drawn independently and uniformly (a list's
  values, or a range's interval, snapped to its step if it has one) from ``random.Random(seed)``,
  repeats skipped. The same seed draws the same candidates.

Each candidate is the plan with those values written in (:func:`candidate_text`), parsed and
checked like any plan, merged in memory and scored (by default: the mean exact match over the
task files, :mod:`.evaluate`); a candidate the plan checks refuse is recorded as failed. Every
result is appended to a JSON-lines results file as soon as it is known; running the same search
again skips the candidates already in it (resumable). The best candidate is written as a plan,
without the ``search:`` sections, its model paths rewritten relative to where it is written.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import random
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import yaml

from ..errors import MergeError, PlanError
from ..lowering import PlanDumper
from ..plan.schema import Recipe, load_plan, parse_plan
from ..plan.source import load_documents
from ..plan.space import Dimension, parse_cli, read_section
from .evaluate import Evaluator, recipe_source
from .tasks import load_task

STRATEGIES = ("grid", "random")


@dataclass
class Trial:
    params: dict[str, Any]
    score: float | None = None  # higher is better
    metrics: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    seconds: float = 0.0


@dataclass
class SearchResult:
    best: Trial
    trials: list[Trial]
    plan_text: str  # the best candidate as a plan
    strategy: str
    space: list[Dimension]


# -- the space -----------------------------------------------------------------------------------

def space_of(recipe: Recipe, params: Sequence[str] | dict[str, Any] = ()) -> list[Dimension]:
    """The plan's ``search:`` dimensions, replaced or extended by `params` (``KEY=SPEC`` strings,
    or {KEY: list or {min, max[, step]}}) that apply to the output step, or to the step named by a
    ``STEP/`` prefix."""
    dims = {d.key: d for step in recipe.steps for d in step.search}
    items = params.items() if isinstance(params, dict) else [_cli(p) for p in params]
    problems: list[str] = []
    for key, domain in items:
        step_name, _, bare = key.rpartition("/")
        step = recipe.step(step_name) if step_name else recipe.output
        if step is None:
            problems.append(f"--param {key}: the plan has no step named '{step_name}'")
            continue
        data = _step_data(recipe, step)
        label = f"{step.name}/" if step.name and len(recipe.steps) > 1 else ""
        found = read_section({bare: domain}, step.method, data, step.doc.index if step.doc else 0, step.prefix,
                             lambda path, msg, k=key: problems.append(f"--param {k}: {msg}"), label)
        dims.update((d.key, d) for d in found)
    if problems:
        raise MergeError("\n".join(problems))
    if not dims:
        raise MergeError("nothing to search: the plan has no search: section and no --param was given")
    return list(dims.values())


def _cli(spec: str) -> tuple[str, Any]:
    try:
        return parse_cli(spec)
    except ValueError as exc:
        raise MergeError(f"--param: {exc}") from None


def _step_data(recipe: Recipe, step: Any) -> dict:
    docs = {d.index: d for d in load_documents(recipe.text, recipe.file)}
    data = docs[step.doc.index if step.doc else 0].data
    for part in step.prefix:
        data = data[part]
    return data


def candidates(dims: list[Dimension], strategy: str, budget: int | None, seed: int) -> Iterator[dict[str, Any]]:
    """The candidates of the strategy, in order (see the module docstring)."""
    if strategy == "grid":
        open_ended = [d.key for d in dims if not d.finite]
        if open_ended:
            raise MergeError(f"the grid needs values or a step for {', '.join(open_ended)}: give a step, or use "
                             "--strategy random --budget N")
        for combo in itertools.product(*(d.values for d in dims)):
            yield dict(zip((d.key for d in dims), combo))
        return
    if strategy != "random":
        raise MergeError(f"unknown strategy {strategy!r}: expected {' or '.join(STRATEGIES)}")
    if not budget or budget < 1:
        raise MergeError("the random strategy needs --budget N (the number of candidates to try)")
    rng, seen = random.Random(seed), set()
    size, misses = _size(dims), 0
    while len(seen) < budget and (size is None or len(seen) < size) and misses < 1000:
        cand = {d.key: d.sample(rng) for d in dims}
        key = _key(cand)
        if key in seen:
            misses += 1  # a space with fewer distinct values than the budget ends the draw
            continue
        seen.add(key)
        misses = 0
        yield cand


def _size(dims: list[Dimension]) -> int | None:
    size = 1
    for d in dims:
        if not d.finite:
            return None
        size *= len(d.values)
    return size


def _key(params: dict[str, Any]) -> str:
    return json.dumps(params, sort_keys=True)


# -- candidates as plans ---------------------------------------------------------------------------

def candidate_text(recipe: Recipe, dims: list[Dimension], params: dict[str, Any]) -> str:
    """The plan's text with `params` written in and the ``search:`` sections removed."""
    docs = load_documents(recipe.text, recipe.file)
    by_index = {d.index: d for d in docs}
    for dim in dims:
        cur = by_index[dim.doc].data
        for part in dim.target[:-1]:
            if isinstance(cur, dict) and cur.get(part) is None:
                cur[part] = {}
            cur = cur[part]
        cur[dim.target[-1]] = params[dim.key]
    for doc in docs:
        if isinstance(doc.data, dict):
            doc.data.pop("search", None)
            for step in doc.data.get("steps") or []:
                if isinstance(step, dict):
                    step.pop("search", None)
    return yaml.dump_all([d.data for d in docs], Dumper=PlanDumper, sort_keys=False)


# -- the search ------------------------------------------------------------------------------------

Objective = Callable[[Recipe], "float | tuple[float, dict]"]


def task_objective(evaluator: Evaluator, metric: str) -> Objective:
    """Score a candidate on the evaluator's tasks: the mean of `metric` (exact, char: higher is
    better; ppl: lower is better, so the score is −ppl)."""
    kinds = {t.kind for t in evaluator.tasks}
    if metric not in ("exact", "char", "ppl"):
        raise MergeError(f"--metric {metric}: expected exact, char or ppl")
    if kinds != ({"perplexity"} if metric == "ppl" else {"generation"}):
        raise MergeError(f"--metric {metric} needs {'text' if metric == 'ppl' else 'prompt/answer'} task files only")

    def score(recipe: Recipe) -> tuple[float, dict]:
        row = evaluator.row(recipe_source(recipe, "candidate"))
        value = row.mean(metric)
        return (-value if metric == "ppl" else value), {metric: value, "tasks": row.scores}

    return score


def run_trial(recipe: Recipe, dims: list[Dimension], params: dict[str, Any], objective: Objective) -> Trial:
    start = time.time()
    trial = Trial(dict(params))
    try:
        candidate = parse_plan(candidate_text(recipe, dims, params), recipe.file)
        result = objective(candidate)
        trial.score, trial.metrics = (result if isinstance(result, tuple) else (float(result), {}))
    except PlanError as exc:
        trial.error = "; ".join(i.message for i in exc.issues)
    except MergeError as exc:
        trial.error = str(exc)
    trial.seconds = round(time.time() - start, 3)
    return trial


def _header(recipe: Recipe, tasks: list[str], metric: str, strategy: str, limit: int | None) -> dict[str, Any]:
    return {"plan": os.path.abspath(recipe.file) if os.path.exists(recipe.file) else recipe.file,
            "plan_sha256": hashlib.sha256(recipe.text.encode()).hexdigest(), "tasks": sorted(tasks),
            "metric": metric, "limit": limit, "strategy": strategy}


def search(plan: str | Recipe, tasks: Sequence[str] = (), *, params: Sequence[str] | dict[str, Any] = (),
           strategy: str = "grid", budget: int | None = None, seed: int = 0, metric: str = "exact",
           results: str | None = None, out_plan: str | None = None, merge_to: str | None = None,
           objective: Objective | None = None, device: str = "auto", dtype: str = "float32", batch_size: int = 64,
           limit: int | None = None, progress: bool = False, overwrite: bool = False) -> SearchResult:
    """Find the parameters of `plan` that score best (see the module docstring).

    `tasks` are validation task files scored with `metric`, unless `objective` is given: a
    function of a candidate's Recipe returning a score (higher is better) or (score, metrics).
    `results` is the resumable results file; the best plan is written to `out_plan` and, with
    `merge_to`, merged into that folder."""
    recipe = plan if isinstance(plan, Recipe) else load_plan(plan)
    dims = space_of(recipe, params)
    if objective is None:
        evaluator = Evaluator([load_task(t, limit) for t in tasks], device, dtype, batch_size)
        if not evaluator.tasks:
            raise MergeError("search needs validation task files (--tasks) to score candidates on")
        objective = task_objective(evaluator, metric)
    from .results import ResultsFile, write_plan

    header = _header(recipe, list(tasks), metric if tasks else "custom objective", strategy, limit)
    log = ResultsFile(results, header) if results else None
    trials = _run(recipe, dims, candidates(dims, strategy, budget, seed), objective, log, progress,
                  _size(dims) if strategy == "grid" else budget)
    ok = [t for t in trials if t.error is None and t.score is not None]
    if not ok:
        first = next((t.error for t in trials if t.error), "no candidate")
        raise MergeError(f"no candidate could be scored; the first problem: {first}")
    best = max(ok, key=lambda t: t.score)  # the first of equal scores
    text = candidate_text(recipe, dims, best.params)
    if out_plan:
        comment = [f"mergekit-lite search ({strategy}, {len(trials)} candidates) of {recipe.file}:",
                   f"best {json.dumps(best.params)}, score {best.score:.4f}"]
        write_plan(out_plan, text, recipe.file, comment)
    if merge_to:
        from ..merge import run

        run(parse_plan(text, recipe.file), merge_to, device=device, overwrite=overwrite)
    return SearchResult(best, trials, text, strategy, dims)


def _run(recipe: Recipe, dims: list[Dimension], cands: Iterator[dict[str, Any]], objective: Objective,
         log: Any, progress: bool, total: int | None) -> list[Trial]:
    from tqdm import tqdm

    trials: list[Trial] = []
    best: float | None = None
    with tqdm(total=total, disable=not progress, unit="cand", desc="search") as bar:
        for params in cands:
            trial = log.done.get(_key(params)) if log else None
            if trial is None:
                trial = run_trial(recipe, dims, params, objective)
                if log:
                    log.add(trial)
            trials.append(trial)
            if trial.score is not None and (best is None or trial.score > best):
                best = trial.score
            bar.set_postfix(best=f"{best:.4f}" if best is not None else "-")
            bar.update(1)
    return trials
