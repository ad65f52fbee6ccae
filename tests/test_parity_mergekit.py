"""Parity with mergekit 0.1.5 on the same plans.

Runs mergekit (``MERGEKIT_YAML``, else ``mergekit-yaml`` on PATH; skipped when neither exists) and
mergekit-lite on the same plans (gradients and filters included) and compares:

- deterministic methods, float32 inputs: every tensor within 1e-5 relative error
  (‖a − b‖ / ‖b‖, and max |a − b| / max |b|);
- DARE/DELLA on 1024×1024 tensors: mean and norm of the merged delta (output − base) within 2%;
- bfloat16 inputs: our result is closer to a float64 reference computation than mergekit's.

One mergekit-free test compares against a simulated "math in bfloat16" computation instead.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import textwrap

import numpy as np
import pytest
import torch

import mergekit_lite
from mergekit_lite.dropin import mergekit_command
from mergekit_lite.examples import LLAMA_CONFIG, llama_shapes, random_model, save_model

from conftest import load_dir

MERGEKIT = os.environ.get("MERGEKIT_YAML") or mergekit_command()  # mergekit's, not our entry point
needs_mergekit = pytest.mark.skipif(not (MERGEKIT and os.path.exists(MERGEKIT)),
                                    reason="mergekit-yaml not found (set MERGEKIT_YAML to run the parity tests)")

MK_ARGS = ["--no-write-model-card", "--quiet", "--no-copy-tokenizer"]

# Runs many plans in one mergekit process (its import alone takes seconds): reads a JSON list of
# {cwd, args} and calls the entry point's main for each.
DRIVER = """
import json, os, sys
from {module} import {func} as entry
for job in json.load(open(sys.argv[1])):
    os.chdir(job["cwd"])
    try:
        entry(job["args"], standalone_mode=False)
    except SystemExit as exc:
        if exc.code:
            raise
