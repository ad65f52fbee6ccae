"""Model Breadcrumbs (breadcrumbs, breadcrumbs_ties): outlier + tail trimming against numpy float64,
hand-worked literals, gamma = 0 and tiny tensors."""

import numpy as np
import torch

from mergekit_lite.methods.breadcrumbs import breadcrumbs, breadcrumbs_ties
from mergekit_lite.methods.sparsify import trim, trim_outliers
from mergekit_lite.methods.task_arithmetic import task_arithmetic


def np_breadcrumbs_mask(tau: np.ndarray, density: float, gamma: float) -> np.ndarray:
    """Keep the entries ranked [n − k − n_top, n − n_top) by |τ| ascending, k = max(1, ⌊d·n⌋),
    n_top = min(⌊γ·n⌋, n − k)."""
    n = tau.size
    if density >= 1:
        return np.ones(tau.shape, bool)
    k = max(1, int(density * n))
    n_top = min(int(gamma * n), n - k)
    order = np.argsort(np.abs(tau).ravel(), kind="stable")
    keep = np.zeros(n, bool)
    keep[order[n - k - n_top:n - n_top]] = True
    return keep.reshape(tau.shape)


gen = torch.Generator().manual_seed(21)
BASE = torch.randn(50, 40, generator=gen)
MODELS = [BASE + 0.1 * torch.randn(50, 40, generator=gen) for _ in range(3)]

TAU = torch.tensor([0.1, -0.5, 0.3, 0.9, -0.2, 0.05, 0.7, -0.4, 0.6, 0.8])


def test_trim_outliers_hand_worked():
    # n = 10, density 0.5 -> k = 5, gamma 0.1 -> the largest (0.9) is an outlier; ascending
    # |τ| ranks 4..8 survive: 0.4, 0.5, 0.6, 0.7, 0.8
    out = trim_outliers(TAU, 0.5, 0.1).apply_(TAU.clone())
    np.testing.assert_array_equal(out.numpy(), np.float32([0, -0.5, 0, 0, 0, 0, 0.7, -0.4, 0.6, 0.8]))


def test_gamma_zero_is_a_plain_top_k_trim():
    a = trim_outliers(TAU, 0.3, 0.0).apply_(TAU.clone())
    b = trim(TAU, 0.3).apply_(TAU.clone())
    assert torch.equal(a, b) and int((a != 0).sum()) == 3 and a[3] == 0.9


def test_tiny_tensor_keeps_its_largest_entry_instead_of_vanishing():
    tau = torch.tensor([0.25, -0.75, 0.5])
    out = trim_outliers(tau, 0.3, 0.01).apply_(tau.clone())  # ⌊0.9⌋ = 0 -> 1; ⌊0.03⌋ = 0 outliers
    assert out.tolist() == [0.0, -0.75, 0.0]
    one = torch.tensor([3.0])
    kept = trim_outliers(one, 0.5, 0.5)
    assert kept is None or kept.apply_(one.clone()).tolist() == [3.0]


def test_outliers_give_way_to_density():
    # density 0.9 keeps 9 of 10; gamma 0.2 would drop 2: only the single largest goes
    out = trim_outliers(TAU, 0.9, 0.2).apply_(TAU.clone())
    expected = TAU.clone()
    expected[3] = 0
    assert torch.equal(out, expected)


def test_breadcrumbs_matches_numpy_reference():
    w, d, g = [0.8, -0.5, 1.2], [0.4, 0.7, 0.2], [0.02, 0.0, 0.1]
    out = breadcrumbs(MODELS, BASE, weight=w, density=d, gamma=g, lambda_=0.9, normalize=True)
    base = BASE.double().numpy()
    taus = [x.double().numpy() - base for x in MODELS]
    mixed = sum(wi * np.where(np_breadcrumbs_mask(t, di, gi), t, 0) for wi, t, di, gi in zip(w, taus, d, g))
    np.testing.assert_allclose(out.numpy(), base + 0.9 * mixed / sum(w), rtol=1e-5, atol=1e-6)


def test_breadcrumbs_ties_matches_numpy_reference():
    w, d, g = [1.0, 0.6, 0.8], [0.5, 0.3, 0.6], [0.01, 0.05, 0.0]
    out = breadcrumbs_ties(MODELS, BASE, weight=w, density=d, gamma=g, normalize=True)
    base = BASE.double().numpy()
    wt = [wi * np.where(np_breadcrumbs_mask(t, di, gi), t, 0)
          for wi, t, di, gi in zip(w, [x.double().numpy() - base for x in MODELS], d, g)]
    elected = np.where(sum(wt) >= 0, 1.0, -1.0)
    agree = [np.sign(x) == elected for x in wt]
    div = sum(np.where(a, wi, 0.0) for a, wi in zip(agree, w))
    ref = base + sum(np.where(a, x, 0.0) for a, x in zip(agree, wt)) / np.where(div == 0, 1, div)
    np.testing.assert_allclose(out.numpy(), ref, rtol=1e-5, atol=1e-6)


def test_breadcrumbs_hand_worked_literal():
    base = torch.zeros(10)
    other = TAU * -1.0
    # model 1: τ̂ as in test_trim_outliers_hand_worked; model 2 (−τ, density 1): all of −τ
    out = breadcrumbs([TAU.clone(), other], base, weight=[1.0, 0.5], density=[0.5, 1.0], gamma=[0.1, 0.1])
    expected = np.float32([0, -0.5, 0, 0, 0, 0, 0.7, -0.4, 0.6, 0.8]) - 0.5 * TAU.numpy()
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-6, atol=1e-7)


def test_breadcrumbs_at_density_one_is_task_arithmetic():
    w = [0.8, -0.5, 1.2]
    out = breadcrumbs(MODELS, BASE, weight=w, density=[1.0] * 3, gamma=[0.05] * 3, lambda_=1.0)
    assert torch.equal(out, task_arithmetic(MODELS, BASE, weight=w, lambda_=1.0, normalize=False))


def test_breadcrumbs_ties_is_symmetric_in_model_order():
    w, d, g = [1.0, 0.6, 0.8], [0.5, 0.3, 0.6], [0.01, 0.05, 0.0]
    out = breadcrumbs_ties(MODELS, BASE, weight=w, density=d, gamma=g, normalize=True)
    p = [1, 2, 0]
    out2 = breadcrumbs_ties([MODELS[i] for i in p], BASE, weight=[w[i] for i in p], density=[d[i] for i in p],
                            gamma=[g[i] for i in p], normalize=True)
    torch.testing.assert_close(out, out2, rtol=1e-6, atol=1e-7)
