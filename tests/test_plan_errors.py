"""Bad plans: every error names the file, the line, the key path and what is allowed."""

import pytest

from mergekit_lite.errors import PlanError
from mergekit_lite.plan.schema import load_plan, parse_plan


def issues(text: str, file="p.yml"):
    with pytest.raises(PlanError) as info:
        parse_plan(text, file)
    return info.value.issues, str(info.value)


def test_unknown_top_level_key_names_line_and_allowed_keys():
    found, msg = issues("merge_method: linear\nmodels:\n  - model: a\n    parameters: {weight: 1}\nnormalise: true\n")
    assert len(found) == 1
    i = found[0]
    assert (i.file, i.line, i.path) == ("p.yml", 5, "normalise")
    assert "unknown key 'normalise'" in i.message and "merge_method" in i.message and "parameters" in i.message
    assert "p.yml:5: normalise:" in msg


def test_parameter_the_method_does_not_take():
    found, _ = issues("merge_method: linear\nmodels:\n  - model: a\n    parameters:\n      weight: 1\n"
                      "      density: 0.5\n")
    assert found[0].line == 6 and found[0].path == "models[0].parameters.density"
    assert "'linear' has no parameter 'density'" in found[0].message and "weight, normalize" in found[0].message


def test_bad_parameter_value_type_and_range():
    found, _ = issues("merge_method: task_arithmetic\nbase_model: b\nmodels:\n  - model: a\n    parameters:\n"
                      "      weight: lots\nparameters:\n  normalize: 3\n")
    msgs = {i.path: (i.line, i.message) for i in found}
    assert msgs["models[0].parameters.weight"][0] == 6
    assert "expected a number, got 'lots'" in msgs["models[0].parameters.weight"][1]
    assert msgs["parameters.normalize"][0] == 8 and "true or false" in msgs["parameters.normalize"][1]


def test_bad_value_inside_gradient_and_filter_is_located():
    found, _ = issues("merge_method: linear\nmodels:\n  - model: a\n    parameters:\n      weight:\n"
                      "        - filter: mlp\n          value: [0, x, 1]\n        - value: 1\n")
    assert found[0].path == "models[0].parameters.weight[0].value"
    assert "gradient is a list of numbers" in found[0].message


def test_global_parameter_given_per_model():
    found, _ = issues("merge_method: linear\nmodels:\n  - model: a\n    parameters: {weight: 1, normalize: false}\n")
    assert found[0].path == "models[0].parameters.normalize"
    assert "global parameter" in found[0].message and "top-level" in found[0].message


def test_unknown_method_lists_known_ones():
    found, _ = issues("merge_method: avg\nmodels:\n  - model: a\n")
    assert found[0].path == "merge_method" and found[0].line == 1
    assert "unknown merge method 'avg'" in found[0].message
    assert "linear" in found[0].message and "task_arithmetic" in found[0].message


def test_malformed_yaml_reports_line():
    found, msg = issues("merge_method: linear\nmodels:\n  - model: a\n   parameters: {weight: 1\n")
    assert len(found) == 1 and found[0].line is not None and found[0].line >= 4
    assert "malformed YAML" in msg


def test_all_problems_reported_at_once():
    found, msg = issues("merge_method: linear\nmodels:\n  - model: a\n    parameters: {wieght: 1}\n"
                        "  - modle: b\ndtype: float8\nfoo: 1\n")
    paths = sorted(i.path for i in found)
    assert paths == ["dtype", "foo", "models[0].parameters.wieght", "models[1]", "models[1].modle"]
    assert msg.startswith("the merge plan has 5 problems")


def test_missing_merge_method_and_models():
    found, _ = issues("dtype: float32\n")
    text = " ".join(i.message for i in found)
    assert "missing key 'merge_method'" in text and "exactly one of 'models'" in text


def test_method_needs_base_model():
    found, _ = issues("merge_method: task_arithmetic\nmodels:\n  - model: a\n    parameters: {weight: 1}\n")
    assert "needs base_model" in found[0].message


def test_duplicate_key():
    found, _ = issues("merge_method: linear\nmerge_method: linear\nmodels:\n  - model: a\n")
    assert found[0].line == 2 and "duplicate key" in found[0].message


def test_scientific_notation_is_a_number():
    recipe = parse_plan("merge_method: linear\nmodels:\n  - model: a\n    parameters: {weight: 1e-3}\n")
    assert recipe.output.models[0].parameters["weight"] == 0.001


def test_lora_reference_is_read_as_a_base_with_an_adapter_not_ignored():
    recipe = parse_plan("merge_method: linear\nmodels:\n  - model: org/base+org/adapter@v2\n    parameters: {weight: 1}\n")
    ref = recipe.output.models[0].model
    assert (ref.path, ref.revision, str(ref.adapter), str(ref)) == ("org/base", None, "org/adapter@v2",
                                                                    "org/base+org/adapter@v2")


def test_missing_plan_file(tmp_path):
    with pytest.raises(PlanError) as info:
        load_plan(tmp_path / "nope.yml")
    assert "does not exist" in str(info.value)


def test_linear_with_unlisted_base_is_an_error():
    found, _ = issues("merge_method: linear\nbase_model: b\nmodels:\n  - model: a\n    parameters: {weight: 1}\n")
    assert found[0].path == "base_model" and "does not use a base model" in found[0].message
