"""The Python API: lazy expressions compiled to the same plans, graph and executor as the CLI."""

import os

import numpy as np
import pytest
import torch

import mergekit_lite
from mergekit_lite import Model, TaskVector, stack
from mergekit_lite.errors import MergeError, PlanError, ShapeMismatch
from mergekit_lite.examples import LLAMA_CONFIG, save_model
from mergekit_lite.plan.schema import parse_plan

from conftest import load_dir, write_plan


@pytest.fixture
def m(models):
    p = models["paths"]
    base = Model(p["base"])
    return {"base": base, "a": Model(p["a"]), "b": Model(p["b"]), "c": Model(p["c"]), "p": p, "t": models["tensors"]}


def same_dirs(x, y):
    a, b = load_dir(x), load_dir(y)
    assert set(a) == set(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_task_arithmetic_expression_equals_yaml_bit_for_bit(m, tmp_path):
    base = m["base"]
    math, code = m["a"] - base, m["b"] - base
    merged = base + 0.7 * math + 0.5 * code
    assert isinstance(math, TaskVector)
    merged.save(tmp_path / "api")
    p = m["p"]
    yaml_plan = write_plan(tmp_path, f"""
        merge_method: task_arithmetic
        base_model: {p['base']}
        models:
          - model: {p['a']}
            parameters: {{weight: 0.7}}
          - model: {p['b']}
            parameters: {{weight: 0.5}}
        """)
    mergekit_lite.run(yaml_plan, str(tmp_path / "yaml"))
    same_dirs(str(tmp_path / "api"), str(tmp_path / "yaml"))


def test_task_negation_matches_numpy(m, tmp_path):
    base = m["base"]
    detox = base - 0.5 * (m["c"] - base)
    plan = detox.to_plan()
    assert "weight: -0.5" in plan and "task_arithmetic" in plan
    got = dict(detox.iter_tensors())
    t = m["t"]
    for name in ("model.layers.0.self_attn.q_proj.weight", "lm_head.weight"):
        base_np = t["base"][name].astype(np.float64)
        np.testing.assert_allclose(got[name].numpy(), base_np - 0.5 * (t["c"][name] - base_np), rtol=1e-6, atol=1e-7)


def test_grouping_of_task_vectors_does_not_matter(m):
    base = m["base"]
    x = base + 0.7 * (m["a"] - base) + 0.5 * (m["b"] - base)
    y = base + (0.7 * (m["a"] - base) + 0.5 * (m["b"] - base))
    z = base + 0.5 * (m["b"] - base) + 0.7 * (m["a"] - base)
    assert x.to_plan() == y.to_plan()
    assert torch.equal(x.tensor("model.norm.weight"), z.tensor("model.norm.weight"))


def test_to_plan_round_trips(m, tmp_path):
    base = m["base"]
    soup = (0.5 * m["a"] + 0.5 * m["b"]).named("soup")
    expr = base + 1.0 * (soup - base) - 0.25 * (m["c"] - base)
    text = expr.to_plan()
    recipe = parse_plan(text)
    assert [s.name for s in recipe.steps] == ["soup", None]
    # the plan text runs through the CLI path and gives the same bits as the expression
    path = write_plan(tmp_path, text)
    mergekit_lite.run(path, str(tmp_path / "yaml"))
    expr.save(tmp_path / "api")
    same_dirs(str(tmp_path / "yaml"), str(tmp_path / "api"))
    # and lowering is stable: the same expression gives the same text
    assert expr.to_plan() == text


def test_tensor_reads_only_what_it_needs(m):
    base = m["base"]
    expr = base + 0.3 * (m["a"] - base)
    compiled = expr._compile(mergekit_lite.Options(), sink="emit", only=["model.layers.1.mlp.up_proj.weight"])
    assert sum(1 for _ in compiled.graph) == 4  # two loads, one merge, one emit
    value = expr.tensor("model.layers.1.mlp.up_proj.weight")
    full = dict(expr.iter_tensors())
    assert torch.equal(value, full["model.layers.1.mlp.up_proj.weight"])
    assert list(full)[0] == "model.embed_tokens.weight" and len(full) == 39
    with pytest.raises(MergeError, match="no tensor 'nope'"):
        expr.tensor("nope")


def test_linear_combination_and_methods_as_functions(m, tmp_path):
    soup = 0.25 * m["a"] + 0.75 * m["b"]
    assert "merge_method: linear" in soup.to_plan()
    via_method = m["a"].linear([m["b"]], weight=[0.25, 0.75], normalize=False)
    via_function = mergekit_lite.merge("linear", [m["a"], m["b"]], weight=[0.25, 0.75], normalize=False)
    name = "model.layers.2.self_attn.v_proj.weight"
    ref = soup.tensor(name)
    assert torch.equal(ref, via_method.tensor(name)) and torch.equal(ref, via_function.tensor(name))
    np.testing.assert_allclose(ref.numpy(), 0.25 * m["t"]["a"][name] + 0.75 * m["t"]["b"][name], rtol=1e-6, atol=1e-9)
    ta = m["base"].task_arithmetic([m["a"] - m["base"]], **{"lambda": 0.5})
    ta2 = m["base"] + 0.5 * (m["a"] - m["base"])
    assert torch.equal(ta.tensor(name), ta2.tensor(name))


def test_stack_and_upscale_equal_their_yaml(m, tmp_path):
    p = m["p"]
    frank = stack(m["a"].layers(0, 3), m["b"].layers(1, 4))
    frank.save(tmp_path / "api", max_shard_size="100KB")
    mergekit_lite.run(write_plan(tmp_path, f"""
        merge_method: passthrough
        slices:
          - sources: [{{model: {p['a']}, layer_range: [0, 3]}}]
          - sources: [{{model: {p['b']}, layer_range: [1, 4]}}]
        """), str(tmp_path / "yaml"))
    same_dirs(str(tmp_path / "api"), str(tmp_path / "yaml"))
    up = m["base"].upscale(copies=2, drop=1)
    assert "depth_upscale" in up.to_plan()
    assert len([n for n, _ in up.iter_tensors() if ".layers." in n]) == 6 * 9


def test_composed_recipe_runs_as_one_graph(m, tmp_path):
    deep = stack(m["a"].layers(0, 4), m["a"].layers(2, 4))
    mixed = deep.linear([stack(m["b"].layers(0, 4), m["b"].layers(2, 4))], weight=[0.5, 0.5])
    stats = mixed.save(tmp_path / "o")
    assert sorted(os.listdir(tmp_path)) == ["o"]
    got = load_dir(str(tmp_path / "o"))
    name = "model.layers.5.mlp.gate_proj.weight"  # output layer 5 <- input layer 3
    src = "model.layers.3.mlp.gate_proj.weight"
    np.testing.assert_allclose(got[name].numpy(), 0.5 * m["t"]["a"][src] + 0.5 * m["t"]["b"][src], rtol=1e-6)
    assert stats.tensors == len(got)


# -- errors when the expression is built ------------------------------------------------------------

def test_type_errors(m):
    base = m["base"]
    with pytest.raises(TypeError, match="scale a task vector instead"):
        base + 3
    with pytest.raises(TypeError, match="different bases"):
        (m["a"] - base) + (m["b"] - m["c"])
    with pytest.raises(TypeError, match="not a model"):
        (m["a"] - base).save("x")
    with pytest.raises(TypeError, match="no parameter 'density'"):
        m["a"].linear([m["b"]], density=0.5)
    with pytest.raises(TypeError, match="must be taken against"):
        m["a"].task_arithmetic([m["b"] - base])
    with pytest.raises(ValueError, match="layer range"):
        m["a"].layers(3, 1)


def test_impossible_expressions_fail_when_built(m, tmp_path):
    t = dict(m["t"]["b"])
    t["model.layers.0.mlp.up_proj.weight"] = np.zeros((10, 64), np.float32)
    odd = Model(save_model(str(tmp_path / "odd"), t, LLAMA_CONFIG))
    with pytest.raises(ShapeMismatch, match=r"model.layers.0.mlp.up_proj.weight.*\[10, 64\]"):
        m["base"] + 0.5 * (odd - m["base"])
    with pytest.raises(PlanError, match="needs parameter 'weight'"):
        m["a"].linear([m["b"]])
    with pytest.raises(mergekit_lite.ModelNotFound, match="not found"):
        m["base"] + 1.0 * (Model(str(tmp_path / "missing")) - m["base"])
