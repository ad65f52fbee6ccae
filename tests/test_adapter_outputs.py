"""Adapter outputs (``output: adapter``): concatenation is exact at rank r₁ + r₂, SVD re-factorisation
of a delta of true rank ≤ r is exact and an error target picks the smallest rank, IA3 vectors merge as
weighted (geometric) means; each checked against numpy float64 computations from the input files."""

from __future__ import annotations

import json
import os
import textwrap

import numpy as np
import pytest
from safetensors.torch import load_file

import mergekit_lite
from mergekit_lite import merge_adapters
from mergekit_lite.errors import ModelNotFound, PlanError
from mergekit_lite.example_adapters import LORA_DEFAULTS, lora_tensors, save_adapter
from mergekit_lite.examples import LLAMA_CONFIG, llama_shapes

from conftest import REPO, load_dir, write_plan

CONFIGS = os.path.join(REPO, "merge_configs")
BASE = os.path.join(CONFIGS, "models", "base")
ATTN, MLP = os.path.join(CONFIGS, "adapters", "lora_attn"), os.path.join(CONFIGS, "adapters", "lora_mlp")
IA3, IA3_CHAT = os.path.join(CONFIGS, "adapters", "ia3"), os.path.join(CONFIGS, "adapters", "ia3_chat")
P = "base_model.model."


def deltas(folder: str) -> dict[str, np.ndarray]:
    """module -> scaling·B@A in float64, from the adapter's files and config (PEFT's rules)."""
    cfg = json.load(open(os.path.join(folder, "adapter_config.json")))
    ts = {k: v.double().numpy() for k, v in load_file(os.path.join(folder, "adapter_model.safetensors")).items()}
    out = {}
    for key, a in ts.items():
        if ".lora_A." not in key:
            continue
        module = key[len(P):].split(".lora_A")[0]
        b = ts[key.replace("lora_A", "lora_B")]
        r = cfg.get("rank_pattern", {}).get(module.rsplit(".", 1)[-1], cfg["r"])
        alpha = cfg.get("alpha_pattern", {}).get(module.rsplit(".", 1)[-1], cfg["lora_alpha"])
        assert a.shape[0] == r
        out[module] = (alpha / (r ** 0.5 if cfg.get("use_rslora") else r)) * (b @ a)
    return out


def written(folder: str) -> tuple[dict, dict[str, np.ndarray], dict[str, int]]:
    """(config, module -> B@A·scaling of the output, module -> rank), read back from the files."""
    cfg = json.load(open(os.path.join(folder, "adapter_config.json")))
    ts = {k: v.double().numpy() for k, v in load_file(os.path.join(folder, "adapter_model.safetensors")).items()}
    prods, ranks = {}, {}
    for key, a in ts.items():
        if ".lora_A." in key:
            module = key[len(P):].split(".lora_A")[0]
            rank = cfg["rank_pattern"].get(module, cfg["r"])
            alpha = cfg["alpha_pattern"].get(module, cfg["lora_alpha"])
            assert a.shape[0] == rank, module
            prods[module] = alpha / rank * ts[key.replace("lora_A", "lora_B")] @ a
            ranks[module] = rank
    return cfg, prods, ranks


def rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def run(tmp_path, text: str, name: str = "plan.yml") -> str:
    out = str(tmp_path / name.replace(".yml", ""))
    mergekit_lite.run(write_plan(tmp_path, text, name), out, overwrite=True)
    return out


