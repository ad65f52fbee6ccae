"""TIES-Merging: trim, elect sign, disjoint merge.

Yadav et al. 2023, "TIES-Merging: Resolving Interference When Merging Models",
https://arxiv.org/abs/2306.01708
"""

from __future__ import annotations

from ..lazy import torch

from . import register
from .gta import (DENSITY, INT8_MASK, LAMBDA, SIGN_ELECTION, WEIGHT, generalized_task_arithmetic, gta_workspace,
                  normalize_param, rescale_mode_param, rescale_param)
from .sparsify import trim


@register(
    "ties",
    params=(WEIGHT, DENSITY, LAMBDA, normalize_param(True), rescale_param(False), rescale_mode_param("l1"),
            SIGN_ELECTION, INT8_MASK),
    base="required",
    paper="https://arxiv.org/abs/2306.01708",
    workspace=gta_workspace(),
)
def ties(tensors: list[torch.Tensor], base: torch.Tensor, *, weight: list[float], density: list[float],
         lambda_: float = 1.0, normalize: bool = True, rescale: bool = False, rescale_mode: str = "l1",
         sign_election: str = "sum", int8_mask: bool = False) -> torch.Tensor:
    """TIES: per model, keep the top-k magnitudes of its task vector; elect a sign per parameter;
    average the agreeing entries.

    τ_i = θ_i − θ_base;  τ̂_i = trim(τ_i): the k_i = max(1, ⌊density_i·n⌋) largest |τ_i| (ties by
    position); s = sign(Σ_i w_i·τ̂_i) (0 counts as +; ``sign_election: count`` uses
    sign(Σ_i sign(w_i·τ̂_i)) instead, PEFT's variant); A = {i : sign(w_i·τ̂_i) = s};
    θ = θ_base + λ · Σ_{i∈A} w_i·τ̂_i / Σ_{i∈A} w_i   (``normalize: true``, the default; without it
    no division). Where no model agrees the entry keeps θ_base.

    Defaults are mergekit's: density 1 (no trim), normalize true, lambda 1, rescale false (with
    ``rescale: true`` survivors are scaled by ‖τ‖₁/‖τ̂‖₁, or by 1/density with
    ``rescale_mode: density``). The paper's unweighted disjoint mean is weights of 1.
    ``int8_mask`` is accepted for compatibility and has no effect.
    """
    return generalized_task_arithmetic(
        tensors, base, weight,
        sparsify=lambda i, tau: trim(tau, density[i], rescale=rescale, mode=rescale_mode),
        consensus=sign_election, normalize=normalize, lambda_=lambda_)
