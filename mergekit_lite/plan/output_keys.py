"""The step keys of adapter outputs: ``output``, ``rank``, ``rank_error``, ``log_space``.

Readers in the form :class:`~mergekit_lite.plan.parser.StepParser` calls them (``read(parser, key)``,
returning the :class:`~mergekit_lite.plan.recipe.MergePlan` field), kept apart so that the parser
stays about the keys every plan has. ``output: adapter`` makes the step's models PEFT adapters of
``base_model``, merged into one adapter (:mod:`mergekit_lite.adapter_output`); the other three
keys only mean something there, and are refused elsewhere.
"""

from __future__ import annotations

from typing import Any

ADAPTER_OUTPUT_KEYS = ("rank", "rank_error", "log_space")
NOT_FOR_ADAPTERS = ("slices", "depth_upscale", "tokenizer_source", "embed_source", "head_source")


def output(p: Any, key: str) -> str:
    value = p.data.get(key, "model")
    if value not in ("model", "adapter"):
        p.report((key,), f"output is 'model' or 'adapter', got {value!r}")
        return "model"
    if value == "adapter":
        for other in NOT_FOR_ADAPTERS:
            if other in p.data:
                p.report((other,), f"{other} does not apply to output: adapter (a list of adapters under models:, "
                         "merged into one adapter of base_model)")
        if p.data.get("base_model") is None:
            p.report((), "output: adapter needs base_model: the model the adapters were trained on")
    else:
        for other in ADAPTER_OUTPUT_KEYS:
            if other in p.data:
                p.report((other,), f"{other} applies to adapter outputs only (output: adapter)")
    return value


def rank(p: Any, key: str) -> int | None:
    value = p.data.get(key)
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        p.report((key,), f"rank must be a positive integer, got {value!r}")
        return None
    return value


def rank_error(p: Any, key: str) -> float | None:
    value = p.data.get(key)
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1):
        p.report((key,), f"rank_error is a relative Frobenius error in (0, 1), e.g. 0.05; got {value!r}")
        return None
    return None if value is None else float(value)


def log_space(p: Any, key: str) -> bool:
    value = p.data.get(key, False)
    if not isinstance(value, bool):
        p.report((key,), f"log_space is true or false, got {value!r}")
        return False
    return value


def check_adapter_inputs(p: Any, values: dict[str, Any]) -> None:
    """In an adapter output, models are adapters of base_model, named alone."""
    named = [(("base_model",), values["base_model"])] + [
        (m.path[len(p.prefix):] + ("model",), m.model) for m in values["models"] or ()]
    for path, ref in named:
        if ref is not None and ref.adapter is not None:
            p.report(path, f"'{ref}': in an adapter output, name each adapter alone under models: and their "
                     "common base once, as base_model")
