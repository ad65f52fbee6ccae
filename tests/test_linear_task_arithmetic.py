"""linear and task_arithmetic: the methods alone, and whole merges checked against numpy."""

import numpy as np
import pytest
import torch

import mergekit_lite
from mergekit_lite import methods
from mergekit_lite.errors import PlanError
from mergekit_lite.methods.linear import linear
from mergekit_lite.methods.task_arithmetic import task_arithmetic

from conftest import load_dir, write_plan

gen = torch.Generator().manual_seed(0)
A, B, C = (torch.randn(5, 7, generator=gen) for _ in range(3))


def test_registry_knows_core_methods_and_rejects_unknown():
    assert {"linear", "task_arithmetic"} <= set(methods.names())
    with pytest.raises(KeyError, match="known methods: .*linear"):
        methods.get("soup")


def test_linear_weights_one_zero_reproduce_first_model_exactly():
    out = linear([A, B], None, weight=[1.0, 0.0], normalize=True)
    assert torch.equal(out, A)


def test_linear_matches_numpy():
    out = linear([A, B], None, weight=[0.3, 0.7], normalize=True)
    expected = (0.3 * A.double().numpy() + 0.7 * B.double().numpy()) / 1.0
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-6, atol=1e-7)
    out = linear([A, B, C], None, weight=[2.0, 1.0, 1.0], normalize=True)
    np.testing.assert_allclose(out.numpy(), (2 * A.numpy() + B.numpy() + C.numpy()) / 4, rtol=1e-6, atol=1e-7)
    out = linear([A, B], None, weight=[2.0, 1.0], normalize=False)
    np.testing.assert_allclose(out.numpy(), 2 * A.numpy() + B.numpy(), rtol=1e-6, atol=1e-7)


def test_linear_hand_worked():
    x = torch.tensor([1.0, 2.0, -4.0])
    y = torch.tensor([3.0, 0.0, 4.0])
    assert linear([x, y], None, weight=[1.0, 3.0], normalize=True).tolist() == [2.5, 0.5, 2.0]


def test_linear_upcasts_bfloat16_inputs():
    out = linear([A.bfloat16(), B.bfloat16()], None, weight=[0.5, 0.5], normalize=True)
    assert out.dtype == torch.float32
    np.testing.assert_allclose(out.numpy(), (A.bfloat16().float() + B.bfloat16().float()).numpy() / 2, rtol=1e-6)


def test_linear_does_not_modify_inputs():
    a = A.clone()
    linear([a, B], None, weight=[0.5, 0.5], normalize=True)
    assert torch.equal(a, A)


def test_task_arithmetic_one_model_weight_one_reproduces_it():
    out = task_arithmetic([A], B, weight=[1.0], lambda_=1.0, normalize=False)
    torch.testing.assert_close(out, A, rtol=0, atol=1e-6)


def test_task_arithmetic_negative_weight_subtracts():
    out = task_arithmetic([A], B, weight=[-1.0], lambda_=1.0, normalize=False)
    np.testing.assert_allclose(out.numpy(), 2 * B.double().numpy() - A.double().numpy(), rtol=1e-5, atol=1e-6)


def test_task_arithmetic_matches_numpy_with_lambda_and_normalize():
    base, a, c = B.double().numpy(), A.double().numpy(), C.double().numpy()
    out = task_arithmetic([A, C], B, weight=[0.7, 0.5], lambda_=0.8, normalize=False)
    np.testing.assert_allclose(out.numpy(), base + 0.8 * (0.7 * (a - base) + 0.5 * (c - base)), rtol=1e-5, atol=1e-6)
    out = task_arithmetic([A, C], B, weight=[0.7, 0.5], lambda_=1.0, normalize=True)
    np.testing.assert_allclose(out.numpy(), base + (0.7 * (a - base) + 0.5 * (c - base)) / 1.2, rtol=1e-5, atol=1e-6)


def test_task_arithmetic_hand_worked():
    base = torch.tensor([1.0, 1.0, 1.0])
    a = torch.tensor([2.0, 1.0, 0.0])
    b = torch.tensor([1.0, 3.0, 1.0])
    out = task_arithmetic([a, b], base, weight=[1.0, -0.5], lambda_=2.0, normalize=False)
    # τa = [1,0,-1], τb = [0,2,0]; 2·(τa − 0.5·τb) = [2,-2,-2]
    assert out.tolist() == [3.0, -1.0, -1.0]


# -- whole merges ---------------------------------------------------------------------------------

def layer_t(name: str, n_layers: int = 4) -> float:
    parts = name.split(".")
    if len(parts) > 2 and parts[1] == "layers":
        return int(parts[2]) / (n_layers - 1)
    return 0.0


def test_task_arithmetic_plan_with_gradient_and_filter_equals_numpy(models, tmp_path, out_dir):
    p = models["paths"]
    plan = write_plan(tmp_path, f"""
        merge_method: task_arithmetic
        base_model: {p['base']}
        models:
          - model: {p['a']}
            parameters:
              weight: [1.0, 0.5]
          - model: {p['b']}
            parameters:
              weight:
                - filter: self_attn
                  value: 0.3
                - value: 0.8
          - model: {p['c']}
            parameters:
              weight: -0.5
        parameters:
          lambda: 0.9
        dtype: float32
        """)
    stats = mergekit_lite.run(plan, out_dir)
    got = load_dir(out_dir)
    t = models["tensors"]
    assert set(got) == set(t["base"]) and stats.tensors == len(got)
    for name, base in t["base"].items():
        base = base.astype(np.float64)
        w_a = 1.0 + (0.5 - 1.0) * layer_t(name)
        w_b = 0.3 if "self_attn" in name else 0.8
        mixed = w_a * (t["a"][name] - base) + w_b * (t["b"][name] - base) - 0.5 * (t["c"][name] - base)
        np.testing.assert_allclose(got[name].numpy(), base + 0.9 * mixed, rtol=1e-6, atol=1e-7, err_msg=name)
        assert got[name].dtype == torch.float32


def test_linear_plan_weights_one_zero_reproduce_model_exactly(models, tmp_path, out_dir):
    p = models["paths"]
    plan = write_plan(tmp_path, f"""
        merge_method: linear
        models:
          - model: {p['a']}
            parameters: {{weight: 1.0}}
          - model: {p['b']}
            parameters: {{weight: 0.0}}
        """)
    mergekit_lite.run(plan, out_dir)
    got = load_dir(out_dir)
    for name, value in models["tensors"]["a"].items():
        assert np.array_equal(got[name].numpy(), value), name


def test_task_arithmetic_plan_one_model_reproduces_it(models, tmp_path, out_dir):
    p = models["paths"]
    plan = write_plan(tmp_path, f"""
        merge_method: task_arithmetic
        base_model: {p['base']}
        models:
          - model: {p['a']}
            parameters: {{weight: 1.0}}
        """)
    mergekit_lite.run(plan, out_dir)
    got = load_dir(out_dir)
    for name, value in models["tensors"]["a"].items():
        np.testing.assert_allclose(got[name].numpy(), value, rtol=0, atol=1e-7, err_msg=name)


def test_weights_summing_to_zero_is_a_plan_error(models, tmp_path, out_dir):
    p = models["paths"]
    plan = write_plan(tmp_path, f"""
        merge_method: linear
        models:
          - model: {p['a']}
            parameters: {{weight: 1.0}}
          - model: {p['b']}
            parameters:
              weight: [-1.0, 1.0]
        """)
    with pytest.raises(PlanError, match="sum to 0"):
        mergekit_lite.run(plan, out_dir)
