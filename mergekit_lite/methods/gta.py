"""Generalized task arithmetic: the shared skeleton of task_arithmetic, TIES, DARE, Model
Breadcrumbs and DELLA, and its named steps.

For task vectors τ_i = θ_i − θ_base with weights w_i::

    τ̂_i  = sparsify(τ_i)                      (trim, drop_and_rescale, ... ; identity when absent)
    s     = elect_sign(w_i·τ̂_i)                (only with sign consensus)
    Δ     = disjoint_merge(w_i·τ̂_i, w_i, s)   (Σ over the models agreeing with s, / Σ agreeing w_i)
            or Σ w_i·τ̂_i (/ Σ w_i)           (without consensus)
    θ     = θ_base + λ·Δ

The steps take *iterables* so a method can stream: the models' task vectors are formed one at a
time in a reused float32 buffer, and a second pass re-forms them (re-applying the masks kept from
the first pass) instead of holding every sparsified task vector at once. Values yielded by such
an iterable are only valid until the next one is drawn.
"""

from __future__ import annotations

from typing import Callable, Iterable, Iterator

from ..lazy import torch

from . import Param, density_check, non_negative
from .sparsify import RESCALE_MODES, Kept

CONSENSUS = ("sum", "count")


def task_vector(tensor: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """τ = θ − θ_base, in float32."""
    return tensor.to(torch.float32) - base.to(torch.float32)


def task_vector_into(out: torch.Tensor, tensor: torch.Tensor, base32: torch.Tensor) -> torch.Tensor:
    """τ = θ − θ_base written into the float32 buffer `out`; a non-float32 input is converted
    into `out` first (a mixed-dtype subtraction would allocate a float32 copy of it)."""
    if tensor.dtype == torch.float32:
        return torch.sub(tensor, base32, out=out)
    return out.copy_(tensor).sub_(base32)


def sum_of_weights(weights: list[float]) -> float:
    """Σ w_i, with mergekit's guard: a sum within 1e-8 of zero counts as 1 (no normalization)."""
    total = float(sum(weights))
    return 1.0 if abs(total) < 1e-8 else total


def elect_sign(votes: Iterable[torch.Tensor], method: str = "sum") -> torch.Tensor:
    """TIES "elect": the sign each parameter takes, as a bool tensor (True: +, False: −).

    ``method="sum"`` (the paper, mergekit): sign(Σ_i w_i·τ̂_i); ``method="count"`` (PEFT's
    "frequency"): sign(Σ_i sign(w_i·τ̂_i)), one vote per model. A tie (0) elects +.
    `votes` yields the weighted task vectors w_i·τ̂_i.
    """
    total = None
    for v in votes:
        contribution = v if method == "sum" else torch.sign(v)
        if total is None:
            total = contribution.clone() if contribution is v else contribution
        else:
            total.add_(contribution)
    if total is None:
        raise ValueError("elect_sign needs at least one task vector")
    return total.ge_(0).to(torch.bool)


def agrees(weighted: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
    """Bool: the entry is non-zero and has the elected sign."""
    return torch.where(positive, weighted > 0, weighted < 0)


def disjoint_merge(weighted: Iterable[tuple[torch.Tensor, float]], positive: torch.Tensor, *,
                   normalize: bool = True, min_divisor: float | None = None, scratch: bool = False) -> torch.Tensor:
    """TIES "disjoint merge": Σ_i w_i·τ̂_i over the models whose entry agrees with the elected sign,
    divided (``normalize``) by Σ w_i over those same models.

    `weighted` yields (w_i·τ̂_i, w_i). Where no model agrees the sum is 0 and the divisor counts as
    1; with ``min_divisor`` the divisor is clamped from below instead (SCE's rule). With
    ``scratch`` the yielded tensors are buffers this step may overwrite (saves one temporary).
    """
    mixed = divisor = None
    for wd, w in weighted:
        agree = agrees(wd, positive)
        if mixed is None:
            mixed = torch.zeros_like(wd)
            divisor = torch.zeros_like(wd) if normalize else None
        mixed.add_(wd.mul_(agree) if scratch else wd * agree)
        if normalize:
            divisor.add_(agree, alpha=w)
        del agree
    if mixed is None:
        raise ValueError("disjoint_merge needs at least one task vector")
    if normalize:
        if min_divisor is None:
            divisor.masked_fill_(divisor == 0, 1.0)
        else:
            divisor.clamp_(min=min_divisor)
        mixed.div_(divisor)
    return mixed


Sparsifier = Callable[[int, "torch.Tensor"], "Kept | None"]


def generalized_task_arithmetic(tensors: list[torch.Tensor], base: torch.Tensor, weight: list[float], *,
                                sparsify: Sparsifier | None = None, consensus: str | None = None,
                                normalize: bool = False, lambda_: float = 1.0) -> torch.Tensor:
    """θ_base + λ·merge(w_i·sparsify(θ_i − θ_base)); see the module docstring.

    ``sparsify(i, τ_i)`` returns the :class:`Kept` entries of model i's task vector (None: all);
    it is called once per model, in model order (random sparsifiers draw from model i's
    generator). ``consensus`` is None (plain weighted sum, divided by Σ w_i when ``normalize``,
    with mergekit's guard for Σ w ≈ 0), ``"sum"`` or ``"count"`` (sign election, then disjoint
    merge dividing by the agreeing weights when ``normalize``). Inputs are read, never modified.
    """
    base32 = base.to(torch.float32)
    buf = torch.empty_like(base32)
    kept: list[Kept | None] = [None] * len(tensors)
    first_pass = [True]

    def weighted() -> Iterator[tuple[torch.Tensor, float]]:
        """w_i·τ̂_i for each model, formed in `buf`; sparsified on the first pass only."""
        for i, (tensor, w) in enumerate(zip(tensors, weight)):
            task_vector_into(buf, tensor, base32)
            if first_pass[0] and sparsify is not None:
                kept[i] = sparsify(i, buf)
            if kept[i] is not None:
                kept[i].apply_(buf)
            buf.mul_(w)
            yield buf, w
        first_pass[0] = False

    if consensus is None:
        mixed = torch.zeros_like(base32)
        for wd, _ in weighted():
            mixed.add_(wd)
        if normalize:
            mixed.div_(sum_of_weights(weight))
    else:
        positive = elect_sign((wd for wd, _ in weighted()), consensus)
        mixed = disjoint_merge(weighted(), positive, normalize=normalize, scratch=True)
        del positive
    del buf, kept
    if lambda_ != 1.0:
        mixed.mul_(lambda_)
    return mixed.add_(base32)


# Parameters shared by the family, with mergekit's names and defaults ----------------------------

def rescale_mode_check(value: str) -> str | None:
    return None if value in RESCALE_MODES else f"expected one of {', '.join(RESCALE_MODES)}, got {value!r}"


WEIGHT = Param("weight", float, "model", doc="the task vector's coefficient; negative subtracts the task")
DENSITY = Param("density", float, "model", default=1.0, check=density_check,
                doc="fraction of the task vector's entries kept, in (0, 1]")
LAMBDA = Param("lambda", float, "global", default=1.0, doc="scale of the merged task vector")
INT8_MASK = Param("int8_mask", bool, "global", default=False,
                  doc="accepted for mergekit compatibility (a memory option there); no effect")
SIGN_ELECTION = Param("sign_election", str, "global", default="sum", choices=CONSENSUS,
                      doc="sum: sign of Σ w·τ̂ (TIES paper, mergekit); count: majority of the signs (PEFT)")
GAMMA = Param("gamma", float, "model", default=0.01, check=lambda v: None if 0 <= v < 1 else
              f"gamma is the fraction of largest entries dropped: it must be in [0, 1), got {v}",
              doc="fraction of the largest-magnitude entries dropped as outliers")
EPSILON = Param("epsilon", float, "model", default=0.15, check=non_negative,
                doc="half-width of the keep probabilities around density")


def normalize_param(default: bool) -> Param:
    return Param("normalize", bool, "global", default=default,
                 doc="divide by the sum of the (agreeing) weights")


def rescale_param(default: bool) -> Param:
    return Param("rescale", bool, "global", default=default, doc="rescale the surviving entries")


def rescale_mode_param(default: str) -> Param:
    return Param("rescale_mode", str, "global", default=default, choices=RESCALE_MODES,
                 doc="density: divide survivors by their keep probability (1/density; DELLA: 1/p_i); "
                     "l1: scale by ‖τ‖₁/‖τ̂‖₁ (mergekit)")


def gta_workspace(extra_per_model: float = 0.25, sparsify: float = 3.5) -> Callable[[int], float]:
    """Float32 temporaries of :func:`generalized_task_arithmetic`, in output-sized units: the
    upcast base, the task-vector buffer, the vote or the running sum, the divisor, the sparsifier's
    own scratch and one kept mask (or scale) per model."""
    return lambda n: 4.0 + sparsify + extra_per_model * max(0, n - 1)