"""


def run_mergekit(jobs: list[tuple[str, str, list[str]]], workdir: str) -> None:
    """Run mergekit on each (plan, out, extra args); one process when the entry point is a
    Python console script, else one call per plan."""
    with open(MERGEKIT, "rb") as fh:
        head = fh.read(4096).decode("utf-8", "replace")
    interp = head.splitlines()[0][2:].strip() if head.startswith("#!") else ""
    entry = re.search(r"^from ([\w.]+) import (\w+)", head, re.M)
    if interp and "python" in os.path.basename(interp.split()[0]) and entry:
        path = os.path.join(workdir, "mergekit_jobs.json")
        with open(path, "w") as fh:
            json.dump([{"cwd": os.path.dirname(p), "args": [p, out, *MK_ARGS, *extra]} for p, out, extra in jobs], fh)
        driver = DRIVER.format(module=entry.group(1), func=entry.group(2))
        _check(subprocess.run([*interp.split(), "-c", driver, path], capture_output=True, text=True))
        return
    for plan, out, extra in jobs:
        _check(subprocess.run([MERGEKIT, plan, out, *MK_ARGS, *extra], cwd=os.path.dirname(plan),
                              capture_output=True, text=True))


def _check(proc: subprocess.CompletedProcess) -> None:
    if proc.returncode:
        raise RuntimeError(f"mergekit failed ({proc.returncode}):\n{proc.stderr[-3000:]}")


# -- plans --------------------------------------------------------------------------------------

DETERMINISTIC = {
    "linear": """
        merge_method: linear
        models:
          - model: {a}
            parameters: {{weight: [0.5, 1.0]}}
          - model: {b}
            parameters: {{weight: 0.3}}
          - model: {c}
            parameters:
              weight:
                - filter: mlp
                  value: 0.1
                - value: 0.2
        """,
    "task_arithmetic": """
        merge_method: task_arithmetic
        base_model: {base}
        models:
          - model: {a}
            parameters: {{weight: [1.0, 0.5]}}
          - model: {b}
            parameters:
              weight:
                - filter: self_attn
                  value: 0.3
                - value: 0.8
          - model: {c}
            parameters: {{weight: -0.5}}
        parameters: {{lambda: 0.9}}
        """,
    "slerp": """
        merge_method: slerp
        base_model: {base}
        slices:
          - sources:
              - model: {base}
                layer_range: [0, 4]
              - model: {a}
                layer_range: [0, 4]
        parameters:
          t:
            - filter: self_attn
              value: [0, 0.5, 0.3, 0.7, 1]
            - filter: mlp
              value: [1, 0.5, 0.7, 0.3, 0]
            - value: 0.5
        """,
    "slices_passthrough_frankenmerge": """
        merge_method: passthrough
        slices:
          - sources: [{{model: {a}, layer_range: [0, 3]}}]
          - sources:
              - model: {b}
                layer_range: [1, 4]
                parameters:
                  scale:
                    - filter: o_proj
                      value: 0
                    - filter: down_proj
                      value: 0.5
                    - value: 1
          - sources: [{{model: {c}, layer_range: [2, 4]}}]
        """,
    "slices_solar_upscale": """
        merge_method: passthrough
        slices:
          - sources: [{{model: {base}, layer_range: [0, 3]}}]
          - sources: [{{model: {base}, layer_range: [1, 4]}}]
        """,
    "slices_gradient_slerp": """
        merge_method: slerp
        base_model: {base}
        slices:
          - sources:
              - {{model: {base}, layer_range: [0, 2]}}
              - {{model: {a}, layer_range: [0, 2]}}
          - sources:
              - {{model: {base}, layer_range: [1, 4]}}
              - {{model: {a}, layer_range: [1, 4]}}
        parameters:
          t:
            - filter: self_attn
              value: [0, 1]
            - value: [1, 0.2]
        """,
    "slices_linear_with_slice_parameters": """
        merge_method: linear
        slices:
          - sources:
              - model: {a}
                layer_range: [0, 3]
                parameters: {{weight: [1, 0]}}
              - model: {b}
                layer_range: [1, 4]
                parameters: {{weight: 0.5}}
            parameters: {{normalize: false}}
          - sources:
              - model: {c}
                layer_range: [3, 4]
                parameters: {{weight: 1}}
        """,
    "slerp_unlisted_base": """
        merge_method: slerp
        base_model: {b}
        models:
          - model: {c}
        parameters: {{t: [0.1, 0.9]}}
        """,
    "nuslerp": """
        merge_method: nuslerp
        base_model: {base}
        models:
          - model: {a}
            parameters: {{weight: [0.3, 0.8]}}
          - model: {b}
            parameters: {{weight: 0.7}}
        parameters:
          nuslerp_flatten:
            - filter: mlp
              value: false
            - value: true
          nuslerp_row_wise:
            - filter: up_proj
              value: true
            - value: false
        """,
    "nuslerp_no_base": """
        merge_method: nuslerp
        models:
          - model: {a}
            parameters: {{weight: 0.4}}
          - model: {c}
            parameters: {{weight: [0.2, 0.9]}}
        parameters: {{nuslerp_flatten: false}}
        """,
    "multislerp": """
        merge_method: multislerp
        base_model: {base}
        models:
          - model: {a}
            parameters: {{weight: 0.5}}
          - model: {b}
            parameters: {{weight: [0.3, 0.1]}}
          - model: {c}
            parameters: {{weight: 0.2}}
        """,
    "multislerp_no_base": """
        merge_method: multislerp
        models:
          - model: {a}
            parameters: {{weight: 0.5}}
          - model: {b}
            parameters: {{weight: 0.3}}
          - model: {base}
            parameters: {{weight: 0.2}}
        parameters: {{normalize_weights: false}}
        """,
    "karcher": """
        merge_method: karcher
        models:
          - model: {a}
          - model: {b}
          - model: {c}
        parameters:
          max_iter:
            - filter: mlp
              value: 20
            - value: 5
          tol: 1.0e-6
        """,
    "karcher_unlisted_base": """
        merge_method: karcher
        base_model: {base}
        models:
          - model: {a}
          - model: {b}
        """,
    "ties": """
        merge_method: ties
        base_model: {base}
        models:
          - model: {a}
            parameters: {{weight: 1.0, density: 0.5}}
          - model: {b}
            parameters:
              weight: [0.8, 0.2]
              density:
                - filter: self_attn
                  value: 0.3
                - value: 0.6
          - model: {c}
            parameters: {{weight: 0.5, density: [0.7, 0.3]}}
        parameters: {{lambda: 0.9, int8_mask: true}}
        """,
    "ties_rescale": """
        merge_method: ties
        base_model: {base}
        models:
          - model: {a}
            parameters: {{weight: 1.0}}
          - model: {c}
            parameters: {{weight: -0.5}}
        parameters: {{density: 0.4, rescale: true, normalize: false}}
        """,
    "breadcrumbs": """
        merge_method: breadcrumbs
        base_model: {base}
        models:
          - model: {a}
            parameters: {{weight: 0.7}}
          - model: {c}
            parameters: {{weight: [0.3, 0.6]}}
        parameters:
          density: 0.4
          gamma:
            - filter: mlp
              value: 0.05
            - value: 0.02
        """,
    "breadcrumbs_ties": """
        merge_method: breadcrumbs_ties
        base_model: {base}
        models:
          - model: {a}
            parameters: {{weight: 1.0, density: 0.5, gamma: 0.01}}
          - model: {b}
            parameters: {{weight: 1.0, density: 0.5, gamma: 0.0}}
          - model: {c}
            parameters: {{weight: 0.5, density: 0.5}}
        parameters: {{normalize: true, lambda: [1.0, 0.5]}}
        """,
    "model_stock": """
        merge_method: model_stock
        base_model: {base}
        models:
          - model: {a}
          - model: {b}
          - model: {c}
        """,
    "model_stock_filter_wise": """
        merge_method: model_stock
        base_model: {base}
        models:
          - model: {a}
          - model: {b}
        parameters:
          filter_wise:
            - filter: mlp
              value: true
            - value: false
        """,
    "sce": """
        merge_method: sce
        base_model: {base}
        models:
          - model: {a}
          - model: {b}
          - model: {c}
        parameters:
          select_topk:
            - filter: self_attn
              value: 0.4
            - value: [1.0, 0.5]
        """,
    "nearswap": """
        merge_method: nearswap
        base_model: {base}
        models:
          - model: {a}
        parameters: {{t: [0.001, 0.006]}}
        """,
    "arcee_fusion": """
        merge_method: arcee_fusion
        base_model: {base}
        models:
          - model: {c}
        """,
    "arcee_fusion_base_listed": """
        merge_method: arcee_fusion
        base_model: {base}
        models:
          - model: {base}
          - model: {a}
        """,
    "ram": """
        merge_method: ram
        base_model: {base}
        models:
          - model: {a}
          - model: {b}
          - model: {c}
        parameters:
          epsilon:
            - filter: mlp
              value: 0.002
            - value: [0.0005, 0.003]
        """,
    "ram_defaults": """
        merge_method: ram
        base_model: {base}
        models:
          - model: {a}
          - model: {b}
        """,
    "ramplus_tl": """
        merge_method: ramplus_tl
        base_model: {base}
        models:
          - model: {a}
          - model: {b}
          - model: {c}
        parameters:
          r: [0.1, 0.8]
          alpha:
            - filter: self_attn
              value: 0.5
            - value: 0.2
          epsilon: 0.003
        """,
    "ramplus_tl_defaults": """
        merge_method: ramplus_tl
        base_model: {base}
        models:
          - model: {b}
          - model: {a}
        """,
}

RANDOM = {
    "dare_linear": """
        merge_method: dare_linear
        base_model: {base}
        models:
          - model: {a}
            parameters: {{weight: 0.6, density: 0.5}}
          - model: {b}
            parameters: {{weight: 0.4, density: 0.3}}
        """,
    "dare_ties": """
        merge_method: dare_ties
        base_model: {base}
        models:
          - model: {a}
            parameters: {{weight: 1.0, density: 0.5}}
          - model: {b}
            parameters: {{weight: 0.7, density: 0.6}}
        parameters: {{normalize: true}}
        """,
    "della": """
        merge_method: della
        base_model: {base}
        models:
          - model: {a}
            parameters: {{weight: 1.0, density: 0.5}}
          - model: {b}
            parameters: {{weight: 0.7, density: 0.6}}
        parameters: {{epsilon: 0.15}}
        """,
    "della_linear": """
        merge_method: della_linear
        base_model: {base}
        models:
          - model: {a}
            parameters: {{weight: 0.6, density: 0.7}}
          - model: {b}
            parameters: {{weight: 0.4, density: 0.4}}
        parameters: {{epsilon: 0.1}}
        """,
}

# slerp and linear are left out: mergekit 0.1.5 computes those in float32 too (the results tie)
BF16 = ["task_arithmetic", "ties", "breadcrumbs_ties", "sce", "model_stock", "nearswap", "nuslerp", "multislerp",
        "karcher"]

BIG_CONFIG = dict(LLAMA_CONFIG, hidden_size=1024, intermediate_size=1024, num_hidden_layers=1,
                  num_attention_heads=8, num_key_value_heads=8, head_dim=128)


def _big_models(root: str) -> dict[str, str]:
    """base + two fine-tunes with 1024×1024 tensors whose task vectors have a non-zero mean."""
    base = random_model(llama_shapes(BIG_CONFIG), seed=3)
    rng = np.random.default_rng(0)
    paths = {"base": save_model(os.path.join(root, "base"), base, BIG_CONFIG, tokenizer=False)}
    for name, (mu, sd) in {"a": (0.003, 0.003), "b": (0.002, 0.004)}.items():
        ft = {k: (v + mu + rng.normal(0, sd, v.shape)).astype(np.float32) for k, v in base.items()}
        paths[name] = save_model(os.path.join(root, name), ft, BIG_CONFIG, tokenizer=False)
    return paths


def _bf16_models(models, root: str) -> dict[str, str]:
    out = {}
    for name, ts in models["tensors"].items():
        cfg = dict(LLAMA_CONFIG, torch_dtype="bfloat16")
        out[name] = save_model(os.path.join(root, name), {k: torch.from_numpy(v).bfloat16() for k, v in ts.items()},
                               cfg)
    return out


def _write(root: str, name: str, template: str, paths: dict[str, str], dtype: str | None) -> str:
    text = textwrap.dedent(template.format(**paths)) + (f"dtype: {dtype}\n" if dtype else "")
    path = os.path.join(root, f"{name}.yml")
    with open(path, "w") as fh:
        fh.write(text)
    return path


@pytest.fixture(scope="module")
def parity(models, tmp_path_factory):
    root = str(tmp_path_factory.mktemp("parity"))
    paths = dict(models["paths"])
    big = _big_models(os.path.join(root, "big"))
    bf16 = _bf16_models(models, os.path.join(root, "bf16"))
    runs = []  # (key, plan, seed)
    for name, tpl in DETERMINISTIC.items():
        runs.append((f"det_{name}", _write(root, f"det_{name}", tpl, paths, "float32"), None))
    for name, tpl in RANDOM.items():
        runs.append((f"rnd_{name}", _write(root, f"rnd_{name}", tpl, big, "float32"), 1))
    for name in BF16:
        runs.append((f"bf16_{name}", _write(root, f"bf16_{name}", DETERMINISTIC[name], bf16, None), None))
    run_mergekit([(plan, os.path.join(root, "mk_" + key), ["--random-seed", str(seed)] if seed is not None else [])
                  for key, plan, seed in runs], root)
    for key, plan, seed in runs:
        mergekit_lite.run(plan, os.path.join(root, "ml_" + key), seed=seed, device="cpu")
    return {"root": root, "big": big, "bf16": bf16}


def _pair(parity, key):
    return load_dir(os.path.join(parity["root"], "ml_" + key)), load_dir(os.path.join(parity["root"], "mk_" + key))


@needs_mergekit
@pytest.mark.parametrize("name", sorted(DETERMINISTIC))
def test_deterministic_method_matches_mergekit(parity, name):
    ours, theirs = _pair(parity, f"det_{name}")
    assert set(ours) == set(theirs)
    for k in theirs:
        a, b = ours[k].double(), theirs[k].double()
        assert ours[k].dtype == theirs[k].dtype == torch.float32
        if not b.any():  # e.g. a projection zeroed by passthrough's scale
            assert not a.any(), k
            continue
        rel = float((a - b).norm() / b.norm())
        rel_max = float((a - b).abs().max() / b.abs().max())
        assert rel <= 1e-5 and rel_max <= 1e-5, f"{k}: relative error {rel:.2e} (max-abs {rel_max:.2e})"


@needs_mergekit
@pytest.mark.parametrize("name", sorted(n for n in DETERMINISTIC if n.startswith("slices_")))
def test_slice_plan_config_matches_mergekit(parity, name):
    root = parity["root"]
    ours = json.load(open(os.path.join(root, f"ml_det_{name}", "config.json")))
    theirs = json.load(open(os.path.join(root, f"mk_det_{name}", "config.json")))
    assert ours["num_hidden_layers"] == theirs["num_hidden_layers"]


@needs_mergekit
@pytest.mark.parametrize("name", sorted(RANDOM))
def test_random_method_is_statistically_equivalent_to_mergekit(parity, name):
    ours, theirs = _pair(parity, f"rnd_{name}")
    base = load_dir(parity["big"]["base"])
    big = [k for k, v in base.items() if v.numel() >= 1 << 20]
    assert len(big) >= 7
    for k in big:
        d_ours, d_theirs = (ours[k].double() - base[k].double()), (theirs[k].double() - base[k].double())
        mean_dev = abs(d_ours.mean().item() / d_theirs.mean().item() - 1)
        norm_dev = abs(d_ours.norm().item() / d_theirs.norm().item() - 1)
        assert mean_dev < 0.02 and norm_dev < 0.02, f"{k}: mean {mean_dev:.2%}, norm {norm_dev:.2%}"


def _float64_reference(name, tensors, k):
    """The method's formula in numpy float64 on the (bfloat16-valued) inputs, for tensor k."""
    from test_methods_model_stock_sce_nearswap import np_model_stock, np_sce
    from test_methods_multislerp_karcher import np_karcher, np_multislerp
    from test_methods_slerp import np_nuslerp
    from test_methods_breadcrumbs import np_breadcrumbs_mask
    from test_methods_ties import np_ties

    base, a, b, c = (tensors[m][k].double().numpy() for m in ("base", "a", "b", "c"))
    parts = k.split(".")
    pos = int(parts[2]) / 3 if len(parts) > 2 and parts[1] == "layers" else 0.0
    if name == "task_arithmetic":
        wa, wb = 1.0 - 0.5 * pos, (0.3 if "self_attn" in k else 0.8)
        return base + 0.9 * (wa * (a - base) + wb * (b - base) - 0.5 * (c - base))
    if name == "ties":
        db = 0.3 if "self_attn" in k else 0.6
        return np_ties([a, b, c], base, [1.0, 0.8 - 0.6 * pos, 0.5], [0.5, db, 0.7 - 0.4 * pos], 0.9)
    if name == "breadcrumbs_ties":
        wt = [w * np.where(np_breadcrumbs_mask(x - base, 0.5, g), x - base, 0.0)
              for w, x, g in zip([1.0, 1.0, 0.5], [a, b, c], [0.01, 0.0, 0.01])]
        elected = np.where(sum(wt) >= 0, 1.0, -1.0)
        agree = [np.sign(x) == elected for x in wt]
        div = sum(np.where(ag, w, 0.0) for ag, w in zip(agree, [1.0, 1.0, 0.5]))
        return base + (1.0 - 0.5 * pos) * sum(np.where(ag, x, 0.0) for ag, x in zip(agree, wt)) / np.where(div == 0, 1, div)
    if name == "sce":
        return np_sce([a, b, c], base, 0.4 if "self_attn" in k else 1.0 - 0.5 * pos)
    if name == "model_stock":
        return np_model_stock([a, b, c], base)
    if name == "nearswap":
        t = 0.001 + 0.005 * pos
        w = np.clip(t / np.maximum(np.abs(base - a), 1e-6), 0, 1)
        return w * a + (1 - w) * base
    if name == "nuslerp":
        t = 0.7 / (0.3 + 0.5 * pos + 0.7)
        return base + np_nuslerp(t, a - base, b - base, flatten="mlp" not in k, row_wise="up_proj" in k)
    if name == "multislerp":
        return np_multislerp([a, b, c], [0.5, 0.3 - 0.2 * pos, 0.2], base)
    if name == "karcher":
        return np_karcher([a, b, c], [1.0, 1.0, 1.0], max_iter=20 if "mlp" in k else 5, tol=1e-6)
    raise KeyError(name)


