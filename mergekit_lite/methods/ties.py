"""TIES-Merging: trim, elect sign, disjoint merge.

Yadav et al. 2023, "TIES-Merging: Resolving Interference When Merging Models",
https://arxiv.org/abs/2306.01708
"""

from __future__ import annotations

from ..lazy import torch

from . import Param, register
from .gta import (DENSITY, INT8_MASK, LAMBDA, SIGN_ELECTION, WEIGHT, generalized_task_arithmetic, gta_workspace,
                  normalize_param, rescale_mode_param, rescale_param)
from .ranks import ModelTrim, TensorTrim
from .select import CUT_BYTES
from .sparsify import trim_window
from .stats import gather

TRIM_SCOPE = Param("trim_scope", str, "global", default="tensor", choices=("tensor", "model"),
                   doc="tensor: top-k of each tensor's task vector (mergekit); model: of the whole task vector "
                       "(the paper's code, two extra reads of the inputs)")


def _scope_check(params: dict) -> str | None:
    if params["trim_scope"] == "model" and params["rescale"] and params["rescale_mode"] == "l1":
        return ("trim_scope: model rescales by 1/density only; set rescale_mode: density (or rescale: false) "
                "with it")
    return None


def trim_statistic(params: dict, shape: tuple[int, ...]) -> TensorTrim | ModelTrim:
    """The trim of every task vector of one tensor, gathered before the tensor is merged in pieces."""
    n = 1
    for d in shape:
        n *= d
    density = params["density"]
    if params.get("trim_scope") == "model":
        return ModelTrim(n, density, params["rescale"])
    mode = params["rescale_mode"] if params["rescale"] else None
    return TensorTrim([trim_window(n, d) for d in density], n, mode, density)


@register(
    "ties",
    params=(WEIGHT, DENSITY, LAMBDA, normalize_param(True), rescale_param(False), rescale_mode_param("l1"),
            SIGN_ELECTION, TRIM_SCOPE, INT8_MASK),
    base="required",
    paper="https://arxiv.org/abs/2306.01708",
    checks=_scope_check,
    workspace=gta_workspace(),
    scratch=lambda numel: CUT_BYTES,  # one model's cut is found at a time
    separable=True,
    statistic=trim_statistic,
)
def ties(tensors: list[torch.Tensor], base: torch.Tensor, *, weight: list[float], density: list[float],
         lambda_: float = 1.0, normalize: bool = True, rescale: bool = False, rescale_mode: str = "l1",
         sign_election: str = "sum", trim_scope: str = "tensor", int8_mask: bool = False,
         stats=None) -> torch.Tensor:
    """TIES: per model, keep the top-k magnitudes of its task vector; elect a sign per parameter;
    average the agreeing entries.

    τ_i = θ_i − θ_base;  τ̂_i = trim(τ_i): the k_i = max(1, ⌊density_i·n⌋) largest |τ_i| (ties by
    position); s = sign(Σ_i w_i·τ̂_i) (0 counts as +; ``sign_election: count`` uses
    sign(Σ_i sign(w_i·τ̂_i)) instead, PEFT's variant); A = {i : sign(w_i·τ̂_i) = s};
    θ = θ_base + λ · Σ_{i∈A} w_i·τ̂_i / Σ_{i∈A} w_i   (``normalize: true``, the default; without it
    no division). Where no model agrees the entry keeps θ_base.

    ``trim_scope: model`` trims as the paper's code does: over the whole task vector (every
    tensor of the step as one vector of N entries), keeping |τ_i| ≥ the (N − ⌊density_i·N⌋)-th
    smallest |τ_i| (ties at that value survive). It needs one density per model for the whole
    model, and rescales by 1/density only; the engine reads the inputs twice more to find the
    thresholds. Called on one tensor alone, the tensor is the model.

    Defaults are mergekit's: density 1 (no trim), normalize true, lambda 1, rescale false (with
    ``rescale: true`` survivors are scaled by ‖τ‖₁/‖τ̂‖₁, or by 1/density with
    ``rescale_mode: density``). The paper's unweighted disjoint mean is weights of 1.
    ``int8_mask`` is accepted for compatibility and has no effect.
    """
    if stats is None:
        params = {"density": density, "rescale": rescale, "rescale_mode": rescale_mode, "trim_scope": trim_scope}
        stats = gather(trim_statistic(params, tuple(base.shape)), tensors, base).at(0)
    return generalized_task_arithmetic(tensors, base, weight, sparsify=lambda i, tau: stats.kept(i, tau),
                                       consensus=sign_election, normalize=normalize, lambda_=lambda_)
