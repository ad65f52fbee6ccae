"""Running a plan end to end: open the inputs, compile, execute, write the output folders atomically.

This is the runner: it is the only place that turns options into a budget and a shard size,
resolves and opens models (through :mod:`.io.inputs`) before the compiler sees their headers, and
finishes each output folder from its :class:`~mergekit_lite.graph.OutputSpec`. It also checks,
before anything is read, that the outputs keep away from the inputs and fit on disk, and computes
the run's key for the resume journal (README, "Safety").
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import warnings
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any, Iterable

import torch

from . import __version__
from .adapter_output import compile_adapter_output, write_adapter_config
from .blocks import BLOCK_NUMEL
from .dtypes import parse_dtype
from .errors import MergeError, MergeWarning
from .executor import Executor, auto_budget, check_budget, pick_device
from .run_stats import Stats
from .graph import Compiled, Load, OutputSpec, Write, compile_recipe
from .io.card import write_card
from .io.folders import check_free_space, output_error, protected_paths
from .io.hub import Upload, upload
from .io.inputs import open_inputs
from .io.journal import run_key
from .io.output import copy_custom_code, copy_generation_config, write_config
from .io.reader import ModelFiles
from .io.vocab import TOKENIZER_FILES, write_tokenizer
from .io.sizes import parse_count, parse_size
from .io.writer import OutputFolder, ShardedWriter, ShardLimit
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
    endpoint: str | None = None  # the Hub to download from (None: HF_ENDPOINT, else huggingface.co)
    upload: Upload | str | None = None  # publish the finished output to this Hub repo ("org/name" or an Upload)
    # mergekit's --out-shard-size: parameters per shard ("1B" = 10⁹); wins over max_shard_size
    out_shard_size: str | int | None = None
    copy_tokenizer: bool = True  # copy the tokenizer donor's files into the output
    write_model_card: bool = True  # README.md (the model card) and mergekit_config.yml
    allow_crimes: bool = False  # merge models of different architectures (their tensors must agree)
    block_size: str | int | None = None  # float32 bytes of a row block's largest value (None: 64 MiB)
    max_device_memory: str | int | None = None  # CUDA: device memory budget (None: 90% of what is free)
    force_overwrite: bool = False  # replace OUT even if mergekit-lite did not write it (never an input)
    resume: bool = False  # continue the interrupted run into OUT (same plan, inputs and engine)
    clamp_overflow: bool = False  # clamp values that overflow the output dtype instead of refusing them

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

    def block_numel(self) -> int:
        """Entries of a row block's largest value: tensors larger than this stream in row blocks."""
        if self.block_size is None:
            return BLOCK_NUMEL
        try:
            size = parse_size(self.block_size)
        except ValueError as exc:
            raise MergeError(f"--block-size: {exc}") from None
        if size < 4:
            raise MergeError("--block-size must be at least one float32 entry (4 bytes)")
        return size // 4

    def device_budget(self) -> int | None:
        if self.max_device_memory is None:
            return None
        try:
            return parse_size(self.max_device_memory)
        except ValueError as exc:
            raise MergeError(f"--max-device-memory: {exc}") from None

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
    opened = open_inputs(recipe, plan_dir, known=files, endpoint=options.endpoint)
    if recipe.output.output == "adapter":
        return compile_adapter_output(recipe, opened, seed=options.seed, dtype=options.torch_dtype(), sink=sink)
    return compile_recipe(recipe, opened, seed=options.seed, dtype=options.torch_dtype(), sink=sink, only=only,
                          max_shard_size=options.shard_size(), allow_crimes=options.allow_crimes,
                          block_numel=options.block_numel(), clamp=options.clamp_overflow)


def run(plan: str | os.PathLike | Recipe, out: str | os.PathLike, options: Options | None = None, **kwargs: Any) -> Stats:
    """Run a plan (a path to a YAML file, or a parsed :class:`Recipe`) into the folder `out`.

    Keyword arguments are :class:`Options` fields (``device``, ``max_memory``, ``max_shard_size``,
    ``overwrite``, ``quiet``, ``seed``, ``dtype`` (a string or a torch dtype), ``out_shard_size``,
    ``copy_tokenizer``, ``write_model_card``, ``allow_crimes``, ``endpoint``, ``upload``: a Hub repo
    to publish the finished folder to, ``block_size``, and the safety options ``force_overwrite``,
    ``resume``, ``clamp_overflow`` (README, "Safety")). Returns the run's :class:`Stats`.
    """
    options = options or Options(**kwargs)
    compiled = compile_plan(plan, options)
    return execute(compiled, os.fspath(out), options)