@needs_mergekit
@pytest.mark.parametrize("name", BF16)
def test_bfloat16_inputs_give_a_result_closer_to_float64_than_mergekit(parity, name):
    ours, theirs = _pair(parity, f"bf16_{name}")
    tensors = {m: load_dir(p) for m, p in parity["bf16"].items()}
    err_ours = err_theirs = 0.0
    for k in theirs:
        assert ours[k].dtype == theirs[k].dtype == torch.bfloat16
        ref = _float64_reference(name, tensors, k)
        err_ours += float(((ours[k].double().numpy() - ref) ** 2).sum())
        err_theirs += float(((theirs[k].double().numpy() - ref) ** 2).sum())
    assert err_ours < err_theirs, f"ours {err_ours ** 0.5:.3e} vs mergekit {err_theirs ** 0.5:.3e}"


def test_bfloat16_math_in_float32_beats_math_in_bfloat16(models):
    """Without mergekit: task arithmetic on bfloat16 inputs, ours (float32 math, one final rounding)
    against the same formula evaluated in bfloat16 (what computing in the storage dtype does)."""
    from mergekit_lite.methods.task_arithmetic import task_arithmetic
    from mergekit_lite.methods.ties import ties
    from test_methods_ties import np_ties

    tt = models["tensors"]
    err = {"ours_ta": 0.0, "bf16_ta": 0.0, "ours_ties": 0.0, "bf16_ties": 0.0}
    w = [0.3, 0.7, -0.45]
    for k in tt["base"]:
        base, *ms = (torch.from_numpy(tt[m][k]).bfloat16() for m in ("base", "a", "b", "c"))
        b64, m64 = base.double().numpy(), [m.double().numpy() for m in ms]
        ref = b64 + 0.9 * sum(wi * (m - b64) for wi, m in zip(w, m64))
        ours = task_arithmetic(ms, base, weight=w, lambda_=0.9, normalize=False).bfloat16()
        sim = base + torch.tensor(0.9, dtype=torch.bfloat16) * sum(
            torch.tensor(wi, dtype=torch.bfloat16) * (m - base) for wi, m in zip(w, ms))
        err["ours_ta"] += float(((ours.double().numpy() - ref) ** 2).sum())
        err["bf16_ta"] += float(((sim.double().numpy() - ref) ** 2).sum())
        ref = np_ties(m64, b64, [1.0, 0.8, 0.5], [0.5, 0.5, 0.5])
        ours = ties(ms, base, weight=[1.0, 0.8, 0.5], density=[0.5] * 3).bfloat16()
        deltas = [m - base for m in ms]  # bf16 task vectors, then the same formula in bf16
        from mergekit_lite.methods.sparsify import trim
        wt = [trim(d.float(), 0.5).apply_(d.float()).bfloat16() * torch.tensor(wi, dtype=torch.bfloat16)
              for d, wi in zip(deltas, [1.0, 0.8, 0.5])]
        elected = sum(wt) >= 0
        agree = [torch.where(elected, x > 0, x < 0) for x in wt]
        div = sum(ag.bfloat16() * torch.tensor(wi, dtype=torch.bfloat16) for ag, wi in zip(agree, [1.0, 0.8, 0.5]))
        sim = base + sum(x * ag for x, ag in zip(wt, agree)) / torch.where(div == 0, torch.ones_like(div), div)
        err["ours_ties"] += float(((ours.double().numpy() - ref) ** 2).sum())
        err["bf16_ties"] += float(((sim.double().numpy() - ref) ** 2).sum())
    assert err["ours_ta"] < err["bf16_ta"] and err["ours_ties"] < err["bf16_ties"], err
