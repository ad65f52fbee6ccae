"""TSV-Merge: merge each layer in the span of the tasks' top singular vectors, made orthogonal.

Gargiulo et al. 2025, "Task Singular Vectors: Reducing Task Interference in Model Merging"
(CVPR 2025), https://arxiv.org/abs/2412.00081; official code:
https://github.com/AntoAndGar/task_singular_vectors (``compute_and_sum_svd_mem_reduction``).
"""

from __future__ import annotations

from ..lazy import torch

from . import Param, register
from .gta import LAMBDA
from .subspace import (SVD_SCRATCH, SVD_UNITS, add_scaled, compose, is_task_matrix, mean_task_vector,
                       orthogonalize, top_components, weighted_task_vectors)

WEIGHT = Param("weight", float, "model", default=1.0,
               doc="scales the model's task vector before merging (1 in the paper)")
RANK_FRACTION = Param("rank_fraction", float, "global", default=1.0,
                      check=lambda v: None if 0 < v <= 1 else f"must be in (0, 1], got {v}",
                      doc="fraction of each matrix's rank min(m, n) shared out among the T tasks: each "
                          "keeps its top ⌊rank_fraction·min(m, n)/T⌋ singular components")


@register(
    "tsv",
    params=(WEIGHT, LAMBDA, RANK_FRACTION),
    base="required",
    sectioned=True,
    paper="https://arxiv.org/abs/2412.00081",
    # the upcast base, the task-vector buffer, the stacked U and Vᵀ, and one SVD at a time
    workspace=lambda n: 5.0 + SVD_UNITS,
    scratch=lambda numel: SVD_SCRATCH,
)
def tsv(tensors: list[torch.Tensor], base: torch.Tensor, *, weight: list[float], lambda_: float = 1.0,
        rank_fraction: float = 1.0, section: str = "layer") -> torch.Tensor:
    """TSV-M: per layer matrix, each task's top singular components, stacked, whitened, summed.

    For a layer's task matrices τ_i = θ_i − θ_base (i = 1…T, scaled by ``weight``, 1 in the paper)
    with SVDs τ_i = U_i·Σ_i·V_iᵀ and k = ⌊rank_fraction·min(m, n)/T⌋ (1/T of the rank each by
    default)::

        Û = [U_1[:, :k] … U_T[:, :k]],  Σ̂ = diag(Σ_1[:k] … Σ_T[:k]),  V̂ = [V_1[:, :k] … V_T[:, :k]]
        Û⊥ = P_U·Q_Uᵀ  where Û = P_U·S_U·Q_Uᵀ          (the polar factor: orthonormal columns)
        V̂⊥ = P_V·Q_Vᵀ  where V̂ = P_V·S_V·Q_Vᵀ
        θ = θ_base + λ·Û⊥·Σ̂·V̂⊥ᵀ

    Embeddings, output heads and non-matrix tensors (norms, biases) are merged as
    θ_base + λ·(1/T)·Σ_i τ_i, as the paper's code does; so is a matrix too small to give every task
    a component (k = 0), which the paper's code would set to θ_base. Defaults are the paper's:
    λ = 1 (the official code can also pick λ on validation data; ``mergekit-lite search`` does
    that), rank_fraction = 1. One task gives θ_base + λ·τ (task arithmetic). Deviation:
    numerically zero singular components are dropped instead of carrying LAPACK's arbitrary basis
    vectors (see :mod:`mergekit_lite.methods.subspace`).
    """
    base32 = base.to(torch.float32)
    k = int(rank_fraction * min(base.shape) / len(tensors)) if base.dim() == 2 else 0
    if not is_task_matrix(base.shape, section) or k == 0:
        return add_scaled(base32, mean_task_vector(tensors, base32, weight), lambda_)
    m, n = base.shape
    width = k * len(tensors)
    u_cat = torch.zeros((m, width), dtype=torch.float32, device=base.device)
    s_cat = torch.zeros(width, dtype=torch.float32, device=base.device)
    vh_cat = torch.zeros((width, n), dtype=torch.float32, device=base.device)
    for i, tau in enumerate(weighted_task_vectors(tensors, base32, weight)):
        u, s, vh = top_components(tau, k)
        u_cat[:, i * k:(i + 1) * k] = u
        s_cat[i * k:(i + 1) * k] = s
        vh_cat[i * k:(i + 1) * k] = vh
        del u, s, vh
    u_cat = orthogonalize(u_cat)
    vh_cat = orthogonalize(vh_cat)
    return add_scaled(base32, compose(u_cat, s_cat, vh_cat), lambda_)
