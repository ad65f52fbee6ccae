"""mergekit-lite: streaming, bounded-memory merges of fine-tuned language models.

Python API::

    import mergekit_lite
    mergekit_lite.run("plan.yaml", "out/")                  # run a mergekit-style YAML plan

    from mergekit_lite import Model
    base = Model("base")
    merged = base + 0.7 * (Model("math-ft") - base)         # lazy task arithmetic
    merged.save("out/", upload="org/name")                 # ... and publish it on the Hub

    tuned = base.with_adapter("lora")                        # a PEFT adapter applied, as a model
    mergekit_lite.merge_adapters(["lora_a", "lora_b"], base="base", method="concat").save("out/lora")
    mergekit_lite.extract_lora("base", "math-ft", "out/extracted", rank=16)
    moe = mergekit_lite.upcycle(base, [("math-ft", ["2 + 2"]), ("code-ft", ["def f():"])],
                                gate_mode="cheap_embed")   # a mixture of experts (mergekit-moe)
    moe.save("out-moe/")
    mergekit_lite.evaluate([base, merged], ["val.jsonl"])   # exact match side by side (transformers)
    mergekit_lite.search("plan.yaml", ["val.jsonl"])        # the plan's search: section, best plan

Why the exports are loaded on first use (PEP 562): importing torch takes seconds, and the command
line imports this package before it can parse ``--help`` or answer ``mergekit-lite methods``; those
must answer at once. So this module imports nothing heavy itself: ``mergekit_lite.Model`` imports
the API (and torch) the first time it is used. The errors are plain Python and are imported here.
"""

from __future__ import annotations

import sys


def _guard_start_up() -> None:
    """When this process is the command line (``mergekit-*`` scripts, ``python -m mergekit_lite``),
    a SIGINT or SIGTERM before the command line's own handlers are in place (while Python imports
    the package) ends the process at once with 130/143 and one line, not a traceback; nothing has
    been written yet. Library users' signal handling is left alone."""
    import os
    import signal

    orig = getattr(sys, "orig_argv", [])
    as_module = "-m" in orig[:-1] and orig[orig.index("-m") + 1] == __name__
    prog = os.path.basename(sys.argv[0] if sys.argv else "")
    if not (as_module or prog.startswith("mergekit-")):
        return
    prog = prog if prog.startswith("mergekit-") else "mergekit-lite"

    def stop(signum: int, frame: object) -> None:
        os.write(2, f"{prog}: stopped by {signal.Signals(signum).name} while starting\n".encode())
        os._exit(128 + signum)

    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, stop)


_guard_start_up()  # first of all, before any other import

import importlib  # noqa: E402
import types  # noqa: E402
from typing import Any  # noqa: E402

__version__ = "0.1.0"

from .errors import (  # noqa: E402
    BudgetExceeded,
    MergeError,
    ModelNotFound,
    OutputExists,
    PlanError,
    ShapeMismatch,
    TensorNotFound,
    UploadFailed,
)

# exported name -> (module, attribute)
_LAZY = {
    "Model": (".api", "Model"),
    "Expr": (".api", "Expr"),
    "TaskVector": (".api", "TaskVector"),
    "merge": (".api", "merge"),
    "merge_adapters": (".api_adapters", "merge_adapters"),
    "extract_lora": (".extract", "extract_lora"),
    "LayerRange": (".stacking", "LayerRange"),
    "stack": (".stacking", "stack"),
    "upcycle": (".moe.api", "upcycle"),
    "Options": (".merge", "Options"),
    "compile_plan": (".merge", "compile_plan"),
    "run": (".merge", "run"),
    "upload": (".io.hub", "upload"),
    "Upload": (".io.hub", "Upload"),
    "METHODS": (".methods", "REGISTRY"),
    "load_plan": (".plan.schema", "load_plan"),
    "parse_plan": (".plan.schema", "parse_plan"),
    "evaluate": (".quality.evaluate", "evaluate"),  # scoring needs the transformers extra
    "search": (".quality.search", "search"),
}

__all__ = ["__version__", *_LAZY, "MergeError", "PlanError", "ModelNotFound", "TensorNotFound", "ShapeMismatch",
           "BudgetExceeded", "OutputExists", "UploadFailed"]


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'mergekit_lite' has no attribute {name!r}")
    module, attr = _LAZY[name]
    value = getattr(importlib.import_module(module, __name__), attr)
    object.__setattr__(sys.modules[__name__], name, value)
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


class _Package(types.ModuleType):
    """Keeps ``mergekit_lite.merge`` the API function: importing the runner submodule
    ``mergekit_lite.merge`` would otherwise rebind the package attribute of the same name."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "merge" and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
