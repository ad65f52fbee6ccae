"""Running a plan end to end: open the inputs, compile, execute, write the output folders atomically.

This is the runner: it is the only place that turns options into a budget and a shard size,
resolves and opens models (through :mod:`.io.inputs`) before the compiler sees their headers, and
finishes each output folder from its :class:`~mergekit_lite.graph.OutputSpec`.
"""

from __future__ import annotations

import os
import re
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any, Iterable

import torch

from .dtypes import parse_dtype
from .errors import MergeError
from .executor import Executor, Stats, auto_budget
from .graph import Compiled, OutputSpec, compile_recipe
from .io.inputs import open_inputs
from .io.output import copy_tokenizer, write_card, write_config
from .io.reader import ModelFiles
from .io.writer import OutputFolder, ShardedWriter, ShardLimit, parse_count, parse_size
from .plan.schema import Recipe, load_plan, parse_plan

DEFAULT_SHARD_SIZE = "5GB"
_BARE_B = re.compile(r"^\s*\d+(\.\d+)?\s*[bB]\s*$")  # "1B": bytes to Hugging Face, 10⁹ to mergekit


@dataclass
class Options:
    """How to run a merge (the CLI's flags; the Python API's keyword arguments)."""

    device: str = "auto"
    max_memory: str | int | None = None  # None: automatic
    max_shard_size: str | int = DEFAULT_SHARD_SIZE
    overwrite: bool = False
    quiet: bool = True
    seed: int | None = None
    dtype: str | torch.dtype | None = None  # override of the written dtype
    read_threads: int = 2
    # mergekit's --out-shard-size: parameters per shard ("1B" = 10⁹); wins over max_shard_size
    out_shard_size: str | int | None = None
    copy_tokenizer: bool = True  # copy the tokenizer donor's files into the output
    write_model_card: bool = True  # README.md (the model card) and mergekit_config.yml
    allow_crimes: bool = False  # merge models of different architectures (their tensors must agree)

    def budget(self, compiled: Compiled) -> int:
        if self.max_memory is None or self.max_memory == "auto":
            return auto_budget(compiled)
        try:
            return parse_size(self.max_memory)
        except ValueError as exc:
            raise MergeError(f"--max-memory: {exc}") from None

    def shard_size(self) -> int | ShardLimit:
        """Bytes per shard (``max_shard_size``), or parameters per shard (``out_shard_size``)."""
        if self.out_shard_size is not None:
            return ShardLimit(_positive_size("--out-shard-size", parse_count, self.out_shard_size), "parameters")
        value = self.max_shard_size
        if isinstance(value, str) and _BARE_B.match(value):
            n = value.strip()[:-1].strip()
            raise MergeError(f"--max-shard-size {value}: ambiguous: in bytes (Hugging Face's unit, this option's) "
                             f"that is {n} byte(s), in mergekit's unit {n} billion parameters; write {n}GB for "
                             f"bytes, or use --out-shard-size {value.strip()} (parameters, as mergekit)")
        return _positive_size("--max-shard-size", parse_size, value)

    def torch_dtype(self) -> torch.dtype | None:
        if self.dtype is None:
            return None
        try:
            return parse_dtype(self.dtype)
        except KeyError:
            raise MergeError(f"unknown dtype {self.dtype!r}; allowed: float32, float16, bfloat16 (as strings or "
                             "torch dtypes)") from None


def _positive_size(flag: str, parse, value: str | int) -> int:
    try:
        size = parse(value)
    except ValueError as exc:
        raise MergeError(f"{flag}: {exc}") from None
    if size <= 0:
        raise MergeError(f"{flag} must be positive")
    return size


def load(plan: str | os.PathLike | Recipe) -> Recipe:
    if isinstance(plan, Recipe):
        return plan
    return load_plan(plan)


def compile_plan(plan: str | os.PathLike | Recipe, options: Options | None = None, *, sink: str = "write",
                 plan_dir: str | None = None, files: dict[str, ModelFiles] | None = None,
                 only: Iterable[str] | None = None) -> Compiled:
    """Open every input the plan names (local folders, Hub repos; headers only), then compile.

    Paths resolve against `plan_dir` (default: the plan file's folder) and the working directory;
    `files` are models already opened (the Python API's); `only` restricts the output tensors."""
    options = options or Options()
    recipe = load(plan)
    if plan_dir is None and os.path.exists(recipe.file):
        plan_dir = os.path.dirname(os.path.abspath(recipe.file))
    opened = open_inputs(recipe, plan_dir, known=files)
    return compile_recipe(recipe, opened, seed=options.seed, dtype=options.torch_dtype(), sink=sink, only=only,
                          max_shard_size=options.shard_size(), allow_crimes=options.allow_crimes)


def run(plan: str | os.PathLike | Recipe, out: str | os.PathLike, options: Options | None = None, **kwargs: Any) -> Stats:
    """Run a plan (a path to a YAML file, or a parsed :class:`Recipe`) into the folder `out`.

    Keyword arguments are :class:`Options` fields (``device``, ``max_memory``, ``max_shard_size``,
    ``overwrite``, ``quiet``, ``seed``, ``dtype`` (a string or a torch dtype), ``out_shard_size``,
    ``copy_tokenizer``, ``write_model_card``, ``allow_crimes``). Returns the run's :class:`Stats`.
    """
    options = options or Options(**kwargs)
    compiled = compile_plan(plan, options)
    return execute(compiled, os.fspath(out), options)


def execute(compiled: Compiled, out: str, options: Options) -> Stats:
    """Execute a compiled recipe into `out` (and into the folders of steps with ``save:``)."""
    budget = options.budget(compiled)
    with ExitStack() as stack:
        folders = {spec.key: stack.enter_context(OutputFolder(spec.key or out, options.overwrite))
                   for spec in compiled.outputs}
        writers = {}
        for spec in compiled.outputs:
            writer = ShardedWriter(folders[spec.key].tmp, spec.layout)
            stack.callback(writer.close)
            writers[spec.key] = writer
        executor = Executor(compiled, device=options.device, budget=budget, writers=writers,
                            progress=not options.quiet, read_threads=options.read_threads)
        stats = executor.execute()
        for spec in compiled.outputs:
            writers[spec.key].finish()
            finish_folder(folders[spec.key].tmp, spec, options)
        for folder in folders.values():
            folder.commit()
    return stats


def finish_folder(folder: str, spec: OutputSpec, options: Options | None = None) -> None:
    """The non-tensor files of an output folder: config, tokenizer (unless ``copy_tokenizer`` is
    off), model card (unless ``write_model_card`` is off)."""
    options = options or Options()
    write_config(folder, dict(spec.config))
    if options.copy_tokenizer:
        copy_tokenizer(spec.tokenizer_folder, folder)
    if not options.write_model_card:
        return
    card = spec.card
    write_card(folder, plan_text=card.plan_text, method=card.method, models=list(card.models), base=card.base,
               paper=card.paper)


__all__ = ["Options", "run", "execute", "compile_plan", "parse_plan", "load_plan"]
