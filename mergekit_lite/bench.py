"""``mergekit-lite bench``: throughput and peak memory, side by side with mergekit when installed.

Synthetic Llama-shaped checkpoints of a chosen size are generated once (and reused), then each
scenario runs in a fresh process per tool:

- ``linear`` (and any other method named with ``--methods``): one merge of N fine-tunes;
- ``upscale``: a SOLAR-style depthwise upscale of one model (two copies, a quarter of the layers
  dropped at the seam), written as slices for mergekit;
- ``multistep``: a 3-step recipe, run by mergekit-lite in one pass and, for comparison, as three
  separate runs writing intermediates (by mergekit-lite and, when installed, by mergekit).

For each run it reports wall time, throughput (GB written per second), and peak RSS above the
interpreter's baseline (the same interpreter with the tool imported, measured separately), next to
the streaming bound (inputs + 3) × the largest tensor in float32. Machines are noisy: compare the
ratios in one run, not absolute times across runs.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from math import prod as numel  # not dtypes.numel: building the CLI parser must not import torch
from typing import Any

from .dropin import mergekit_command

_WRAP = textwrap.dedent("""
    import json, resource, subprocess, sys, time
    t = time.perf_counter()
    r = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    dt = time.perf_counter() - t
    print(json.dumps({"rc": r.returncode, "seconds": dt,
                      "maxrss": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024,
                      "stderr": r.stderr.decode(errors="replace")[-3000:]}))
