"""TSV-Merge, Iso-C and Iso-CTS against independent NumPy (float64) implementations.

The references take other routes than the methods: singular vectors from the eigendecomposition of
X·Xᵀ instead of an SVD, polar factors as X·(XᵀX)^(-1/2) on X's range, Iso-C as the nuclear norm
over the rank times the polar factor of the sum. A second set transcribes the papers' official code
literally (zero-padded stacks, SVD-based whitening): at full rank both must agree with ours.
Edge cases: rank-deficient task matrices, one task (TSV is then task arithmetic; Iso-CTS is Iso-C),
two identical tasks, embeddings/heads/vectors (the mean of the task vectors).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from mergekit_lite import methods
from mergekit_lite.methods.iso import split_rank

from conftest import REPO, load_dir

TSV, ISO_C, ISO_CTS = (methods.get(n).fn for n in ("tsv", "iso_c", "iso_cts"))
REL = 1e-9  # float64 references: singular values below REL·scale are zero


# -- independent float64 references ------------------------------------------------------------

def np_components(x, k, scale=None):
    """Top-k singular triplets of x from eigh(x·xᵀ); numerically zero ones dropped (zeroed)."""
    lam, vecs = np.linalg.eigh(x @ x.T)
    order = np.argsort(lam)[::-1]
    lam, vecs = np.clip(lam[order], 0, None), vecs[:, order]
    s = np.sqrt(lam)
    scale = s[0] if scale is None else scale
    keep = s > REL * max(scale, 1e-300) * 1e3  # eigh's σ of a zero direction is ~sqrt(ε)·σ₁
    u = vecs[:, :k] * keep[:k]
    s_k = s[:k] * keep[:k]
    vh = np.where(keep[:k, None], (x.T @ vecs[:, :k]).T / np.where(s_k > 0, s_k, 1)[:, None], 0)
    return u, s_k, vh


def np_polar(x):
    """x·(xᵀx)^(-1/2) restricted to x's range (the partial isometry)."""
    tall = x.shape[0] >= x.shape[1]
    g = x.T @ x if tall else x @ x.T
    lam, q = np.linalg.eigh(g)
    inv = np.where(lam > (REL * 1e3) ** 2 * lam.max(), 1 / np.sqrt(np.clip(lam, 1e-300, None)), 0)
    root = (q * inv) @ q.T
    return x @ root if tall else root @ x


def np_taus(models, base, weight=None):
    weight = weight or [1.0] * len(models)
    return [w * (m - base) for m, w in zip(models, weight)]


def np_tsv(models, base, lam=1.0, fraction=1.0):
    taus = np_taus(models, base)
    k = int(fraction * min(base.shape) / len(taus))
    parts = [np_components(t, k) for t in taus]
    u = np.concatenate([p[0] for p in parts], axis=1)
    s = np.concatenate([p[1] for p in parts])
    vh = np.concatenate([p[2] for p in parts], axis=0)
    return base + lam * (np_polar(u) * s) @ np_polar(vh)


def np_iso_c(models, base, lam=1.0):
    total = sum(np_taus(models, base))
    s = np_components(total, min(total.shape))[1]
    nonzero = s[s > 0]
    return base + lam * nonzero.mean() * np_polar(total)


def np_iso_cts(models, base, lam=1.0, fraction=0.8):
    taus = np_taus(models, base)
    c, k = split_rank(min(base.shape), len(taus), fraction)
    u_c, s_c, vh_c = np_components(sum(taus), c)
    parts = [np_components(t - u_c @ (u_c.T @ t), k, scale=np.linalg.norm(t)) for t in taus] if k else []
    u = np.concatenate([p[0] for p in parts] + [u_c], axis=1)
    s = np.concatenate([p[1] for p in parts] + [s_c])
    vh = np.concatenate([p[2] for p in parts] + [vh_c], axis=0)
    return base + lam * s[s > 0].mean() * np_polar(u) @ np_polar(vh)


