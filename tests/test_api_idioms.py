"""Python idioms without surprises: dtype= takes a torch dtype or a string everywhere, sum() of task
vectors works, and adding or negating whole models is an error unless asked for by name."""

import numpy as np
import pytest
import torch

import mergekit_lite
from mergekit_lite import Model, TaskVector
from mergekit_lite.errors import MergeError

from conftest import load_dir

NAME = "model.layers.1.self_attn.q_proj.weight"


@pytest.fixture
def m(models):
    p = models["paths"]
    return {"base": Model(p["base"]), "a": Model(p["a"]), "b": Model(p["b"]), "c": Model(p["c"]), "p": p,
            "t": models["tensors"]}


@pytest.mark.parametrize("dtype,want", [(torch.bfloat16, torch.bfloat16), ("bfloat16", torch.bfloat16),
                                        ("torch.float16", torch.float16), (torch.float32, torch.float32)])
def test_dtype_takes_a_torch_dtype_or_a_string_everywhere(m, tmp_path, dtype, want):
    expr = m["base"] + 0.5 * (m["a"] - m["base"])
    expr.save(tmp_path / "save", dtype=dtype)
    assert load_dir(str(tmp_path / "save"))[NAME].dtype == want
    assert expr.tensor(NAME, dtype=dtype).dtype == want
    assert all(t.dtype == want for _, t in expr.iter_tensors(dtype=dtype, only=[NAME]))
    plan = tmp_path / "p.yml"
    plan.write_text(expr.to_plan())
    mergekit_lite.run(str(plan), str(tmp_path / "run"), dtype=dtype)
    assert load_dir(str(tmp_path / "run"))[NAME].dtype == want


def test_a_dtype_that_cannot_be_written_is_a_clear_error(m, tmp_path):
    expr = m["base"] + 0.5 * (m["a"] - m["base"])
    for bad in (torch.int8, "int4", 16):
        with pytest.raises(MergeError, match="unknown dtype .*allowed: float32, float16, bfloat16"):
            expr.save(tmp_path / "x", dtype=bad)
    assert not (tmp_path / "x").exists()


def test_sum_of_task_vectors(m):
    base = m["base"]
    tvs = [m["a"] - base, m["b"] - base, 0.5 * (m["c"] - base)]
    total = sum(tvs)
    assert isinstance(total, TaskVector) and sum(tvs, 0) is not None
    assert (tvs[0] + 0) is tvs[0] and (0 + tvs[0]) is tvs[0]
    merged = base + sum(tvs)
    assert merged.to_plan() == (base + tvs[0] + tvs[1] + tvs[2]).to_plan()
    t = m["t"]
    b64 = t["base"][NAME].astype(np.float64)
    want = b64 + (t["a"][NAME] - b64) + (t["b"][NAME] - b64) + 0.5 * (t["c"][NAME] - b64)
    np.testing.assert_allclose(merged.tensor(NAME).numpy(), want, rtol=1e-6, atol=1e-7)


def test_adding_or_negating_whole_models_says_to_subtract_the_base(m):
    base, a, b = m["base"], m["a"], m["b"]
    with pytest.raises(TypeError, match=r"a sum of models is not a model.*Subtract the base first.*"
                                        r"base \+ \(finetuned - base\).*merge\('linear'"):
        base + a
    with pytest.raises(TypeError, match="a sum of models is not a model"):
        (0.5 * a + 0.5 * b) + base  # a weighted average is a model: adding another one is the same mistake
    with pytest.raises(TypeError, match=r"cannot negate.*base - 0.5 \* \(finetuned - base\)"):
        -a
    with pytest.raises(TypeError, match=r"weights sum to 2, not 1"):
        (2 * a).save("never")
    with pytest.raises(TypeError, match=r"weights sum to 1.5, not 1"):
        (0.5 * a + b).tensor(NAME)
    with pytest.raises(TypeError, match=r"weights sum to 0.5"):
        (0.5 * a) - base
    with pytest.raises(TypeError, match=r"weights sum to -1"):
        base.ties([a * -1.0])
    with pytest.raises(TypeError, match=r"sum\(\) of models"):
        sum([a, b])


def test_weighted_averages_still_read_as_models(m):
    a, b, c = m["a"], m["b"], m["c"]
    soup = 0.25 * a + 0.75 * b  # weights summing to 1: a model soup
    three = 0.2 * a + 0.3 * b + 0.5 * c  # partial sums on the way are fine
    t = m["t"]
    np.testing.assert_allclose(soup.tensor(NAME).numpy(), 0.25 * t["a"][NAME] + 0.75 * t["b"][NAME], rtol=1e-6,
                               atol=1e-9)
    np.testing.assert_allclose(three.tensor(NAME).numpy(),
                               0.2 * t["a"][NAME] + 0.3 * t["b"][NAME] + 0.5 * t["c"][NAME], rtol=1e-6, atol=1e-8)
    assert "merge_method: linear" in (m["base"] + 1.0 * (soup - m["base"])).to_plan()


def test_the_linear_merge_by_name_still_adds_models(m):
    doubled = mergekit_lite.merge("linear", [m["base"], m["a"]], weight=[1, 1], normalize=False)
    t = m["t"]
    np.testing.assert_allclose(doubled.tensor(NAME).numpy(), t["base"][NAME] + t["a"][NAME], rtol=1e-6)
    negated = m["a"].linear([], weight=[-1.0], normalize=False)
    np.testing.assert_allclose(negated.tensor(NAME).numpy(), -t["a"][NAME], rtol=0)
