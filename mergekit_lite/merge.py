"""Running a plan end to end: compile, execute, write the output folder atomically."""

from __future__ import annotations

import os
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

import torch

from .dtypes import parse_dtype
from .errors import MergeError
from .executor import Executor, Stats, auto_budget
from .graph import Compiled, compile_recipe
from .io.output import copy_tokenizer, write_card, write_config
from .io.writer import OutputFolder, ShardedWriter, ShardLayout, parse_size
from .plan.schema import ModelRef, Recipe, load_plan, parse_plan

DEFAULT_SHARD_SIZE = "5GB"


@dataclass
class Options:
    """How to run a merge (the CLI's flags; the Python API's keyword arguments)."""

    device: str = "auto"
    max_memory: str | int | None = None  # None: automatic
    max_shard_size: str | int = DEFAULT_SHARD_SIZE
    overwrite: bool = False
    quiet: bool = True
    seed: int | None = None
    dtype: str | None = None  # override of the written dtype
    read_threads: int = 2

    def budget(self, compiled: Compiled) -> int:
        if self.max_memory is None or self.max_memory == "auto":
            return auto_budget(compiled)
        try:
            return parse_size(self.max_memory)
        except ValueError as exc:
            raise MergeError(f"--max-memory: {exc}") from None

    def shard_size(self) -> int:
        try:
            size = parse_size(self.max_shard_size)
        except ValueError as exc:
            raise MergeError(f"--max-shard-size: {exc}") from None
        if size <= 0:
            raise MergeError("--max-shard-size must be positive")
        return size

    def torch_dtype(self) -> torch.dtype | None:
        if self.dtype is None:
            return None
        try:
            return parse_dtype(self.dtype)
        except KeyError:
            raise MergeError(f"unknown dtype {self.dtype!r}; allowed: float32, float16, bfloat16") from None


def load(plan: str | os.PathLike | Recipe) -> Recipe:
    if isinstance(plan, Recipe):
        return plan
    return load_plan(plan)


def compile_plan(plan: str | os.PathLike | Recipe, options: Options | None = None, *, sink: str = "write") -> Compiled:
    options = options or Options()
    recipe = load(plan)
    plan_dir = os.path.dirname(os.path.abspath(recipe.file)) if os.path.exists(recipe.file) else None
    return compile_recipe(recipe, plan_dir=plan_dir, seed=options.seed, dtype=options.torch_dtype(), sink=sink)


def run(plan: str | os.PathLike | Recipe, out: str | os.PathLike, options: Options | None = None, **kwargs: Any) -> Stats:
    """Run a plan (a path to a YAML file, or a parsed :class:`Recipe`) into the folder `out`.

    Keyword arguments are :class:`Options` fields (``device``, ``max_memory``, ``max_shard_size``,
    ``overwrite``, ``quiet``, ``seed``, ``dtype``). Returns the run's :class:`Stats`.
    """
    options = options or Options(**kwargs)
    compiled = compile_plan(plan, options)
    return execute(compiled, os.fspath(out), options)


def execute(compiled: Compiled, out: str, options: Options) -> Stats:
    """Execute a compiled recipe into `out` (and into the folders of steps with ``save:``)."""
    budget = options.budget(compiled)
    shard_size = options.shard_size()
    targets = {"": out}
    for key in compiled.outputs:
        if key:
            targets[key] = key
    with ExitStack() as stack:
        folders = {key: stack.enter_context(OutputFolder(path, options.overwrite)) for key, path in targets.items()}
        writers = {}
        for key, (planned, _layout) in compiled.outputs.items():
            writer = ShardedWriter(folders[key].tmp, ShardLayout(planned, shard_size))
            stack.callback(writer.close)
            writers[key] = writer
        executor = Executor(compiled, device=options.device, budget=budget, writers=writers,
                            progress=not options.quiet, read_threads=options.read_threads)
        stats = executor.execute()
        for key, (planned, layout) in compiled.outputs.items():
            writers[key].finish()
            _finish_folder(compiled, folders[key].tmp, layout, step_key=key)
        for folder in folders.values():
            folder.commit()
    return stats


def _donor_folder(compiled: Compiled, ref: ModelRef | None) -> str | None:
    """Folder holding the tokenizer/config of `ref` (following steps back to a model on disk)."""
    seen = set()
    while ref is not None:
        if ref.revision is None and ref.path in compiled.steps and ref.path not in seen:
            seen.add(ref.path)
            step = compiled.steps[ref.path]
            ref = _tokenizer_ref(step.plan, step.layout.donor)
            continue
        files = compiled.files.get(str(ref))
        return files.folder if files else None
    return None


def _tokenizer_ref(plan, donor: ModelRef) -> ModelRef | None:
    if plan.tokenizer_source == "base":
        return plan.base_model or donor
    if isinstance(plan.tokenizer_source, ModelRef):
        return plan.tokenizer_source
    return donor


def _finish_folder(compiled: Compiled, folder: str, layout, step_key: str) -> None:
    step = compiled.recipe.output if step_key == "" else next(
        s for s in compiled.recipe.steps if s.save == step_key)
    write_config(folder, layout.config)
    copy_tokenizer(_donor_folder(compiled, _tokenizer_ref(step, layout.donor)), folder)
    models = [str(r) for s in compiled.recipe.steps for r in s.referenced_models()
              if not (r.revision is None and r.path in compiled.steps)]
    from . import methods

    write_card(folder, plan_text=compiled.recipe.text, method=step.merge_method, models=models,
               base=str(step.base_model) if step.base_model else None, paper=methods.get(step.merge_method).paper)


__all__ = ["Options", "run", "execute", "compile_plan", "parse_plan", "load_plan"]