""")


def add_arguments(p) -> None:
    p.add_argument("--dir", default=os.path.join(os.environ.get("TMPDIR", "/tmp"), "mergekit-lite-bench"),
                   help="work folder for the generated models and outputs [$TMPDIR/mergekit-lite-bench]")
    p.add_argument("--size-gb", type=float, default=1.0, help="size of each generated checkpoint [1.0]")
    p.add_argument("--models", type=int, default=3, help="number of fine-tunes merged [3]")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"],
                   help="storage dtype of the generated checkpoints [bfloat16]")
    p.add_argument("--methods", default="linear", help="comma-separated methods to time [linear]")
    p.add_argument("--multistep", action="store_true", help="also time a 3-step recipe")
    p.add_argument("--upscale", action="store_true", help="also time a SOLAR-style depth upscale of one model")
    p.add_argument("--mergekit", default=None, metavar="PATH",
                   help="mergekit-yaml executable [found on PATH; skipped when absent]")
    p.add_argument("--compare", default=None, metavar="DIR",
                   help="another checkout of mergekit-lite (a folder holding mergekit_lite/) timed side by side, "
                        "e.g. before and after a change")
    p.add_argument("--device", default="cpu", help="device for every tool [cpu]")
    p.add_argument("--repeat", type=int, default=1, help="runs per measurement; the fastest is kept [1]")
    p.add_argument("--hidden", type=int, default=HIDDEN, help=f"hidden size of the generated models [{HIDDEN}]")
    p.add_argument("--vocab", type=int, default=VOCAB, help=f"vocabulary size of the generated models [{VOCAB}]")
    p.add_argument("--json", action="store_true", help="print the report as JSON")


# ------------------------------------------------------------------------------------------------
# synthetic models


HIDDEN, VOCAB = 2048, 32000


def _shapes(size_gb: float, itemsize: int, h: int = HIDDEN, vocab: int = VOCAB) -> dict[str, tuple[int, ...]]:
    """Llama-like shapes (by default hidden 2048, vocab 32000) with as many layers as fit in `size_gb`."""
    inter = (h * 11 // 4 + 63) // 64 * 64
    per_layer = (4 * h * h + 3 * h * inter + 2 * h) * itemsize
    fixed = (2 * vocab * h + h) * itemsize
    layers = max(1, round((size_gb * 1e9 - fixed) / per_layer))
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, h)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes.update({p + "input_layernorm.weight": (h,), p + "self_attn.q_proj.weight": (h, h),
                       p + "self_attn.k_proj.weight": (h, h), p + "self_attn.v_proj.weight": (h, h),
                       p + "self_attn.o_proj.weight": (h, h), p + "post_attention_layernorm.weight": (h,),
                       p + "mlp.gate_proj.weight": (inter, h), p + "mlp.up_proj.weight": (inter, h),
                       p + "mlp.down_proj.weight": (h, inter)})
    shapes.update({"model.norm.weight": (h,), "lm_head.weight": (vocab, h)})
    return shapes


def _make_models(work: str, n: int, size_gb: float, dtype_name: str, h: int = HIDDEN, vocab: int = VOCAB
                 ) -> dict[str, str]:
    import torch

    from .examples import LLAMA_CONFIG, save_model

    dtype = getattr(torch, dtype_name)
    itemsize = torch.empty((), dtype=dtype).element_size()
    shapes = _shapes(size_gb, itemsize, h, vocab)
    layers = sum(1 for k in shapes if k.endswith("input_layernorm.weight"))
    heads = max(1, h // 128)
    cfg = dict(LLAMA_CONFIG, hidden_size=h, intermediate_size=shapes["model.layers.0.mlp.up_proj.weight"][0],
               vocab_size=vocab, num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
               head_dim=h // heads, torch_dtype=dtype_name)
    tag = f"{size_gb:g}gb-{dtype_name}-h{h}-v{vocab}"
    paths = {}
    for i, name in enumerate(["base"] + [f"ft{j}" for j in range(n)]):
        folder = os.path.join(work, "models", tag, name)
        paths[name] = folder
        if os.path.exists(os.path.join(folder, "config.json")):
            continue
        gen = torch.Generator().manual_seed(1234 + i)
        base_gen = torch.Generator().manual_seed(1234)
        tensors = {}
        for key, shape in shapes.items():
            t = torch.randn(shape, generator=base_gen) * 0.02
            if i:
                t += torch.randn(shape, generator=gen) * 0.002
            tensors[key] = t.to(dtype)
        save_model(folder + ".tmp", tensors, cfg, max_shard_bytes=2_000_000_000, tokenizer=False)
        os.replace(folder + ".tmp", folder)
        del tensors
    return paths


def _largest_f32(shapes: dict[str, tuple[int, ...]]) -> int:
    return max(4 * numel(s) for s in shapes.values())


# ------------------------------------------------------------------------------------------------
# plans


def _plan_single(method: str, paths: dict[str, str], n: int, dtype: str) -> str:
    fts = [paths[f"ft{j}"] for j in range(n)]
    if method == "linear":
        models = "".join(f"  - model: {p}\n    parameters: {{weight: {1.0 / n:.4f}}}\n" for p in fts)
        return f"merge_method: linear\nmodels:\n{models}dtype: {dtype}\n"
    params = {"ties": "weight: 1.0, density: 0.5", "dare_ties": "weight: 1.0, density: 0.5",
              "dare_linear": "weight: 1.0, density: 0.5", "task_arithmetic": "weight: 0.5",
              "breadcrumbs": "weight: 1.0, density: 0.9, gamma: 0.01"}.get(method, "weight: 1.0")
    models = "".join(f"  - model: {p}\n    parameters: {{{params}}}\n" for p in fts)
    return f"merge_method: {method}\nbase_model: {paths['base']}\nmodels:\n{models}dtype: {dtype}\n"


def _plan_steps(paths: dict[str, str], dtype: str, inter: dict[str, str] | None) -> list[str]:
    """The 3-step recipe, as one multi-document plan (`inter` None) or as three separate plans whose
    intermediates live in the folders `inter` names."""
    a, b, c, base = paths["ft0"], paths["ft1"], paths.get("ft2", paths["ft0"]), paths["base"]
    s1 = f"merge_method: linear\nmodels:\n  - {{model: {a}, parameters: {{weight: 0.5}}}}\n" \
         f"  - {{model: {b}, parameters: {{weight: 0.5}}}}\ndtype: {dtype}\n"
    one = inter["one"] if inter else "one"
    s2 = f"merge_method: task_arithmetic\nbase_model: {base}\nmodels:\n  - {{model: {one}, parameters: {{weight: 1.0}}}}\n" \
         f"  - {{model: {c}, parameters: {{weight: -0.3}}}}\ndtype: {dtype}\n"
    two = inter["two"] if inter else "two"
    s3 = f"merge_method: linear\nmodels:\n  - {{model: {two}, parameters: {{weight: 0.7}}}}\n" \
         f"  - {{model: {a}, parameters: {{weight: 0.3}}}}\ndtype: {dtype}\n"
    if inter is None:
        return ["name: one\n" + s1 + "---\nname: two\n" + s2 + "---\n" + s3]
    return [s1, s2, s3]


# ------------------------------------------------------------------------------------------------
# measuring


def _measure(cmd: list[str], repeat: int, cleanup: list[str], env: dict[str, str] | None = None) -> dict[str, Any]:
    best: dict[str, Any] | None = None
    for _ in range(max(1, repeat)):
        for path in cleanup:
            shutil.rmtree(path, ignore_errors=True)
        out = subprocess.run([sys.executable, "-c", _WRAP, *cmd], capture_output=True, text=True,
                             env={**os.environ, **env} if env else None)
        result = json.loads(out.stdout)
        if result["rc"] != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{result['stderr']}")
        if best is None or result["seconds"] < best["seconds"]:
            best = result
    return best


def _mergekit_python(mk: str) -> str:
    with open(mk, "rb") as fh:
        first = fh.readline().decode(errors="replace").strip()
    return first[2:].strip() if first.startswith("#!") else sys.executable


def _row(name: str, tool: str, result: dict, baseline: int, written: int, bound: int) -> dict:
    extra = max(0, result["maxrss"] - baseline)
    return {"scenario": name, "tool": tool, "seconds": round(result["seconds"], 3),
            "gb_per_s": round(written / 1e9 / result["seconds"], 4), "peak_rss_over_baseline": extra,
            "bound": bound, "within_bound": extra <= bound}


class _Tool:
    """One engine to time: its command line for a plan, its environment, its import-only RSS."""

    def __init__(self, name: str, command, env: dict[str, str] | None, baseline_cmd: list[str]):
        self.name = name
        self.command = command  # (plan, out) -> argv
        self.env = env
        self.baseline = _measure(baseline_cmd, 1, [], env)["maxrss"]


def _tools(args) -> list[_Tool]:
    """mergekit-lite; another checkout of it (``--compare``); mergekit when installed."""
    here = [sys.executable, "-c", "import torch, mergekit_lite.merge, mergekit_lite.executor"]

    def ours(plan: str, out: str) -> list[str]:
        return [sys.executable, "-m", "mergekit_lite", "run", plan, out, "--overwrite", "-q", "--device", args.device]

    tools = [_Tool("mergekit-lite", ours, None, here)]
    if args.compare:
        src = os.path.abspath(args.compare)
        if not os.path.isdir(os.path.join(src, "mergekit_lite")):
            raise SystemExit(f"--compare {args.compare}: no mergekit_lite package there")
        tools.append(_Tool(f"mergekit-lite ({os.path.basename(src)})", ours, {"PYTHONPATH": src}, here))
    mk = args.mergekit or mergekit_command()  # mergekit's, not our mergekit-yaml entry point
    if mk and not os.path.exists(mk):
        raise SystemExit(f"--mergekit {mk}: not found")
    if mk:
        extra = ["--cuda"] if args.device.startswith("cuda") else []
        tools.append(_Tool("mergekit", lambda plan, out: [mk, plan, out, *extra], None,
                           [_mergekit_python(mk), "-c", "import mergekit.merge, mergekit.scripts.run_yaml"]))
    return tools


class _Bench:
    """The scenarios of one ``bench`` run, every tool on each, rows in the order measured."""

    def __init__(self, args):
        self.args = args
        self.work = os.path.abspath(args.dir)
        os.makedirs(os.path.join(self.work, "plans"), exist_ok=True)
        self.n = args.models
        self.paths = _make_models(self.work, max(self.n, 3 if args.multistep else self.n), args.size_gb, args.dtype,
                                  args.hidden, args.vocab)
        self.tools = _tools(args)
        self.itemsize = {"bfloat16": 2, "float16": 2, "float32": 4}[args.dtype]
        self.shapes = _shapes(args.size_gb, self.itemsize, args.hidden, args.vocab)
        self.largest = _largest_f32(self.shapes)
        self.written = sum(numel(s) for s in self.shapes.values()) * self.itemsize
        self.rows: list[dict] = []

    def plan(self, name: str, text: str) -> str:
        path = os.path.join(self.work, "plans", name)
        with open(path, "w") as fh:
            fh.write(text)
        return path

    def time_all(self, scenario: str, plan: str, written: int, bound: int) -> None:
        out = os.path.join(self.work, "out")
        for tool in self.tools:
            r = _measure(tool.command(plan, out), self.args.repeat, [out], tool.env)
            self.rows.append(_row(scenario, tool.name, r, tool.baseline, written, bound))
        shutil.rmtree(out, ignore_errors=True)

    def single(self, method: str) -> None:
        from . import methods as registry

        registry.get(method)
        plan = self.plan(f"{method}.yml", _plan_single(method, self.paths, self.n, self.args.dtype))
        bound = (self.n + (method != "linear") + 3) * self.largest
        self.time_all(f"{method} {self.n}x{self.args.size_gb:g}GB", plan, self.written, bound)

    def upscale(self) -> None:
        layers = sum(1 for k in self.shapes if k.endswith("input_layernorm.weight"))
        drop = max(1, layers // 4) if layers > 2 else 0
        ranges = [(0, layers - drop), (drop, layers)]
        plan = self.plan("upscale.yml", "merge_method: passthrough\nslices:\n" + "".join(
            f"  - sources: [{{model: {self.paths['base']}, layer_range: [{a}, {b}]}}]\n" for a, b in ranges)
            + f"dtype: {self.args.dtype}\n")
        per_layer = sum(numel(v) for k, v in self.shapes.items() if ".layers.0." in k) * self.itemsize
        self.time_all(f"upscale {self.args.size_gb:g}GB x2", plan, self.written + (layers - 2 * drop) * per_layer,
                      4 * self.largest)

    def multistep(self) -> None:
        name = f"3-step recipe {self.args.size_gb:g}GB"
        bound = (4 + 3) * self.largest
        for tool in self.tools:
            if tool.name.startswith("mergekit-lite"):
                plan = self.plan("multistep.yml", _plan_steps(self.paths, self.args.dtype, None)[0])
                out = os.path.join(self.work, "out")
                r = _measure(tool.command(plan, out), self.args.repeat, [out], tool.env)
                self.rows.append(_row(name, tool.name + " (one pass)", r, tool.baseline, self.written, bound))
        for tool in self.tools:
            self.rows.append(_row(name, tool.name + " (3 runs)", self.staged(tool), tool.baseline, self.written, bound))

    def staged(self, tool: _Tool) -> dict[str, Any]:
        """The recipe as three runs with intermediates on disk: total time, largest RSS."""
        inter = {"one": os.path.join(self.work, "inter-one"), "two": os.path.join(self.work, "inter-two")}
        targets = [inter["one"], inter["two"], os.path.join(self.work, "out-stages")]
        total = {"seconds": 0.0, "maxrss": 0}
        for i, (text, target) in enumerate(zip(_plan_steps(self.paths, self.args.dtype, inter), targets)):
            r = _measure(tool.command(self.plan(f"stage{i + 1}.yml", text), target), 1, [target], tool.env)
            total["seconds"] += r["seconds"]
            total["maxrss"] = max(total["maxrss"], r["maxrss"])
        for t in targets:
            shutil.rmtree(t, ignore_errors=True)
        return total


def run_bench(args) -> dict[str, Any]:
    bench = _Bench(args)
    for method in [m.strip() for m in args.methods.split(",") if m.strip()]:
        bench.single(method)
    if args.upscale:
        bench.upscale()
    if args.multistep:
        bench.multistep()
    report = _report(bench.rows)
    if not any(t.name == "mergekit" for t in bench.tools):
        report["text"] += "\nmergekit not found (pip install mergekit, or pass --mergekit PATH): its columns are skipped"
    report.update(largest_tensor_f32=bench.largest, bytes_written=bench.written,
                  baseline_rss={t.name: t.baseline for t in bench.tools})
    return report


def _report(rows: list[dict]) -> dict[str, Any]:
    """The table, and each other tool's time and RSS as ratios to mergekit-lite's (the first row)."""
    lines = [f"{'scenario':<26} {'tool':<34} {'seconds':>8} {'GB/s':>8} {'peak RSS - base':>16} {'bound':>10}"]
    for r in rows:
        lines.append(f"{r['scenario']:<26} {r['tool']:<34} {r['seconds']:>8.2f} {r['gb_per_s']:>8.3f} "
                     f"{r['peak_rss_over_baseline'] / 1e6:>13.0f} MB {r['bound'] / 1e6:>7.0f} MB"
                     + ("" if r["within_bound"] else "  (over)"))
    ratios = []
    for scenario in dict.fromkeys(r["scenario"] for r in rows):
        group = [r for r in rows if r["scenario"] == scenario]
        lite = group[0]
        for other in group[1:]:
            ratios.append({"scenario": scenario, "versus": other["tool"],
                           "speedup": round(other["seconds"] / lite["seconds"], 2),
                           "rss_ratio": round(lite["peak_rss_over_baseline"] / max(1, other["peak_rss_over_baseline"]), 2)})
            lines.append(f"{scenario}: mergekit-lite is {ratios[-1]['speedup']}x as fast as {other['tool']}, "
                         f"peak RSS {ratios[-1]['rss_ratio']}x of it")
    return {"rows": rows, "ratios": ratios, "text": "\n".join(lines)}
