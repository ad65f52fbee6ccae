"""Python API for adapters: a model with an adapter applied, and merging adapters into one adapter.

::

    from mergekit_lite import Model, merge_adapters, extract_lora

    base = Model("base")
    tuned = base.with_adapter("lora")                  # base+lora, as a model (lazy, streamed)
    merged = base + 0.7 * (tuned - base)               # an adapter is a task vector like any other
    merged.save("out/model")

    both = merge_adapters(["lora_a", "lora_b"], base="base", method="concat", weight=[0.7, 0.5])
    print(both.to_plan())                              # the equivalent `output: adapter` plan
    result = both.save("out/adapter")                  # a PEFT adapter folder
    print(result.report())                             # rank and error of each module

    extract_lora("base", "finetune", "out/extracted", rank=16)

Like every expression, these lower to the YAML plan the CLI runs, so both give the same bits.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import yaml

from .adapter_output import AdapterResult
from .api import Model
from .io.inputs import open_one
from .io.resolve import looks_like_repo_id
from .merge import Options, compile_plan, execute
from .plan.schema import ModelRef, parse_plan


class AdaptedModel(Model):
    """A model with a PEFT adapter applied (``Model(base).with_adapter(adapter)``)."""

    def __init__(self, base: Model, adapter: str, revision: str | None = None):
        super().__init__(base.path, base.revision)
        if isinstance(base, AdaptedModel):
            raise TypeError(f"{base!r} already has an adapter; merge adapters with merge_adapters(), or fold "
                            "one into a model saved first")
        self.base_model = base
        self.adapter = ModelRef(adapter, revision)
        self._adapter_files: Any = None

    def __str__(self) -> str:
        return f"{self.base_model}+{self.adapter}"

    def __repr__(self) -> str:
        return f"{self.base_model!r}.with_adapter({str(self.adapter)!r})"

    def with_adapter(self, adapter: str | os.PathLike, revision: str | None = None) -> Model:
        raise TypeError(f"{self!r} already has an adapter; apply one adapter per model (merge adapters with "
                        "merge_adapters() first)")

    def _local(self) -> bool:
        return self.base_model._local() and self.adapter.revision is None and (
            os.path.exists(os.path.expanduser(self.adapter.path)) or not looks_like_repo_id(self.adapter.path))

    def _open(self) -> Any:
        """Check that both open; the compiler reads their headers again (_model_files stays None)."""
        if self._adapter_files is None:
            self._adapter_files = open_one(self.adapter, os.getcwd(), is_adapter=True)
        return self.base_model._open()


class AdapterMerge:
    """Adapters of one base merged into one adapter (an ``output: adapter`` plan); lazy until saved."""

    def __init__(self, adapters: Sequence[str | os.PathLike], base: str | os.PathLike, method: str,
                 weight: Sequence[float] | float | None, rank: int | None, rank_error: float | None,
                 log_space: bool, params: dict[str, Any]):
        self.doc: dict[str, Any] = {"output": "adapter", "merge_method": method, "base_model": os.fspath(base)}
        weights = list(weight) if isinstance(weight, (list, tuple)) else [weight] * len(adapters)
        if len(weights) != len(adapters):
            raise TypeError(f"{len(weights)} weights for {len(adapters)} adapters")
        self.doc["models"] = [{"model": os.fspath(a), **({"parameters": {"weight": w}} if w is not None else {})}
                              for a, w in zip(adapters, weights)]
        if params:
            self.doc["parameters"] = dict(params)
        for key, value in (("rank", rank), ("rank_error", rank_error), ("log_space", log_space or None)):
            if value is not None:
                self.doc[key] = value
        parse_plan(self.to_plan(), "<merge_adapters>")  # bad parameters fail here, not when saving

    def to_plan(self) -> str:
        """The equivalent YAML plan (run it with ``mergekit-lite run PLAN OUT``)."""
        return yaml.safe_dump(self.doc, sort_keys=False)

    def save(self, out: str | os.PathLike, *, dtype: str | None = None, device: str = "auto",
             max_memory: str | int | None = None, overwrite: bool = False, quiet: bool = True,
             seed: int | None = None) -> AdapterResult:
        """Write the merged adapter (a PEFT folder) into `out`; returns the run's stats and report."""
        options = Options(device=device, max_memory=max_memory, overwrite=overwrite, quiet=quiet, dtype=dtype,
                          seed=seed)
        compiled = compile_plan(parse_plan(self.to_plan(), "<merge_adapters>"), options, plan_dir=os.getcwd())
        stats = execute(compiled, os.fspath(out), options)
        return AdapterResult(stats, compiled.outputs[0].manifest)


def merge_adapters(adapters: Sequence[str | os.PathLike], *, base: str | os.PathLike, method: str = "concat",
                   weight: Sequence[float] | float | None = None, rank: int | None = None,
                   rank_error: float | None = None, log_space: bool = False, **params: Any) -> AdapterMerge:
    """Merge PEFT adapters of `base` into one adapter: ``concat`` (exact, rank Σ rᵢ), or any merge
    method on the full deltas re-factorised by SVD to `rank` (or per module within `rank_error`);
    IA3 adapters with a method on their vectors (``log_space``: on their logarithms). Per-adapter
    `weight`; other method parameters as keywords (``density=0.5``)."""
    return AdapterMerge(adapters, base, method, weight, rank, rank_error, log_space, params)
