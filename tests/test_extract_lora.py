"""LoRA extraction: a fine-tune made of the base plus a known rank-4 delta is recovered exactly; the rank
picked by an error or energy target is the smallest that meets it (numpy's SVD of the true delta);
tensors that differ but are not linear weights are saved whole; GPT-2 Conv1D and embedding LoRA
layouts; the command line prints the report."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from safetensors.torch import load_file

from mergekit_lite import extract_lora
from mergekit_lite.examples import GPT2_CONFIG, LLAMA_CONFIG, gpt2_shapes, llama_shapes, random_model, save_model

from conftest import REPO, load_dir

P = "base_model.model."


def low_rank_finetune(base: dict, rank: int, seed: int, skip=("embed", "norm", "lm_head")) -> dict:
    """base + U·V (rank `rank`) on every 2-d weight not named in `skip`."""
    rng = np.random.default_rng(seed)
    out = dict(base)
    for name, w in base.items():
        if w.ndim == 2 and not any(s in name for s in skip):
            u = rng.normal(0, 0.05, (w.shape[0], rank))
            v = rng.normal(0, 0.05, (rank, w.shape[1]))
            out[name] = (w + u @ v).astype(np.float32)
    return out


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("extract")
    base = random_model(llama_shapes(LLAMA_CONFIG), seed=11)
    ft = low_rank_finetune(base, 4, 12)
    ft["model.layers.1.input_layernorm.weight"] = base["model.layers.1.input_layernorm.weight"] * 1.1
    return (save_model(str(root / "base"), base, LLAMA_CONFIG), save_model(str(root / "ft"), ft, LLAMA_CONFIG),
            base, ft)


def factors(folder: str) -> tuple[dict, dict[str, np.ndarray], dict[str, int]]:
    cfg = json.load(open(os.path.join(folder, "adapter_config.json")))
    ts = {k: v.double().numpy() for k, v in load_file(os.path.join(folder, "adapter_model.safetensors")).items()}
    prods, ranks = {}, {}
    for key, a in ts.items():
        if key.endswith("lora_A.weight") or key.endswith("lora_embedding_A"):
            module = key[len(P):].rsplit(".lora_", 1)[0]
            rank = cfg.get("rank_pattern", {}).get(module, cfg["r"])
            alpha = cfg.get("alpha_pattern", {}).get(module, cfg["lora_alpha"])
            prods[module] = alpha / rank * ts[key.replace("_A", "_B")] @ a
            ranks[module] = a.shape[0]
    return cfg, prods, ranks


def test_base_plus_a_rank4_delta_is_recovered(pair, tmp_path):
    base_path, ft_path, base, ft = pair
    for rank in (4, 8):
        out = str(tmp_path / f"r{rank}")
        result = extract_lora(base_path, ft_path, out, rank=rank)
        cfg, prods, ranks = factors(out)
        assert len(prods) == 28 and set(ranks.values()) == {rank}
        for module, prod in prods.items():
            delta = ft[module + ".weight"].astype(np.float64) - base[module + ".weight"]
            assert np.linalg.norm(prod - delta) / np.linalg.norm(delta) < 1e-5, module
        assert result.manifest.overall_error() < 1e-5
        assert result.saved == ("model.layers.1.input_layernorm.weight",)  # the only other tensor that differs
        assert cfg["modules_to_save"] == ["model.layers.1.input_layernorm"]
        saved = load_file(os.path.join(out, "adapter_model.safetensors"))[P + "model.layers.1.input_layernorm.weight"]
        assert np.array_equal(saved.numpy(), ft["model.layers.1.input_layernorm.weight"])


def test_an_error_or_energy_target_picks_the_smallest_rank_that_meets_it(tmp_path):
    base_path = os.path.join(REPO, "merge_configs", "models", "base")
    ft_path = os.path.join(REPO, "merge_configs", "models", "ft_math")
    out = str(tmp_path / "err")
    extract_lora(base_path, ft_path, out, rank=40, rank_error=0.6)
    energy = str(tmp_path / "energy")
    extract_lora(base_path, ft_path, energy, rank=40, energy=1 - 0.6 ** 2)
    base, ft = load_dir(base_path), load_dir(ft_path)
    _, prods, ranks = factors(out)
    assert factors(energy)[2] == ranks
    for module, prod in prods.items():
        delta = (ft[module + ".weight"].double() - base[module + ".weight"].double()).numpy()
        s = np.linalg.svd(delta, compute_uv=False)
        tail = [np.sqrt(np.sum(s[k:] ** 2)) / np.linalg.norm(s) for k in range(len(s) + 1)]
        k = ranks[module]
        assert tail[k] <= 0.6 + 1e-6 and tail[k - 1] > 0.6, (module, k)
        assert abs(np.linalg.norm(prod - delta) / np.linalg.norm(delta) - tail[k]) < 1e-5  # optimal (Eckart-Young)


def test_gpt2_conv1d_factors_in_linear_layout_and_embedding_lora(tmp_path):
    base = random_model(gpt2_shapes(GPT2_CONFIG), seed=21)
    ft = low_rank_finetune(base, 2, 22, skip=("wpe",))  # wpe unchanged: no LoRA for it
    ft["transformer.h.0.attn.c_attn.bias"] = base["transformer.h.0.attn.c_attn.bias"] + 0.5  # a LoRA module's bias
    ft["transformer.h.0.ln_1.bias"] = base["transformer.h.0.ln_1.bias"] + 0.5  # a norm's bias: saved whole
    bp = save_model(str(tmp_path / "base"), base, GPT2_CONFIG)
    fp = save_model(str(tmp_path / "ft"), ft, GPT2_CONFIG)
    out = str(tmp_path / "out")
    result = extract_lora(bp, fp, out, rank=2, embed_lora=True)
    assert result.dropped == ("transformer.h.0.attn.c_attn.bias",) and "not represented" in result.report()
    assert result.saved == ("transformer.h.0.ln_1.bias",)
    cfg, prods, _ = factors(out)
    assert cfg["fan_in_fan_out"] is True and "transformer.wpe" not in prods and len(prods) == 17
    ts = load_file(os.path.join(out, "adapter_model.safetensors"))
    assert tuple(ts[P + "transformer.h.0.attn.c_attn.lora_A.weight"].shape) == (2, 32)  # A: [r, in]
    assert tuple(ts[P + "transformer.wte.lora_embedding_A"].shape) == (2, 256)  # A: [r, vocab]
    for module, prod in prods.items():
        delta = ft[module + ".weight"].astype(np.float64) - base[module + ".weight"]
        assert np.linalg.norm(prod.T - delta) / np.linalg.norm(delta) < 1e-5, module  # ΔW = (B@A)ᵀ


def test_command_line_prints_each_module_and_the_overall_error(pair, tmp_path):
    base_path, ft_path, _, _ = pair
    r = subprocess.run([sys.executable, "-m", "mergekit_lite", "extract-lora", "--base", base_path, "--finetuned",
                        ft_path, "--rank", "4", str(tmp_path / "cli")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "model.layers.0.self_attn.q_proj: rank 4, relative error" in r.stdout
    assert "overall relative error" in r.stdout and "saved whole (modules_to_save)" in r.stdout
    bad = subprocess.run([sys.executable, "-m", "mergekit_lite", "extract-lora", "--base", base_path, "--finetuned",
                          ft_path, "--rank-error", "2", str(tmp_path / "bad")], capture_output=True, text=True)
    assert bad.returncode == 2 and "--rank-error" in bad.stderr and "Traceback" not in bad.stderr


def test_mergekit_extract_lora_flags_run_the_same_extraction(pair, tmp_path):
    base_path, ft_path, _, _ = pair
    mine = str(tmp_path / "mine")
    extract_lora(base_path, ft_path, mine, rank=4)
    os.makedirs(tmp_path / "mk")  # mergekit writes into an existing (empty) folder
    r = subprocess.run([sys.executable, "-m", "mergekit_lite.compat_extract", "--model", ft_path, "--base-model",
                        base_path, "--out-path", str(tmp_path / "mk"), "--max-rank", "4", "--no-embed-lora"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    same = [open(os.path.join(d, "adapter_model.safetensors"), "rb").read() for d in (mine, str(tmp_path / "mk"))]
    assert same[0] == same[1]
    bad = subprocess.run([sys.executable, "-m", "mergekit_lite.compat_extract", "--model", ft_path, "--base-model",
                          base_path, "--out-path", str(tmp_path / "x"), "--sv-epsilon", "0.1"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "--sv-epsilon: use mergekit-lite extract-lora --rank-error" in bad.stderr
