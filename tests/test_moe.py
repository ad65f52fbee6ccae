"""Mixtures of experts built from the example models: where every tensor comes from, router weights
against independent computations, seeded randomness, the Python API, and the ``mergekit-moe`` command."""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

import mergekit_lite
from mergekit_lite.examples import LLAMA_CONFIG, finetune, llama_shapes, random_model, save_model
from mergekit_lite.executor import Executor
from mergekit_lite.graph import Load
from mergekit_lite.merge import Options, compile_plan
from mergekit_lite.moe.nodes import EmbeddingRows

from conftest import REPO, load_dir, write_plan

MODELS = os.path.join(REPO, "merge_configs", "models")
EXPERTS = ("ft_math", "ft_code", "ft_chat")
PROMPTS = {"ft_math": (["1 2 3 and 4", "9 8 7"], ["you and it"]), "ft_code": (["merge the model weights"], []),
           "ft_chat": (["is it you", "That is THE model, x"], [])}
SLOTS = {"w1": "gate_proj", "w2": "down_proj", "w3": "up_proj"}


def moe_plan(tmp_path, gate_mode="cheap_embed", extra="", name="moe.yml", experts=EXPERTS, expert_extra=None):
    lines = [f"base_model: {MODELS}/base", f"gate_mode: {gate_mode}", "experts:"]
    for e in experts:
        pos, neg = PROMPTS[e]
        lines += [f"  - source_model: {MODELS}/{e}", f"    positive_prompts: {json.dumps(pos)}"]
        if neg:
            lines.append(f"    negative_prompts: {json.dumps(neg)}")
        lines += [f"    {x}" for x in (expert_extra or {}).get(e, [])]
    return write_plan(tmp_path, "\n".join(lines) + "\n" + extra, name)


def run_dir(plan: str, out, **options) -> dict[str, torch.Tensor]:
    """Run `plan` into `out` and read every tensor back."""
    mergekit_lite.run(plan, str(out), **options)
    return load_dir(str(out))


@pytest.fixture(scope="module")
def sources():
    return {name: load_dir(os.path.join(MODELS, name)) for name in ("base",) + EXPERTS}


def test_experts_attention_embeddings_and_norms_are_the_sources_bit_for_bit(tmp_path, sources):
    out = tmp_path / "out"
    mergekit_lite.run(moe_plan(tmp_path), str(out))  # no dtype: the base config's float32
    got = load_dir(str(out))
    base = sources["base"]
    kept = {n for n in base if ".mlp." not in n}
    routers = {f"model.layers.{i}.block_sparse_moe.gate.weight" for i in range(4)}
    experts = {f"model.layers.{i}.block_sparse_moe.experts.{e}.{w}.weight" for i in range(4) for e in range(3)
               for w in SLOTS}
    assert set(got) == kept | routers | experts
    for name in kept:
        assert got[name].dtype == base[name].dtype and torch.equal(got[name], base[name]), name
    for name in experts:
        layer, e, slot = re.match(r"model\.layers\.(\d+)\.block_sparse_moe\.experts\.(\d+)\.(w\d)", name).groups()
        src = sources[EXPERTS[int(e)]][f"model.layers.{layer}.mlp.{SLOTS[slot]}.weight"]
        assert torch.equal(got[name], src), name
    config = json.load(open(out / "config.json"))
    assert config["architectures"] == ["MixtralForCausalLM"] and config["model_type"] == "mixtral"
    assert (config["num_local_experts"], config["num_experts_per_tok"], config["torch_dtype"]) == (3, 2, "float32")
    assert config["router_aux_loss_coef"] == 0.001 and config["sliding_window"] is None
    assert (out / "tokenizer.json").exists() and "moe" in (out / "README.md").read_text()


def test_dtype_rounds_each_copy_once(tmp_path, sources):
    out = tmp_path / "out"
    mergekit_lite.run(moe_plan(tmp_path, extra="dtype: bfloat16\n"), str(out))
    got = load_dir(str(out))
    assert torch.equal(got["model.layers.2.block_sparse_moe.experts.1.w2.weight"],
                       sources["ft_code"]["model.layers.2.mlp.down_proj.weight"].to(torch.bfloat16))
    assert torch.equal(got["lm_head.weight"], sources["base"]["lm_head.weight"].to(torch.bfloat16))
    assert all(t.dtype == torch.bfloat16 for t in got.values())


