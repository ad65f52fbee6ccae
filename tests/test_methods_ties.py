"""TIES and its named steps (trim, elect_sign, disjoint_merge) against the paper's formula written
independently in numpy float64, hand-worked literals, and properties."""

import numpy as np
import pytest
import torch

import mergekit_lite
from mergekit_lite.errors import PlanError
from mergekit_lite.methods.gta import disjoint_merge, elect_sign
from mergekit_lite.methods.sparsify import rank_window, trim
from mergekit_lite.methods.task_arithmetic import task_arithmetic
from mergekit_lite.methods.ties import ties

from conftest import load_dir, write_plan


# -- an independent numpy float64 reference of the paper's TIES (weighted, as mergekit) -----------

def np_trim(tau: np.ndarray, density: float) -> np.ndarray:
    if density >= 1:
        return tau.copy()
    k = max(1, int(density * tau.size))
    flat = np.abs(tau).ravel()
    keep = np.zeros(tau.size, bool)
    keep[np.argsort(flat, kind="stable")[tau.size - k:]] = True
    return np.where(keep.reshape(tau.shape), tau, 0.0)


def np_ties(models, base, weights, densities, lam=1.0, normalize=True, count=False):
    base = base.astype(np.float64)
    wt = [w * np_trim(m.astype(np.float64) - base, d) for m, w, d in zip(models, weights, densities)]
    votes = sum(np.sign(x) for x in wt) if count else sum(wt)
    elected = np.where(votes >= 0, 1.0, -1.0)
    agree = [np.sign(x) == elected for x in wt]
    mixed = sum(np.where(a, x, 0.0) for a, x in zip(agree, wt))
    if normalize:
        div = sum(np.where(a, w, 0.0) for a, w in zip(agree, weights))
        mixed = mixed / np.where(div == 0, 1.0, div)
    return base + lam * mixed


gen = torch.Generator().manual_seed(11)
BASE = torch.randn(40, 30, generator=gen)
MODELS = [BASE + 0.1 * torch.randn(40, 30, generator=gen) for _ in range(3)]


def t(x):
    return torch.tensor(x, dtype=torch.float32)


# -- steps --------------------------------------------------------------------------------------

def test_trim_keeps_top_k_magnitudes_hand_worked():
    tau = t([0.5, -3.0, 1.0, 0.1, -2.0])
    kept = trim(tau, 0.4)  # k = 2: |-3| and |-2|
    assert kept.apply_(tau.clone()).tolist() == [0.0, -3.0, 0.0, 0.0, -2.0]
    assert trim(tau, 1.0) is None


def test_trim_tiny_tensor_keeps_its_largest_entry():
    tau = t([0.5, -3.0, 1.0])
    assert trim(tau, 0.1).apply_(tau.clone()).tolist() == [0.0, -3.0, 0.0]  # ⌊0.3⌋ = 0 -> 1
    one = t([2.5])
    assert trim(one, 0.01) is None  # a one-element tensor keeps its only entry


def test_rank_window_breaks_ties_by_position():
    score = t([1.0, 2.0, 2.0, 2.0, 3.0])
    # ascending ranks: 1.0->0, the three 2.0s -> 1, 2, 3 in position order, 3.0 -> 4
    assert rank_window(score, 2, 4).tolist() == [False, False, True, True, False]
    assert rank_window(score, 0, 2).tolist() == [True, True, False, False, False]
    assert rank_window(score, 0, 5) is None


def test_elect_sign_sum_and_count_hand_worked():
    a, b, c = t([1.0, -1.0, 0.0]), t([-3.0, 0.5, 0.0]), t([0.5, 0.25, 0.0])
    # sums: [-1.5, -0.25, 0] -> [-, -, + (tie counts as +)]
    assert elect_sign([a, b, c], "sum").tolist() == [False, False, True]
    # sign counts: [+1-1+1, -1+1+1, 0] = [1, 1, 0] -> [+, +, +]
    assert elect_sign([a, b, c], "count").tolist() == [True, True, True]


