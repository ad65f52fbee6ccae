"""``mergekit-lite eval``: score models and merges on task files, side by side.

A *source* is anything the engine can stream: a model folder (or ``.safetensors`` file, or Hub
id), a plan file (its output, merged in memory, never written), a parsed :class:`Recipe`, or a
Python expression (:class:`mergekit_lite.Expr`). Each is compiled with Emit sinks and streamed
into a transformers model (:mod:`.hf`), then every task file is scored (:mod:`.infer`,
:mod:`.scoring`). The result is a :class:`Report`: a table to print and a JSON document.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch

from ..errors import MergeError
from ..executor import Executor, pick_device
from ..graph import Compiled
from ..merge import Options, compile_plan
from ..plan.schema import Recipe, load_plan, parse_plan
from .hf import ModelCache, stream_into
from .infer import eos_ids, generate, negative_log_likelihood
from .scoring import char_accuracy, exact_match, mean, perplexity
from .tasks import Task, load_task

METRICS = {"exact": "exact_match", "char": "char_accuracy", "ppl": "perplexity"}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class Source:
    """Something to score: a label and how to compile it into a graph with Emit sinks."""

    label: str
    compile: Callable[[Options], Compiled]


def recipe_source(recipe: Recipe, label: str | None = None, plan_dir: str | None = None,
                  files: dict | None = None) -> Source:
    return Source(label or recipe.file, lambda o: compile_plan(recipe, o, sink="emit", plan_dir=plan_dir, files=files))


def as_source(x: Any) -> Source:
    """A Source from a path (model folder, ``.safetensors`` file, Hub id, or ``.yml``/``.yaml``
    plan), a Recipe, a Python expression, or a Source."""
    from ..api import Expr, Model

    if isinstance(x, Source):
        return x
    if isinstance(x, Recipe):
        return recipe_source(x)
    if isinstance(x, Expr):
        label = str(x) if isinstance(x, Model) else repr(x)
        return recipe_source(x.recipe(), label, os.getcwd(), x._files())
    if isinstance(x, (str, os.PathLike)):
        path = os.fspath(x)
        if path.endswith((".yml", ".yaml")):
            return recipe_source(load_plan(path), f"output of {path}")
        return model_source(path, path)
    raise TypeError(f"cannot score {type(x).__name__} {x!r}: expected a model path, a plan, or an expression")


def model_source(path: str, label: str) -> Source:
    """A model on disk (or the Hub), streamed through its identity plan."""
    from ..api import Model

    return recipe_source(parse_plan(Model(path).to_plan(), "<model>"), label, os.getcwd())


def plan_inputs(recipe: Recipe) -> list[Source]:
    """The models a plan reads (not its steps), each as a Source, in first-mention order."""
    from ..io.resolve import resolve_model

    plan_dir = os.path.dirname(os.path.abspath(recipe.file)) if os.path.exists(recipe.file) else None
    names = {s.name for s in recipe.steps if s.name}
    seen, out = set(), []
    for step in recipe.steps:
        for ref in step.referenced_models():
            if ref.path in names or ref in seen:
                continue
            seen.add(ref)
            out.append(model_source(resolve_model(ref.path, ref.revision, plan_dir), str(ref)))
    return out


@dataclass
class Row:
    label: str
    scores: dict[str, dict[str, float]] = field(default_factory=dict)  # task name -> metric -> value
    seconds: float = 0.0

    def mean(self, metric: str) -> float:
        """The metric averaged over the tasks that have it (each task counts once)."""
        key = METRICS.get(metric, metric)
        return mean([s[key] for s in self.scores.values() if key in s])


@dataclass
class Report:
    tasks: list[Task]
    rows: list[Row]
    settings: dict[str, Any]

    def names(self) -> list[str]:
        return task_names(self.tasks)

    def to_json(self) -> dict[str, Any]:
        return {"tasks": [{"name": n, "path": t.path, "kind": t.kind, "examples": len(t)}
                          for n, t in zip(self.names(), self.tasks)],
                "models": [{"label": r.label, "scores": r.scores, "seconds": round(r.seconds, 2),
                            "mean": {m: v for m in METRICS if (v := r.mean(m)) == v}}  # v != v: NaN, no such task
                           for r in self.rows],
                "settings": self.settings}

    def table(self) -> str:
        from .table import format_report

        return format_report(self)


def task_names(tasks: Sequence[Task]) -> list[str]:
    """Each task's short name (``reverse.val``), or its path where two short names collide."""
    short = [t.name for t in tasks]
    return [n if short.count(n) == 1 else t.path for n, t in zip(short, tasks)]