def word_ids(folder: str, text: str) -> list[int]:
    """The example tokenizer by hand: the '<s>' special token, then lowercase words and punctuation
    runs looked up in the vocabulary (unknown words: '<unk>')."""
    tok = json.load(open(os.path.join(folder, "tokenizer.json")))
    vocab = tok["model"]["vocab"]
    assert text.startswith("<s>")
    return [vocab["<s>"]] + [vocab.get(w, vocab["<unk>"]) for w in re.findall(r"\w+|[^\w\s]+", text[3:].lower())]


def unit(v: np.ndarray) -> np.ndarray:
    return v / max(np.linalg.norm(v), 1e-8)


def test_cheap_embed_rows_equal_an_independent_computation(tmp_path, sources):
    out = tmp_path / "out"
    mergekit_lite.run(moe_plan(tmp_path), str(out))
    got = load_dir(str(out))
    embed = sources["base"]["model.embed_tokens.weight"].double().numpy()

    def vector(prompts):
        return unit(sum(embed[i] for p in prompts for i in word_ids(f"{MODELS}/base", "<s>" + p)))

    expected = []
    for e in EXPERTS:
        pos, neg = PROMPTS[e]
        expected.append(unit(vector(pos) - vector(neg)) if neg else vector(pos))
    expected = np.stack(expected)
    for i in range(4):
        gate = got[f"model.layers.{i}.block_sparse_moe.gate.weight"]
        assert gate.shape == (3, 64) and gate.dtype == torch.float32
        assert np.abs(gate.double().numpy() - expected).max() < 1e-6
    assert word_ids(f"{MODELS}/base", "<s>That is THE model, x")[1:] == [48, 45, 39, 50, 0, 26]  # ',' is unknown


def test_random_gates_are_seeded_order_independent_and_standard_normal(tmp_path):
    plan = moe_plan(tmp_path, "random")
    name = "model.layers.2.block_sparse_moe.gate.weight"
    runs = {}
    for key, seed in (("a", None), ("b", None), ("c", 7)):
        runs[key] = run_dir(plan, tmp_path / key, seed=seed)
    assert torch.equal(runs["a"][name], runs["b"][name]) and not torch.equal(runs["a"][name], runs["c"][name])
    # the tensor alone (one group compiled, nothing else drawn before it) has the same bits
    alone = dict(Executor(compile_plan(plan, Options(), sink="emit", only=[name]), device="cpu").run())
    assert torch.equal(alone[name], runs["a"][name])
    gates = torch.stack([runs["a"][f"model.layers.{i}.block_sparse_moe.gate.weight"] for i in range(4)])
    assert abs(gates.mean().item()) < 0.1 and abs(gates.std().item() - 1.0) < 0.1
    assert not torch.equal(gates[0], gates[1])  # every layer draws its own
    uniform = run_dir(moe_plan(tmp_path, "uniform_random", name="u.yml"), tmp_path / "u")
    values = torch.stack([uniform[f"model.layers.{i}.block_sparse_moe.gate.weight"] for i in range(4)])
    assert values.abs().max() <= 1 / 8 and values.abs().max() > 0.9 / 8  # U(±1/√hidden), hidden 64


def test_noise_and_residual_scale(tmp_path, sources):
    extra = {"ft_math": ["residual_scale: 0.5"], "ft_code": ["noise_scale: 0.01"]}
    plan = moe_plan(tmp_path, "random", expert_extra=extra)
    got, again = run_dir(plan, tmp_path / "a"), run_dir(plan, tmp_path / "b")
    p, src = "model.layers.1.block_sparse_moe.experts.", "model.layers.1.mlp."
    assert torch.equal(got[p + "0.w2.weight"], sources["ft_math"][src + "down_proj.weight"] * 0.5)
    assert torch.equal(got[p + "0.w1.weight"], sources["ft_math"][src + "gate_proj.weight"])  # down_proj only
    noise = (got[p + "1.w3.weight"] - sources["ft_code"][src + "up_proj.weight"]).double()
    assert abs(noise.std().item() - 0.01) < 0.001 and abs(noise.mean().item()) < 0.001
    assert torch.equal(got[p + "1.w3.weight"], again[p + "1.w3.weight"])  # seeded
    assert not torch.equal(got[p + "1.w3.weight"] - sources["ft_code"][src + "up_proj.weight"],
                           got[p + "1.w1.weight"] - sources["ft_code"][src + "gate_proj.weight"])


