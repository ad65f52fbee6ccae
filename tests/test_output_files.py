"""The non-tensor files of an output folder: the model card, config.json, and what comes from donors.

- the card's front matter parses with huggingface_hub, never lists a local folder as a Hub model
  (whatever the working directory), and has a license only when every input's card agrees;
- config.json says what was written: ``--dtype`` / ``save(dtype=)`` update ``torch_dtype`` (and
  ``dtype``, transformers' new key), ``vocab_size`` is the embedding's rows;
- generation_config.json comes from the config's donor, and the custom code ``auto_map`` names
  (with what it imports relatively) from the folder whose config or tokenizer names it, never from
  outside that folder.
"""

from __future__ import annotations

import json
import os
import shutil

import pytest

import mergekit_lite
from mergekit_lite.cli import main
from mergekit_lite.io.card import card_metadata

from conftest import REPO, load_dir
from test_engine import ta_plan

TASK = os.path.join(REPO, "merge_configs", "task_arithmetic.yml")


def card(folder: str) -> dict:
    from huggingface_hub import ModelCard

    return ModelCard.load(os.path.join(folder, "README.md")).data.to_dict()


def copy_models(models, tmp_path, names=("base", "a", "b")) -> dict[str, str]:
    out = {}
    for name in names:
        out[name] = str(tmp_path / "m" / name)
        shutil.copytree(models["paths"][name], out[name])
    return out


@pytest.mark.parametrize("cwd", ["repo", "elsewhere"])
def test_card_never_lists_local_folders_as_hub_models(tmp_path, monkeypatch, cwd):
    monkeypatch.chdir(REPO if cwd == "repo" else tmp_path)
    out = str(tmp_path / "out")
    mergekit_lite.run(TASK, out)
    meta = card(out)
    assert "base_model" not in meta and "base_model_relation" not in meta
    assert meta["library_name"] == "transformers" and meta["tags"] == ["merge", "mergekit", "mergekit-lite"]
    text = open(os.path.join(out, "README.md")).read()
    assert "- `models/ft_math` (a local model)" in text
    assert "[task_arithmetic](https://arxiv.org/abs/2212.04089)" in text and "Add weighted task vectors" in text
    assert open(os.path.join(out, "mergekit_config.yml")).read() == open(TASK).read()
    assert open(TASK).read().rstrip() in text


@pytest.mark.parametrize("licenses, expected", [
    (("apache-2.0", "apache-2.0", "apache-2.0"), "apache-2.0"),
    (("apache-2.0", "mit", "apache-2.0"), None),
    (("apache-2.0", None, "apache-2.0"), None),
])
def test_license_only_when_every_input_card_agrees(models, tmp_path, licenses, expected):
    p = copy_models(models, tmp_path)
    for name, lic in zip(("base", "a", "b"), licenses):
        if lic:
            with open(os.path.join(p[name], "README.md"), "w") as fh:
                fh.write(f"---\nlicense: {lic}\nlanguage: en\n---\n# {name}\n")
    out = str(tmp_path / "out")
    mergekit_lite.run(ta_plan(tmp_path, p), out)
    assert card(out).get("license") == expected


def test_adapter_outputs_are_peft_cards():
    from mergekit_lite.steps import CardData, CardModel

    data = CardData("plan", "linear", (CardModel("org/a", "org/a"),), None, "")
    assert card_metadata(data, "adapter")["library_name"] == "peft"
    assert card_metadata(data)["library_name"] == "transformers" and card_metadata(data)["base_model"] == ["org/a"]