def test_disjoint_merge_hand_worked():
    a, b = t([2.0, -1.0, 4.0]), t([1.0, 3.0, -4.0])
    positive = torch.tensor([True, True, False])
    # entry 0: both agree (+): (2 + 1)/(0.5 + 1); entry 1: only b: 3/1; entry 2: only a? a=4 is +, elected -: only b: -4/1
    out = disjoint_merge([(a, 0.5), (b, 1.0)], positive)
    assert out.tolist() == [2.0, 3.0, -4.0]
    nodiv = disjoint_merge([(a, 0.5), (b, 1.0)], positive, normalize=False)
    assert nodiv.tolist() == [3.0, 3.0, -4.0]
    assert a.tolist() == [2.0, -1.0, 4.0]  # inputs untouched


# -- the method ---------------------------------------------------------------------------------

def test_ties_hand_worked_literal():
    base = t([1.0, 1.0, 1.0, 1.0])
    a = base + t([1.0, -2.0, 0.5, 3.0])
    b = base + t([-1.0, 1.5, 0.25, -4.0])
    c = base + t([0.5, -1.0, 2.0, 0.9])
    # trim at 0.5 (k = 2): τa -> [0,-2,0,3], τb -> [0,1.5,0,-4], τc -> [0,-1,2,0]
    # weights 1, 1, 0.5: wτ = a [0,-2,0,3], b [0,1.5,0,-4], c [0,-0.5,1,0]
    # sum [0,-1,1,-1] -> elected [+,-,+,-]; entry 0: nobody (zeros never agree) -> 0
    # entry 1: a (-2) and c (-0.5) agree: (-2.5)/(1 + 0.5); entry 2: c: 1/0.5; entry 3: b: -4/1
    out = ties([a, b, c], base, weight=[1.0, 1.0, 0.5], density=[0.5, 0.5, 0.5], lambda_=1.0, normalize=True)
    np.testing.assert_allclose(out.numpy(), [1.0, 1.0 - 2.5 / 1.5, 1.0 + 2.0, 1.0 - 4.0], rtol=1e-7)
    out = ties([a, b, c], base, weight=[1.0, 1.0, 0.5], density=[0.5, 0.5, 0.5], lambda_=0.5, normalize=False)
    assert out.tolist() == [1.0, 1.0 - 1.25, 1.5, -1.0]


@pytest.mark.parametrize("count", [False, True])
@pytest.mark.parametrize("normalize", [True, False])
def test_ties_matches_numpy_reference(normalize, count):
    weights, densities = [1.0, 0.7, -0.4], [0.3, 0.6, 1.0]
    out = ties(MODELS, BASE, weight=weights, density=densities, lambda_=0.8, normalize=normalize,
               sign_election="count" if count else "sum")
    ref = np_ties([m.numpy() for m in MODELS], BASE.numpy(), weights, densities, 0.8, normalize, count)
    np.testing.assert_allclose(out.numpy(), ref, rtol=1e-5, atol=1e-6)


def test_ties_density_one_single_model_is_task_arithmetic():
    for normalize in (False, True):
        got = ties(MODELS[:1], BASE, weight=[0.7], density=[1.0], lambda_=1.3, normalize=normalize)
        ta = task_arithmetic(MODELS[:1], BASE, weight=[0.7], lambda_=1.3, normalize=normalize)
        torch.testing.assert_close(got, ta, rtol=1e-6, atol=1e-6)


def test_ties_is_symmetric_in_model_order():
    w, d = [1.0, 0.5, 0.8], [0.4, 0.6, 0.5]
    out = ties(MODELS, BASE, weight=w, density=d, lambda_=1.0, normalize=True)
    perm = [2, 0, 1]
    out2 = ties([MODELS[i] for i in perm], BASE, weight=[w[i] for i in perm], density=[d[i] for i in perm],
                lambda_=1.0, normalize=True)
    torch.testing.assert_close(out, out2, rtol=1e-6, atol=1e-7)


