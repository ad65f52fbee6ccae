"""Mixtures of experts through transformers (optional extra; skipped without it): the outputs load with
the right class and route tokens; an MoE of copies of one model computes that model; ``hidden`` gates
against a float32 forward pass; prompt tokenization against AutoTokenizer."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

import mergekit_lite
from mergekit_lite.errors import MergeError
from mergekit_lite.io import tokenizer as tk

from conftest import REPO, load_dir, write_plan

transformers = pytest.importorskip("transformers")
MODELS = os.path.join(REPO, "merge_configs", "models")
IDS = torch.tensor([[1, 49, 39, 50, 51, 30, 31, 47, 45, 46]])


def load(folder):
    model, info = transformers.AutoModelForCausalLM.from_pretrained(folder, output_loading_info=True,
                                                                    dtype=torch.float32)
    assert not any(info.values()), info  # no missing, unexpected or mismatched tensors
    return model.eval()


def test_example_loads_as_mixtral_and_routes_tokens(tmp_path):
    mergekit_lite.run(os.path.join(REPO, "merge_configs", "moe.yml"), str(tmp_path / "out"))
    model = load(str(tmp_path / "out"))
    assert type(model).__name__ == "MixtralForCausalLM" and model.config.num_local_experts == 3
    with torch.no_grad():
        out = model(IDS, output_router_logits=True)
    assert torch.isfinite(out.logits).all() and out.logits.shape == (1, 10, 256)
    assert len(out.router_logits) == 4 and out.router_logits[0].shape == (10, 3)
    chosen = {int(i) for logits in out.router_logits for i in logits.topk(2, dim=-1).indices.flatten()}
    assert chosen == {0, 1, 2}  # tokens go to different experts


def test_moe_of_copies_of_one_model_computes_that_model(tmp_path):
    """Routing weights of the chosen experts sum to 1, so identical experts give the dense model."""
    base = f"{MODELS}/base"
    plan = write_plan(tmp_path, f"base_model: {base}\ngate_mode: cheap_embed\nexperts:\n"
                                f"  - source_model: {base}\n    positive_prompts: [the model]\n"
                                f"  - source_model: {base}\n    positive_prompts: [1 2 3]\n"
                                f"  - source_model: {base}\n    positive_prompts: [you]\n")
    mergekit_lite.run(plan, str(tmp_path / "out"))
    with torch.no_grad():
        moe, dense = load(str(tmp_path / "out"))(IDS).logits, load(base)(IDS).logits
    assert torch.allclose(moe, dense, atol=1e-5, rtol=1e-5)


def test_qwen_outputs_load_with_their_classes(tmp_path):
    from test_moe import _qwen_models

    base, e1, e2 = _qwen_models(tmp_path, "llama")
    plan = write_plan(tmp_path, f"base_model: {base}\narchitecture: qwen2_moe\ngate_mode: random\n"
                                f"experts: [{e1}, {e2}]\nshared_experts: [{base}]\n")
    mergekit_lite.run(plan, str(tmp_path / "q2"))
    q3 = _qwen_models(tmp_path / "3", "qwen3")
    plan = write_plan(tmp_path, f"base_model: {q3[0]}\ngate_mode: random\nexperts: [{q3[1]}, {q3[2]}]\n", "q3.yml")
    mergekit_lite.run(plan, str(tmp_path / "q3"))
    for folder, cls in (("q2", "Qwen2MoeForCausalLM"), ("q3", "Qwen3MoeForCausalLM")):
        model = load(str(tmp_path / folder))
        with torch.no_grad():
            assert type(model).__name__ == cls and torch.isfinite(model(IDS).logits).all()


def test_hidden_gates_follow_the_base_models_hidden_states(tmp_path):
    prompts = {"ft_math": ["1 2 3", "9 8 7 and 6"], "ft_code": ["merge the model weights"], "ft_chat": ["is it you"]}
    lines = [f"base_model: {MODELS}/base", "gate_mode: hidden", "experts:"]
    for e, p in prompts.items():
        lines += [f"  - source_model: {MODELS}/{e}", f"    positive_prompts: {json.dumps(p)}"]
    mergekit_lite.run(write_plan(tmp_path, "\n".join(lines) + "\n"), str(tmp_path / "out"))
    got = load_dir(str(tmp_path / "out"))
    tok = transformers.AutoTokenizer.from_pretrained(f"{MODELS}/base")
    dense = load(f"{MODELS}/base")
    rows = []
    for texts in prompts.values():  # float32, one prompt at a time, last token's state entering each layer
        states = [dense(torch.tensor([tok("<s>" + t, add_special_tokens=False)["input_ids"]]),
                        output_hidden_states=True).hidden_states for t in texts]
        mean = torch.stack([torch.stack(s[:-1])[:, 0, -1, :] for s in states]).mean(0)
        rows.append(mean / mean.norm(dim=-1, keepdim=True))
    expected = torch.stack(rows, dim=1).detach()  # (layers, experts, hidden)
    for i in range(4):
        gate = got[f"model.layers.{i}.block_sparse_moe.gate.weight"]
        cosine = torch.nn.functional.cosine_similarity(gate, expected[i], dim=-1)
        assert (cosine > 0.99).all(), (i, cosine)  # bfloat16 forward pass, as mergekit-moe


VARIANTS = {
    "example": lambda tok, cfg: None,
    "no added tokens": lambda tok, cfg: tok.update(added_tokens=[]),
    "no bos in the vocabulary": lambda tok, cfg: (tok.update(added_tokens=tok["added_tokens"][::2]),
                                                 tok["model"]["vocab"].pop("<s>")),
    "no config": lambda tok, cfg: [cfg.pop(k) for k in list(cfg) if k != "tokenizer_class"],
    "llama class": lambda tok, cfg: cfg.update(tokenizer_class="LlamaTokenizer"),
    "add_prefix_space": lambda tok, cfg: cfg.update(add_prefix_space=True),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_prompt_ids_equal_autotokenizers(variant, tmp_path):
    folder = tmp_path / "tok"
    shutil.copytree(f"{MODELS}/base", folder, ignore=shutil.ignore_patterns("*.safetensors*", "special_*"))
    tok, cfg = json.load(open(folder / "tokenizer.json")), json.load(open(folder / "tokenizer_config.json"))
    VARIANTS[variant](tok, cfg)
    json.dump(tok, open(folder / "tokenizer.json", "w"))
    json.dump(cfg, open(folder / "tokenizer_config.json", "w"))
    ours = tk.load_prompt_tokenizer(str(folder))
    auto = transformers.AutoTokenizer.from_pretrained(str(folder))
    assert ours.how == ("tokenizers" if variant in ("example", "no added tokens", "no config") else "transformers")
    bos = auto.bos_token or ""
    for prompt in ("merge the model", "", "Hello  World 12", "<s>x</s>", " lead"):
        assert list(ours.encode(prompt)) == auto(bos + prompt, add_special_tokens=False)["input_ids"], prompt
    pad = auto.bos_token_id if auto.bos_token_id is not None else auto.eos_token_id
    assert ours.pad == (pad if pad is not None else 0)


def test_missing_tokenizer_libraries_are_a_clear_error(tmp_path, monkeypatch):
    import builtins

    real = builtins.__import__

    def no_hf(name, *args, **kwargs):
        if name.split(".")[0] in ("tokenizers", "transformers"):
            raise ImportError(name)
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_hf)
    folder = tmp_path / "tok"
    shutil.copytree(f"{MODELS}/base", folder, ignore=shutil.ignore_patterns("*.safetensors*"))
    with pytest.raises(MergeError, match=r"needs the tokenizers library.*pip install 'mergekit-lite\[transformers\]'"):
        tk.load_prompt_tokenizer(str(folder))
    from mergekit_lite.moe.hidden import load_model

    with pytest.raises(MergeError, match="gate_mode hidden runs the base model.*needs transformers"):
        load_model(str(folder), torch.device("cpu"))