def score(model: Any, tokenizer: Any, task: Task, device: torch.device, batch_size: int,
          stop: set[int] | None = None) -> dict[str, float]:
    if task.kind == "perplexity":
        nll, tokens = negative_log_likelihood(model, tokenizer, task, device)
        return {"perplexity": perplexity(nll, tokens), "tokens": tokens}
    predicted = generate(model, tokenizer, task, device, batch_size, stop)
    answers = [a for _, a in task.examples]
    return {"exact_match": mean([exact_match(p, a) for p, a in zip(predicted, answers)]),
            "char_accuracy": mean([char_accuracy(p, a) for p, a in zip(predicted, answers)]),
            "examples": len(answers)}


@dataclass
class Evaluator:
    """Scores sources on tasks, reusing one model (and tokenizer) across sources of one config."""

    tasks: list[Task]
    device: str = "auto"
    dtype: str = "float32"
    batch_size: int = 64
    options: Options = field(default_factory=Options)
    cache: ModelCache = field(default_factory=ModelCache)

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise MergeError(f"--dtype {self.dtype}: expected one of {', '.join(DTYPES)}")
        if self.batch_size < 1:
            raise MergeError(f"--batch-size must be at least 1, got {self.batch_size}")

    def row(self, source: Source) -> Row:
        start = time.time()
        compiled = source.compile(self.options)
        spec = compiled.outputs[0]
        if spec.kind != "model":
            raise MergeError(f"{source.label}: the plan writes an {spec.kind}, not a model; score the model it "
                             "applies to (base+adapter) instead")
        device = pick_device(self.device)
        model = self.cache.model(dict(spec.config), source.label, device, DTYPES[self.dtype])
        tokenizer = self.cache.tokenizer(spec.tokenizer, source.label)
        executor = Executor(compiled, device=self.options.device, budget=self.options.budget(compiled))
        stream_into(model, executor.run(), source.label)
        row = Row(source.label)
        stop = eos_ids(model, tokenizer, generation_eos(spec.config_folder))
        with flushed_denormals():
            for name, task in zip(task_names(self.tasks), self.tasks):
                row.scores[name] = score(model, tokenizer, task, device, self.batch_size, stop)
        row.seconds = time.time() - start
        return row


def generation_eos(folder: str | None) -> Any:
    """``eos_token_id`` of the config donor's generation_config.json (chat models often list more
    end tokens there than in config.json), or None."""
    path = os.path.join(folder, "generation_config.json") if folder else ""
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except (OSError, ValueError):
        return None
    return data.get("eos_token_id") if isinstance(data, dict) else None


@contextlib.contextmanager
def flushed_denormals() -> Iterator[None]:
    """Subnormal floats (below 1.2e-38) read as zero while scoring: on CPUs they are handled in
    microcode, and a trained model's activations make the forward passes several times slower."""
    torch.set_flush_denormal(True)
    try:
        yield
    finally:
        torch.set_flush_denormal(False)


def evaluate(models: Iterable[Any] = (), tasks: Iterable[str | Task] = (), *, plan: str | Recipe | None = None,
             inputs: bool = True, device: str = "auto", dtype: str = "float32", batch_size: int = 64,
             limit: int | None = None, seed: int | None = None, progress: Callable[[str], None] | None = None
             ) -> Report:
    """Score `models` (paths, plans, expressions) and, with `plan`, the plan's output merged in
    memory next to its input models (``inputs=False``: the output only) on every task file.

    Returns a :class:`Report` (``.table()``, ``.to_json()``)."""
    loaded = [t if isinstance(t, Task) else load_task(os.fspath(t), limit) for t in tasks]
    if not loaded:
        raise MergeError("no task files to score on: give at least one")
    sources = [as_source(m) for m in models]
    if plan is not None:
        recipe = plan if isinstance(plan, Recipe) else load_plan(plan)
        sources += (plan_inputs(recipe) if inputs else []) + [recipe_source(recipe, f"output of {recipe.file}")]
    if not sources:
        raise MergeError("nothing to score: give model folders, plans or --plan")
    ev = Evaluator(loaded, device, dtype, batch_size, Options(device=device, seed=seed))
    rows = []
    for source in sources:
        if progress:
            progress(f"scoring {source.label}")
        rows.append(ev.row(source))
    settings = {"device": str(pick_device(device)), "dtype": dtype, "batch_size": batch_size, "limit": limit,
                "seed": seed}
    return Report(loaded, rows, settings)
