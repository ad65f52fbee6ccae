"""model_stock, sce and nearswap against their formulas in numpy float64, literals and properties."""

import numpy as np
import pytest
import torch

import mergekit_lite
from mergekit_lite.errors import PlanError
from mergekit_lite.methods.model_stock import model_stock
from mergekit_lite.methods.nearswap import nearswap
from mergekit_lite.methods.sce import sce

from conftest import load_dir, write_plan


def np_model_stock(models, base, filter_wise=False):
    b = base.astype(np.float64)
    taus = [m.astype(np.float64) - b for m in models]
    n = len(models)
    if filter_wise:
        reduce = lambda x: x.sum(axis=-1)  # noqa: E731  (vectors along the last dimension)
    else:
        reduce = lambda x: x.sum()  # noqa: E731
    cos = []
    for i in range(n):
        for j in range(i + 1, n):
            norms = np.sqrt(reduce(taus[i] ** 2) * reduce(taus[j] ** 2))
            cos.append(np.clip(reduce(taus[i] * taus[j]) / np.maximum(norms, 1e-6), -1, 1))
    c = np.mean(cos, axis=0)
    den = 1 + (n - 1) * c
    t = np.where(np.abs(den) < 1e-6, 0.0, n * c / np.where(np.abs(den) < 1e-6, 1.0, den))
    if filter_wise and b.ndim >= 1:
        t = np.expand_dims(t, -1)
    return t * np.mean([m.astype(np.float64) for m in models], axis=0) + (1 - t) * b


def np_sce(models, base, topk=1.0):
    b = base.astype(np.float64)
    taus = np.stack([m.astype(np.float64) - b for m in models])
    if topk < 1:
        var = taus.var(axis=0)
        k = int(np.count_nonzero(var) * topk)
        keep = np.zeros(var.size, bool)
        keep[np.argsort(var.ravel(), kind="stable")[var.size - k:]] = True
        taus = taus * keep.reshape(var.shape)
    energy = (taus ** 2).reshape(len(models), -1).mean(axis=1)
    w = np.full(len(models), 1 / len(models)) if energy.sum() < 1e-6 else energy / energy.sum()
    elected = np.where(taus.sum(axis=0) >= 0, 1.0, -1.0)
    agree = np.sign(taus) == elected
    wa = w.reshape(-1, *([1] * b.ndim)) * agree
    return b + (taus * wa).sum(axis=0) / np.maximum(wa.sum(axis=0), 1e-6)


def t(x):
    return torch.tensor(x, dtype=torch.float32)


gen = torch.Generator().manual_seed(51)
BASE = torch.randn(30, 10, generator=gen)
MODELS = [BASE + 0.2 * torch.randn(30, 10, generator=gen) + 0.1 for _ in range(3)]


# -- model_stock --------------------------------------------------------------------------------

def test_model_stock_hand_worked():
    base = t([1.0, 1.0])
    # task vectors (1, 0) and (1, 1): cos = 1/√2, t = 2c/(1 + c) = 0.8284271; average (2, 1.5)
    out = model_stock([t([2.0, 1.0]), t([2.0, 2.0])], base)
    np.testing.assert_allclose(out.numpy(), [1.8284271, 1.4142136], rtol=1e-6)
    # orthogonal task vectors: cos = 0, t = 0: the base
    assert model_stock([t([2.0, 1.0]), t([1.0, 2.0])], base).tolist() == [1.0, 1.0]


@pytest.mark.parametrize("filter_wise", [False, True])
def test_model_stock_matches_numpy(filter_wise):
    out = model_stock(MODELS, BASE, filter_wise=filter_wise)
    ref = np_model_stock([m.numpy() for m in MODELS], BASE.numpy(), filter_wise)
    np.testing.assert_allclose(out.numpy(), ref, rtol=1e-5, atol=1e-6)
    vec = model_stock([m[0] for m in MODELS], BASE[0], filter_wise=filter_wise)  # 1-D: one vector
    np.testing.assert_allclose(vec.numpy(), np_model_stock([m[0].numpy() for m in MODELS], BASE[0].numpy()),
                               rtol=1e-5, atol=1e-6)


def test_model_stock_properties():
    torch.testing.assert_close(model_stock(MODELS, BASE), model_stock(MODELS[::-1], BASE), rtol=1e-6, atol=1e-6)
    same = model_stock([MODELS[0], MODELS[0].clone()], BASE)  # cos = 1 -> t = 1: the model itself
    torch.testing.assert_close(same, MODELS[0], rtol=1e-6, atol=1e-6)
    opposite = model_stock([BASE + 1.0, BASE - 1.0], BASE)  # cos = -1: 1 + (N-1)c = 0 -> the base
    assert torch.equal(opposite, BASE)
    assert torch.equal(model_stock([BASE.clone(), BASE.clone()], BASE), BASE)  # zero task vectors


