"""mergekit-lite: streaming, bounded-memory merges of fine-tuned language models.

Python API::

    import mergekit_lite
    mergekit_lite.run("plan.yaml", "out/")                  # run a mergekit-style YAML plan

    from mergekit_lite import Model
    base = Model("base")
    merged = base + 0.7 * (Model("math-ft") - base)         # lazy task arithmetic
    merged.save("out/")

    moe = mergekit_lite.upcycle(base, [("math-ft", ["2 + 2"]), ("code-ft", ["def f():"])],
                                gate_mode="cheap_embed")   # a mixture of experts (mergekit-moe)
    moe.save("out-moe/")
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
from .moe.api import upcycle  # noqa: E402
from .merge import Options, compile_plan, run  # noqa: E402
from .methods import REGISTRY as METHODS  # noqa: E402
from .plan.schema import load_plan, parse_plan  # noqa: E402

__all__ = [
    "__version__",
    "Model",
    "Expr",
    "TaskVector",
    "LayerRange",
    "stack",
    "upcycle",
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
