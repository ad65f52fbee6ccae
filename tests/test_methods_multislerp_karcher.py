"""multislerp and karcher against their formulas in numpy float64, literals on the circle, and
degenerate inputs."""

import numpy as np
import pytest
import torch

import mergekit_lite
from mergekit_lite.errors import PlanError
from mergekit_lite.methods.karcher import karcher
from mergekit_lite.methods.multislerp import multislerp

from conftest import load_dir, write_plan


def np_multislerp(models, weights, base=None, normalize=True, eps=1e-8):
    if len(models) == 1:
        return models[0].astype(np.float64)
    shape = models[0].shape
    b = 0.0 if base is None else base.astype(np.float64).ravel()
    vs = [m.astype(np.float64).ravel() - b for m in models]
    w = np.array(weights, np.float64)
    if normalize:
        w = w / w.sum()
    norms = [np.linalg.norm(v) for v in vs]
    units = [v / (n + eps) for v, n in zip(vs, norms)]
    mean = sum(wi * u for wi, u in zip(w, units))
    mean = mean / np.linalg.norm(mean)
    tangent = sum(wi * (u - np.dot(u, mean) * mean) for wi, u in zip(w, units))
    tn = np.linalg.norm(tangent) + eps
    r = mean * np.cos(tn) + tangent * np.sin(tn) / tn
    return (r * sum(wi * n for wi, n in zip(w, norms)) + b).reshape(shape)


def np_karcher(models, weights, max_iter=10, tol=1e-5):
    shape = models[0].shape
    xs = [m.astype(np.float64).ravel() for m in models]
    alpha = np.array(weights, np.float64) / sum(weights)
    norms = [np.linalg.norm(x) for x in xs]
    valid = [i for i, n in enumerate(norms) if n > tol]
    a = {i: alpha[i] / sum(alpha[j] for j in valid) for i in valid}
    units = {i: xs[i] / norms[i] for i in valid}
    mean = sum(a[i] * units[i] for i in valid)
    mean = mean / np.linalg.norm(mean)
    for _ in range(max_iter):
        tangent = np.zeros_like(mean)
        for i in valid:
            c = np.clip(np.dot(mean, units[i]), -1, 1)
            om = np.arccos(c)
            if om < tol or np.pi - om < tol:
                continue
            tangent += a[i] * om / np.sin(om) * (units[i] - c * mean)
        tn = np.linalg.norm(tangent)
        if tn < tol:
            break
        mean = np.cos(tn) * mean + np.sin(tn) * tangent / tn
        mean /= np.linalg.norm(mean)
    return (sum(alpha[i] * norms[i] for i in range(len(xs))) * mean).reshape(shape)


gen = torch.Generator().manual_seed(41)
BASE = torch.randn(20, 12, generator=gen)
MODELS = [BASE + 0.3 * torch.randn(20, 12, generator=gen) for _ in range(3)]


def t(x):
    return torch.tensor(x, dtype=torch.float32)


# -- multislerp ---------------------------------------------------------------------------------

def test_multislerp_hand_worked():
    # two orthogonal directions with norms 2 and 1, equal weights: the bisector, scaled by 1.5
    out = multislerp([t([2.0, 0.0]), t([0.0, 1.0])], None, weight=[1.0, 1.0])
    np.testing.assert_allclose(out.numpy(), [1.06066017, 1.06066017], rtol=1e-6)
    # three orthonormal vectors: (1, 1, 1)/√3
    out = multislerp([t([1.0, 0, 0]), t([0, 1.0, 0]), t([0, 0, 1.0])], None, weight=[1.0, 1.0, 1.0])
    np.testing.assert_allclose(out.numpy(), [0.57735027] * 3, rtol=1e-6)


@pytest.mark.parametrize("with_base", [False, True])
@pytest.mark.parametrize("normalize", [True, False])
def test_multislerp_matches_numpy(with_base, normalize):
    w = [0.5, 0.3, 0.7]
    base = BASE if with_base else None
    out = multislerp(MODELS, base, weight=w, normalize_weights=normalize)
    ref = np_multislerp([m.numpy() for m in MODELS], w, BASE.numpy() if with_base else None, normalize)
    np.testing.assert_allclose(out.numpy(), ref, rtol=1e-5, atol=1e-5)


def test_multislerp_is_symmetric_and_one_model_is_itself():
    w = [0.5, 0.3, 0.7]
    out = multislerp(MODELS, BASE, weight=w)
    out2 = multislerp(MODELS[::-1], BASE, weight=w[::-1])
    torch.testing.assert_close(out, out2, rtol=1e-6, atol=1e-6)
    assert torch.equal(multislerp(MODELS[:1], BASE, weight=[0.4]), MODELS[0])


