"""Arcee Fusion: take the fine-tune's change only where it matters, judged by an importance score
and an outlier threshold computed per tensor.

Arcee AI 2025, "Meet MergeKit v0.1: Arcee Fusion, expanded model support, multi-GPU acceleration",
https://www.arcee.ai/blog/meet-mergekit-v0-1-arcee-fusion-expanded-model-support-multi-gpu-acceleration;
the reference implementation is mergekit 0.1.5's ``merge_methods/arcee_fusion.py`` (no paper yet).
"""

from __future__ import annotations

from ..lazy import torch

from . import register

EPS = 1e-8  # added to both softmax distributions before the KL divergence (mergekit's value)


def quantile(values: torch.Tensor, q: float) -> torch.Tensor:
    """The q-quantile of `values` by the "lower" rule: the ⌊q·(n−1)⌋-th smallest entry (0-based),
    as a 0-d tensor. Exact for every size (a selection, not a sort)."""
    flat = values.reshape(-1)
    k = int(q * (flat.numel() - 1))  # exact for q in {1/4, 1/2, 3/4}
    return torch.kthvalue(flat, k + 1).values


def fusion_threshold(importance: torch.Tensor) -> torch.Tensor:
    """Tukey's upper fence on the importance scores: median + 1.5·(Q3 − Q1)."""
    q1, median, q3 = (quantile(importance, q) for q in (0.25, 0.5, 0.75))
    return median + 1.5 * (q3 - q1)


def importance_scores(tuned: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """|θ₁ − θ_base| · KL(softmax(θ₁) ‖ softmax(θ_base)), the KL taken per row (over the last dim)."""
    p = torch.softmax(tuned, dim=-1).add_(EPS)
    q = torch.softmax(base, dim=-1).add_(EPS)
    kl = torch.div(p, q).log_().mul_(p).sum(dim=-1, keepdim=True)
    del p, q
    return torch.sub(tuned, base).abs_().mul_(kl)


@register(
    "arcee_fusion",
    base="required",
    min_models=1,
    max_models=1,
    paper="https://www.arcee.ai/blog/meet-mergekit-v0-1-arcee-fusion-expanded-model-support-multi-gpu-acceleration",
    workspace=lambda n: 6.0,  # ~4 measured, plus the per-row KL (a full unit when rows have 1 entry)
)
def arcee_fusion(tensors: list[torch.Tensor], base: torch.Tensor) -> torch.Tensor:
    """θ = θ_base + (θ₁ − θ_base)·[s ≥ median(s) + 1.5·IQR(s)], s = |θ₁ − θ_base|·KL_row.

    The importance s of an entry is how far the fine-tune moved it times how much its row's
    softmax distribution changed (KL(softmax θ₁ ‖ softmax θ_base) + 1e-8 smoothing, one value per
    row over the last dim; a 1-D tensor is one row). Only entries above the upper outlier fence of s
    take the fine-tune's value; the rest keep the base's. Quantiles are the "lower" order
    statistics ⌊q·(n−1)⌋, as in mergekit, but always over the whole tensor: mergekit estimates them
    from a random sample of 10⁶ entries on tensors larger than that, so its mask there changes with
    the global random state, while this one is exact and deterministic.
    """
    base32 = base.to(torch.float32)
    tuned = tensors[0].to(torch.float32)
    if base32.numel() == 0:
        return base32.clone()
    importance = importance_scores(tuned, base32)
    keep = importance >= fusion_threshold(importance)
    del importance
    return torch.sub(tuned, base32).mul_(keep).add_(base32)
