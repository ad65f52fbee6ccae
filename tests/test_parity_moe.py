"""Parity with mergekit-moe 0.1.5 on the same configs (skipped without it: ``mergekit-moe`` next to
``MERGEKIT_YAML``, or on PATH).

Expert, attention, embedding and norm tensors must be equal bit for bit, and cheap_embed and hidden
routers within 1e-5 (in fact bit for bit too); random routers are drawn from another generator, so
only their shape and dtype are compared. mergekit writes transformers 5's fused expert layout
(``mlp.experts.gate_up_proj``), which :func:`unfuse` maps back to the checkpoint names we write. Both
outputs' config.json load in transformers as the same configuration. All configs run in one
mergekit process (its import alone takes seconds).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

import mergekit_lite
from mergekit_lite.dropin import mergekit_command

from conftest import REPO, load_dir, write_plan

MERGEKIT = os.environ.get("MERGEKIT_YAML") or mergekit_command()  # mergekit's, not our entry point
MOE = os.path.join(os.path.dirname(MERGEKIT), "mergekit-moe") if MERGEKIT else mergekit_command("mergekit-moe")
pytestmark = pytest.mark.skipif(not (MOE and os.path.exists(MOE)),
                                reason="mergekit-moe not found (set MERGEKIT_YAML to run the parity tests)")
MODELS = os.path.join(REPO, "merge_configs", "models")

CONFIGS = {
    "example": open(os.path.join(REPO, "merge_configs", "moe.yml")).read().replace("models/", f"{MODELS}/"),
    "cheap_embed_float32": f"""\
        base_model: {MODELS}/base
        gate_mode: cheap_embed
        dtype: float32
        experts_per_token: 1
        experts:
          - source_model: {MODELS}/ft_math
            positive_prompts: ["", "1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 and the rest", "unknown words here"]
          - source_model: {MODELS}/ft_code
            positive_prompts: ["merge", "the model weights"]
            negative_prompts: ["a b c d e f g h i j k l m n o p q r s t u v w x y z"]
          - source_model: {MODELS}/ft_chat
            positive_prompts: ["you", "is it you, that is it"]
          - source_model: {MODELS}/ft_math
            positive_prompts: ["tok1 tok2 tok3"]
        """,
    "hidden": f"""\
        base_model: {MODELS}/base
        gate_mode: hidden
        dtype: float32
        experts:
          - source_model: {MODELS}/ft_math
            positive_prompts: ["1 2 3", "9 8 7 and 6"]
            negative_prompts: ["you"]
          - source_model: {MODELS}/ft_code
            positive_prompts: ["merge the model weights"]
        """,
    "random": f"""\
        base_model: {MODELS}/base
        gate_mode: random
        experts: [{{source_model: {MODELS}/ft_code}}, {{source_model: {MODELS}/ft_chat}}]
        """,
    "qwen_shared_expert": f"""\
        base_model: {MODELS}/base
        architecture: qwen
        gate_mode: cheap_embed
        experts:
          - source_model: {MODELS}/ft_math
            positive_prompts: ["1 2 3"]
          - source_model: {MODELS}/ft_code
            positive_prompts: ["merge the model"]
        shared_experts:
          - source_model: {MODELS}/ft_math
            positive_prompts: ["the"]
            residual_scale: 0.5
        """,
}
GATES = {"example": "exact", "cheap_embed_float32": "exact", "hidden": 1e-5, "random": None,
         "qwen_shared_expert": "exact"}

DRIVER = """
import json, sys
from mergekit.scripts.moe import main
for config, out in json.load(open(sys.argv[1])):
    try:
        main([config, out, "--quiet"], standalone_mode=False)
    except SystemExit as exc:
        if exc.code:
            raise
"""


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("moe-parity")
    jobs = []
    for name, text in CONFIGS.items():
        plan = write_plan(root, text, f"{name}.yml")
        mergekit_lite.run(plan, str(root / "ours" / name))
        jobs.append((plan, str(root / "mergekit" / name)))
    with open(root / "jobs.json", "w") as fh:
        json.dump(jobs, fh)
    interp = open(MOE).readline()[2:].strip()
    r = subprocess.run([interp if interp else sys.executable, "-c", DRIVER, str(root / "jobs.json")],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return root


def unfuse(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """mergekit's fused Mixtral experts and routers under the checkpoint names."""
    out = {}
    for name, t in tensors.items():
        layer = name.split("mlp.")[0]
        if name.endswith("mlp.experts.gate_up_proj"):
            for e in range(t.shape[0]):
                w1, w3 = t[e].chunk(2, dim=0)
                out[f"{layer}block_sparse_moe.experts.{e}.w1.weight"] = w1
                out[f"{layer}block_sparse_moe.experts.{e}.w3.weight"] = w3
        elif name.endswith("mlp.experts.down_proj"):
            for e in range(t.shape[0]):
                out[f"{layer}block_sparse_moe.experts.{e}.w2.weight"] = t[e]
        elif name.endswith("mlp.gate.weight") and "experts.0.gate_proj" not in " ".join(tensors):
            out[f"{layer}block_sparse_moe.gate.weight"] = t
        else:
            out[name] = t
    return out


@pytest.mark.parametrize("name", list(CONFIGS))
def test_tensors_equal_mergekit_moe(name, outputs):
    ref = unfuse(load_dir(str(outputs / "mergekit" / name)))
    ours = load_dir(str(outputs / "ours" / name))
    assert set(ref) == set(ours)
    for key in sorted(ref):
        a, b = ref[key], ours[key]
        assert (a.dtype, a.shape) == (b.dtype, b.shape), key
        if key.endswith("gate.weight") and "shared_expert.gate" not in key:
            if GATES[name] == "exact":
                assert torch.equal(a, b), (key, (a.float() - b.float()).abs().max())
            elif GATES[name] is not None:
                assert (a.float() - b.float()).abs().max() <= GATES[name], key
        else:
            assert torch.equal(a, b), key


@pytest.mark.parametrize("name", ["example", "qwen_shared_expert"])
def test_configs_load_as_the_same_transformers_configuration(name, outputs):
    transformers = pytest.importorskip("transformers")
    ref = transformers.AutoConfig.from_pretrained(str(outputs / "mergekit" / name)).to_dict()
    ours = transformers.AutoConfig.from_pretrained(str(outputs / "ours" / name)).to_dict()
    differ = {k for k in set(ref) | set(ours) if ref.get(k) != ours.get(k)}
    assert differ <= {"_name_or_path", "pretraining_tp"}, {k: (ref.get(k), ours.get(k)) for k in differ}
