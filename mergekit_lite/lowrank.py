"""Low-rank math on tensors: LoRA and IA3 folding, factor stacking, truncated SVD. Pure functions.

Every function takes tensors already on the compute device, computes in float32 and never reads
files or rounds for storage (the nodes in :mod:`mergekit_lite.adapter_nodes` decide dtypes).

Folding follows PEFT's ``merge_and_unload`` operation for operation, so a ``base+adapter`` input is
the model PEFT would produce: ΔW = (B @ A) · scaling in float32 (transposed for GPT-2 Conv1D weights
and embeddings), added to the base weight upcast to float32, the sum rounded once to the base's dtype.

Truncated SVD (:func:`truncated_svd`) picks between two algorithms and says which it used:

- a randomised range finder (Halko, Martinsson & Tropp 2011, https://arxiv.org/abs/0909.4061;
  2k + 8 columns, two power iterations), whose result is *used only when it is verified exact*: the
  residual ‖Δ − QQᵀΔ‖ is within float32 noise of zero, i.e. Δ has rank ≤ 2k + 8. That is the case of
  merged LoRA deltas (a sum of low-rank terms), where it is many times faster than a full SVD;
- otherwise the full thin SVD (``torch.linalg.svd``), whose truncation is the optimal rank-k
  approximation (Eckart-Young). A randomised SVD of a full-rank delta (a fine-tune's) is measurably
  less accurate at the same rank, so it is never used there.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

F32 = torch.float32
SMALL = 1 << 16  # entries below which the full SVD is used directly
EXACT = 3e-6  # residual (relative to ‖Δ‖) below which a range of rank q holds all of Δ


def lora_delta(a: torch.Tensor, b: torch.Tensor, scaling: float, transpose: bool) -> torch.Tensor:
    """ΔW = (B @ A) · scaling in float32, in the base weight's layout (transposed when `transpose`)."""
    delta = b.to(F32) @ a.to(F32)
    delta = delta.T if transpose else delta
    return delta.mul_(scaling)


def fold_lora(w: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scaling: float, transpose: bool,
              dtype: torch.dtype) -> torch.Tensor:
    """W + scaling · B @ A, summed in float32 and rounded once to `dtype` (PEFT's merge). The sum is
    formed in the delta's buffer (float addition commutes: the same bits as W + ΔW), except for a
    transposed delta, whose sum gets a buffer of its own so that the result is contiguous."""
    delta = lora_delta(a, b, scaling, transpose)
    if transpose:
        out = torch.empty(w.shape, dtype=F32, device=w.device)
        torch.add(w, delta, out=out)
        del delta
    else:
        out = delta.add_(w)
    return out if dtype == F32 else out.to(dtype)


def fold_workspace(a: tuple[int, ...], b: tuple[int, ...], shape: tuple[int, ...], transpose: bool) -> int:
    """Float32 bytes :func:`fold_lora` holds at once: the factors upcast, the delta, and (transposed)
    the separate sum."""
    n = shape[0] * shape[1]
    return 4 * (a[0] * a[1] + b[0] * b[1] + n * (2 if transpose else 1))


def ia3_scale(w: torch.Tensor, vector: torch.Tensor, transpose: bool, dtype: torch.dtype) -> torch.Tensor:
    """W scaled by an IA3 vector ([out, 1]: rows; [1, in]: columns; transposed when `transpose`);
    a bias (1-d) is scaled entry by entry. Computed in float32, rounded once to `dtype`."""
    scale = vector.to(F32)
    scale = scale.T if transpose else scale
    if w.dim() == 1:
        scale = scale.reshape(w.shape)
    out = torch.mul(w, scale)
    out = out if out.dtype == F32 else out.to(F32)
    return out if dtype == F32 else out.to(dtype)


