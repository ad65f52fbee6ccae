"""Task arithmetic.

Ilharco et al. 2022, "Editing Models with Task Arithmetic", https://arxiv.org/abs/2212.04089

A task vector is τ_i = θ_i − θ_base. Adding task vectors adds abilities; a negative weight
subtracts (negates) a task.
"""

from __future__ import annotations

import torch

from . import Param, register


def task_vector(tensor: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """τ = θ − θ_base, in float32."""
    return tensor.to(torch.float32) - base.to(torch.float32)


def sum_of_weights(weights: list[float]) -> float:
    """Σ w_i, with mergekit's guard: a sum within 1e-8 of zero counts as 1 (no normalization)."""
    total = float(sum(weights))
    return 1.0 if abs(total) < 1e-8 else total


@register(
    "task_arithmetic",
    params=(
        Param("weight", float, "model", doc="the task vector's coefficient; negative subtracts the task"),
        Param("lambda", float, "global", default=1.0, doc="scale of the merged task vector"),
        Param("normalize", bool, "global", default=False, doc="divide by the sum of the weights"),
    ),
    base="required",
    paper="https://arxiv.org/abs/2212.04089",
    workspace=lambda n: 3.0,
)
def task_arithmetic(tensors: list[torch.Tensor], base: torch.Tensor, *, weight: list[float],
                    lambda_: float, normalize: bool) -> torch.Tensor:
    """Add weighted task vectors to the base.

    θ = θ_base + λ · Σ_i w_i·(θ_i − θ_base)            (``normalize: false``, the default)
    θ = θ_base + λ · Σ_i w_i·(θ_i − θ_base) / Σ_i w_i  (``normalize: true``)

    Task vectors are formed and accumulated one model at a time in float32.
    """
    base32 = base.to(torch.float32)
    mixed = torch.zeros_like(base32)
    delta = torch.empty_like(base32)  # reused for every model's task vector
    for tensor, w in zip(tensors, weight):
        torch.sub(tensor, base32, out=delta)
        mixed.add_(delta, alpha=w)
    del delta
    if normalize:
        mixed.div_(sum_of_weights(weight))
    if lambda_ != 1.0:
        mixed.mul_(lambda_)
    return mixed.add_(base32)
