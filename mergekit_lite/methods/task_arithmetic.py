"""Task arithmetic.

Ilharco et al. 2022, "Editing Models with Task Arithmetic", https://arxiv.org/abs/2212.04089

A task vector is τ_i = θ_i − θ_base. Adding task vectors adds abilities; a negative weight
subtracts (negates) a task.
"""

from __future__ import annotations

from ..lazy import torch

from . import register
from .gta import INT8_MASK, LAMBDA, WEIGHT, generalized_task_arithmetic, normalize_param
from .gta import sum_of_weights, task_vector  # noqa: F401  (re-exported)


@register(
    "task_arithmetic",
    params=(WEIGHT, LAMBDA, normalize_param(False), INT8_MASK),
    base="required",
    paper="https://arxiv.org/abs/2212.04089",
    workspace=lambda n: 3.0,  # the upcast base, the task-vector buffer, the sum
)
def task_arithmetic(tensors: list[torch.Tensor], base: torch.Tensor, *, weight: list[float],
                    lambda_: float, normalize: bool, int8_mask: bool = False) -> torch.Tensor:
    """Add weighted task vectors to the base.

    θ = θ_base + λ · Σ_i w_i·(θ_i − θ_base)            (``normalize: false``, the default)
    θ = θ_base + λ · Σ_i w_i·(θ_i − θ_base) / Σ_i w_i  (``normalize: true``; a Σ w within 1e-8
                                                        of 0 counts as 1, as in mergekit)

    Task vectors are formed and accumulated one model at a time in float32.
    ``int8_mask`` is accepted for mergekit compatibility and has no effect.
    """
    return generalized_task_arithmetic(tensors, base, weight, normalize=normalize, lambda_=lambda_)
