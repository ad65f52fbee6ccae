"""arcee_fusion, ram and ramplus_tl against hand-worked numbers and independent numpy float64
computations of their definitions (mergekit 0.1.5 parity is in test_parity_mergekit.py)."""

import numpy as np
import pytest
import torch

import mergekit_lite
from mergekit_lite import methods
from mergekit_lite.errors import PlanError
from mergekit_lite.plan.schema import parse_plan

from conftest import REPO, load_dir

ram = methods.get("ram").fn
ramplus = methods.get("ramplus_tl").fn
fusion = methods.get("arcee_fusion").fn


def t(values):
    return torch.tensor(values, dtype=torch.float32)


# -- ram / ramplus_tl ----------------------------------------------------------------------------

def np_ram(tvs, base, eps, r=0.0, alpha=0.0):
    """RAM(+) written out per entry in float64: changed = |τ| > ε, c = #changed; an entry changed
    by one model gets λᵢ·τ (λᵢ = 1 + r·min(max(ρᵢ, 0), α)), one changed by several their mean."""
    changed = [np.abs(x) > eps for x in tvs]
    c = sum(ch.astype(np.int64) for ch in changed)
    out = np.zeros_like(base)
    for x, ch in zip(tvs, changed):
        alone = int((ch & (c == 1)).sum())
        shared = int((ch & (c > 1)).sum())
        lam = 1 + r * min(max(shared / max(alone, eps), 0.0), alpha)
        out += np.where(ch & (c == 1), lam * x, 0.0) + np.where(ch & (c > 1), x / np.maximum(c, 1), 0.0)
    return base + out


def test_ram_hand_worked():
    base = t([0.0, 0.0, 0.0, 0.0, 1.0])
    a = t([1.0, 0.0, 2.0, 3.0, 1.0])
    b = t([3.0, 1.0, 0.0, 1e-6, 1.0])
    # entry 0 changed by both: mean 2; 1 only by b: 1; 2 and 3 only by a (b's 1e-6 is below ε); 4 by none
    assert torch.equal(ram([a, b], base, epsilon=1e-5), t([2.0, 1.0, 2.0, 3.0, 1.0]))
    # epsilon is strict: a change of exactly ε is no change
    assert torch.equal(ram([t([0.5, -0.25])], t([0.0, 0.0]), epsilon=0.25), t([0.5, 0.0]))
    # three models sharing one entry, two another
    got = ram([t([3.0, 4.0]), t([6.0, 0.0]), t([-3.0, 2.0])], t([0.0, 0.0]), epsilon=0.1)
    assert torch.allclose(got, t([2.0, 3.0]))


def test_ramplus_hand_worked():
    base = t([0.0, 0.0, 0.0, 0.0])
    a = t([1.0, 0.0, 2.0, 3.0])  # changes 3 entries: 1 shared (entry 0), 2 alone -> rho 0.5
    b = t([3.0, 1.0, 0.0, 0.0])  # changes 2 entries: 1 shared, 1 alone -> rho 1.0
    # alpha caps rho at 0.2: both lambdas are 1 + 0.1·0.2 = 1.02
    assert torch.allclose(ramplus([a, b], base, r=0.1, alpha=0.2, epsilon=1e-5), t([2.0, 1.02, 2.04, 3.06]))
    # a larger cap separates them: lambda_a = 1 + 0.5·0.5 = 1.25, lambda_b = 1 + 0.5·1.0 = 1.5
    assert torch.allclose(ramplus([a, b], base, r=0.5, alpha=2.0, epsilon=1e-5), t([2.0, 1.5, 2.5, 3.75]))
    # a model with no unique entry: rho = shared/ε, capped at alpha; its shared entries are just averaged
    assert torch.allclose(ramplus([t([2.0]), t([4.0])], t([0.0]), r=0.1, alpha=0.2, epsilon=1e-5), t([3.0]))


