"""Parity with mergekit 0.1.5 on ``base+adapter`` plans and on LoRA extraction (skipped without
``MERGEKIT_YAML``).

mergekit folds an adapter by loading the base with transformers (in the dtype of its config),
running PEFT's ``merge_and_unload`` and saving the merged model to ``--lora-merge-cache``; then it
merges as usual. We fold per tensor in memory, rounding once to the base's dtype as that save does,
and write nothing else. Every tensor must agree within 1e-5 relative (‖a − b‖ / ‖b‖).

Extraction: our relative error ‖Δ − BA‖/‖Δ‖ (over all modules) is no worse than
mergekit-extract-lora's at the same rank (both truncate the full SVD, so they agree to rounding on
float32 inputs; on bfloat16 inputs mergekit subtracts and stores in bfloat16, so ours is smaller).
"""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest
import torch
from safetensors.torch import load_file

import mergekit_lite
from mergekit_lite.examples import LLAMA_CONFIG, save_model
from mergekit_lite.io.adapters import open_adapter

from conftest import REPO, load_dir, write_plan
from test_parity_mergekit import MERGEKIT, needs_mergekit, run_mergekit

pytestmark = [needs_mergekit, pytest.mark.parity]

CONFIGS = os.path.join(REPO, "merge_configs")

PLANS = {
    "passthrough": "merge_method: passthrough\nmodels:\n  - model: {base}+{attn}\n",
    "passthrough_ia3": "merge_method: passthrough\nmodels:\n  - model: {base}+{ia3}\n",
    "passthrough_bf16": "merge_method: passthrough\nmodels:\n  - model: {bf16}+{attn}\ndtype: bfloat16\n",
    "linear": ("merge_method: linear\nmodels:\n  - model: {base}+{attn}\n    parameters: {{weight: 0.6}}\n"
               "  - model: {base}+{mlp}\n    parameters: {{weight: [0.2, 0.8]}}\ndtype: float32\n"),
    "task_arithmetic": ("merge_method: task_arithmetic\nbase_model: {base}\nmodels:\n"
                        "  - model: {base}+{attn}\n    parameters: {{weight: 0.7}}\n"
                        "  - model: {base}+{mlp}\n    parameters:\n      weight:\n        - filter: q_proj\n"
                        "          value: -0.3\n        - value: 0.5\n"
                        "  - model: {ft}\n    parameters: {{weight: 0.3}}\ndtype: float32\n"),
}


@pytest.fixture(scope="module")
def parity(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapter-parity")
    paths = {"base": os.path.join(CONFIGS, "models", "base"), "ft": os.path.join(CONFIGS, "models", "ft_math"),
             "attn": os.path.join(CONFIGS, "adapters", "lora_attn"),
             "mlp": os.path.join(CONFIGS, "adapters", "lora_mlp"),
             "ia3": os.path.join(CONFIGS, "adapters", "ia3")}
    bf16 = {k: v.to(torch.bfloat16) for k, v in load_dir(paths["base"]).items()}
    paths["bf16"] = save_model(str(root / "bf16"), bf16, dict(LLAMA_CONFIG, torch_dtype="bfloat16"))
    jobs, ours = [], {}
    for name, text in PLANS.items():
        plan = write_plan(root, text.format(**paths), f"{name}.yml")
        ours[name] = str(root / f"ours-{name}")
        mergekit_lite.run(plan, ours[name])
        jobs.append((plan, str(root / f"mk-{name}"), ["--lora-merge-cache", str(root / "cache")]))
    run_mergekit(jobs, str(root))
    return root, ours


@pytest.mark.parametrize("name", sorted(PLANS))
def test_base_plus_adapter_plans_match_mergekit(parity, name):
    root, ours = parity
    mine, theirs = load_dir(ours[name]), load_dir(str(root / f"mk-{name}"))
    assert set(mine) == set(theirs)
    for key, ref in theirs.items():
        a, b = mine[key].double(), ref.double()
        assert mine[key].dtype == ref.dtype, key
        assert float((a - b).norm() / b.norm()) <= 1e-5, (name, key)


def test_no_merged_copy_besides_the_output(parity):
    """mergekit needed a merged copy per adapter in its cache; our runs wrote only their outputs."""
    root, ours = parity
    assert len(os.listdir(root / "cache")) >= 3
    assert all(sorted(os.listdir(out)) == sorted(os.listdir(ours["passthrough"])) for out in ours.values())


def overall_error(folder: str, base: dict, ft: dict) -> float:
    ad = open_adapter(folder)
    ts = load_file(os.path.join(folder, "adapter_model.safetensors"))
    lost = total = 0.0
    for target, m in ad.modules.items():
        delta = ft[target].double() - base[target].double()
        approx = m.scaling * ts[m.b.name].double() @ ts[m.a.name].double()
        lost += float((delta - approx).norm() ** 2)
        total += float(delta.norm() ** 2)
    return (lost / total) ** 0.5


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_extract_lora_is_at_least_as_accurate_as_mergekit(tmp_path, dtype):
    tool = os.path.join(os.path.dirname(MERGEKIT), "mergekit-extract-lora")
    if not os.path.exists(tool):
        pytest.skip("mergekit-extract-lora is not next to MERGEKIT_YAML")
    base_path, ft_path = os.path.join(CONFIGS, "models", "base"), os.path.join(CONFIGS, "models", "ft_math")
    if dtype == "bfloat16":
        for name in ("base", "ft"):
            src = base_path if name == "base" else ft_path
            tensors = {k: v.to(torch.bfloat16) for k, v in load_dir(src).items()}
            path = save_model(str(tmp_path / name), tensors, dict(LLAMA_CONFIG, torch_dtype="bfloat16"))
            base_path, ft_path = (path, ft_path) if name == "base" else (base_path, path)
    subprocess.run([tool, "--model", ft_path, "--base-model", base_path, "--out-path", str(tmp_path / "mk"),
                    "--max-rank", "8", "--quiet"], check=True, capture_output=True)
    mergekit_lite.extract_lora(base_path, ft_path, str(tmp_path / "ours"), rank=8)
    base, ft = load_dir(base_path), load_dir(ft_path)
    theirs = overall_error(str(tmp_path / "mk"), base, ft)
    mine = overall_error(str(tmp_path / "ours"), base, ft)
    assert mine <= theirs * (1 + 1e-6), (mine, theirs)
    if dtype == "bfloat16":
        assert mine < theirs
    shutil.rmtree(tmp_path / "mk")