def test_multislerp_opposite_vectors():
    a = t([1.0, 2.0, -1.0])
    out = multislerp([a, -a], None, weight=[1.0, 1.0])  # two models: linear fallback, 0
    assert torch.equal(out, torch.zeros(3))
    with pytest.raises(ValueError, match="zero"):
        multislerp([a, -a, a, -a], None, weight=[1.0, 1.0, 1.0, 1.0])


def test_multislerp_weights_summing_to_zero_is_a_plan_error(models, tmp_path, out_dir):
    p = models["paths"]
    plan = write_plan(tmp_path, f"""
        merge_method: multislerp
        models:
          - model: {p['a']}
            parameters: {{weight: 1.0}}
          - model: {p['b']}
            parameters: {{weight: -1.0}}
        """)
    with pytest.raises(PlanError, match="sum to 0"):
        mergekit_lite.run(plan, out_dir)


# -- karcher ------------------------------------------------------------------------------------

def test_karcher_hand_worked_on_the_circle():
    e0, e1 = t([1.0, 0.0]), t([0.0, 1.0])
    # equal weights: the geodesic midpoint
    np.testing.assert_allclose(karcher([e0, e1], None, weight=[1.0, 1.0]).numpy(), [0.70710678] * 2, rtol=1e-6)
    # weights 2:1 pull the mean to 30° from e0 (weighted mean of the angles 0° and 90°)
    np.testing.assert_allclose(karcher([e0, e1], None, weight=[2.0, 1.0]).numpy(), [0.8660254, 0.5], rtol=1e-6)
    # norms 2 and 1 with equal weights: scaled by the mean norm 1.5
    np.testing.assert_allclose(karcher([2 * e0, e1], None, weight=[1.0, 1.0]).numpy(), [1.06066017] * 2, rtol=1e-6)


@pytest.mark.parametrize("weights", [[1.0, 1.0, 1.0], [0.2, 1.0, 3.0]])
def test_karcher_matches_numpy(weights):
    out = karcher(MODELS, None, weight=weights, max_iter=30, tol=1e-7)
    ref = np_karcher([m.numpy() for m in MODELS], weights, max_iter=30, tol=1e-7)
    np.testing.assert_allclose(out.numpy(), ref, rtol=1e-5, atol=1e-6)


def test_karcher_is_symmetric_and_degenerate_inputs_are_finite():
    out = karcher(MODELS, None, weight=[1.0, 2.0, 3.0])
    torch.testing.assert_close(out, karcher(MODELS[::-1], None, weight=[3.0, 2.0, 1.0]), rtol=1e-6, atol=1e-6)
    assert torch.equal(karcher(MODELS[:1], None, weight=[1.0]), MODELS[0])
    same = karcher([MODELS[0], MODELS[0].clone()], None, weight=[1.0, 1.0])
    torch.testing.assert_close(same, MODELS[0], rtol=1e-6, atol=1e-6)
    a = t([1.0, 2.0])
    assert torch.isfinite(karcher([a, -a], None, weight=[1.0, 1.0])).all()  # antipodal: no direction
    zero = karcher([torch.zeros(2), a], None, weight=[1.0, 1.0])  # a zero tensor has no direction
    np.testing.assert_allclose(zero.numpy(), (0.5 * a).numpy(), rtol=1e-6)
    assert torch.equal(karcher([torch.zeros(3), torch.zeros(3)], None, weight=[1.0, 1.0]), torch.zeros(3))


def test_karcher_plan_merges_an_unlisted_base_as_one_more_model(models, tmp_path, out_dir):
    p, tt = models["paths"], models["tensors"]
    plan = write_plan(tmp_path, f"""
        merge_method: karcher
        base_model: {p['base']}
        models:
          - model: {p['a']}
          - model: {p['b']}
        dtype: float32
        """)
    mergekit_lite.run(plan, out_dir)
    got = load_dir(out_dir)
    for name in ("model.layers.1.mlp.up_proj.weight", "model.norm.weight"):
        ref = np_karcher([tt["a"][name], tt["b"][name], tt["base"][name]], [1.0, 1.0, 1.0])
        np.testing.assert_allclose(got[name].numpy(), ref, rtol=1e-5, atol=1e-6)


def test_karcher_negative_weight_is_a_plan_error(models, tmp_path, out_dir):
    p = models["paths"]
    plan = write_plan(tmp_path, f"""
        merge_method: karcher
        models:
          - model: {p['a']}
            parameters: {{weight: -1.0}}
          - model: {p['b']}
        """)
    with pytest.raises(PlanError, match="positive"):
        mergekit_lite.run(plan, out_dir)
