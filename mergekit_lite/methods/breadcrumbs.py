"""Model Breadcrumbs: drop both the largest-magnitude outliers and the small tail of each task
vector, then merge linearly or with TIES' sign consensus.

Davari & Belilovsky 2023, "Model Breadcrumbs: Scaling Multi-Task Model Merging with Sparse
Masks", https://arxiv.org/abs/2312.06795
"""

from __future__ import annotations

from ..lazy import torch

from . import register
from .gta import (DENSITY, GAMMA, INT8_MASK, LAMBDA, SIGN_ELECTION, WEIGHT, generalized_task_arithmetic,
                  gta_workspace, normalize_param, rescale_mode_param, rescale_param)
from .sparsify import trim_outliers

PAPER = "https://arxiv.org/abs/2312.06795"


def _breadcrumbs(tensors, base, weight, density, gamma, rescale, rescale_mode, consensus, normalize, lambda_):
    return generalized_task_arithmetic(
        tensors, base, weight,
        sparsify=lambda i, tau: trim_outliers(tau, density[i], gamma[i], rescale=rescale, mode=rescale_mode),
        consensus=consensus, normalize=normalize, lambda_=lambda_)


@register(
    "breadcrumbs",
    params=(WEIGHT, DENSITY, GAMMA, LAMBDA, normalize_param(False), rescale_param(False), rescale_mode_param("l1"),
            INT8_MASK),
    base="required",
    paper=PAPER,
    workspace=gta_workspace(),
)
def breadcrumbs(tensors: list[torch.Tensor], base: torch.Tensor, *, weight: list[float], density: list[float],
                gamma: list[float], lambda_: float = 1.0, normalize: bool = False, rescale: bool = False,
                rescale_mode: str = "l1", int8_mask: bool = False) -> torch.Tensor:
    """Model Breadcrumbs, merged by task arithmetic.

    For τ_i = θ_i − θ_base with n entries ranked by |τ_i| ascending (ties by position): keep ranks
    [n_bot, n_bot + k) with k = max(1, ⌊density_i·n⌋), n_bot = max(0, n − k − ⌊gamma_i·n⌋):
    the ⌊gamma·n⌋ largest entries (outliers) and the small tail are dropped. When outliers and
    density overlap, fewer outliers are dropped so that k entries remain; at density 1 nothing
    is dropped (mergekit's rules). θ = θ_base + λ·Σ_i w_i·τ̂_i (/ Σ_i w_i with ``normalize``).

    Unlike mergekit 0.1.4 (which zeroed the whole task vector at gamma = 0 or below 100 entries)
    and 0.1.5 (which zeroes tensors where ⌊density·n⌋ = 0), gamma = 0 is a plain top-k trim and a
    tiny tensor keeps at least its largest entry. Defaults: density 1, gamma 0.01, normalize false.
    """
    return _breadcrumbs(tensors, base, weight, density, gamma, rescale, rescale_mode, None, normalize, lambda_)


@register(
    "breadcrumbs_ties",
    params=(WEIGHT, DENSITY, GAMMA, LAMBDA, normalize_param(False), rescale_param(False), rescale_mode_param("l1"),
            SIGN_ELECTION, INT8_MASK),
    base="required",
    paper=PAPER,
    workspace=gta_workspace(),
)
def breadcrumbs_ties(tensors: list[torch.Tensor], base: torch.Tensor, *, weight: list[float],
                     density: list[float], gamma: list[float], lambda_: float = 1.0, normalize: bool = False,
                     rescale: bool = False, rescale_mode: str = "l1", sign_election: str = "sum",
                     int8_mask: bool = False) -> torch.Tensor:
    """Model Breadcrumbs masks (see ``breadcrumbs``), merged with TIES' sign election and disjoint
    merge: s = sign(Σ_i w_i·τ̂_i), θ = θ_base + λ·Σ_{i: sign(w_i τ̂_i)=s} w_i·τ̂_i
    (/ Σ of the agreeing w_i with ``normalize``; mergekit's default is false).
    """
    return _breadcrumbs(tensors, base, weight, density, gamma, rescale, rescale_mode, sign_election, normalize,
                        lambda_)