def test_model_stock_needs_two_models(models, tmp_path, out_dir):
    p = models["paths"]
    plan = write_plan(tmp_path, f"""
        merge_method: model_stock
        base_model: {p['base']}
        models:
          - model: {p['a']}
        """)
    with pytest.raises(PlanError, match="at least 2"):
        mergekit_lite.run(plan, out_dir)


# -- sce ----------------------------------------------------------------------------------------

def test_sce_hand_worked():
    base = torch.zeros(3)
    # τ1 = (1, -2, 0.5), τ2 = (3, 1, -0.5); energies 5.25/3 and 10.25/3 -> w = 5.25/15.5, 10.25/15.5
    # Σ τ = (4, -1, 0): elected (+, -, +); entry 0: both; entry 1: τ1 only; entry 2: τ1 only
    out = sce([t([1.0, -2.0, 0.5]), t([3.0, 1.0, -0.5])], base)
    w1, w2 = 5.25 / 15.5, 10.25 / 15.5
    np.testing.assert_allclose(out.numpy(), [w1 * 1 + w2 * 3, -2.0, 0.5], rtol=1e-6)


@pytest.mark.parametrize("topk", [1.0, 0.5, 0.1])
def test_sce_matches_numpy(topk):
    out = sce(MODELS, BASE, select_topk=topk)
    ref = np_sce([m.numpy() for m in MODELS], BASE.numpy(), topk)
    np.testing.assert_allclose(out.numpy(), ref, rtol=1e-5, atol=1e-6)


def test_sce_properties():
    torch.testing.assert_close(sce(MODELS, BASE, select_topk=0.5), sce(MODELS[::-1], BASE, select_topk=0.5),
                               rtol=1e-6, atol=1e-7)
    assert torch.equal(sce([BASE.clone(), BASE.clone()], BASE), BASE)  # zero task vectors: uniform weights, base
    one = sce(MODELS[:1], BASE)  # one model: its own task vector
    torch.testing.assert_close(one, MODELS[0], rtol=1e-6, atol=1e-6)
    tiny = sce([t([1.0]), t([3.0])], t([0.0]), select_topk=0.5)  # one element: variance 1, keeps 0 entries
    assert tiny.tolist() == [0.0]


# -- nearswap -----------------------------------------------------------------------------------

def test_nearswap_hand_worked():
    base = torch.zeros(4)
    other = t([0.001, 0.01, -0.1, 0.0])
    # |Δ| = (0.001, 0.01, 0.1, 0): w = min(t/|Δ|, 1) with t = 0.005 -> (1, 0.5, 0.05, 1)
    out = nearswap([other], base, t=0.005)
    np.testing.assert_allclose(out.numpy(), [0.001, 0.005, -0.005, 0.0], rtol=1e-6)
    assert torch.equal(nearswap([other], base, t=0.0), base)


def test_nearswap_matches_numpy_and_plan(models, tmp_path, out_dir):
    a, b = MODELS[0].double().numpy(), BASE.double().numpy()
    w = np.clip(0.05 / np.maximum(np.abs(b - a), 1e-6), 0, 1)
    np.testing.assert_allclose(nearswap([MODELS[0]], BASE, t=0.05).numpy(), w * a + (1 - w) * b, rtol=1e-6, atol=1e-7)
    p, tt = models["paths"], models["tensors"]
    plan = write_plan(tmp_path, f"""
        merge_method: nearswap
        base_model: {p['base']}
        models:
          - model: {p['a']}
        parameters:
          t:
            - filter: mlp
              value: [0.001, 0.004]
            - value: 0.002
        dtype: float32
        """)
    mergekit_lite.run(plan, out_dir)
    got = load_dir(out_dir)
    for name, base in tt["base"].items():
        parts = name.split(".")
        pos = int(parts[2]) / 3 if len(parts) > 2 and parts[1] == "layers" else 0.0
        tv = 0.001 + 0.003 * pos if "mlp" in name else 0.002
        a = tt["a"][name].astype(np.float64)
        w = np.clip(tv / np.maximum(np.abs(base - a), 1e-6), 0, 1)
        np.testing.assert_allclose(got[name].numpy(), w * a + (1 - w) * base, rtol=1e-5, atol=1e-7, err_msg=name)