@pytest.mark.parametrize("seed", [0, 1])
def test_ram_and_ramplus_match_numpy_float64(seed):
    g = np.random.default_rng(seed)
    base = g.normal(size=(33, 17))
    tvs = [g.normal(0, 0.01, base.shape) * (g.random(base.shape) < p) for p in (0.3, 0.5, 0.8)]
    ts = [torch.from_numpy(base + x).float() for x in tvs]
    b = torch.from_numpy(base).float()
    tvs32 = [(x - b).double().numpy() for x in ts]  # the float32 task vectors both sides threshold
    np.testing.assert_allclose(ram(ts, b, epsilon=0.004).numpy(), np_ram(tvs32, b.double().numpy(), 0.004),
                               rtol=1e-6, atol=1e-7)
    got = ramplus(ts, b, r=0.3, alpha=0.9, epsilon=0.004)
    np.testing.assert_allclose(got.numpy(), np_ram(tvs32, b.double().numpy(), 0.004, 0.3, 0.9), rtol=1e-6, atol=1e-7)
    # r = 0 is RAM; inputs are never modified
    assert torch.equal(ramplus(ts, b, r=0.0, alpha=0.9, epsilon=0.004), ram(ts, b, epsilon=0.004))
    assert torch.equal(b, torch.from_numpy(base).float())


def test_ram_bfloat16_inputs_are_upcast_before_the_task_vectors():
    base = torch.tensor([1.0, 1.0], dtype=torch.bfloat16)
    x = torch.tensor([1.0078125, 1.0], dtype=torch.bfloat16)  # one bfloat16 step above 1
    out = ram([x], base, epsilon=0.005)
    assert out.dtype == torch.float32 and torch.equal(out, t([1.0078125, 1.0]))


# -- arcee_fusion --------------------------------------------------------------------------------

def np_fusion(tuned, base):
    """Arcee Fusion in float64: importance = |Δ|·KL_row(softmax θ₁ + 1e-8 ‖ softmax θ_base + 1e-8),
    kept where importance ≥ median + 1.5·IQR, quantiles the ⌊q(n−1)⌋-th order statistics."""
    def softmax(x):
        e = np.exp(x - x.max(axis=-1, keepdims=True))
        return e / e.sum(axis=-1, keepdims=True)

    p, q = softmax(tuned) + 1e-8, softmax(base) + 1e-8
    imp = np.abs(tuned - base) * (p * np.log(p / q)).sum(axis=-1, keepdims=True)
    s = np.sort(imp.reshape(-1))
    q1, med, q3 = (s[int(f * (s.size - 1))] for f in (0.25, 0.5, 0.75))
    return np.where(imp >= med + 1.5 * (q3 - q1), tuned, base), imp


def test_arcee_fusion_hand_worked():
    # one row: KL is one positive number, so importance ranks entries by |Δ|: |Δ| = 0,0,0,0,0,0,0,0.1,0.2,4
    base = t([0.0] * 10)
    tuned = t([0.0] * 7 + [0.1, 0.2, 4.0])
    # sorted importance (÷KL): n−1 = 9 -> Q1 = s[2] = 0, median = s[4] = 0, Q3 = s[6] = 0: threshold 0,
    # so every entry passes (Δ = 0 entries keep the base either way)
    assert torch.equal(fusion([tuned], base), tuned)
    # with small changes everywhere the fence rises: |Δ| = 0.01 (x6), 0.02, 0.03, 0.04, 4 ->
    # Q1 = s[2] = 0.01, median = s[4] = 0.01, Q3 = s[6] = 0.02 -> fence 0.025: 0.03, 0.04 and 4 pass
    delta = t([0.01] * 6 + [0.02, 0.03, 0.04, 4.0])
    got = fusion([base + delta], base)
    assert torch.equal(got[:7], base[:7]) and torch.equal(got[7:], (base + delta)[7:])


