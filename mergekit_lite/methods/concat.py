"""Concatenation of LoRA adapters: the exact sum of their deltas.

As a method on full tensors it is θ_base + Σ wᵢ(θᵢ − θ_base) (task arithmetic without λ or
normalisation). Its point is the adapter output (``output: adapter``): there the adapters' factors
are stacked instead (A = [w₁s₁A₁; w₂s₂A₂; ...], B = [B₁ B₂ ...]), which represents that same sum
exactly, at rank Σ rᵢ, without any SVD (PEFT's ``add_weighted_adapter(combination_type="cat")``).
"""

from __future__ import annotations

from ..lazy import torch
from . import Param, register
from .gta import generalized_task_arithmetic


@register(
    "concat",
    params=(Param("weight", float, "model", default=1.0, doc="the adapter's (task vector's) coefficient"),),
    base="required",
    paper="https://huggingface.co/docs/peft/developer_guides/model_merging",
    workspace=lambda n: 3.0,  # as task_arithmetic: the upcast base, the task-vector buffer, the sum
)
def concat(tensors: list[torch.Tensor], base: torch.Tensor, *, weight: list[float]) -> torch.Tensor:
    """The exact weighted sum of the task vectors (of LoRA deltas, for adapters).

    θ = θ_base + Σ_i w_i·(θ_i − θ_base)

    With ``output: adapter`` the LoRA factors are concatenated: B @ A = Σ_i w_i·s_i·B_i A_i
    at rank Σ r_i, exactly (s_i is adapter i's scaling).
    """
    return generalized_task_arithmetic(tensors, base, weight, normalize=False, lambda_=1.0)