def test_concat_is_the_exact_weighted_sum_at_rank_r1_plus_r2(tmp_path):
    out = str(tmp_path / "concat")
    mergekit_lite.run(os.path.join(CONFIGS, "lora_concat.yml"), out)  # weights 0.7 and 0.5
    d1, d2 = deltas(ATTN), deltas(MLP)
    cfg, prods, ranks = written(out)
    assert set(prods) == set(d1) | set(d2)
    for module, got in prods.items():
        want = 0.7 * d1.get(module, 0) + 0.5 * d2.get(module, 0)
        assert rel(got, want) < 1e-6, module
        expected = (8 if "o_proj" not in module else 4) * (module in d1) + 4 * (module in d2)
        assert ranks[module] == expected, module
    assert ranks["model.layers.0.self_attn.q_proj"] == 12  # both adapters change q_proj: 8 + 4
    assert cfg["peft_type"] == "LORA" and cfg["use_rslora"] is False and cfg["r"] == cfg["lora_alpha"]
    assert set(cfg["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def test_svd_refactorisation_of_a_delta_of_true_rank_at_most_r_is_exact(tmp_path):
    plan = f"""
        output: adapter
        merge_method: task_arithmetic
        base_model: {BASE}
        models:
          - {{model: {ATTN}, parameters: {{weight: 1.0}}}}
          - {{model: {MLP}, parameters: {{weight: -0.5}}}}
        rank: 12
        """
    out = run(tmp_path, plan)
    d1, d2 = deltas(ATTN), deltas(MLP)
    _, prods, ranks = written(out)
    for module, got in prods.items():
        assert rel(got, d1.get(module, 0) - 0.5 * d2.get(module, 0)) < 1e-5, module
        assert ranks[module] == 12


def test_default_rank_is_the_largest_input_rank_and_the_error_target_picks_the_smallest_rank(tmp_path):
    base_plan = f"""
        output: adapter
        merge_method: linear
        base_model: {BASE}
        models:
          - {{model: {ATTN}, parameters: {{weight: 0.6}}}}
          - {{model: {MLP}, parameters: {{weight: 0.4}}}}
        """
    d1, d2 = deltas(ATTN), deltas(MLP)
    _, _, ranks = written(run(tmp_path, base_plan, "default.yml"))
    assert ranks["model.layers.0.self_attn.q_proj"] == 8 and ranks["model.layers.0.mlp.up_proj"] == 4
    assert ranks["model.layers.3.self_attn.o_proj"] == 4
    out = run(tmp_path, textwrap.dedent(base_plan) + "rank: 12\nrank_error: 0.2\n", "target.yml")
    cfg, prods, ranks = written(out)
    for module, got in prods.items():
        merged = 0.6 * d1.get(module, 0) + 0.4 * d2.get(module, 0)  # linear normalises: weights sum to 1
        s = np.linalg.svd(merged, compute_uv=False)
        tail = [np.sqrt(np.sum(s[k:] ** 2)) / np.linalg.norm(s) for k in range(len(s) + 1)]
        k = ranks[module]
        assert tail[k] <= 0.2 + 1e-6 and (k == 1 or tail[k - 1] > 0.2), (module, k, tail[:13])
        assert abs(rel(got, merged) - tail[k]) < 1e-4
    assert len(set(ranks.values())) > 1 and cfg["rank_pattern"]  # the ranks differ and the config says so


def test_any_method_runs_on_the_deltas_before_the_svd(tmp_path):
    """ties with density 1 and equal signs is the plain sum: a check that the method sees the deltas."""
    plan = f"""
        output: adapter
        merge_method: ties
        base_model: {BASE}
        models:
          - {{model: {ATTN}, parameters: {{weight: 1.0, density: 1.0}}}}
        parameters: {{normalize: false}}
        rank: 8
        """
    d1 = deltas(ATTN)
    _, prods, _ = written(run(tmp_path, plan))
    assert all(rel(got, d1[m]) < 1e-5 for m, got in prods.items())


def test_ia3_merge_weighted_mean_and_geometric_mean_with_identity_for_absent_modules(tmp_path):
    v1 = {k: v.double().numpy() for k, v in load_file(os.path.join(IA3, "adapter_model.safetensors")).items()}
    v2 = {k: v.double().numpy() for k, v in load_file(os.path.join(IA3_CHAT, "adapter_model.safetensors")).items()}
    plan = f"""
        output: adapter
        merge_method: linear
        base_model: {BASE}
        models:
          - {{model: {IA3}, parameters: {{weight: 0.6}}}}
          - {{model: {IA3_CHAT}, parameters: {{weight: 0.4}}}}
        """
    for log_space, name in ((False, "mean.yml"), (True, "log.yml")):
        out = run(tmp_path, textwrap.dedent(plan) + f"log_space: {str(log_space).lower()}\n", name)
        got = {k: v.double().numpy() for k, v in load_file(os.path.join(out, "adapter_model.safetensors")).items()}
        assert set(got) == set(v1) | set(v2)
        for key, l_out in got.items():
            a, b = v1.get(key, np.ones_like(l_out)), v2.get(key, np.ones_like(l_out))
            want = np.exp(0.6 * np.log(a) + 0.4 * np.log(b)) if log_space else 0.6 * a + 0.4 * b
            assert rel(l_out, want) < 1e-6, key
        cfg = json.load(open(os.path.join(out, "adapter_config.json")))
        assert cfg["peft_type"] == "IA3" and cfg["feedforward_modules"] == ["down_proj"]
        assert set(cfg["target_modules"]) == {"k_proj", "v_proj", "down_proj"}


def test_python_merge_adapters_is_the_plan(tmp_path):
    merged = merge_adapters([ATTN, MLP], base=BASE, method="concat", weight=[0.7, 0.5])
    assert "output: adapter" in merged.to_plan() and "merge_method: concat" in merged.to_plan()
    result = merged.save(str(tmp_path / "py"))
    yaml_out = run(tmp_path, merged.to_plan(), "same.yml")
    py = open(tmp_path / "py" / "adapter_model.safetensors", "rb").read()
    assert py == open(os.path.join(yaml_out, "adapter_model.safetensors"), "rb").read()
    assert "model.layers.0.self_attn.q_proj: rank 12, relative error 0" in result.report()
    with pytest.raises(PlanError, match="has no parameter 'density'"):
        merge_adapters([ATTN, MLP], base=BASE, method="concat", density=0.5)


@pytest.mark.parametrize("text, where, message", [
    ("merge_method: concat\nmodels:\n  - model: {ia3}\n  - model: {ia3c}\n", "merge_method",
     "concat stacks LoRA factors"),
    ("merge_method: linear\nmodels:\n  - model: {attn}\n  - model: {ia3}\n", "models", "mix LoRA and IA3"),
    ("merge_method: linear\nmodels:\n  - model: {attn}\nlog_space: true\n", "log_space", "applies to IA3"),
    ("merge_method: linear\nmodels:\n  - model: {ia3}\nrank: 4\n", "rank", "IA3 adapters have no rank"),
    ("merge_method: concat\nmodels:\n  - model: {attn}\nrank_error: 0.1\n", "rank_error", "concat is exact"),
    ("merge_method: linear\nmodels:\n  - model: {base}+{attn}\n", "models[0].model", "name each adapter alone"),
])
def test_adapter_output_mistakes_are_plan_errors(tmp_path, text, where, message):
    body = text.format(ia3=IA3, ia3c=IA3_CHAT, attn=ATTN, base=BASE)
    plan = write_plan(tmp_path, f"output: adapter\nbase_model: {BASE}\n" + body)
    with pytest.raises(PlanError) as info:
        mergekit_lite.compile_plan(plan)
    issue = info.value.issues[0]
    assert issue.path == where and message in issue.message


def test_adapter_keys_outside_adapter_outputs_and_multi_step_adapter_outputs_are_refused(tmp_path):
    with pytest.raises(PlanError, match="rank applies to adapter outputs only"):
        mergekit_lite.parse_plan(f"merge_method: linear\nmodels:\n  - model: {BASE}\nrank: 4\n")
    with pytest.raises(PlanError, match="output: adapter needs base_model"):
        mergekit_lite.parse_plan(f"output: adapter\nmerge_method: concat\nmodels:\n  - model: {ATTN}\n")
    with pytest.raises(PlanError, match="single-step plans"):
        mergekit_lite.parse_plan(f"name: a\nmerge_method: linear\nmodels:\n  - model: {BASE}\n---\noutput: adapter\n"
                                 f"merge_method: concat\nbase_model: {BASE}\nmodels:\n  - model: {ATTN}\n")


def test_modules_to_save_are_merged_whole_over_the_base(tmp_path):
    """An adapter's modules_to_save tensor is a full tensor R: concat gives W + Σ wᵢ(Rᵢ − W), where an
    adapter without it counts as the base's W; the output saves it whole and says so."""
    shapes = llama_shapes(LLAMA_CONFIG)
    ts = lora_tensors(shapes, ["q_proj"], {"*": 2}, 1)
    norm = np.random.default_rng(3).normal(1, 0.1, 64).astype(np.float32)
    ts["model.norm.weight"] = norm
    folder = save_adapter(str(tmp_path / "ad"), dict(LORA_DEFAULTS, r=2, lora_alpha=2, modules_to_save=["norm"]), ts)
    out = run(tmp_path, f"output: adapter\nmerge_method: concat\nbase_model: {BASE}\nmodels:\n"
                        f"  - {{model: {folder}, parameters: {{weight: 0.7}}}}\n"
                        f"  - {{model: {ATTN}, parameters: {{weight: 0.5}}}}\n")
    cfg, prods, ranks = written(out)
    assert cfg["modules_to_save"] == ["model.norm"] and ranks["model.layers.0.self_attn.q_proj"] == 2 + 8
    base_norm = load_dir(BASE)["model.norm.weight"].double().numpy()
    got = load_file(os.path.join(out, "adapter_model.safetensors"))[P + "model.norm.weight"].double().numpy()
    assert rel(got, base_norm + 0.7 * (norm - base_norm)) < 1e-6
    # lm_head adapted (LoRA) by one adapter and saved whole by another: refused
    lora_head = save_adapter(str(tmp_path / "head"), dict(LORA_DEFAULTS, r=2, lora_alpha=2),
                             lora_tensors(shapes, ["lm_head"], {"*": 2}, 2))
    whole_head = save_adapter(str(tmp_path / "whole"),
                              dict(LORA_DEFAULTS, r=2, lora_alpha=2, modules_to_save=["norm", "lm_head"]),
                              dict(ts, **{"lm_head.weight": np.zeros((256, 64), np.float32)}))
    plan = write_plan(tmp_path, f"output: adapter\nmerge_method: concat\nbase_model: {BASE}\nmodels:\n"
                                f"  - model: {lora_head}\n  - model: {whole_head}\n", "clash.yml")
    with pytest.raises(PlanError, match="lm_head.weight is saved whole by one adapter"):
        mergekit_lite.compile_plan(plan)


def test_a_model_named_as_an_adapter_is_reported(tmp_path):
    plan = write_plan(tmp_path, f"output: adapter\nmerge_method: concat\nbase_model: {BASE}\nmodels:\n"
                                f"  - model: {ATTN}\n  - model: {CONFIGS}/models/ft_math\n")
    with pytest.raises(ModelNotFound, match="ft_math is not a PEFT adapter folder: a model has no adapter_config.json"):
        mergekit_lite.compile_plan(plan)
