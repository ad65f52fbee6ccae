"""Against PEFT itself (skipped without peft and transformers): our fold equals ``merge_and_unload``
(adapters written by PEFT, with embedding and lm_head LoRA, modules_to_save, rank_pattern, rsLoRA,
and IA3), and the adapters we write load with ``PeftModel.from_pretrained`` and mean what we say."""

from __future__ import annotations

import os
import warnings

import pytest
import torch

import mergekit_lite

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from conftest import REPO, load_dir, write_plan  # noqa: E402

CONFIGS = os.path.join(REPO, "merge_configs")
BASE = os.path.join(CONFIGS, "models", "base")
ADAPTERS = os.path.join(CONFIGS, "adapters")


def base_model():
    return transformers.AutoModelForCausalLM.from_pretrained(BASE, dtype=torch.float32)


def peft_merged(adapter: str) -> dict[str, torch.Tensor]:
    """PEFT's merge_and_unload of `adapter` on the example base; fails on missing/unexpected keys."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = peft.PeftModel.from_pretrained(base_model(), adapter)
    bad = [str(w.message) for w in caught if any(word in str(w.message).lower() for word in ("missing", "unexpected"))]
    assert not bad, bad
    return {k: v.detach() for k, v in model.merge_and_unload().state_dict().items()}


def our_fold(tmp_path, adapter: str) -> dict[str, torch.Tensor]:
    plan = write_plan(tmp_path, f"merge_method: passthrough\nmodels:\n  - model: {BASE}+{adapter}\n", "fold.yml")
    mergekit_lite.run(plan, str(tmp_path / "fold"), overwrite=True)
    return load_dir(str(tmp_path / "fold"))


def assert_same(ours: dict, theirs: dict, tol: float = 1e-6) -> None:
    for name, mine in ours.items():
        ref = theirs[name]
        err = float((mine.double() - ref.double()).norm() / ref.double().norm())
        assert err <= tol, (name, err)


@pytest.mark.parametrize("name", ["lora_attn", "lora_mlp", "ia3", "ia3_chat"])
def test_fold_of_the_example_adapters_equals_merge_and_unload_bit_for_bit(tmp_path, name):
    """The same operations in the same order (B@A, ·scaling, + W in float32): the same bits."""
    folder = os.path.join(ADAPTERS, name)
    ours, theirs = our_fold(tmp_path, folder), peft_merged(folder)
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_fold_of_peft_written_adapters_equals_merge_and_unload(tmp_path):
    torch.manual_seed(0)
    cfg = peft.LoraConfig(r=4, lora_alpha=12, use_rslora=True, init_lora_weights=False,
                          target_modules=["q_proj", "v_proj", "down_proj", "embed_tokens", "lm_head"],
                          modules_to_save=["model.norm"], rank_pattern={"v_proj": 2}, alpha_pattern={"down_proj": 3})
    model = peft.get_peft_model(base_model(), cfg)
    with torch.no_grad():
        model.base_model.model.model.norm.modules_to_save["default"].weight.mul_(1.5)
    model.save_pretrained(str(tmp_path / "lora"))
    ia3 = peft.get_peft_model(base_model(), peft.IA3Config(target_modules=["k_proj", "down_proj"],
                                                          feedforward_modules=["down_proj"], init_ia3_weights=False))
    ia3.save_pretrained(str(tmp_path / "ia3"))
    for folder in (str(tmp_path / "lora"), str(tmp_path / "ia3")):
        assert_same(our_fold(tmp_path, folder), peft_merged(folder))


def test_concatenated_adapter_loads_in_peft_and_is_the_weighted_sum(tmp_path):
    out = str(tmp_path / "concat")
    mergekit_lite.run(os.path.join(CONFIGS, "lora_concat.yml"), out)
    merged = peft_merged(out)
    base = load_dir(BASE)
    attn = our_fold(tmp_path, os.path.join(ADAPTERS, "lora_attn"))
    mlp = our_fold(tmp_path, os.path.join(ADAPTERS, "lora_mlp"))
    for name, w in base.items():
        want = w.double() + 0.7 * (attn[name].double() - w.double()) + 0.5 * (mlp[name].double() - w.double())
        delta = want - w.double()
        if delta.norm() > 0:
            assert float((merged[name].double() - want).norm() / delta.norm()) < 1e-5, name


@pytest.mark.parametrize("plan", ["lora_svd.yml", "ia3_merge.yml"])
def test_merged_adapters_load_in_peft(tmp_path, plan):
    out = str(tmp_path / "out")
    mergekit_lite.run(os.path.join(CONFIGS, plan), out)
    merged = peft_merged(out)
    ours = our_fold(tmp_path, out)  # the adapter we wrote, folded by us
    assert_same(ours, merged)


def test_extracted_adapter_loads_in_peft_and_reproduces_the_finetune(tmp_path):
    ft = os.path.join(CONFIGS, "models", "ft_math")
    out = str(tmp_path / "extracted")
    mergekit_lite.extract_lora(BASE, ft, out, rank=64)  # full rank of the 64-wide example: exact
    merged = peft_merged(out)
    assert_same(load_dir(ft), merged, tol=1e-5)


def test_concat_with_modules_to_save_loads_in_peft(tmp_path):
    torch.manual_seed(1)
    cfg = peft.LoraConfig(r=2, lora_alpha=4, init_lora_weights=False, target_modules=["q_proj"],
                          modules_to_save=["model.norm"])
    model = peft.get_peft_model(base_model(), cfg)
    with torch.no_grad():
        model.base_model.model.model.norm.modules_to_save["default"].weight.mul_(1.5)
    model.save_pretrained(str(tmp_path / "peft"))
    plan = write_plan(tmp_path, f"output: adapter\nmerge_method: concat\nbase_model: {BASE}\nmodels:\n"
                                f"  - {{model: {tmp_path / 'peft'}, parameters: {{weight: 0.7}}}}\n"
                                f"  - {{model: {ADAPTERS}/lora_attn, parameters: {{weight: 0.5}}}}\n")
    mergekit_lite.run(plan, str(tmp_path / "out"))
    merged = peft_merged(str(tmp_path / "out"))
    base = load_dir(BASE)
    one, two = our_fold(tmp_path, str(tmp_path / "peft")), our_fold(tmp_path, f"{ADAPTERS}/lora_attn")
    for name in ("model.norm.weight", "model.layers.0.self_attn.q_proj.weight",
                 "model.layers.0.self_attn.k_proj.weight"):
        w = base[name].double()
        want = w + 0.7 * (one[name].double() - w) + 0.5 * (two[name].double() - w)
        assert float((merged[name].double() - want).norm() / (want - w).norm()) < 1e-5, name
