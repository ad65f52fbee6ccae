"""The method contract lives in one place: ``register(...)``.

Parameters, cross-parameter checks, the output shape rule and the memory declaration are all
given to ``register``; the function's signature is checked against them at import.
"""

from __future__ import annotations

import inspect
import os

import pytest
import torch

import mergekit_lite
from mergekit_lite import methods
from mergekit_lite.errors import PlanError
from mergekit_lite.merge import Options, compile_plan

from conftest import REPO, load_dir, write_plan

MODELS = os.path.join(REPO, "merge_configs", "models")


@pytest.fixture
def scratch_name():
    """A method name that is removed from the registry afterwards."""
    name = "_contract_test"
    yield name
    methods.REGISTRY.pop(name, None)


def test_every_method_signature_agrees_with_its_params():
    for name in methods.names():
        m = methods.get(name)
        sig = inspect.signature(m.fn)
        for p in m.params:
            default = sig.parameters[p.pyname].default
            if default is not inspect.Parameter.empty:
                assert not p.required and default == p.default, (name, p.name)
        assert not hasattr(m.fn, "check_params"), name  # checks are given to register()


def test_a_signature_default_that_disagrees_is_refused(scratch_name):
    with pytest.raises(TypeError, match="defaults to 0.5 in its Param but to 0.7"):
        @methods.register(scratch_name, params=(methods.Param("t", float, "global", default=0.5),))
        def f(tensors, base, *, t=0.7):
            return tensors[0]
    assert scratch_name not in methods.REGISTRY


def test_a_required_param_with_a_signature_default_is_refused(scratch_name):
    with pytest.raises(TypeError, match="'t' is required"):
        @methods.register(scratch_name, params=(methods.Param("t", float, "global"),))
        def f(tensors, base, *, t=0.5):
            return tensors[0]


def test_an_undeclared_keyword_is_refused(scratch_name):
    with pytest.raises(TypeError, match="do not match the declared"):
        @methods.register(scratch_name, params=())
        def f(tensors, base, *, alpha=1.0):
            return tensors[0]


def test_cross_parameter_checks_come_from_register_and_are_located_plan_errors(scratch_name, tmp_path):
    def halves(values):
        return None if values["a"] + values["b"] == 1.0 else f"a + b must be 1, got {values['a'] + values['b']}"

    @methods.register(scratch_name, params=(methods.Param("a", float, "global"), methods.Param("b", float, "global")),
                      checks=halves)
    def f(tensors, base, *, a, b):
        return tensors[0] * a + tensors[1] * b

    f.check_params = lambda values: "never consulted"  # the old side channel is gone
    plan = write_plan(tmp_path, f"""\
        merge_method: {scratch_name}
        models:
          - model: {MODELS}/ft_math
          - model: {MODELS}/ft_code
        parameters:
          a: 0.3
          b: 0.3
        """)
    with pytest.raises(PlanError) as err:
        compile_plan(plan, Options())
    issue = err.value.issues[0]
    assert "a + b must be 1, got 0.6" in issue.message and issue.line is not None
    ok = write_plan(tmp_path, open(plan).read().replace("b: 0.3", "b: 0.7"), "ok.yml")
    compile_plan(ok, Options())


def test_linear_zero_weight_sum_check_is_registered():
    assert methods.get("linear").check({"normalize": True, "weight": [1.0, -1.0]}).startswith("the models' weights")
    assert methods.get("linear").check({"normalize": False, "weight": [1.0, -1.0]}) is None


def test_an_output_shape_rule_decides_the_planned_and_written_shape(scratch_name, tmp_path):
    """A method whose result is the inputs stacked along a new first axis."""
    @methods.register(scratch_name, min_models=2, shape=lambda shapes, base, params: (len(shapes), *shapes[0]),
                      workspace=lambda n: float(n))
    def f(tensors, base):
        return torch.stack([t.to(torch.float32) for t in tensors])

    plan = write_plan(tmp_path, f"""\
        merge_method: {scratch_name}
        models:
          - model: {MODELS}/ft_math
          - model: {MODELS}/ft_code
        """)
    compiled = compile_plan(plan, Options())
    shapes = {t.name: t.shape for t in compiled.outputs[0].tensors}
    assert shapes["model.norm.weight"] == (2, 64)
    out = str(tmp_path / "out")
    mergekit_lite.run(plan, out)
    got = load_dir(out)
    a, b = load_dir(f"{MODELS}/ft_math"), load_dir(f"{MODELS}/ft_code")
    assert torch.equal(got["model.norm.weight"], torch.stack([a["model.norm.weight"], b["model.norm.weight"]]))
