"""slerp and nuslerp against Shoemake's formula in numpy float64, literals, endpoints, colinear and
degenerate vectors, and whole plans with gradients and filters."""

import math

import numpy as np
import pytest
import torch

import mergekit_lite
from mergekit_lite.errors import PlanError
from mergekit_lite.methods.nuslerp import nuslerp
from mergekit_lite.methods.slerp import slerp

from conftest import load_dir, write_plan


def np_slerp_vec(t, a, b, colinear, guard):
    """Shoemake on 1-D float64 vectors; `colinear(cos)` says when to interpolate linearly, `guard`
    adjusts tiny norms."""
    cos = np.clip(np.dot(a, b) / (guard(np.linalg.norm(a)) * guard(np.linalg.norm(b))), -1, 1)
    if colinear(cos):
        return (1 - t) * a + t * b
    omega = np.arccos(cos)
    return (np.sin((1 - t) * omega) * a + np.sin(t * omega) * b) / np.sin(omega)


def np_slerp(t, v0, v1):
    """slerp: one angle per tensor; |cos| > 0.9995 is colinear; a norm ≤ 1e-8 counts as 1."""
    a, b = v0.astype(np.float64).ravel(), v1.astype(np.float64).ravel()
    return np_slerp_vec(t, a, b, lambda c: abs(c) > 0.9995, lambda n: n if n > 1e-8 else 1.0).reshape(v0.shape)


def np_nuslerp(t, v0, v1, flatten=True, row_wise=False):
    """nuslerp: colinear when 1 − cos² ≤ 1e-16; norms clamped to ≥ 1e-7; vectors per tensor, row or
    (row_wise) column."""
    a, b = v0.astype(np.float64), v1.astype(np.float64)

    def one(x, y):
        return np_slerp_vec(t, x, y, lambda c: 1 - c * c <= 1e-16, lambda n: max(n, 1e-7))

    if flatten or a.ndim < 2:
        return one(a.ravel(), b.ravel()).reshape(a.shape)
    if row_wise:  # vectors along dimension 0
        return np.stack([one(a[:, j], b[:, j]) for j in range(a.shape[1])], axis=1)
    return np.stack([one(a[i], b[i]) for i in range(a.shape[0])])


gen = torch.Generator().manual_seed(31)
A = torch.randn(24, 16, generator=gen)
B = torch.randn(24, 16, generator=gen)
C = torch.randn(24, 16, generator=gen)


# -- slerp --------------------------------------------------------------------------------------

def test_slerp_hand_worked():
    v0, v1 = torch.tensor([2.0, 0.0]), torch.tensor([0.0, 1.0])
    # orthogonal: Ω = π/2; t = 1/3 -> sin(π/3)·v0 + sin(π/6)·v1
    np.testing.assert_allclose(slerp([v1], v0, t=1 / 3).numpy(), [1.7320508, 0.5], rtol=1e-6)
    np.testing.assert_allclose(slerp([torch.tensor([0.0, 1.0])], torch.tensor([1.0, 0.0]), t=0.5).numpy(),
                               [0.70710678, 0.70710678], rtol=1e-6)


@pytest.mark.parametrize("t", [0.0, 0.2, 0.5, 0.9, 1.0])
def test_slerp_matches_numpy(t):
    np.testing.assert_allclose(slerp([B], A, t=t).numpy(), np_slerp(t, A.numpy(), B.numpy()), rtol=1e-5, atol=1e-6)


def test_slerp_endpoints_are_exact():
    assert torch.equal(slerp([B], A, t=0.0), A)
    assert torch.equal(slerp([B], A, t=1.0), B)
    near = A + 1e-3 * B  # colinear branch
    assert torch.equal(slerp([near], A, t=0.0), A) and torch.equal(slerp([near], A, t=1.0), near)


def test_slerp_is_symmetric_under_swapping_ends():
    torch.testing.assert_close(slerp([B], A, t=0.3), slerp([A], B, t=0.7), rtol=1e-5, atol=1e-6)


def test_slerp_identical_opposite_colinear_and_degenerate_vectors():
    # identical: linear interpolation of equal tensors (0.6·A + 0.4·A, exact up to one rounding)
    torch.testing.assert_close(slerp([A.clone()], A, t=0.4), A, rtol=2e-7, atol=0)
    opposite = slerp([-A], A, t=0.5)
    assert torch.equal(opposite, torch.zeros_like(A))  # antipodal: (1−t)·A + t·(−A)
    near = A + 1e-3 * B
    np.testing.assert_allclose(slerp([near], A, t=0.25).numpy(), (0.75 * A + 0.25 * near).numpy(), rtol=1e-6, atol=1e-7)
    one = slerp([torch.tensor([3.0])], torch.tensor([1.0]), t=0.5)  # one element: always colinear
    assert one.tolist() == [2.0]
    zero = slerp([B], torch.zeros_like(A), t=0.5)  # a zero tensor is orthogonal to everything
    assert torch.isfinite(zero).all()
    np.testing.assert_allclose(zero.numpy(), math.sin(math.pi / 4) * B.numpy(), rtol=1e-6)
    assert slerp([torch.zeros(0)], torch.zeros(0), t=0.5).shape == (0,)