def test_streamed_one_tensor_per_group_and_only_the_prompt_rows_of_the_embedding(tmp_path):
    compiled = compile_plan(os.path.join(REPO, "merge_configs", "moe.yml"))
    for group, nodes in compiled.groups:
        assert sum(isinstance(n, Load) for n in nodes) <= 1, group
        rows = [n for n in nodes if isinstance(n, EmbeddingRows)]
        if rows:
            assert rows[0].outputs[0].nbytes <= 20 * 64 * 4  # a few rows, not the 256-row matrix
    stats = mergekit_lite.run(os.path.join(REPO, "merge_configs", "moe.yml"), str(tmp_path / "o"),
                              max_memory=compiled.max_need)  # the tightest budget the plan allows
    assert stats.peak_live_bytes <= compiled.max_need


def _qwen_models(tmp_path, model_type):
    cfg = copy.deepcopy(LLAMA_CONFIG)
    cfg["model_type"] = model_type
    shapes = llama_shapes(cfg)
    for n in range(4):
        if model_type == "qwen3":
            shapes.update({f"model.layers.{n}.self_attn.{k}_norm.weight": (16,) for k in "qk"})
    base = random_model(shapes, 3)
    return [save_model(str(tmp_path / f"{model_type}{i}"), base if i == 0 else finetune(base, "dense", i), cfg)
            for i in range(3)]


def test_qwen2_moe_with_a_shared_expert_and_zero_attention_biases(tmp_path):
    base, e1, e2 = _qwen_models(tmp_path, "llama")
    plan = write_plan(tmp_path, f"base_model: {base}\narchitecture: qwen\ngate_mode: random\n"
                                f"experts: [{e1}, {e2}]\nshared_experts:\n  - source_model: {e2}\n"
                                "    residual_scale: 0.25\n")
    mergekit_lite.run(plan, str(tmp_path / "out"))
    got, src = load_dir(str(tmp_path / "out")), load_dir(e2)
    p = "model.layers.3."
    assert torch.equal(got[p + "mlp.experts.1.up_proj.weight"], src[p + "mlp.up_proj.weight"])
    assert torch.equal(got[p + "mlp.shared_expert.down_proj.weight"], src[p + "mlp.down_proj.weight"] * 0.25)
    assert got[p + "mlp.gate.weight"].shape == (2, 64) and got[p + "mlp.shared_expert_gate.weight"].shape == (1, 64)
    assert torch.equal(got[p + "self_attn.k_proj.bias"], torch.zeros(32))
    config = json.load(open(tmp_path / "out" / "config.json"))
    assert (config["model_type"], config["num_experts"], config["shared_expert_intermediate_size"]) == (
        "qwen2_moe", 2, 176)


def test_qwen3_moe_keeps_the_attention_norms(tmp_path):
    base, e1, e2 = _qwen_models(tmp_path, "qwen3")
    plan = write_plan(tmp_path, f"base_model: {base}\ngate_mode: random\nexperts: [{e1}, {e2}]\n")
    mergekit_lite.run(plan, str(tmp_path / "out"))  # no architecture: chosen from the models
    got = load_dir(str(tmp_path / "out"))
    assert torch.equal(got["model.layers.1.self_attn.q_norm.weight"], load_dir(base)["model.layers.1.self_attn.q_norm.weight"])
    assert "model.layers.1.mlp.experts.0.gate_proj.weight" in got
    assert json.load(open(tmp_path / "out" / "config.json"))["architectures"] == ["Qwen3MoeForCausalLM"]


