"""Multi-step plans: one graph, streamed per tensor, no intermediate files unless asked for."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import mergekit_lite
from mergekit_lite.errors import PlanError
from mergekit_lite.graph import Load, Merge
from mergekit_lite.merge import compile_plan
from mergekit_lite.plan.schema import parse_plan

from conftest import load_dir, write_plan


def step1(p, name="mix", extra=""):
    return f"""name: {name}
merge_method: linear
models:
  - model: {p['a']}
    parameters: {{weight: [0.2, 0.8]}}
  - model: {p['b']}
    parameters: {{weight: 0.4}}
{extra}
"""


def step2(p, mix="mix"):
    return f"""merge_method: task_arithmetic
base_model: {p['base']}
models:
  - model: {mix}
    parameters: {{weight: 1.0}}
  - model: {p['c']}
    parameters: {{weight: -0.5}}
"""


@pytest.mark.parametrize("first_dtype", ["float32", "bfloat16"])
def test_two_step_plan_equals_separate_runs_with_intermediate_on_disk(models, tmp_path, first_dtype):
    p = models["paths"]
    combined = write_plan(tmp_path, step1(p, extra=f"out_dtype: {first_dtype}") + "---\n" + step2(p), "two.yml")
    one = str(tmp_path / "one")
    stats = mergekit_lite.run(combined, one)
    assert sorted(os.listdir(tmp_path)) == sorted(["two.yml", "one"])  # nothing intermediate written
    # the same stages run separately, the intermediate on disk
    inter = str(tmp_path / "inter")
    mergekit_lite.run(write_plan(tmp_path, step1(p, extra=f"out_dtype: {first_dtype}").replace("name: mix\n", ""),
                                 "s1.yml"), inter)
    sep = str(tmp_path / "sep")
    mergekit_lite.run(write_plan(tmp_path, step2(p, mix=inter), "s2.yml"), sep)
    a, b = load_dir(one), load_dir(sep)
    assert set(a) == set(b) and stats.tensors == len(a)
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_steps_form_equals_multi_document_form(models, tmp_path):
    p = models["paths"]
    multi = write_plan(tmp_path, step1(p) + "---\n" + step2(p), "multi.yml")
    indent = lambda text: "\n".join(("    " + ln if ln else ln) for ln in text.splitlines())
    steps = write_plan(tmp_path, "steps:\n  - " + indent(step1(p)).lstrip() + "\n  - " + indent(step2(p)).lstrip()
                       + "\n", "steps.yml")
    assert len(parse_plan(open(steps).read()).steps) == 2
    mergekit_lite.run(multi, str(tmp_path / "m"))
    mergekit_lite.run(steps, str(tmp_path / "s"))
    a, b = load_dir(str(tmp_path / "m")), load_dir(str(tmp_path / "s"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_each_step_tensor_is_computed_in_the_same_group(models, tmp_path):
    p = models["paths"]
    compiled = compile_plan(write_plan(tmp_path, step1(p) + "---\n" + step2(p)))
    for group, nodes in compiled.groups:
        merges = [n for n in nodes if isinstance(n, Merge)]
        assert {m.step for m in merges} == {"mix", ""} and all(m.tensor == group for m in merges)
        # the base model, read by the second step only, and each input: read once per tensor
        loads = [n for n in nodes if isinstance(n, Load)]
        assert len(loads) == len(set((n.file, n.tensor) for n in loads)) == 4


def test_three_step_recipe_stays_within_single_step_bound(models, tmp_path):
    p = models["paths"]
    text = step1(p) + "---\n" + f"""name: second
merge_method: task_arithmetic
base_model: {p['base']}
models:
  - model: mix
    parameters: {{weight: 0.8}}
  - model: {p['c']}
    parameters: {{weight: -0.3}}
---
merge_method: linear
models:
  - model: second
    parameters: {{weight: 0.5}}
  - model: {p['b']}
    parameters: {{weight: 0.5}}
