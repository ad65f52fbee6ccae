"""Iso-C and Iso-CTS: isotropic merging, a flat singular spectrum for each layer's merged task matrix.

Marczak et al. 2025, "No Task Left Behind: Isotropic Model Merging with Common and Task-Specific
Subspaces" (ICML 2025), https://arxiv.org/abs/2502.04959; official code:
https://github.com/danielm1405/iso-merging (``iso_c``, ``iso_cts``).
"""

from __future__ import annotations

from ..lazy import torch

from . import Param, in_unit_interval, register
from .gta import LAMBDA
from .subspace import (SVD_SCRATCH, SVD_UNITS, add_scaled, compose, is_task_matrix, isotropic, mean_task_vector,
                       orthogonalize, sum_task_vectors, top_components, weighted_task_vectors)
from .tsv import WEIGHT

COMMON_SPACE_FRACTION = Param("common_space_fraction", float, "global", default=0.8, check=in_unit_interval,
                              doc="share of each matrix's rank min(m, n) given to the common subspace; the "
                                  "rest is split equally among the tasks")


@register(
    "iso_c",
    params=(WEIGHT, LAMBDA),
    base="required",
    sectioned=True,
    paper="https://arxiv.org/abs/2502.04959",
    workspace=lambda n: 3.0 + SVD_UNITS,  # the upcast base, the buffer, the sum, its SVD
    scratch=lambda numel: SVD_SCRATCH,
)
def iso_c(tensors: list[torch.Tensor], base: torch.Tensor, *, weight: list[float], lambda_: float = 1.0,
          section: str = "layer") -> torch.Tensor:
    """Iso-C: the task-arithmetic sum with its singular values replaced by their mean.

    For a layer's task matrices τ_i = θ_i − θ_base (scaled by ``weight``, 1 in the paper)::

        Σ_i τ_i = U·diag(σ_1 … σ_r)·Vᵀ,   σ̄ = (1/r)·Σ_j σ_j
        θ = θ_base + λ·σ̄·U·Vᵀ

    Embeddings, output heads and non-matrix tensors are merged as θ_base + λ·(1/T)·Σ_i τ_i, as
    the paper's code does. λ defaults to 1 (FusionBench's default; the official code picks it on
    validation data from a grid up to 3, which ``mergekit-lite search`` does). Deviation: r counts
    only the numerically non-zero singular values (the official code also spreads σ̄ over LAPACK's
    arbitrary null-space vectors of a rank-deficient sum); identical at full rank.
    """
    base32 = base.to(torch.float32)
    if not is_task_matrix(base.shape, section):
        return add_scaled(base32, mean_task_vector(tensors, base32, weight), lambda_)
    total = sum_task_vectors(tensors, base32, weight)
    u, s, vh = top_components(total, min(base.shape))
    del total
    return add_scaled(base32, compose(u, isotropic(s), vh), lambda_)


def split_rank(rank: int, tasks: int, common_space_fraction: float) -> tuple[int, int]:
    """(c, k): c components of the common subspace and k per task, c + T·k = rank.

    The official rule: c = ⌊rank·fraction⌋, then k = round((rank − c)/T) (Python's rounding, half
    to even) and c = rank − T·k so that the task-specific part divides equally; k is capped at
    ⌊rank/T⌋ (FusionBench's fix: without it a small rank and fraction 0 give c < 0)."""
    c = int(rank * common_space_fraction)
    k = min(round((rank - c) / tasks), rank // tasks)
    return rank - tasks * k, k


@register(
    "iso_cts",
    params=(WEIGHT, LAMBDA, COMMON_SPACE_FRACTION),
    base="required",
    sectioned=True,
    paper="https://arxiv.org/abs/2502.04959",
    # the upcast base, the buffer, the common subspace (U_c, V_c), the stacked U and Vᵀ, the
    # projection's two temporaries, one SVD at a time, and a unit of margin
    workspace=lambda n: 9.0 + SVD_UNITS,
    scratch=lambda numel: SVD_SCRATCH,
)
def iso_cts(tensors: list[torch.Tensor], base: torch.Tensor, *, weight: list[float], lambda_: float = 1.0,
            common_space_fraction: float = 0.8, section: str = "layer") -> torch.Tensor:
    """Iso-CTS: the common subspace of the sum plus each task's own directions outside it, with a
    flat spectrum.

    For a layer's task matrices τ_i (scaled by ``weight``), rank r = min(m, n), and (c, k) from
    :func:`split_rank` (c ≈ common_space_fraction·r, c + T·k = r)::

        Σ_i τ_i ≈ U_c·Σ_c·V_cᵀ                       (its top c components: the common subspace)
        τ_i − U_c·U_cᵀ·τ_i ≈ U_i·Σ_i·V_iᵀ             (task i outside it, its top k components)
        Û = [U_1 … U_T U_c],  Σ̂ = diag(Σ_1 … Σ_T Σ_c),  V̂ = [V_1 … V_T V_c]
        θ = θ_base + λ·σ̄·Û⊥·V̂⊥ᵀ                      (⊥: polar factor; σ̄ the mean of Σ̂)

    Embeddings, heads and non-matrix tensors: θ_base + λ·(1/T)·Σ_i τ_i, as in the paper's code.
    Defaults: common_space_fraction 0.8 (the paper's), λ 1 (FusionBench's; the official code picks
    λ on validation data). One task gives the same as Iso-C. Deviation: numerically zero singular
    components are dropped (see :mod:`mergekit_lite.methods.subspace`); σ̄ averages the others.
    """
    base32 = base.to(torch.float32)
    if not is_task_matrix(base.shape, section):
        return add_scaled(base32, mean_task_vector(tensors, base32, weight), lambda_)
    c, k = split_rank(min(base.shape), len(tensors), common_space_fraction)
    total = sum_task_vectors(tensors, base32, weight)
    u_c, s_c, vh_c = top_components(total, c)
    del total
    width = k * len(tensors)
    u_cat = torch.cat([torch.zeros((base.shape[0], width), device=base.device), u_c], dim=1)
    s_cat = torch.cat([torch.zeros(width, device=base.device), s_c])
    vh_cat = torch.cat([torch.zeros((width, base.shape[1]), device=base.device), vh_c])
    for i, tau in enumerate(weighted_task_vectors(tensors, base32, weight) if k else ()):
        scale = float(torch.linalg.matrix_norm(tau))  # ≥ σ_1(τ_i): the scale of the projection's rounding
        tau.sub_(u_c @ (u_c.T @ tau))
        u, s, vh = top_components(tau, k, scale)
        u_cat[:, i * k:(i + 1) * k] = u
        s_cat[i * k:(i + 1) * k] = s
        vh_cat[i * k:(i + 1) * k] = vh
        del u, s, vh
    del u_c, vh_c
    u_cat = orthogonalize(u_cat)
    vh_cat = orthogonalize(vh_cat)
    return add_scaled(base32, compose(u_cat, isotropic(s_cat), vh_cat), lambda_)