def test_arcee_fusion_matches_numpy_float64():
    g = np.random.default_rng(3)
    for shape in [(40, 64), (300,), (5, 7, 9)]:
        base = g.normal(size=shape).astype(np.float32)
        tuned = (base + g.normal(0, 0.02, shape) * (g.random(shape) < 0.4)).astype(np.float32)
        got = fusion([torch.from_numpy(tuned)], torch.from_numpy(base)).numpy()
        want, imp = np_fusion(tuned.astype(np.float64), base.astype(np.float64))
        s = np.sort(imp.reshape(-1))
        fence = s[int(0.5 * (s.size - 1))] + 1.5 * (s[int(0.75 * (s.size - 1))] - s[int(0.25 * (s.size - 1))])
        near = np.abs(imp - fence) < 1e-6 * fence  # float32 vs float64 may disagree exactly at the fence
        assert (got != base).any() and (got == base).any()
        np.testing.assert_allclose(got[~near], want[~near], rtol=1e-6, atol=1e-7)


def test_arcee_fusion_quantiles_are_exact_on_large_tensors():
    """Above 10⁶ entries mergekit samples the quantiles at random; ours stay exact order statistics."""
    from mergekit_lite.methods.arcee_fusion import fusion_threshold, importance_scores

    g = torch.Generator().manual_seed(0)
    base = torch.randn(1100, 1000, generator=g)
    tuned = base + 0.01 * torch.randn(1100, 1000, generator=g)
    imp = importance_scores(tuned, base)
    s = np.sort(imp.reshape(-1).numpy())
    n1 = s.size - 1
    assert float(fusion_threshold(imp)) == pytest.approx(
        float(s[n1 // 2] + 1.5 * (s[3 * n1 // 4] - s[n1 // 4])), rel=1e-6)
    assert torch.equal(fusion([tuned], base), fusion([tuned], base))  # deterministic


# -- plans -------------------------------------------------------------------------------------------

def test_plans_check_counts_and_parameters():
    with pytest.raises(PlanError, match="arcee_fusion"):
        parse_plan("merge_method: arcee_fusion\nbase_model: a\nmodels: [{model: b}, {model: c}]\n")
    with pytest.raises(PlanError, match="base"):
        parse_plan("merge_method: ram\nmodels: [{model: b}, {model: c}]\n")
    with pytest.raises(PlanError, match="epsilon"):
        parse_plan("merge_method: ram\nbase_model: a\nmodels: [{model: b}]\nparameters: {epsilon: -1}\n")
    with pytest.raises(PlanError, match="no parameter 'weight'"):
        parse_plan("merge_method: ramplus_tl\nbase_model: a\nmodels: [{model: b, parameters: {weight: 1}}]\n")


def test_example_plans_run_and_do_what_they_say(tmp_path):
    base = load_dir(f"{REPO}/merge_configs/models/base")
    math = load_dir(f"{REPO}/merge_configs/models/ft_math")
    code = load_dir(f"{REPO}/merge_configs/models/ft_code")
    out = {}
    for name in ("ram", "ramplus_tl", "arcee_fusion"):
        mergekit_lite.run(f"{REPO}/merge_configs/{name}.yml", str(tmp_path / name))
        out[name] = load_dir(str(tmp_path / name))
    k = "model.layers.1.mlp.down_proj.weight"
    want = np_ram([(m[k] - base[k]).double().numpy() for m in (math, code)], base[k].double().numpy(), 0.001)
    np.testing.assert_allclose(out["ram"][k].numpy(), want, rtol=1e-6, atol=1e-7)
    assert (out["ramplus_tl"][k] - base[k]).abs().sum() > (out["ram"][k] - base[k]).abs().sum()  # boosted
    kept = out["arcee_fusion"][k].float() != base[k].bfloat16().float()
    assert 0 < kept.float().mean() < 0.5  # the outlier fence keeps a minority of the changes