# -- the papers' official code, transcribed (full rank only: it keeps LAPACK's null vectors) -------

def official_tsv(models, base, alpha=1.0):
    taus = np_taus(models, base)
    r, T = min(base.shape), len(taus)
    k = int(r * (1 / T))
    sum_u, sum_s, sum_v = np.zeros((base.shape[0], r)), np.zeros(r), np.zeros((r, base.shape[1]))
    for i, t in enumerate(taus):
        u, s, v = np.linalg.svd(t, full_matrices=False)
        sum_u[:, i * k:(i + 1) * k], sum_s[i * k:(i + 1) * k], sum_v[i * k:(i + 1) * k] = u[:, :k], s[:k], v[:k]
    u_u, _, v_u = np.linalg.svd(sum_u, full_matrices=False)
    u_v, _, v_v = np.linalg.svd(sum_v, full_matrices=False)
    return base + alpha * np.linalg.multi_dot((u_u, v_u, np.diag(sum_s), u_v, v_v))


def official_iso_c(models, base, alpha=1.0):
    u, s, v = np.linalg.svd(sum(np_taus(models, base)), full_matrices=False)
    return base + alpha * (u * s.mean()) @ v


def official_iso_cts(models, base, alpha=1.0, fraction=0.8):
    taus = np_taus(models, base)
    r, T = min(base.shape), len(taus)
    c = int(r * fraction)
    c = r - round((r - c) / T) * T
    u, s, v = np.linalg.svd(sum(taus), full_matrices=False)
    cu, cs, cv = u[:, :c], s[:c], v[:c]
    n = int((r - c) / T)
    U, S, V = np.zeros((base.shape[0], r)), np.zeros(r), np.zeros((r, base.shape[1]))
    for i, t in enumerate(taus):
        ut, st, vt = np.linalg.svd(t - cu @ cu.T @ t, full_matrices=False)
        U[:, i * n:(i + 1) * n], S[i * n:(i + 1) * n], V[i * n:(i + 1) * n] = ut[:, :n], st[:n], vt[:n]
    U[:, T * n:T * n + c], S[T * n:T * n + c], V[T * n:T * n + c] = cu, cs, cv
    a, _, b = np.linalg.svd(U, full_matrices=False)
    d, _, e = np.linalg.svd(V, full_matrices=False)
    return base + alpha * (a @ b * S.mean()) @ (d @ e)


# -- fixtures ------------------------------------------------------------------------------------

def random_models(shape, n, seed, rank=None, scale=0.1):
    rng = np.random.default_rng(seed)
    base = rng.normal(size=shape)
    out = []
    for _ in range(n):
        if rank is None:
            tau = rng.normal(scale=scale, size=shape)
        else:
            tau = rng.normal(scale=scale, size=(shape[0], rank)) @ rng.normal(size=(rank, shape[1]))
        out.append(base + tau)
    return out, base


def ours(fn, models, base, dtype=torch.float32, **kw):
    ts = [torch.from_numpy(m).to(dtype) for m in models]
    b = torch.from_numpy(base).to(dtype)
    kw.setdefault("weight", [1.0] * len(models))
    return fn(ts, b, **kw).double().numpy()


def close(got, want, base, rtol=2e-4):
    """Task-vector-relative error: ‖got − want‖ ≤ rtol·‖want − base‖ (the base cancels out)."""
    assert np.linalg.norm(got - want) <= rtol * max(np.linalg.norm(want - base), 1e-12)


SHAPES = [(24, 40), (40, 24), (16, 16)]


# -- tests ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("rank", [None, 2], ids=["full-rank", "rank-2"])
def test_tsv_matches_the_numpy_reference(shape, rank):
    models, base = random_models(shape, 3, seed=1, rank=rank)
    close(ours(TSV, models, base, lambda_=0.7), np_tsv(models, base, lam=0.7), base)
    close(ours(TSV, models, base, rank_fraction=0.5), np_tsv(models, base, fraction=0.5), base)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("rank", [None, 2], ids=["full-rank", "rank-2"])