def test_dtype_override_is_what_config_and_card_say(models, tmp_path):
    p = copy_models(models, tmp_path)
    for name in p.values():  # a config with transformers' new spelling too
        cfg = json.load(open(os.path.join(name, "config.json")))
        cfg["dtype"] = "float32"
        json.dump(cfg, open(os.path.join(name, "config.json"), "w"))
    plan = ta_plan(tmp_path, p, "dtype: bfloat16")
    out = str(tmp_path / "f16")
    assert main(["run", plan, out, "--dtype", "float16", "-q"]) == 0
    cfg = json.load(open(os.path.join(out, "config.json")))
    assert cfg["torch_dtype"] == cfg["dtype"] == "float16"
    assert {str(t.dtype) for t in load_dir(out).values()} == {"torch.float16"}
    note = "Weights are written as float16 (`--dtype float16`; the plan asks for bfloat16)."
    assert note in open(os.path.join(out, "README.md")).read()
    assert open(os.path.join(out, "mergekit_config.yml")).read().endswith(f"# {note}\n")
    base = mergekit_lite.Model(p["base"])
    (base + 0.5 * (mergekit_lite.Model(p["a"]) - base)).save(str(tmp_path / "bf16"), dtype="bfloat16")
    cfg = json.load(open(tmp_path / "bf16" / "config.json"))
    assert cfg["torch_dtype"] == cfg["dtype"] == "bfloat16"


def test_vocab_size_is_the_embedding_rows(models, tmp_path):
    p = copy_models(models, tmp_path)
    path = os.path.join(p["base"], "config.json")
    cfg = json.load(open(path))
    cfg["vocab_size"] = 300  # wrong in the donor
    json.dump(cfg, open(path, "w"))
    out = str(tmp_path / "out")
    mergekit_lite.run(ta_plan(tmp_path, p), out)
    assert json.load(open(os.path.join(out, "config.json")))["vocab_size"] == 256


MODELING = "from .configuration_x import XConfig\nfrom . import utils_x\n\nclass XForCausalLM:\n    pass\n"


def test_companions_come_from_their_donors_and_stay_inside_them(models, tmp_path):
    p = copy_models(models, tmp_path)
    base, tok = p["base"], p["a"]
    cfg = json.load(open(os.path.join(base, "config.json")))
    cfg["auto_map"] = {"AutoConfig": "configuration_x.XConfig", "AutoModelForCausalLM": "modeling_x.XForCausalLM",
                       "AutoModel": "escape_x.X", "AutoModelForSequenceClassification": "other/repo--modeling_y.Y"}
    json.dump(cfg, open(os.path.join(base, "config.json"), "w"))
    files = {"modeling_x.py": MODELING, "configuration_x.py": "class XConfig:\n    pass\n",
             "utils_x.py": "def helper():\n    pass\n", "unrelated.py": "x = 1\n",
             "generation_config.json": '{"max_new_tokens": 7}\n'}
    for name, text in files.items():
        open(os.path.join(base, name), "w").write(text)
    secret = tmp_path / "secret.py"
    secret.write_text("TOKEN = 'do not copy'\n")
    os.symlink(secret, os.path.join(base, "escape_x.py"))
    open(os.path.join(tok, "generation_config.json"), "w").write('{"max_new_tokens": 99}\n')
    open(os.path.join(tok, "tokenization_x.py"), "w").write("class XTok:\n    pass\n")
    tcfg = json.load(open(os.path.join(tok, "tokenizer_config.json")))
    tcfg["auto_map"] = {"AutoTokenizer": ["tokenization_x.XTok", None]}
    json.dump(tcfg, open(os.path.join(tok, "tokenizer_config.json"), "w"))
    out = str(tmp_path / "out")
    mergekit_lite.run(ta_plan(tmp_path, p, f"tokenizer_source: {tok}"), out)
    got = set(os.listdir(out))
    assert {"modeling_x.py", "configuration_x.py", "utils_x.py", "tokenization_x.py"} <= got
    assert not {"escape_x.py", "unrelated.py", "modeling_y.py"} & got
    assert json.load(open(os.path.join(out, "generation_config.json"))) == {"max_new_tokens": 7}
    assert json.load(open(os.path.join(out, "config.json")))["auto_map"] == cfg["auto_map"]
    assert open(os.path.join(out, "modeling_x.py")).read() == MODELING
