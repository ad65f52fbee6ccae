"""DARE: drop and rescale task-vector entries at random, then merge linearly or with TIES' sign
consensus.

Yu et al. 2023, "Language Models are Super Mario: Absorbing Abilities from Homologous Models as a
Free Lunch", https://arxiv.org/abs/2311.03099
"""

from __future__ import annotations

import math

from ..lazy import torch

from . import register
from .draws import Draws
from .gta import (DENSITY, INT8_MASK, LAMBDA, SIGN_ELECTION, WEIGHT, generalized_task_arithmetic, gta_workspace,
                  normalize_param, rescale_mode_param, rescale_param)
from .drops import KeptNorms, KeptPiece, dare_mask, drop_and_rescale, from_norms, whole_tensor_norms

PAPER = "https://arxiv.org/abs/2311.03099"


def l1_statistic(params: dict, shape: tuple[int, ...]) -> KeptNorms | None:
    """mergekit's L1 rescale needs ‖τ_i‖₁ and ‖τ̂_i‖₁ over the whole tensor before a piece is
    merged; the paper's 1/density needs nothing."""
    if not (params["rescale"] and params["rescale_mode"] == "l1"):
        return None
    density = params["density"]
    return KeptNorms(lambda i, tau, draws: dare_mask(tau, density[i], draws), params["draws"],
                     math.prod(shape))


def _dare(tensors, base, weight, density, draws, rescale, rescale_mode, consensus, normalize, lambda_, stats):
    params = {"density": density, "rescale": rescale, "rescale_mode": rescale_mode, "draws": draws}
    stats = stats if stats is not None else whole_tensor_norms(l1_statistic, params, tensors, base)
    return generalized_task_arithmetic(
        tensors, base, weight,
        sparsify=lambda i, tau: drop_and_rescale(tau, density[i], draws[i], rescale=rescale, mode=rescale_mode,
                                                 **from_norms(stats, i, tau.shape)),
        consensus=consensus, normalize=normalize, lambda_=lambda_)


@register(
    "dare_linear",
    params=(WEIGHT, DENSITY, LAMBDA, normalize_param(False), rescale_param(True), rescale_mode_param("density"),
            INT8_MASK),
    base="required",
    random=True,
    paper=PAPER,
    workspace=gta_workspace(sparsify=2.5),  # the CPU-drawn mask, the L1 rescale, the count vote (measured)
    separable=True,
    statistic=l1_statistic,
)
def dare_linear(tensors: list[torch.Tensor], base: torch.Tensor, *, weight: list[float], density: list[float],
                draws: list[Draws], lambda_: float = 1.0, normalize: bool = False,
                rescale: bool = True, rescale_mode: str = "density", int8_mask: bool = False,
                stats: KeptPiece | None = None) -> torch.Tensor:
    """DARE, merged by task arithmetic.

    τ_i = θ_i − θ_base;  m_i ~ Bernoulli(density_i) per entry;  τ̂_i = m_i ⊙ τ_i / density_i
    (the paper's rescale, so E[τ̂_i] = τ_i);  θ = θ_base + λ·Σ_i w_i·τ̂_i (/ Σ_i w_i with
    ``normalize: true``).

    ``rescale_mode: l1`` scales by ‖τ_i‖₁/‖m_i ⊙ τ_i‖₁ instead (mergekit's rule, equal to 1/density
    only in expectation; both norms are gathered over the whole tensor first); ``rescale: false``
    keeps survivors unscaled. Entry j of model i is kept when u_j < density_i, u_j its draw from a
    stream seeded by (plan seed, step, tensor name, model) and addressed by position
    (:mod:`.draws`): the mask does not depend on execution order, threads, row blocks or device.
    ``int8_mask`` has no effect.
    """
    return _dare(tensors, base, weight, density, draws, rescale, rescale_mode, None, normalize, lambda_, stats)


@register(
    "dare_ties",
    params=(WEIGHT, DENSITY, LAMBDA, normalize_param(False), rescale_param(True), rescale_mode_param("density"),
            SIGN_ELECTION, INT8_MASK),
    base="required",
    random=True,
    paper=PAPER,
    workspace=gta_workspace(sparsify=2.5),  # the CPU-drawn mask, the L1 rescale, the count vote (measured)
    separable=True,
    statistic=l1_statistic,
)
def dare_ties(tensors: list[torch.Tensor], base: torch.Tensor, *, weight: list[float], density: list[float],
              draws: list[Draws], lambda_: float = 1.0, normalize: bool = False,
              rescale: bool = True, rescale_mode: str = "density", sign_election: str = "sum",
              int8_mask: bool = False, stats: KeptPiece | None = None) -> torch.Tensor:
    """DARE, merged with TIES' sign election and disjoint merge.

    τ̂_i = m_i ⊙ τ_i / density_i with m_i ~ Bernoulli(density_i);  s = sign(Σ_i w_i·τ̂_i);
    A = {i : sign(w_i·τ̂_i) = s};  θ = θ_base + λ·Σ_{i∈A} w_i·τ̂_i  (/ Σ_{i∈A} w_i with
    ``normalize: true``; mergekit's default is false, and so is ours).

    Rescale options and seeding as in ``dare_linear``.
    """
    return _dare(tensors, base, weight, density, draws, rescale, rescale_mode, sign_election, normalize,
                 lambda_, stats)
