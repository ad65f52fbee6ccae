"""Every registered method on degenerate inputs: finite results (never NaN/inf), inputs left
untouched, float32 out; and the plan-level edge cases (missing optional tensors, bad parameters)."""

import json
import os

import pytest
import torch

import mergekit_lite
from mergekit_lite import methods
from mergekit_lite.errors import PlanError, TensorNotFound
from mergekit_lite.examples import LLAMA_CONFIG, save_model
from mergekit_lite.methods.draws import Draws

from conftest import load_dir, write_plan

REQUIRED = {"weight": 1.0, "t": 0.5}


def call(name, tensors, base):
    """Call method `name` with its defaults (required parameters: weight 1, t 0.5)."""
    m = methods.get(name)
    n = len(tensors)
    kwargs = {}
    for p in m.params:
        value = REQUIRED[p.name] if p.required else p.default
        if p.name == "density":
            value = 0.5
        kwargs[p.pyname] = [value] * n if p.scope == "model" else value
    if "weight" in kwargs and name == "nuslerp":
        kwargs["weight"] = [1.0, 2.0]
    if m.random:
        kwargs["draws"] = [Draws(i) for i in range(n)]
    return m.fn(tensors, base if m.base != "none" else None, **kwargs)


def n_models(name):
    m = methods.get(name)
    n = max(2, m.min_models)
    return min(n, m.max_models) if m.max_models else n


g = torch.Generator().manual_seed(61)
X = torch.randn(6, 5, generator=g)
CASES = {
    "one_element": lambda: (torch.tensor([0.5]), [torch.tensor([1.5]), torch.tensor([-0.5])]),
    "identical_to_base": lambda: (X.clone(), [X.clone(), X.clone()]),
    "opposite": lambda: (X.clone(), [X + 1.0, X - 1.0]),
    "all_zero": lambda: (torch.zeros(4, 3), [torch.zeros(4, 3), torch.zeros(4, 3)]),
    "antipodal_no_base": lambda: (torch.zeros(6, 5), [X.clone(), -X]),
    "bfloat16": lambda: (X.bfloat16(), [(X + 0.1).bfloat16(), (X - 0.2).bfloat16()]),
}
METHODS = [n for n in methods.names() if n != "passthrough"]


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("name", METHODS)
def test_method_is_finite_on_degenerate_inputs(name, case):
    base, pool = CASES[case]()
    k = n_models(name)
    tensors = (pool * k)[:k]
    before = [x.clone() for x in tensors] + [base.clone()]
    try:
        out = call(name, tensors, base)
    except ValueError as exc:  # a defined refusal (multislerp with cancelling directions)
        assert name == "multislerp" and "zero" in str(exc) and case in ("antipodal_no_base", "opposite")
        return
    assert out.shape == base.shape
    assert out.dtype == torch.float32 or (out is tensors[0])
    assert torch.isfinite(out.float()).all(), f"{name} on {case}: {out}"
    assert all(torch.equal(a, b) for a, b in zip(tensors + [base], before)), "inputs were modified"


def test_every_method_has_a_docstring_with_a_formula_and_a_paper():
    for name in methods.names():
        m = methods.get(name)
        assert m.paper.startswith("https://"), name
        assert "=" in m.doc or "θ" in m.doc, name


# -- plan-level edge cases ----------------------------------------------------------------------

def _without(src_tensors, drop, folder, tied=False):
    cfg = dict(LLAMA_CONFIG, tie_word_embeddings=tied)
    ts = {k: v for k, v in src_tensors.items() if k != drop}
    return save_model(folder, ts, cfg)


def test_model_missing_a_tied_lm_head_uses_its_embeddings(models, tmp_path, out_dir):
    p, tt = models["paths"], models["tensors"]
    tied = _without(tt["a"], "lm_head.weight", str(tmp_path / "tied"), tied=True)
    plan = write_plan(tmp_path, f"""
        merge_method: slerp
        base_model: {p['base']}
        models:
          - model: {tied}
        parameters: {{t: 0.0}}
        dtype: float32
        """)
    mergekit_lite.run(plan, out_dir)
    got = load_dir(out_dir)
    assert torch.equal(got["lm_head.weight"], torch.from_numpy(tt["base"]["lm_head.weight"]))


def test_model_missing_a_tensor_is_reported_before_reading(models, tmp_path, out_dir):
    p, tt = models["paths"], models["tensors"]
    partial = _without(tt["a"], "model.layers.2.mlp.up_proj.weight", str(tmp_path / "partial"))
    plan = write_plan(tmp_path, f"""
        merge_method: ties
        base_model: {p['base']}
        models:
          - model: {partial}
            parameters: {{weight: 1.0, density: 0.5}}
        """)
    with pytest.raises(TensorNotFound, match="model.layers.2.mlp.up_proj.weight"):
        mergekit_lite.run(plan, out_dir)
    assert not os.path.exists(out_dir)


@pytest.mark.parametrize("method,params,match", [
    ("dare_linear", "density: 0", "density"),
    ("dare_ties", "density: 1.2", "density"),
    ("breadcrumbs", "gamma: 1.0", "gamma"),
    ("sce", "select_topk: 0", "select_topk"),
    ("ties", "sign_election: majority", "sign_election"),
    ("dare_linear", "rescale_mode: l2", "rescale_mode"),
    ("karcher", "max_iter: 0", "max_iter"),
    ("nearswap", "t: -0.1", "'t'"),
])
def test_bad_parameter_values_are_plan_errors(models, tmp_path, out_dir, method, params, match):
    p = models["paths"]
    base = f"base_model: {p['base']}" if methods.get(method).base != "none" else ""
    weight = "weight: 1.0" if methods.get(method).param("weight") is not None and method != "karcher" else ""
    entries = [p["a"]] if methods.get(method).max_models == 1 else [p["a"], p["b"]]
    models_yaml = "\n".join(f"          - model: {e}\n            parameters: {{{weight}}}" for e in entries)
    plan = write_plan(tmp_path, f"""
        merge_method: {method}
        {base}
        models:
{models_yaml}
        parameters: {{{params}}}
        """)
    with pytest.raises(PlanError, match=match):
        mergekit_lite.run(plan, out_dir)


def test_weights_summing_to_zero_with_normalize_in_task_methods_keep_mergekits_guard():
    # Σ w = 0 with normalize: the divisor counts as 1 (no normalization), never inf/NaN
    from mergekit_lite.methods.dare import dare_linear
    out = dare_linear([X + 1, X + 2], X, weight=[1.0, -1.0], density=[1.0, 1.0], normalize=True,
                      draws=[Draws(0), Draws(1)])
    torch.testing.assert_close(out, X - 1.0)


def test_int8_mask_is_accepted_for_compatibility(models, tmp_path, out_dir):
    p = models["paths"]
    plan = write_plan(tmp_path, f"""
        merge_method: task_arithmetic
        base_model: {p['base']}
        models:
          - model: {p['a']}
            parameters: {{weight: 1.0}}
        parameters: {{int8_mask: true, normalize: true}}
        """)
    mergekit_lite.run(plan, out_dir)
    assert json.load(open(os.path.join(out_dir, "config.json")))["model_type"] == "llama"
