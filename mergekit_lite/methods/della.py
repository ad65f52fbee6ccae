"""DELLA: drop task-vector entries with probabilities ranked by magnitude (MagPrune), rescale,
then merge with TIES' sign consensus (della) or linearly (della_linear).

Deep et al. 2024, "DELLA-Merging: Reducing Interference in Model Merging through Magnitude-Based
Sampling", https://arxiv.org/abs/2406.11617
"""

from __future__ import annotations

import math

from ..lazy import torch

from . import register
from .gta import (DENSITY, EPSILON, INT8_MASK, LAMBDA, SIGN_ELECTION, WEIGHT, generalized_task_arithmetic,
                  gta_workspace, normalize_param, rescale_mode_param, rescale_param)
from .draws import Draws
from .drops import KeptNorms, KeptPiece, della_mask, from_norms, magprune, whole_tensor_norms

PAPER = "https://arxiv.org/abs/2406.11617"


def _check(params: dict) -> str | None:
    for d, e in zip(params["density"], params["epsilon"]):
        if d < 1 and (d - e < 0 or d + e > 1):
            return (f"DELLA keeps entries with probabilities density ± epsilon, which must lie in [0, 1]: "
                    f"density {d} with epsilon {e} gives [{d - e:g}, {d + e:g}]; lower epsilon")
    return None


def l1_statistic(params: dict, shape: tuple[int, ...]) -> KeptNorms | None:
    """mergekit's L1 rescale (the default) needs ‖τ_i‖₁ and ‖τ̂_i‖₁ over the whole tensor before a
    piece is merged; the paper's per-entry 1/p_j needs nothing."""
    if not (params["rescale"] and params["rescale_mode"] == "l1"):
        return None
    density, epsilon = params["density"], params["epsilon"]
    return KeptNorms(lambda i, tau, draws: della_mask(tau, density[i], epsilon[i], draws), params["draws"],
                     math.prod(shape))


def _della(tensors, base, weight, density, epsilon, draws, rescale, rescale_mode, consensus, normalize,
           lambda_, stats):
    params = {"density": density, "epsilon": epsilon, "rescale": rescale, "rescale_mode": rescale_mode,
              "draws": draws}
    stats = stats if stats is not None else whole_tensor_norms(l1_statistic, params, tensors, base)
    return generalized_task_arithmetic(
        tensors, base, weight,
        sparsify=lambda i, tau: magprune(tau, density[i], epsilon[i], draws[i], rescale=rescale, mode=rescale_mode,
                                         **from_norms(stats, i, tau.shape)),
        consensus=consensus, normalize=normalize, lambda_=lambda_)


# MagPrune ranks a block of rows at a time (int64 indices and ranks) and keeps a per-model mask or
# per-entry scale alive until the second pass.
_WORKSPACE = gta_workspace(extra_per_model=2.0, sparsify=5.5)  # measured: tests/test_memory_ledger.py


@register(
    "della",
    params=(WEIGHT, DENSITY, EPSILON, LAMBDA, normalize_param(True), rescale_param(True), rescale_mode_param("l1"),
            SIGN_ELECTION, INT8_MASK),
    base="required",
    random=True,
    paper=PAPER,
    checks=_check,
    workspace=_WORKSPACE,
    separable="rows",  # MagPrune ranks within rows; pieces are whole rows
    statistic=l1_statistic,
)
def della(tensors: list[torch.Tensor], base: torch.Tensor, *, weight: list[float], density: list[float],
          epsilon: list[float], draws: list[Draws], lambda_: float = 1.0, normalize: bool = True,
          rescale: bool = True, rescale_mode: str = "l1", sign_election: str = "sum",
          int8_mask: bool = False, stats: KeptPiece | None = None) -> torch.Tensor:
    """DELLA: MagPrune, then TIES' sign election and disjoint merge.

    MagPrune, per row of τ_i = θ_i − θ_base (a 1-D tensor is one row of m entries): rank the
    entries by |τ| (r = 0 … m−1, ties by position); keep entry j with probability
    p_j = density − ε + 2ε·r_j/(m−1) (mean density); survivors are rescaled (``rescale``, default
    true). Then s = sign(Σ_i w_i·τ̂_i), θ = θ_base + λ·Σ_{i∈A} w_i·τ̂_i / Σ_{i∈A} w_i
    (``normalize``, default true).

    Decision on the rescale: the default, ``rescale_mode: l1``, scales survivors by ‖τ‖₁/‖τ̂‖₁ as
    mergekit does, so merged models match mergekit's statistically (the paper's per-entry
    1/p_j gives a merged delta about 5% smaller in norm at density 0.5, ε 0.15).
    ``rescale_mode: density`` is the paper's rule: each survivor divided by its own p_j, so
    E[τ̂] = τ. density ± ε must lie in [0, 1] (checked before any tensor is read). Entry j is kept
    when u_j < p_j, u_j its draw from a stream seeded per (plan seed, step, tensor, model) and
    addressed by position (:mod:`.draws`), so rows merge in any pieces with the same bits.
    """
    return _della(tensors, base, weight, density, epsilon, draws, rescale, rescale_mode, sign_election,
                  normalize, lambda_, stats)


@register(
    "della_linear",
    params=(WEIGHT, DENSITY, EPSILON, LAMBDA, normalize_param(False), rescale_param(True),
            rescale_mode_param("l1"), INT8_MASK),
    base="required",
    random=True,
    paper=PAPER,
    checks=_check,
    workspace=_WORKSPACE,
    separable="rows",  # MagPrune ranks within rows; pieces are whole rows
    statistic=l1_statistic,
)
def della_linear(tensors: list[torch.Tensor], base: torch.Tensor, *, weight: list[float], density: list[float],
                 epsilon: list[float], draws: list[Draws], lambda_: float = 1.0,
                 normalize: bool = False, rescale: bool = True, rescale_mode: str = "l1",
                 int8_mask: bool = False, stats: KeptPiece | None = None) -> torch.Tensor:
    """DELLA's MagPrune (see ``della``), merged by task arithmetic:
    θ = θ_base + λ·Σ_i w_i·τ̂_i (/ Σ_i w_i with ``normalize``; default false, as in mergekit).
    """
    return _della(tensors, base, weight, density, epsilon, draws, rescale, rescale_mode, None, normalize,
                  lambda_, stats)