def test_iso_c_matches_the_numpy_reference(shape, rank):
    models, base = random_models(shape, 3, seed=2, rank=rank)
    close(ours(ISO_C, models, base, lambda_=1.3), np_iso_c(models, base, lam=1.3), base)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("rank", [None, 2], ids=["full-rank", "rank-2"])
@pytest.mark.parametrize("fraction", [0.8, 0.5, 0.0])
def test_iso_cts_matches_the_numpy_reference(shape, rank, fraction):
    models, base = random_models(shape, 3, seed=3, rank=rank)
    got = ours(ISO_CTS, models, base, lambda_=1.1, common_space_fraction=fraction)
    close(got, np_iso_cts(models, base, lam=1.1, fraction=fraction), base)


@pytest.mark.parametrize("shape", SHAPES)
def test_full_rank_results_equal_the_papers_official_code(shape):
    models, base = random_models(shape, 3, seed=4)
    close(ours(TSV, models, base), official_tsv(models, base), base)
    close(ours(ISO_C, models, base), official_iso_c(models, base), base)
    close(ours(ISO_CTS, models, base), official_iso_cts(models, base), base)


def test_one_task_tsv_is_task_arithmetic_and_iso_cts_is_iso_c():
    models, base = random_models((20, 30), 1, seed=5)
    ta = methods.get("task_arithmetic").fn
    want = ours(ta, models, base, lambda_=0.6, normalize=False)
    close(ours(TSV, models, base, lambda_=0.6), want, base)
    close(ours(ISO_CTS, models, base), ours(ISO_C, models, base), base)
    tau = models[0] - base
    s = np.linalg.svd(tau, compute_uv=False)
    close(ours(ISO_C, models, base), base + s.mean() * np_polar(tau), base)
    low, low_base = random_models((20, 30), 1, seed=6, rank=3)  # rank-deficient: still task arithmetic
    close(ours(TSV, low, low_base), low[0], low_base)


def test_two_identical_tasks_give_the_truncated_task_matrix_once():
    """The stacked singular vectors are dependent: the whitening keeps them once (the official code
    would add LAPACK's arbitrary null-space vectors here)."""
    models, base = random_models((24, 32), 1, seed=7)
    tau = models[0] - base
    u, s, vh = np.linalg.svd(tau, full_matrices=False)
    k = 12  # min(24, 32) / 2 tasks
    close(ours(TSV, models * 2, base), base + (u[:, :k] * s[:k]) @ vh[:k], base)


@pytest.mark.parametrize("name,case", [(n, c) for n in ("tsv", "iso_c", "iso_cts")
                                       for c in ("vector", "embeddings", "head")] + [("tsv", "too-small")])
def test_what_is_not_a_layer_matrix_is_the_mean_of_the_task_vectors(name, case):
    """Too small: a 2×30 matrix cannot give 3 tasks ⌊2/3⌋ = 0 components each (TSV only)."""
    shape = (7,) if case == "vector" else (2, 30) if case == "too-small" else (12, 9)
    section = {"embeddings": "pre", "head": "post"}.get(case, "layer")
    models, base = random_models(shape, 3, seed=8)
    got = ours(methods.get(name).fn, models, base, lambda_=0.5, section=section, weight=[1.0, 2.0, 0.5])
    want = base + 0.5 * np.mean(np_taus(models, base, [1.0, 2.0, 0.5]), axis=0)
    close(got, want, base, rtol=1e-5)


def test_weights_scale_each_task_vector():
    models, base = random_models((16, 20), 2, seed=9)
    scaled = [base + 2.0 * (models[0] - base), models[1]]
    for fn in (TSV, ISO_C, ISO_CTS):
        close(ours(fn, models, base, weight=[2.0, 1.0]), ours(fn, scaled, base), base, rtol=1e-5)