def publish(out: str | os.PathLike, target: Upload | str | None, options: Options) -> str | None:
    """Upload a finished output folder (`target` None: nothing to do); the run's endpoint is the default.
    A failed upload raises :class:`~mergekit_lite.errors.UploadFailed` and leaves the folder as it is."""
    if target is None:
        return None
    up = Upload.of(target)
    if up.endpoint is None and options.endpoint is not None:
        up = Upload(up.repo_id, up.private, up.revision, up.commit_message, options.endpoint, up.token)
    return upload(os.fspath(out), up)


def execute(compiled: Compiled, out: str, options: Options) -> Stats:
    """Execute a compiled recipe into `out` (and into the folders of steps with ``save:``).

    Before anything is read: the device and budget are checked, every output folder is checked
    against the inputs, the plan and the Hugging Face cache, and the free space against the bytes
    to write. Each folder is written through an :class:`OutputFolder` (a temporary folder with a
    resume journal, committed with the marker last); with ``resume``, tensors an interrupted run
    already wrote are not computed again."""
    device = pick_device(options.device)
    budget = options.budget(compiled)
    check_budget(compiled, budget)
    key = run_key_of(compiled, options, device)
    folders = output_folders(compiled, out, options, key)
    if options.resume and all(f.complete() for f in folders.values()):
        _note(f"{out} already holds the result of this run; nothing to do")
        return Stats(budget=budget, device=str(device))
    with ExitStack() as stack:
        for folder in folders.values():
            stack.enter_context(folder)
            for text in folder.notes:
                _note(text)
        check_free_space({f.out: bytes_to_write(spec, f.done) for spec, f in _pairs(compiled, folders)})
        writers = {}
        for spec, folder in _pairs(compiled, folders):
            writer = ShardedWriter(folder.tmp, spec.layout, clamp=options.clamp_overflow, journal=folder.journal,
                                   done=folder.done, label=folder.out)
            stack.callback(writer.close)
            writers[spec.key] = writer
        remaining = skip_written(compiled, {k: f.done for k, f in folders.items()})
        executor = Executor(remaining, device=device, budget=budget, writers=writers,
                            progress=not options.quiet, read_threads=options.read_threads,
                            device_budget=options.device_budget())
        stats = executor.execute()
        for spec, folder in _pairs(compiled, folders):
            writers[spec.key].finish()
            try:
                finish_folder(folder.tmp, spec, options, os.path.basename(os.path.normpath(spec.key or out)))
            except OSError as exc:
                raise output_error(exc, folder.out) from None
        for folder in folders.values():
            folder.commit({"version": __version__, "run_key": key})
    publish(out, options.upload, options)
    return stats


def _pairs(compiled: Compiled, folders: dict[str, OutputFolder]) -> list[tuple[OutputSpec, OutputFolder]]:
    return [(spec, folders[spec.key]) for spec in compiled.outputs]


def _note(text: str) -> None:
    warnings.warn(text, MergeWarning, stacklevel=3)


def output_folders(compiled: Compiled, out: str, options: Options, key: str) -> dict[str, OutputFolder]:
    """One checked OutputFolder per output (nothing is written yet): keyed like the outputs."""
    protected = protected_paths(compiled.inputs, compiled.recipe.file if compiled.recipe else None)
    paths = {spec.key: spec.key or out for spec in compiled.outputs}
    folders = {}
    for k, path in paths.items():
        others = tuple(p for other, p in paths.items() if other != k)
        folders[k] = OutputFolder(path, options.overwrite, force=options.force_overwrite, protected=protected,
                                  others=others, key=key, resume=options.resume)
    return folders