def test_ties_does_not_modify_inputs_and_upcasts_bfloat16():
    models = [m.bfloat16() for m in MODELS]
    copies = [m.clone() for m in models]
    base = BASE.bfloat16()
    out = ties(models, base, weight=[1.0, 1.0, 1.0], density=[0.5, 0.5, 0.5])
    assert out.dtype == torch.float32
    assert all(torch.equal(a, b) for a, b in zip(models, copies)) and torch.equal(base, BASE.bfloat16())
    ref = np_ties([m.float().numpy() for m in models], base.float().numpy(), [1.0] * 3, [0.5] * 3)
    np.testing.assert_allclose(out.numpy(), ref, rtol=1e-5, atol=1e-6)


def test_ties_where_nobody_agrees_keeps_the_base():
    base = t([0.0, 5.0])
    out = ties([base.clone(), base.clone()], base, weight=[1.0, 1.0], density=[1.0, 1.0])
    assert out.tolist() == [0.0, 5.0] and torch.isfinite(out).all()


def test_ties_plan_with_gradient_and_filter(models, tmp_path, out_dir):
    p = models["paths"]
    plan = write_plan(tmp_path, f"""
        merge_method: ties
        base_model: {p['base']}
        models:
          - model: {p['a']}
            parameters:
              weight: 1.0
              density: [0.2, 0.8]
          - model: {p['b']}
            parameters:
              weight: 0.5
              density:
                - filter: mlp
                  value: 0.3
                - value: 0.6
        parameters:
          lambda: 0.9
        dtype: float32
        """)
    mergekit_lite.run(plan, out_dir)
    got = load_dir(out_dir)
    tt = models["tensors"]
    for name, base in tt["base"].items():
        parts = name.split(".")
        pos = int(parts[2]) / 3 if len(parts) > 2 and parts[1] == "layers" else 0.0
        da = 0.2 + 0.6 * pos
        db = 0.3 if "mlp" in name else 0.6
        ref = np_ties([tt["a"][name], tt["b"][name]], base, [1.0, 0.5], [da, db], 0.9)
        np.testing.assert_allclose(got[name].numpy(), ref, rtol=1e-5, atol=1e-6, err_msg=name)


@pytest.mark.parametrize("density", ["0", "1.5", "-0.1"])
def test_density_outside_unit_interval_is_a_plan_error(models, tmp_path, out_dir, density):
    p = models["paths"]
    plan = write_plan(tmp_path, f"""
        merge_method: ties
        base_model: {p['base']}
        models:
          - model: {p['a']}
            parameters: {{weight: 1.0, density: {density}}}
        """)
    with pytest.raises(PlanError, match="density"):
        mergekit_lite.run(plan, out_dir)


def test_every_ties_parameter_takes_filters_and_gradients(models, tmp_path, out_dir):
    p = models["paths"]
    plan = write_plan(tmp_path, f"""
        merge_method: ties
        base_model: {p['base']}
        models:
          - model: {p['a']}
            parameters:
              weight: [{{filter: mlp, value: [1.0, 0.4]}}, {{value: 0.9}}]
              density: 0.5
          - model: {p['c']}
            parameters:
              weight: 0.6
              density: [{{filter: self_attn, value: 0.3}}, {{value: [0.8, 0.4]}}]
        parameters:
          lambda: [{{filter: mlp, value: [1.0, 0.5]}}, {{value: 1.2}}]
          normalize: [{{filter: self_attn, value: false}}, {{value: true}}]
          sign_election: [{{filter: up_proj, value: count}}, {{value: sum}}]
        dtype: float32
        """)
    mergekit_lite.run(plan, out_dir)
    got = load_dir(out_dir)
    tt = models["tensors"]
    for name, base in tt["base"].items():
        parts = name.split(".")
        pos = int(parts[2]) / 3 if len(parts) > 2 and parts[1] == "layers" else 0.0
        wa = 1.0 - 0.6 * pos if "mlp" in name else 0.9
        dc = 0.3 if "self_attn" in name else 0.8 - 0.4 * pos
        lam = 1.0 - 0.5 * pos if "mlp" in name else 1.2
        ref = np_ties([tt["a"][name], tt["c"][name]], base, [wa, 0.6], [0.5, dc], lam,
                      normalize="self_attn" not in name, count="up_proj" in name)
        np.testing.assert_allclose(got[name].numpy(), ref, rtol=1e-5, atol=1e-6, err_msg=name)