def test_python_api_runs_the_same_plan(tmp_path, sources):
    from mergekit_lite import Model, upcycle

    experts = [(Model(f"{MODELS}/{e}"), *PROMPTS[e]) if PROMPTS[e][1] else (f"{MODELS}/{e}", PROMPTS[e][0])
               for e in EXPERTS]
    moe = upcycle(f"{MODELS}/base", experts, gate_mode="cheap_embed", dtype="bfloat16")
    moe.save(str(tmp_path / "api"))
    mergekit_lite.run(moe_plan(tmp_path, extra="dtype: bfloat16\n"), str(tmp_path / "yaml"))
    a, b = load_dir(str(tmp_path / "api")), load_dir(str(tmp_path / "yaml"))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    # an expert can be a merge computed in the same pass
    soup = Model(f"{MODELS}/ft_math").linear([Model(f"{MODELS}/ft_code")], weight=[0.5, 0.5])
    mixed = upcycle(f"{MODELS}/base", [soup, f"{MODELS}/ft_chat"], gate_mode="random")
    name = "model.layers.0.block_sparse_moe.experts.0.w3.weight"
    assert torch.allclose(mixed.tensor(name), (sources["ft_math"]["model.layers.0.mlp.up_proj.weight"]
                                               + sources["ft_code"]["model.layers.0.mlp.up_proj.weight"]) / 2)
    with pytest.raises(mergekit_lite.PlanError, match="experts_per_token 3 is more than the 2 experts"):
        upcycle(f"{MODELS}/base", [soup, f"{MODELS}/ft_chat"], gate_mode="random", experts_per_token=3)


def test_mergekit_moe_command(tmp_path, capsys, monkeypatch):
    from mergekit_lite.moe.cli import main

    plan = moe_plan(tmp_path, "random")
    r = subprocess.run([sys.executable, "-m", "mergekit_lite.moe.cli", plan, str(tmp_path / "a"), "--random-seed", "3",
                        "--lazy-unpickle", "--load-in-4bit", "--no-copy-tokenizer", "--out-shard-size", "100K",
                        "-j", "2", "--quiet"], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "--load-in-4bit: noted, not honoured" in r.stderr and "lazy" not in r.stderr  # no note where nothing changes
    assert not os.path.exists(tmp_path / "a" / "tokenizer.json")  # --no-copy-tokenizer
    a, b = load_dir(str(tmp_path / "a")), run_dir(plan, tmp_path / "b", seed=3)
    index = json.load(open(tmp_path / "a" / "model.safetensors.index.json"))["weight_map"]
    per_shard = {f: sum(a[k].numel() for k in index if index[k] == f) for f in set(index.values())}
    assert len(per_shard) > 1 and max(per_shard.values()) <= 100_000  # 100K parameters per shard
    assert all(torch.equal(a[k], b[k]) for k in b)
    capsys.readouterr()
    assert main([plan, str(tmp_path / "a")]) == 2 and "already exists" in capsys.readouterr().err
    monkeypatch.chdir(REPO)
    assert main(["merge_configs/linear.yml", str(tmp_path / "c")]) == 2
    assert "not a mixture of experts config" in capsys.readouterr().err
    bad = write_plan(tmp_path, f"base_model: {MODELS}/base\ngate_mode: random\nexperts_per_token: 5\n"
                               f"experts: [{MODELS}/ft_math, {MODELS}/ft_code]\n", "bad.yml")
    assert main([bad, str(tmp_path / "d")]) == 2
    assert f"{bad}:3: experts_per_token:" in capsys.readouterr().err and not os.path.exists(tmp_path / "d")


def test_hidden_without_transformers_fails_before_anything_is_written(tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "transformers" else real(name, *a))
    with pytest.raises(mergekit_lite.MergeError, match=r"needs transformers: pip install 'mergekit-lite\[transformers\]'"):
        mergekit_lite.run(moe_plan(tmp_path, "hidden"), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_mergekit_moe_help_lists_its_flags_without_importing_torch():
    code = ("import sys\nfrom mergekit_lite.moe.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n"
            "    pass\nprint('torch imported:', 'torch' in sys.modules)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert r.returncode == 0 and "torch imported: False" in r.stdout, r.stderr
    for flag in ("--load-in-4bit", "--i-understand-this-is-not-useful-without-training", "--random-seed",
                 "--out-shard-size", "--overwrite", "CONFIG_PATH", "OUT_PATH"):
        assert flag in r.stdout
