"""mergekit-lite: streaming, bounded-memory merges of fine-tuned language models.

Python API::

    import mergekit_lite
    mergekit_lite.run("plan.yaml", "out/")                  # run a mergekit-style YAML plan
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
from .merge import Options, compile_plan, run  # noqa: E402
from .methods import REGISTRY as METHODS  # noqa: E402
from .plan.schema import load_plan, parse_plan  # noqa: E402

__all__ = [
    "__version__",
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
