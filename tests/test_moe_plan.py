"""Mixture of experts configs (mergekit-moe's): accepted unchanged, and every problem a plan error with
file:line:key, reported at once; those that need headers (hidden size, depth, model type) before any
tensor is read. ``mergekit-lite plan`` shows the experts and the gate mode."""

from __future__ import annotations

import copy
import json
import os

import pytest

import mergekit_lite
from mergekit_lite.errors import PlanError
from mergekit_lite.examples import LLAMA_CONFIG, llama_shapes, random_model, save_model
from mergekit_lite.plan.schema import parse_plan

from conftest import REPO, write_plan

MODELS = os.path.join(REPO, "merge_configs", "models")


def issues(text: str, file: str = "moe.yml"):
    with pytest.raises(PlanError) as info:
        parse_plan(text, file)
    return {i.path: (i.line, i.message) for i in info.value.issues}


def test_mergekit_moe_config_parses_with_its_defaults():
    recipe = parse_plan("base_model: b\nexperts:\n  - source_model: e1\n    positive_prompts: [x]\n"
                        "  - source_model: e2\n    positive_prompts: [y]\n    negative_prompts: [z]\n"
                        "    noise_scale: 0.01\n    residual_scale: 0.5\n")
    step = recipe.output
    assert step.merge_method == "moe" and str(step.base_model) == "b"
    spec = step.moe
    assert spec.gate_mode == "hidden" and spec.experts_per_token == 2  # mergekit-moe's defaults
    assert spec.architectures == ("mixtral", "qwen2_moe", "qwen3_moe")
    assert [str(e.source_model) for e in spec.experts] == ["e1", "e2"]
    assert spec.experts[1].negative_prompts == ("z",) and spec.experts[1].residual_scale == 0.5
    assert [str(r) for r in step.referenced_models()] == ["b", "e1", "e2"]


def test_every_problem_at_once_with_line_and_key():
    found = issues("base_model: b\n"
                   "gate_mode: cheap_embedding\n"
                   "experts_per_token: 3\n"
                   "architecture: mixtrel\n"
                   "experts:\n"
                   "  - source_model: e1\n"
                   "    positive_prompts: [x]\n"
                   "    temperature: 2\n"
                   "  - source_model: e2\n"
                   "    positive_prompts: hello\n"
                   "    noise_scale: -1\n"
                   "merge_method: linear\n")
    assert found["gate_mode"][0] == 2 and "cheap_embed" in found["gate_mode"][1]
    assert found["experts_per_token"] == (3, "experts_per_token 3 is more than the 2 experts given; allowed: 1 to 2")
    assert found["architecture"][0] == 4 and "unknown architecture 'mixtrel'" in found["architecture"][1]
    assert "mixtral, qwen2_moe, qwen3_moe" in found["architecture"][1]
    assert found["experts[0].temperature"][0] == 8 and "source_model" in found["experts[0].temperature"][1]
    assert found["experts[1].positive_prompts"] == (10, "expected a list of strings, got 'hello'")
    assert found["experts[1].noise_scale"][0] == 11 and ">= 0" in found["experts[1].noise_scale"][1]
    assert found["merge_method"][0] == 12 and "unknown key 'merge_method'" in found["merge_method"][1]


def test_prompt_built_gates_need_distinct_prompts():
    found = issues("base_model: b\ngate_mode: cheap_embed\nexperts:\n  - source_model: e1\n"
                   "  - source_model: e2\n    positive_prompts: [y]\n")
    assert found["experts[0]"][0] == 4 and "give positive_prompts" in found["experts[0]"][1]
    found = issues("base_model: b\ngate_mode: hidden\nexperts:\n  - source_model: e1\n    positive_prompts: [a]\n"
                   "  - source_model: e2\n    positive_prompts: [a]\n")
    assert "every expert has the same prompts" in found["experts"][1]
    # random gates need no prompts; the same model twice is only a warning
    recipe = parse_plan("base_model: b\ngate_mode: random\nexperts:\n  - e1\n  - e1\n")
    assert any("every expert is the same model" in w for w in recipe.warnings)


