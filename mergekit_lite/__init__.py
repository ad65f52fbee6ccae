"""mergekit-lite: streaming, bounded-memory merges of fine-tuned language models.

Python API::

    import mergekit_lite
    mergekit_lite.run("plan.yaml", "out/")                  # run a mergekit-style YAML plan

    from mergekit_lite import Model
    base = Model("base")
    merged = base + 0.7 * (Model("math-ft") - base)         # lazy task arithmetic
    merged.save("out/")

    mergekit_lite.evaluate([base, merged], ["val.jsonl"])   # exact match side by side (transformers)
    mergekit_lite.search("plan.yaml", ["val.jsonl"])        # the plan's search: section, best plan
"""

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
from .api import Expr, Model, TaskVector, merge  # noqa: E402
from .stacking import LayerRange, stack  # noqa: E402
from .merge import Options, compile_plan, run  # noqa: E402
from .methods import REGISTRY as METHODS  # noqa: E402
from .plan.schema import load_plan, parse_plan  # noqa: E402
from .quality.evaluate import evaluate  # noqa: E402  (scoring needs the transformers extra)
from .quality.search import search  # noqa: E402

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
    "evaluate",
    "search",
    "METHODS",
    "MergeError",
    "PlanError",
    "ModelNotFound",
    "TensorNotFound",
    "ShapeMismatch",
    "BudgetExceeded",
    "OutputExists",
]