def test_bfloat16_inputs_are_merged_in_float32():
    models, base = random_models((24, 40), 3, seed=10)
    rounded = [torch.from_numpy(m).to(torch.bfloat16).double().numpy() for m in models]
    b = torch.from_numpy(base).to(torch.bfloat16).double().numpy()
    close(ours(ISO_CTS, models, base, dtype=torch.bfloat16), np_iso_cts(rounded, b), b)


def test_split_rank_follows_the_official_rule_with_fusionbenchs_cap():
    assert split_rank(64, 3, 0.8) == (52, 4)  # c = 51, k = round(13/3) = 4, c = 64 − 12
    assert split_rank(10, 4, 0.8) == (10, 0)  # round(0.5) = 0: Python's half to even
    assert split_rank(3, 2, 0.0) == (1, 1)  # round(1.5) = 2 would leave c = −1: capped at ⌊3/2⌋
    for r, t, f in [(64, 3, 0.8), (7, 5, 0.2), (128, 8, 0.5)]:
        c, k = split_rank(r, t, f)
        assert c + t * k == r and c >= 0 and k >= 0


def test_a_plan_routes_embeddings_and_heads_to_the_mean(tmp_path):
    """Through the engine: the section of each tensor reaches the method."""
    import mergekit_lite

    cfg = os.path.join(REPO, "merge_configs")
    out = str(tmp_path / "out")
    mergekit_lite.run(os.path.join(cfg, "tsv.yml"), out)
    got = load_dir(out)
    ins = {n: load_dir(os.path.join(cfg, "models", n)) for n in ("base", "ft_math", "ft_code", "ft_chat")}
    lam = 1.0
    for name in ("model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"):
        mean = sum(ins[m][name] - ins["base"][name] for m in ("ft_math", "ft_code", "ft_chat")) / 3
        torch.testing.assert_close(got[name], ins["base"][name] + lam * mean, rtol=0, atol=1e-6)
    q = "model.layers.1.self_attn.q_proj.weight"
    models = [ins[m][q].double().numpy() for m in ("ft_math", "ft_code", "ft_chat")]
    close(got[q].double().numpy(), np_tsv(models, ins["base"][q].double().numpy()), ins["base"][q].double().numpy())


# -- memory: the declared workspace covers what an SVD really allocates ----------------------------

MEASURE = r"""
import json, sys, torch
from mergekit_lite import methods
torch.set_num_threads(1)
def status(key):
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith(key))
name, m, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
g = torch.Generator().manual_seed(0)
base = torch.randn(m, n, generator=g)
ts = [base + 0.01 * torch.randn(m, n, generator=g) for _ in range(3)]
fn = methods.get(name).fn
fn([t[:8, :8] for t in ts], base[:8, :8], weight=[1.0] * 3)  # load LAPACK before measuring
open("/proc/self/clear_refs", "w").write("5")
before = status("VmRSS")
out = fn(ts, base, weight=[1.0] * 3)
peak = status("VmHWM") - before
print(json.dumps({"peak": peak, "declared": methods.get(name).workspace_bytes(4, m * n)}))
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc peak-RSS reset")
@pytest.mark.parametrize("name", ["tsv", "iso_c", "iso_cts"])
@pytest.mark.parametrize("shape", [(512, 512), (256, 1024)])
def test_declared_workspace_covers_the_peak_rss_of_the_svds(name, shape):
    """LAPACK's copies and work arrays are invisible to the allocation probe (they are not torch
    operations' results), so the SVD methods are measured by peak RSS in a fresh process."""
    run = subprocess.run([sys.executable, "-c", MEASURE, name, *map(str, shape)], capture_output=True, text=True,
                         cwd=REPO, timeout=300)
    assert run.returncode == 0, run.stderr
    got = json.loads(run.stdout)
    assert 0 < got["peak"] <= got["declared"], got
