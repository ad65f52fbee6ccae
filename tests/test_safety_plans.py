"""Hostile and broken plans are plan errors with file and line, found quickly: alias bombs, deep
nesting, self-referencing aliases, control characters, tags, huge numbers and counts."""

from __future__ import annotations

import os
import time

import pytest

from mergekit_lite import cli
from mergekit_lite.errors import PlanError
from mergekit_lite.plan.schema import load_plan, parse_plan
from mergekit_lite.plan.source import MAX_DEPTH, MAX_PLAN_BYTES, MAX_VALUES

from conftest import REPO, write_plan

MODELS = os.path.join(REPO, "merge_configs", "models")


def alias_bomb(levels: int = 12) -> str:
    text = "a0: &a0 [x, x, x, x, x, x, x, x, x]\n"
    for i in range(1, levels):
        text += f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]\n"
    return text + "merge_method: linear\n"


def merge_key_bomb(levels: int = 40) -> str:
    text = "b0: &b0 {k: 1}\n"
    for i in range(1, levels):
        text += f"b{i}: &b{i} {{<<: [*b{i - 1}, *b{i - 1}], z{i}: 1}}\n"
    return text


CASES = [
    ("alias bomb", alias_bomb(), f"more than {MAX_VALUES} values", 6),  # a5 holds 9^5 x's
    ("merge-key bomb", merge_key_bomb(), f"more than {MAX_VALUES} values", 16),  # b15 merges 2^15 mappings
    ("deep lists", "merge_method: " + "[" * 5000 + "]" * 5000 + "\n", f"nested more than {MAX_DEPTH}", 1),
    ("deep mappings", "merge_method: " + "{a: " * 3000 + "1" + "}" * 3000 + "\n", f"nested more than {MAX_DEPTH}", 1),
    ("self alias", "merge_method: linear\nmodels: &m [*m]\n", "alias refers to a mapping or list that contains it", 2),
    ("self alias map", "merge_method: linear\nparameters: &p {weight: *p}\n", "contains it", 2),
    ("control byte", "merge_method: linear\nmodels:\n  - model: a\x01b\n", "character #x0001 is not allowed", 3),
    ("python tag", "merge_method: !!python/object/apply:os.system ['true']\n", "YAML tag", 1),
    ("python name", "merge_method: !!python/name:os.system\n", "could not determine a constructor", 1),
    ("400 digits", "merge_method: linear\nseed: " + "9" * 400 + "\n", "out of range", 2),
    ("1e400", "merge_method: linear\nparameters:\n  weight: 1e400\n", "not a finite number", 3),
    (".nan", "merge_method: linear\nparameters:\n  weight: .nan\n", "not a finite number", 3),
    ("huge copies", "merge_method: passthrough\ndepth_upscale: {model: m, copies: 1000000000000}\n", "at most 64", 2),
    ("karcher max_iter", "merge_method: karcher\nmodels: [{model: a}, {model: b}]\nparameters: {max_iter: 1000000000000}\n",
     "between 1 and 10000", 3),
    ("too big", "merge_method: linear\n#" + "x" * MAX_PLAN_BYTES + "\n", f"limited to {MAX_PLAN_BYTES} bytes", None),
]


@pytest.mark.parametrize("case,text,message,line", CASES, ids=[c[0] for c in CASES])
def test_hostile_plans_are_plan_errors_with_a_line(case, text, message, line):
    start = time.perf_counter()
    with pytest.raises(PlanError) as err:
        parse_plan(text, "hostile.yml")
    assert time.perf_counter() - start < 10
    issue = err.value.issues[0]
    assert message in issue.message, issue
    assert issue.file == "hostile.yml" and issue.line == line, issue


def test_merge_keys_work_like_writing_the_values_out():
    with_merge = parse_plan(
        "merge_method: ties\n"
        "base_model: base\n"
        "models:\n"
        "  - model: a\n"
        "    parameters: &p {weight: 0.3, density: 0.5}\n"
        "  - model: b\n"
        "    parameters:\n"
        "      <<: *p\n"
        "      weight: 0.7\n")
    spelled = parse_plan(
        "merge_method: ties\n"
        "base_model: base\n"
        "models:\n"
        "  - {model: a, parameters: {weight: 0.3, density: 0.5}}\n"
        "  - {model: b, parameters: {weight: 0.7, density: 0.5}}\n")
    assert [dict(m.parameters) for m in with_merge.steps[0].models] == \
           [dict(m.parameters) for m in spelled.steps[0].models]


def test_plan_that_is_not_a_regular_file(tmp_path):
    os.mkfifo(tmp_path / "fifo.yml")
    with pytest.raises(PlanError, match="not a regular file"):
        load_plan(str(tmp_path / "fifo.yml"))
    with pytest.raises(PlanError, match="not a regular file"):
        load_plan(str(tmp_path))
    (tmp_path / "bad.yml").write_bytes(b"merge_method: \xff\xfe\n")
    with pytest.raises(PlanError, match="cannot read the plan file"):
        load_plan(str(tmp_path / "bad.yml"))


@pytest.mark.parametrize("case,text,message,line", CASES[:8], ids=[c[0] for c in CASES[:8]])
def test_cli_reports_hostile_plans_with_status_2(tmp_path, capsys, case, text, message, line):
    plan = write_plan(tmp_path, text)
    assert cli.main(["plan", plan]) == 2
    err = capsys.readouterr().err
    assert f"{plan}:{line}" in err and message in err and "Traceback" not in err


@pytest.mark.parametrize("model", ["org/..", "org/name@../../etc", "../../../../etc/passwd", "org/na--me",
                                   "a" * 300 + "/b", "org/name@main;rm -rf /", "/dev/zero", "org\x00x/name"])
def test_hostile_model_references_are_refused_without_network(tmp_path, capsys, monkeypatch, model):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    plan = write_plan(tmp_path, "merge_method: linear\nmodels:\n  - model: " + repr(model).replace("'", '"')
                      + f"\n  - model: {MODELS}/ft_math\n")
    start = time.perf_counter()
    assert cli.main(["run", plan, str(tmp_path / "out"), "-q"]) == 2
    err = capsys.readouterr().err
    assert "error:" in err and "Traceback" not in err and "internal error" not in err, err
    assert time.perf_counter() - start < 30 and not os.path.exists(tmp_path / "out")