def test_slerp_upcasts_bfloat16_and_leaves_inputs_alone():
    a, b = A.bfloat16(), B.bfloat16()
    out = slerp([b], a, t=0.3)
    assert out.dtype == torch.float32 and torch.equal(a, A.bfloat16())
    np.testing.assert_allclose(out.numpy(), np_slerp(0.3, a.float().numpy(), b.float().numpy()), rtol=1e-5, atol=1e-6)


def layer_pos(name, n=4):
    parts = name.split(".")
    return int(parts[2]) / (n - 1) if len(parts) > 2 and parts[1] == "layers" else 0.0


def test_slerp_plan_with_gradient_and_filters(models, tmp_path, out_dir):
    p = models["paths"]
    plan = write_plan(tmp_path, f"""
        merge_method: slerp
        base_model: {p['base']}
        models:
          - model: {p['base']}
          - model: {p['a']}
        parameters:
          t:
            - filter: self_attn
              value: [0, 0.5, 0.3, 0.7, 1]
            - filter: mlp
              value: [1, 0.5, 0.7, 0.3, 0]
            - value: 0.5
        dtype: float32
        """)
    mergekit_lite.run(plan, out_dir)
    got = load_dir(out_dir)
    tt = models["tensors"]
    for name, base in tt["base"].items():
        pos = layer_pos(name)
        grad = [0, 0.5, 0.3, 0.7, 1] if "self_attn" in name else [1, 0.5, 0.7, 0.3, 0] if "mlp" in name else None
        t = 0.5 if grad is None else float(np.interp(pos * 4, range(5), grad))
        np.testing.assert_allclose(got[name].numpy(), np_slerp(t, base, tt["a"][name]), rtol=1e-5, atol=1e-6,
                                   err_msg=name)


def test_slerp_needs_exactly_two_models(models, tmp_path, out_dir):
    p = models["paths"]
    plan = write_plan(tmp_path, f"""
        merge_method: slerp
        base_model: {p['base']}
        models:
          - model: {p['a']}
          - model: {p['b']}
        parameters: {{t: 0.5}}
        """)
    with pytest.raises(PlanError, match="exactly 1"):
        mergekit_lite.run(plan, out_dir)


# -- nuslerp ------------------------------------------------------------------------------------

def test_nuslerp_hand_worked():
    # t = 3/(1+3) = 0.75 between orthogonal unit vectors: sin(π/8), sin(3π/8)
    out = nuslerp([torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])], None, weight=[1.0, 3.0])
    np.testing.assert_allclose(out.numpy(), [0.38268343, 0.92387953], rtol=1e-6)
    # with a base: interpolation between task vectors, added back to the base
    base = torch.tensor([1.0, 1.0])
    out = nuslerp([base + torch.tensor([1.0, 0.0]), base + torch.tensor([0.0, 1.0])], base, weight=[1.0, 3.0])
    np.testing.assert_allclose(out.numpy(), [1.38268343, 1.92387953], rtol=1e-6)


@pytest.mark.parametrize("flatten,row_wise", [(True, False), (False, False), (False, True)])
def test_nuslerp_matches_numpy(flatten, row_wise):
    w = [0.3, 0.9]
    out = nuslerp([A, B], None, weight=w, nuslerp_flatten=flatten, nuslerp_row_wise=row_wise)
    ref = np_nuslerp(0.75, A.numpy(), B.numpy(), flatten, row_wise)
    np.testing.assert_allclose(out.numpy(), ref, rtol=1e-5, atol=1e-6)
    out = nuslerp([A, B], C, weight=w, nuslerp_flatten=flatten, nuslerp_row_wise=row_wise)
    c = C.double().numpy()
    ref = c + np_nuslerp(0.75, A.numpy() - c, B.numpy() - c, flatten, row_wise)
    np.testing.assert_allclose(out.numpy(), ref, rtol=1e-5, atol=1e-5)


def test_nuslerp_is_symmetric_and_hits_endpoints():
    torch.testing.assert_close(nuslerp([A, B], C, weight=[0.2, 0.6]), nuslerp([B, A], C, weight=[0.6, 0.2]),
                               rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(nuslerp([A, B], None, weight=[1.0, 0.0]), A, rtol=0, atol=0)
    torch.testing.assert_close(nuslerp([A, B], None, weight=[0.0, 2.0], nuslerp_flatten=False), B, rtol=0, atol=0)


def test_nuslerp_colinear_rows_interpolate_linearly_and_stay_finite():
    a = torch.tensor([[1.0, 2.0], [0.0, 0.0], [1.0, 0.0]])
    b = torch.tensor([[2.0, 4.0], [0.0, 0.0], [-1.0, 0.0]])
    out = nuslerp([a, b], None, weight=[1.0, 1.0], nuslerp_flatten=False)
    assert torch.isfinite(out).all()
    np.testing.assert_allclose(out.numpy(), [[1.5, 3.0], [0.0, 0.0], [0.0, 0.0]], atol=1e-7)


def test_nuslerp_weights_summing_to_zero_is_a_plan_error(models, tmp_path, out_dir):
    p = models["paths"]
    plan = write_plan(tmp_path, f"""
        merge_method: nuslerp
        models:
          - model: {p['a']}
            parameters: {{weight: 1.0}}
          - model: {p['b']}
            parameters: {{weight: -1.0}}
        """)
    with pytest.raises(PlanError, match="sum to 0"):
        mergekit_lite.run(plan, out_dir)