def run_key_of(compiled: Compiled, options: Options, device: torch.device) -> str:
    """The key of a run's resume journal: what the written bytes depend on (see io/journal.py)."""
    parts = {
        "plan": compiled.recipe.text if compiled.recipe else "",
        "options": [options.seed, str(options.dtype), options.clamp_overflow],
        "layouts": {spec.key: [hashlib.sha256(s.header).hexdigest() for s in spec.layout.shards]
                    for spec in compiled.outputs},
        "outputs": [[spec.kind, spec.card.plan_text if spec.card else "", spec.config] for spec in compiled.outputs],
        "engine": [__version__, torch.__version__, torch.get_num_threads(), device.type],
    }
    return run_key(parts, {n.file for n in compiled.graph if isinstance(n, Load)})


def bytes_to_write(spec: OutputSpec, done: set[str]) -> int:
    """Bytes an output folder still needs: its shards (less the tensors already written), and a
    margin for the config, tokenizer and card."""
    layout = spec.layout
    total = layout.total_size + sum(len(s.header) for s in layout.shards)
    total -= sum(layout.where[n][2].nbytes for n in done if n in layout.where)
    folder = spec.tokenizer.folder
    tokenizer = [os.path.join(folder, n) for n in TOKENIZER_FILES] if folder else []
    return total + sum(os.path.getsize(p) for p in tokenizer if os.path.isfile(p)) + (64 << 10)


def skip_written(compiled: Compiled, done: dict[str, set[str]]) -> Compiled:
    """`compiled` without the groups whose every write is already on disk (a resumed run), unless a
    kept group consumes one of their values (a statistic's sweeps, a shared intermediate merge); the
    graph keeps only the kept groups' nodes, so no value waits for a consumer that will not run."""
    if not any(done.values()):
        return compiled
    graph, keep, kept_nodes = compiled.graph, [], set()
    for i in reversed(range(len(compiled.groups))):
        nodes = compiled.groups[i][1]
        on_disk = all(n.tensor in done.get(n.output, ()) for n in nodes if isinstance(n, Write))
        if not on_disk or any(s in kept_nodes for n in nodes for s in graph.successors(n)):
            keep.append(i)
            kept_nodes.update(nodes)
    keep.reverse()
    if len(keep) < len(compiled.groups):
        planned = [(spec.key, name) for spec in compiled.outputs for name in spec.layout.where]
        written = sum(name in done.get(key, ()) for key, name in planned)
        _note(f"resuming: {written} of {len(planned)} tensors were already written")
    return dataclasses.replace(compiled, graph=graph.subgraph(kept_nodes).copy(),
                               groups=tuple(compiled.groups[i] for i in keep),
                               needs=tuple(compiled.needs[i] for i in keep))


def finish_folder(folder: str, spec: OutputSpec, options: Options | None = None, name: str = "") -> None:
    """The non-tensor files of an output folder: config and the custom code its ``auto_map`` names; the
    tokenizer and generation config (unless ``copy_tokenizer`` is off; a vocabulary built by the merge is
    always written, the rows need it); the model card (unless ``write_model_card`` is off). An adapter
    folder gets adapter_config.json and the card."""
    options = options or Options()
    if spec.kind == "adapter":
        write_adapter_config(folder, spec)
    else:
        _model_files(folder, spec, options)
    if options.write_model_card:
        write_card(folder, spec.card, name or os.path.basename(os.path.normpath(folder)), spec.kind)


def _model_files(folder: str, spec: OutputSpec, options: Options) -> None:
    """config.json, custom code, tokenizer and generation config of a model folder."""
    write_config(folder, dict(spec.config))
    copy_custom_code(spec.config_folder, folder, spec.config.get("auto_map"))
    if options.copy_tokenizer or spec.tokenizer.added or spec.tokenizer.keep_below is not None:
        write_tokenizer(spec.tokenizer, folder)
        tokenizer_config = os.path.join(folder, "tokenizer_config.json")
        if os.path.isfile(tokenizer_config):
            with open(tokenizer_config, encoding="utf-8") as fh:
                copy_custom_code(spec.tokenizer.folder, folder, json.load(fh).get("auto_map"))
    if options.copy_tokenizer:
        copy_generation_config(spec.config_folder, folder)


__all__ = ["Options", "Upload", "run", "execute", "publish", "compile_plan", "parse_plan", "load_plan"]
