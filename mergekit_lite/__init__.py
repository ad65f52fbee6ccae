"""mergekit-lite: streaming, bounded-memory merges of fine-tuned language models.

Python API::

    import mergekit_lite
    mergekit_lite.run("plan.yaml", "out/")                  # run a mergekit-style YAML plan

    from mergekit_lite import Model
    base = Model("base")
    merged = base + 0.7 * (Model("math-ft") - base)         # lazy task arithmetic
    merged.save("out/")
"""

import sys
import types


def _guard_start_up() -> None:
    """When this process is the command line (``mergekit-*`` scripts, ``python -m mergekit_lite``),
    a SIGINT or SIGTERM before the command line's own handlers are in place (while Python imports
    the package) ends the process at once with 130/143 and one line, not a traceback; nothing has
    been written yet. Library users' signal handling is left alone."""
    import os
    import signal

    orig = getattr(sys, "orig_argv", [])
    as_module = "-m" in orig[:-1] and orig[orig.index("-m") + 1] == __name__
    if not (as_module or os.path.basename(sys.argv[0] if sys.argv else "").startswith("mergekit-")):
        return

    def stop(signum: int, frame: object) -> None:
        os.write(2, f"mergekit-lite: stopped by {signal.Signals(signum).name} while starting\n".encode())
        os._exit(128 + signum)

    if hasattr(signal, "SIGTERM"):
        for s in (signal.SIGINT, signal.SIGTERM):
            signal.signal(s, stop)


_guard_start_up()

__version__ = "0.1.0"

from .errors import (  # noqa: E402
    BudgetExceeded,
    MergeError,
    ModelNotFound,
    OutputExists,
    PlanError,
    ShapeMismatch,
    TensorNotFound,
)

# The rest is imported on first use (PEP 562), so that importing the package (the command line
# does, before it can install its signal handlers) does not import torch.
_LAZY = {
    "Expr": "api", "Model": "api", "TaskVector": "api", "merge": "api",
    "LayerRange": "stacking", "stack": "stacking",
    "Options": "merge", "compile_plan": "merge", "run": "merge",
    "load_plan": "plan.schema", "parse_plan": "plan.schema",
}


def __getattr__(name: str):
    import importlib

    if name == "METHODS":
        return importlib.import_module(".methods", __name__).REGISTRY
    if name in _LAZY:
        value = getattr(importlib.import_module("." + _LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'mergekit_lite' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


class _Package(types.ModuleType):
    """``mergekit_lite.merge`` is the function (as it always was), even once the submodule of that
    name is imported, which would otherwise replace the attribute."""

    def __getattribute__(self, name: str):
        if name == "merge":
            from .api import merge

            return merge
        return super().__getattribute__(name)


sys.modules[__name__].__class__ = _Package


__all__ = [
    "__version__",
    "Model",
    "Expr",
    "TaskVector",
    "LayerRange",
    "stack",
    "merge",
    "run",
    "compile_plan",
    "parse_plan",
    "load_plan",
    "Options",
    "METHODS",
    "MergeError",
    "PlanError",
    "ModelNotFound",
    "TensorNotFound",
    "ShapeMismatch",
    "BudgetExceeded",
    "OutputExists",
]