"""
    plan = write_plan(tmp_path, text)
    compiled = compile_plan(plan)
    largest_f32 = max(n.nbytes for n in compiled.graph if isinstance(n, Load))
    n_inputs = 4  # distinct models: a, b, c, base
    bound = (n_inputs + 3) * largest_f32
    assert compiled.max_need <= bound
    stats = mergekit_lite.run(plan, str(tmp_path / "o"), max_memory=compiled.max_need)
    assert stats.peak_live_bytes <= compiled.max_need <= bound
    # and the numbers: mix = (w·a + 0.4·b)/(w + 0.4), w from 0.2 to 0.8 over the layers;
    # second = base + 0.8(mix − base) − 0.3(c − base); then the average of second and b
    got = load_dir(str(tmp_path / "o"))
    t = models["tensors"]
    name = "model.layers.3.mlp.down_proj.weight"  # t = 1: weight of a is 0.8
    mix = (0.8 * t["a"][name].astype(np.float64) + 0.4 * t["b"][name]) / 1.2
    mix = mix.astype(np.float32).astype(np.float64)
    base = t["base"][name].astype(np.float64)
    second = (base + 0.8 * (mix - base) - 0.3 * (t["c"][name] - base)).astype(np.float32).astype(np.float64)
    np.testing.assert_allclose(got[name].numpy(), 0.5 * second + 0.5 * t["b"][name], rtol=1e-5, atol=1e-7)


def test_save_writes_an_intermediate_step(models, tmp_path):
    p = models["paths"]
    inter = str(tmp_path / "saved_mix")
    plan = write_plan(tmp_path, step1(p, extra=f"save: {inter}") + "---\n" + step2(p))
    mergekit_lite.run(plan, str(tmp_path / "o"))
    ref = str(tmp_path / "ref")
    mergekit_lite.run(write_plan(tmp_path, step1(p).replace("name: mix\n", ""), "s1.yml"), ref)
    a, b = load_dir(inter), load_dir(ref)
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert os.path.exists(os.path.join(inter, "config.json"))


def test_cycle_is_reported(models, tmp_path):
    p = models["paths"]
    text = f"""name: x
merge_method: linear
models:
  - {{model: y, parameters: {{weight: 1}}}}
  - {{model: {p['a']}, parameters: {{weight: 1}}}}
---
name: y
merge_method: linear
models:
  - {{model: x, parameters: {{weight: 1}}}}
  - {{model: {p['b']}, parameters: {{weight: 1}}}}
---
merge_method: linear
models:
  - {{model: y, parameters: {{weight: 1}}}}
"""
    with pytest.raises(PlanError, match="cycle: y -> x -> y|cycle: x -> y -> x"):
        parse_plan(text, "c.yml")


def test_unknown_step_name_is_reported(models, tmp_path):
    p = models["paths"]
    plan = write_plan(tmp_path, step1(p) + "---\n" + step2(p, mix="mixx"))
    with pytest.raises(PlanError, match="step 'mix' is not used by the output step"):
        mergekit_lite.run(plan, str(tmp_path / "o"))
    plan = write_plan(tmp_path, step2(p, mix="mixx"), "single.yml")
    with pytest.raises(mergekit_lite.ModelNotFound, match="'mixx' not found"):
        mergekit_lite.run(plan, str(tmp_path / "o"))


def test_shape_or_depth_mismatch_between_steps_is_a_plan_time_error(models, tmp_path):
    p = models["paths"]
    text = f"""name: deep
merge_method: passthrough
slices:
  - sources: [{{model: {p['a']}, layer_range: [0, 4]}}]
  - sources: [{{model: {p['a']}, layer_range: [2, 4]}}]
---
merge_method: linear
models:
  - {{model: deep, parameters: {{weight: 0.5}}}}
  - {{model: {p['b']}, parameters: {{weight: 0.5}}}}
"""
    with pytest.raises(PlanError, match="model .* has 4 layers but step 'deep' has 6"):
        compile_plan(write_plan(tmp_path, text))
    assert not (tmp_path / "o").exists()


def test_two_unnamed_steps_and_duplicate_names(tmp_path):
    with pytest.raises(PlanError, match="only one step may be unnamed"):
        parse_plan("merge_method: linear\nmodels: [{model: a, parameters: {weight: 1}}]\n---\n"
                   "merge_method: linear\nmodels: [{model: b, parameters: {weight: 1}}]\n")
    with pytest.raises(PlanError, match="two steps are named 'x'"):
        parse_plan("name: x\nmerge_method: linear\nmodels: [{model: a, parameters: {weight: 1}}]\n---\n"
                   "name: x\nmerge_method: linear\nmodels: [{model: b, parameters: {weight: 1}}]\n---\n"
                   "merge_method: linear\nmodels: [{model: x, parameters: {weight: 1}}]\n")


def test_plan_command_shows_steps_and_dependencies(models, tmp_path):
    p = models["paths"]
    plan = write_plan(tmp_path, step1(p) + "---\n" + step2(p))
    r = subprocess.run([sys.executable, "-m", "mergekit_lite", "plan", plan], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert "step mix: linear" in r.stdout and "step (output): task_arithmetic" in r.stdout
    assert "uses steps: mix (computed in the same pass, not written)" in r.stdout