def test_architectures_and_shared_experts():
    assert "DeepSeek MoE output is not supported" in issues("base_model: b\narchitecture: deepseek\ngate_mode: random\n"
                                                            "experts: [e1, e2]\n")["architecture"][1]
    found = issues("base_model: b\narchitecture: mixtral\ngate_mode: random\nexperts: [e1, e2]\n"
                   "shared_experts: [e3]\n")
    assert found["shared_experts"][0] == 5 and "mixtral takes 0" in found["shared_experts"][1]
    # mergekit's spelling: a prefix of "Qwen MoE" / "Qwen3 MoE"
    spec = parse_plan("base_model: b\narchitecture: qwen\ngate_mode: random\nexperts: [e1, e2]\n"
                      "shared_experts: [e3]\n").output.moe
    assert spec.architectures == ("qwen2_moe", "qwen3_moe") and str(spec.shared_experts[0].source_model) == "e3"


def _variant(root, name, **changes):
    cfg = copy.deepcopy(LLAMA_CONFIG)
    cfg.update(changes)
    return save_model(str(root / name), random_model(llama_shapes(cfg), 5), cfg)


def test_header_problems_are_plan_errors_before_any_read(tmp_path):
    wide = _variant(tmp_path, "wide", hidden_size=32, head_dim=8)
    deep = _variant(tmp_path, "deep", num_hidden_layers=3)
    plan = write_plan(tmp_path, f"base_model: {MODELS}/base\ngate_mode: random\nexperts:\n"
                                f"  - source_model: {MODELS}/ft_math\n  - source_model: {wide}\n"
                                f"  - source_model: {deep}\n")
    with pytest.raises(PlanError) as info:
        mergekit_lite.compile_plan(plan)
    found = {i.path: (i.line, i.message) for i in info.value.issues}
    assert found["experts[1].source_model"][0] == 5
    assert "hidden size differs (hidden size 64" in found["experts[1].source_model"][1]
    assert "[176, 32]" in found["experts[1].source_model"][1]
    assert "has 3 layers, the base 4" in found["experts[2].source_model"][1]
    assert all(str(plan) in str(i) for i in info.value.issues)


def test_model_type_the_architecture_does_not_take(tmp_path):
    cfg = copy.deepcopy(LLAMA_CONFIG)
    cfg["model_type"] = "qwen3"
    other = save_model(str(tmp_path / "q3"), random_model(llama_shapes(cfg), 5), cfg)
    plan = write_plan(tmp_path, f"base_model: {MODELS}/base\ngate_mode: random\nexperts:\n"
                                f"  - source_model: {other}\n  - source_model: {MODELS}/ft_code\n")
    with pytest.raises(PlanError) as info:
        mergekit_lite.compile_plan(plan)
    assert "is a qwen3 model, the base is a llama model" in str(info.value)
    plan = write_plan(tmp_path, f"base_model: {other}\narchitecture: mixtral\ngate_mode: random\nexperts:\n"
                                f"  - source_model: {other}\n  - source_model: {other}\n", "p2.yml")
    with pytest.raises(PlanError) as info:
        mergekit_lite.compile_plan(plan)
    assert info.value.issues[0].path == "architecture" and "mixtral takes llama or mistral" in str(info.value)


def test_plan_command_shows_experts_and_gate_mode(capsys, monkeypatch):
    from mergekit_lite.cli import main

    monkeypatch.chdir(REPO)
    assert main(["plan", "merge_configs/moe.yml"]) == 0
    out = capsys.readouterr().out
    assert "mixture of experts: mixtral, gate_mode cheap_embed, 2 of 3 experts per token" in out
    assert "expert 0: models/ft_math (2 positive, 1 negative prompts)" in out
    assert main(["plan", "merge_configs/moe.yml", "--json"]) == 0
    step = json.loads(capsys.readouterr().out)["steps"][0]
    assert step["gate_mode"] == "cheap_embed" and step["architecture"] == "mixtral"
    assert [e["model"] for e in step["experts"]] == ["models/ft_math", "models/ft_code", "models/ft_chat"]