def stack_factors(factors: list[tuple[torch.Tensor, torch.Tensor, float]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenation: from (Aᵢ, Bᵢ, cᵢ) the factors A = [c₁A₁; c₂A₂; ...] and B = [B₁ B₂ ...], so that
    B @ A = Σ cᵢ BᵢAᵢ exactly, at rank Σ rᵢ. The coefficient goes on A, as in PEFT's ``cat``."""
    a = torch.cat([f[0].to(F32) * f[2] for f in factors], dim=0)
    b = torch.cat([f[1].to(F32) for f in factors], dim=1)
    return a, b


@dataclass(frozen=True)
class Factors:
    """A rank-k factorisation B @ A of a matrix, with its relative Frobenius error."""

    a: torch.Tensor  # [k, n]
    b: torch.Tensor  # [m, k]
    rank: int
    error: float  # ‖Δ − B @ A‖ / ‖Δ‖
    norm: float  # ‖Δ‖
    algorithm: str  # "randomised (exact)" or "full"


def truncated_svd(delta: torch.Tensor, max_rank: int, max_error: float | None = None,
                  randomised: bool = True, seed: int = 0) -> Factors:
    """The best rank-k factors of `delta` (float32, [m, n]): k = `max_rank`, or with `max_error`
    the smallest k ≤ `max_rank` whose relative error is at most `max_error` (at least 1). The
    singular values are split evenly, A = √S·Vh and B = U·√S; signs are fixed so that the largest
    entry of every column of U is positive, so the result does not depend on the LAPACK build.
    `randomised`: try the randomised range first (used only when verified exact, see above)."""
    m, n = delta.shape
    kmax = max(1, min(max_rank, m, n))
    norm = float(torch.linalg.vector_norm(delta))
    if norm == 0.0:
        k = kmax if max_error is None else 1
        return Factors(delta.new_zeros(k, n), delta.new_zeros(m, k), k, 0.0, 0.0, "none (zero delta)")
    found = _randomised(delta, kmax, norm, seed) if randomised else None
    if found is None:
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
        residual, algorithm = 0.0, "full"
    else:
        u, s, vh, residual = found
        algorithm = "randomised (exact)"
    tails = _tail_errors(s, residual, norm)  # tails[k]: relative error keeping k values
    k = kmax
    if max_error is not None:
        k = next((i for i in range(1, kmax + 1) if tails[i] <= max_error), kmax)
    u, s, vh = u[:, :k], s[:k], vh[:k]
    flip = torch.sign(u.gather(0, u.abs().argmax(dim=0, keepdim=True)))
    flip[flip == 0] = 1
    root = s.sqrt()
    a = (vh * (root * flip.squeeze(0))[:, None]).contiguous()
    b = (u * (root[None, :] * flip)).contiguous()
    return Factors(a, b, k, tails[k], norm, algorithm)


def _tail_errors(s: torch.Tensor, residual: float, norm: float) -> list[float]:
    """Relative error of keeping the first k singular values, for k = 0 .. len(s)."""
    sq = (s.double() ** 2).tolist()
    tails = [0.0] * (len(sq) + 1)
    acc = residual ** 2
    for i in range(len(sq) - 1, -1, -1):
        tails[i + 1] = acc ** 0.5 / norm
        acc += sq[i]
    tails[0] = 1.0
    return tails


def _randomised(delta: torch.Tensor, k: int, norm: float, seed: int):
    """U, S, Vh and the residual from a randomised range of 2k + 8 columns, when that range holds
    all of `delta` (within float32 noise); None when it does not (or would not be smaller)."""
    m, n = delta.shape
    q = 2 * k + 8
    if q >= min(m, n) // 2 or m * n < SMALL:
        return None  # a full SVD is as fast
    g = torch.randn(n, q, generator=torch.Generator().manual_seed(seed)).to(delta.device)
    basis = torch.linalg.qr(delta @ g).Q
    del g
    for _ in range(2):
        basis = torch.linalg.qr(delta @ torch.linalg.qr(delta.T @ basis).Q).Q
    small = basis.T @ delta  # [q, n]
    rest = delta - basis @ small
    residual = float(torch.linalg.vector_norm(rest))
    del rest
    if residual > EXACT * norm:
        return None
    u_small, s, vh = torch.linalg.svd(small, full_matrices=False)
    return basis @ u_small, s, vh, residual


def svd_workspace(m: int, n: int, k: int) -> int:
    """Bytes of float32 temporaries :func:`truncated_svd` may hold at once on an [m, n] input: the
    full SVD's copy of the input, U, Vh and LAPACK's work arrays (or the randomised path's residual
    and range, which are smaller), and the factors."""
    s = min(m, n)
    return 4 * (2 * m * n + m * s + s * n + 5 * s * s + 8 * max(m, n) + 2 * k * (m + n))
